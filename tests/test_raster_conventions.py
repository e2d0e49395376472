"""GeoTIFF conventions of other writers (GDAL, QGIS, terra, lidR, PDAL): nodata strings, sparse blocks,
PackBits/LZMA, negative y scales, several tiepoints, GCPs, geographic CRSs, scaled-integer CHMs.

Files are built with tifffile and the GeoTIFF tags written by hand, as those tools write them.
"""
import logging
import struct
import warnings

import numpy as np
import pytest
import tifffile

import gaps
from lib.geoio import tiff_codecs
from lib.core.errors import RasterError
from lib.geoio.geotiff_read import check_heights, read_info, read_raster
from tests.test_geotiff import tiff_bytes

UTM_KEYS = (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32633)  # projected, EPSG:32633


def geotags(scale=(0.5, 0.5), tiepoints=(0, 0, 0, 500000.0, 6000000.0, 0), keys=UTM_KEYS, nodata=None):
    """extratags: ModelPixelScale, ModelTiepoint, GeoKeyDirectory, GDAL_NODATA (ASCII, as GDAL writes it)."""
    tags = [(34735, "H", len(keys), keys, True)]
    if scale is not None:
        tags.append((33550, "d", 3, (*scale, 0.0), True))
    if tiepoints is not None:
        tags.append((33922, "d", len(tiepoints), tiepoints, True))
    if nodata is not None:
        tags.append((42113, "s", 0, nodata, True))
    return tags


def heights(shape=(64, 80), dtype=np.float32) -> np.ndarray:
    """A CHM-like surface in metres (15 to 25 m) with one 12 x 20 px clearing at 1 m."""
    z = 20 + 5 * np.random.default_rng(0).uniform(-1, 1, shape)
    z[20:32, 30:50] = 1.0
    return z.astype(dtype)


# ----------------------------------------------------------------------------- nodata
@pytest.mark.parametrize("dtype,fill,text", [
    (np.float32, -3.4028234663852886e38, "-3.4028234663852886e+38"),  # GDAL, terra: -FLT_MAX as %.18g
    (np.float32, -3.4028234663852886e38, "-3.4028235e+38"),  # numpy's str(np.finfo(np.float32).min)
    (np.float32, 3.4e38, "3.4e38"),
    (np.float32, np.nan, "nan"), (np.float32, np.nan, "-nan"), (np.float32, np.nan, "NaN"),
    (np.float32, -9999, " -9999 "), (np.float32, -9999, "-9999\0"), (np.float32, 0, "0"),
    (np.float64, -3.4028234663852886e38, "-3.4028234663852886e+38"),
    (np.int16, -32768, "-32768"), (np.int16, -32768, "-32768.0"), (np.uint16, 65535, "65535"),
    (np.int32, -9999, "-9999")])
def test_declared_nodata_becomes_nan_without_noise(tmp_path, caplog, dtype, fill, text):
    values = heights(dtype=dtype)
    values[:5] = fill
    tifffile.imwrite(tmp_path / "n.tif", values, extratags=geotags(nodata=text))
    with caplog.at_level(logging.DEBUG, logger="tifffile"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fill-value warning either: the nodata is declared
        got, _ = read_raster(tmp_path / "n.tif")
    assert np.isnan(got[:5]).all() and np.isfinite(got[5:]).all()
    assert not [r for r in caplog.records if "GDAL_NODATA" in r.getMessage()]  # tifffile's float32 complaint


def test_sparse_blocks_read_as_nodata(tmp_path):
    """GDAL's SPARSE_OK=TRUE leaves all-nodata tiles out (byte count 0); GDAL reads them as nodata."""
    values = heights((96, 96))
    values[:32, :64] = -9999.0  # tiles 0 and 1 of the 3 x 3 grid of 32 x 32 tiles
    for nodata, expected_fill in (("-9999", np.nan), (None, 0.0)):
        path = tmp_path / f"sparse_{nodata}.tif"
        tifffile.imwrite(path, values, tile=(32, 32), extratags=geotags(nodata=nodata))
        data = bytearray(path.read_bytes())
        with tifffile.TiffFile(path) as tif:
            counts = tif.pages[0].tags[325]
            width = {3: 2, 4: 4, 16: 8}[int(counts.dtype)]
            for i in (0, 1):
                struct.pack_into(f"<{'HIQ'[width // 4]}", data, counts.valueoffset + i * width, 0)
        path.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 9999 fill without a nodata tag: not this test
            got, _ = read_raster(path)
            part, _ = read_raster(path, window=(10, 20, 30, 30))  # crosses stored and sparse tiles
        expected = values.copy()
        expected[:32, :64] = expected_fill
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(part, expected[10:40, 20:50])


# ----------------------------------------------------------------------------- compression
def packbits_reference_decode(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        n = data[i]
        if n < 128:
            out += data[i + 1 : i + 2 + n]
            i += n + 2
        elif n > 128:
            out += data[i + 1 : i + 2] * (257 - n)
            i += 2
        else:
            i += 1
    return bytes(out)


def packbits_encode(data: bytes) -> bytes:
    """Reference encoder: runs of >= 3 equal bytes as repeats, the rest as literals, a no-op now and then."""
    out, i = bytearray(b"\x80"), 0
    while i < len(data):
        j = i
        while j < len(data) and j - i < 128 and data[j] == data[i]:
            j += 1
        if j - i >= 3:
            out += bytes([257 - (j - i), data[i]])
            i = j
        else:
            n = min(128, len(data) - i)
            out += bytes([n - 1]) + data[i : i + n]
            i += n
    return bytes(out)


def test_packbits_decoder_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(200):
        parts = []
        for _ in range(rng.integers(0, 30)):
            n = int(rng.integers(0, 256))
            parts.append(bytes([n]) + (rng.integers(0, 256, n + 1, dtype=np.uint8).tobytes() if n < 128
                                       else bytes([n % 7]) if n > 128 else b""))
        stream = b"".join(parts)
        assert tiff_codecs.packbits_decode(stream) == packbits_reference_decode(stream)
    with pytest.raises(ValueError, match="passes the end"):
        tiff_codecs.packbits_decode(b"\x05ab")


@pytest.mark.filterwarnings("ignore:.*no georeferencing:UserWarning")
def test_packbits_and_lzma_files_read(tmp_path):
    values = heights((37, 45))
    values[:, :10] = -1.0  # long runs
    rows = 8
    strips = [packbits_encode(values[r : r + rows].tobytes()) for r in range(0, 37, rows)]
    (tmp_path / "pb.tif").write_bytes(tiff_bytes(strips, values.shape, np.float32, 32773, 1, rows))
    tifffile.imwrite(tmp_path / "lzma.tif", values, compression="lzma", rowsperstrip=rows)
    for name in ("pb.tif", "lzma.tif"):
        got, _ = read_raster(tmp_path / name)
        np.testing.assert_array_equal(got, values)
        part, _ = read_raster(tmp_path / name, window=(9, 3, 20, 30))
        np.testing.assert_array_equal(part, values[9:29, 3:33])


# ----------------------------------------------------------------------------- georeferencing
def test_negative_y_scale_is_north_up_as_in_gdal(tmp_path):
    tifffile.imwrite(tmp_path / "neg.tif", heights(), extratags=geotags(scale=(0.5, -0.5)))
    info = read_info(tmp_path / "neg.tif")
    assert info.pixel_size == (0.5, 0.5) and info.origin == (500000.0, 6000000.0)


def test_south_up_and_gcps_are_refused_with_a_hint(tmp_path):
    south_up = (0.5, 0, 0, 500000.0, 0, 0.5, 0, 6000000.0, 0, 0, 0, 0, 0, 0, 0, 1)
    tifffile.imwrite(tmp_path / "south.tif", heights(), extratags=[*geotags(scale=None, tiepoints=None),
                                                                   (34264, "d", 16, south_up, True)])
    with pytest.raises(RasterError, match=r"(?s)south.tif: pixel size \(0.5, 0.5\) is not north-up.*gdalwarp"):
        read_info(tmp_path / "south.tif")
    gcps = (0, 0, 0, 500000.0, 6000000.0, 0, 79, 63, 0, 500040.0, 5999968.0, 0)
    tifffile.imwrite(tmp_path / "gcps.tif", heights(), extratags=geotags(scale=None, tiepoints=gcps))
    with pytest.raises(RasterError, match=r"(?s)gcps.tif: georeferenced by 2 ground control points.*gdalwarp"):
        read_info(tmp_path / "gcps.tif")


def test_several_tiepoints_with_a_scale_use_the_first(tmp_path):
    tiepoints = (10, 20, 0, 500005.0, 5999990.0, 0, 79, 63, 0, 500039.5, 5999968.5, 0)
    tifffile.imwrite(tmp_path / "t.tif", heights(), extratags=geotags(tiepoints=tiepoints))
    info = read_info(tmp_path / "t.tif")
    assert info.pixel_size == (0.5, 0.5) and info.origin == (500000.0, 6000000.0)


def test_geographic_crs_is_refused_and_feet_warn(tmp_path):
    wgs84 = (1, 1, 0, 2, 1024, 0, 1, 2, 2048, 0, 1, 4326)
    tifffile.imwrite(tmp_path / "ll.tif", heights(), extratags=geotags(scale=(1e-5, 1e-5), keys=wgs84))
    with pytest.raises(RasterError, match=r"(?s)ll.tif: the CRS is geographic \(EPSG:4326.*gdalwarp -t_srs"):
        read_raster(tmp_path / "ll.tif")
    feet = (1, 1, 0, 3, 1024, 0, 1, 1, 3072, 0, 1, 2227, 3076, 0, 1, 9002)
    tifffile.imwrite(tmp_path / "ft.tif", heights(), extratags=geotags(keys=feet))
    with pytest.warns(UserWarning, match=r"ft.tif: the CRS's linear unit is EPSG:9002, not metres"):
        read_info(tmp_path / "ft.tif")


# ----------------------------------------------------------------------------- scripts, units
def test_gaps_script_keeps_the_grid_of_a_gdal_style_int16_chm(tmp_path):
    """int16 CHM, nodata -32768, negative y scale: gap ids readable by tifffile, on the input's grid."""
    chm = heights().astype(np.int16)  # whole metres
    chm[:5] = -32768
    tifffile.imwrite(tmp_path / "chm.tif", chm, compression="zlib", predictor=2,
                     extratags=geotags(scale=(0.5, -0.5), nodata="-32768"))
    assert gaps.main(["--chm", str(tmp_path / "chm.tif"), "--thresholds", "5", "--out", str(tmp_path / "out")]) == 0
    labels = tifffile.imread(tmp_path / "out" / "gaps_5m.tif")
    assert labels.shape == chm.shape and set(np.unique(labels)) == {0, 1}
    assert np.array_equal(np.argwhere(labels == 1).min(0), (20, 30)) and (labels == 1).sum() == 12 * 20
    out, src = read_info(tmp_path / "out" / "gaps_5m.tif"), read_info(tmp_path / "chm.tif")
    assert (out.pixel_size, out.origin, out.epsg) == (src.pixel_size, src.origin, 32633)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp files


def test_chm_in_centimetres_warns():
    chm = heights() * 100
    with pytest.warns(UserWarning, match=r"chm_cm.tif: the median canopy height is .* not a CHM in metres"):
        check_heights(chm, "chm_cm.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_heights(heights(), "chm_m.tif")


def test_multiband_hint_names_a_command(tmp_path):
    tifffile.imwrite(tmp_path / "two.tif", np.stack([heights(), heights()]), planarconfig="separate",
                     extratags=geotags())
    with pytest.raises(RasterError, match=r"two.tif: expected one band, found 2\n.*gdal_translate -b 1"):
        read_raster(tmp_path / "two.tif")
