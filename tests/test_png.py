"""PNG encoding round trips (an independent decoder here, Pillow when present), the glyph table, the
plot renderer's geometry and the hillshade quick-look's outlines."""
import math
import struct
import zlib

import numpy as np
import pytest

from lib.geoio import png


def decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder: 8-bit grey / RGB, not interlaced, filters None, Sub and Up; checks the CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, header = 8, b"", None
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (0, 2) and interlace == 0
    channels = 3 if colour == 2 else 1
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    rows = np.zeros((height, width * channels), np.uint8)
    for r in range(height):
        kind, line = raw[r, 0], raw[r, 1:].copy()
        if kind == 1:
            for c in range(channels, len(line)):
                line[c] = (int(line[c]) + int(line[c - channels])) % 256
        elif kind == 2 and r > 0:
            line = (line.astype(np.int32) + rows[r - 1]) % 256
        rows[r] = line
    return rows.reshape(height, width, channels)[..., 0] if channels == 1 else rows.reshape(height, width, 3)


@pytest.mark.parametrize("shape", [(7, 5), (1, 1), (13, 9, 3), (2, 300, 3)])
def test_png_round_trip(shape, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png.write_png(tmp_path / "a.png", image)
    np.testing.assert_array_equal(decode_png((tmp_path / "a.png").read_bytes()), image)


def test_png_opens_in_pillow_when_present(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    image = np.random.default_rng(1).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    png.write_png(tmp_path / "a.png", image)
    with image_module.open(tmp_path / "a.png") as opened:
        np.testing.assert_array_equal(np.asarray(opened), image)


def test_png_rejects_other_arrays():
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            png.encode_png(bad)


def test_glyphs_and_text_bitmap():
    assert len(png._FONT) == 46
    assert png.text_bitmap("<", scale=1).astype(int).tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert all(len(code) == 5 and set(code) <= set("01234567") for code in png._FONT.values())
    one = png.text_bitmap("1", scale=1)
    assert one.astype(int).tolist() == [[0, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 1, 1]]
    assert png.text_bitmap("10.5", scale=2).shape == (10, 2 * (4 * 4 - 1))
    assert not png.text_bitmap("  ", scale=1).any() and png.text_bitmap("", 1).shape == (5, 0)


def test_plot_draws_a_line_where_it_belongs():
    x = np.linspace(0, 10, 50)
    image = png.plot([{"x": x, "y": x, "style": "line", "colour": png.RED}], "X", "Y", size=(400, 300))
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8
    rows, cols = np.nonzero(np.all(image == png.RED, axis=2))
    assert len(rows) > 100
    slope = np.polyfit(cols, rows, 1)[0]                       # y up on screen: rows fall as x grows
    left, right, top, bottom = 78, 384, 34, 248
    assert slope == pytest.approx(-(bottom - top) / (right - left), rel=0.02)   # equal x and y ranges


def test_plot_log_axes_and_degenerate_series():
    image = png.plot([{"x": [2, 10, 50], "y": [500, 20, 0], "style": "points", "colour": png.BLUE}],
                     "SIZE", "N", log_x=True, log_y=True)
    assert np.all(image == png.BLUE, axis=2).sum() == 2 * 25     # y = 0 has no place on a log axis
    png.plot([], "X", "Y")
    png.plot([{"x": [np.nan], "y": [np.nan]}], "X", "Y")
    assert png._ticks(0, 2, log=True) == [0, 1, 2] and png._ticks(0, 50, log=False)[:3] == [0, 10, 20]


def test_band_fills_between_its_bounds():
    x = np.linspace(0, 10, 11)
    image = png.plot([{"x": x, "y": x * 0 + 2, "y_hi": x * 0 + 8, "style": "band", "colour": png.GREY},
                      {"x": x, "y": x * 0, "style": "line", "colour": png.RED},
                      {"x": x, "y": x * 0 + 10, "style": "line", "colour": png.RED}], "X", "Y")
    grey_rows = np.unique(np.nonzero(np.all(image == png.GREY, axis=2))[0])
    red_rows = np.unique(np.nonzero(np.all(image == png.RED, axis=2))[0])
    low, high = red_rows.max(), red_rows.min()                 # y = 0 and y = 10
    expected = (high + (low - high) * 0.2, high + (low - high) * 0.8)
    assert abs(grey_rows.min() - expected[0]) <= 2 and abs(grey_rows.max() - expected[1]) <= 2


def test_hillshade_outlines_and_nodata():
    dsm = np.full((30, 40), 100.0, np.float32)
    dsm[:, 35:] = np.nan
    mask = np.zeros((30, 40), np.uint8)
    mask[10:15, 5:12] = 1
    mask[0, 0] = 255                                            # nodata in a uint8 mask is not gap
    image = png.hillshade_quicklook(dsm, mask, min_side=0)
    assert image.shape == (30, 40, 3)
    flat = image[20, 20]
    assert flat[0] == flat[1] == flat[2] == int(math.sqrt(2) / 2 * 215 + 40)   # flat ground, sun at 45°
    assert (image[:, 35:] == 0).all()
    red = np.all(image == png.OUTLINE_COLOURS[0], axis=2)
    box = np.zeros_like(red)
    box[10:15, 5:12] = True
    box[11:14, 6:11] = False                                    # the ring of pixels around the gap
    np.testing.assert_array_equal(red, box)


def test_hillshade_lights_north_west_slopes_and_scales():
    rows, cols = np.indices((64, 64), dtype=np.float32)
    facing_west = png.hillshade_quicklook(cols * 1.0, np.zeros((64, 64), bool), min_side=0)   # rises eastward
    facing_east = png.hillshade_quicklook(-cols * 1.0, np.zeros((64, 64), bool), min_side=0)
    assert facing_west[32, 32, 0] > facing_east[32, 32, 0]
    big = png.hillshade_quicklook(np.zeros((100, 250), np.float32), np.zeros((2, 100, 250), np.uint8),
                                  max_side=50)
    assert big.shape == (20, 50, 3)
    small = png.hillshade_quicklook(np.zeros((10, 20), np.float32), np.ones((10, 20), bool), min_side=60)
    assert small.shape == (30, 60, 3)
    with pytest.raises(ValueError, match="do not match"):
        png.hillshade_quicklook(np.zeros((4, 4)), np.zeros((5, 4), bool))
