"""lib/geoio/tiff_codecs.py: the numpy LZW decoder against a plain-Python reference encoder (and imagecodecs when
present), the TIFF predictors against row-by-row references, and LZW GeoTIFFs written by GDAL."""
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import tifffile

from lib.geoio import tiff_codecs
from lib.geoio.geotiff_read import read_info, read_raster

try:
    import imagecodecs
except ImportError:
    imagecodecs = None


def pack_codes(codes: list) -> bytes:
    """MSB-first bit packing with the TIFF width schedule: code k after a clear is
    min(bit_length(258 + k), 12) bits wide ("early change")."""
    out, acc, n_bits, k = bytearray(), 0, 0, 0
    for code in codes:
        width = min((258 + k).bit_length(), 12)
        acc, n_bits, k = (acc << width) | code, n_bits + width, 0 if code == 256 else k + 1
        while n_bits >= 8:
            n_bits -= 8
            out.append((acc >> n_bits) & 0xFF)
        acc &= (1 << n_bits) - 1
    return bytes(out + (bytes([(acc << (8 - n_bits)) & 0xFF]) if n_bits else b""))


def lzw_codes(data: bytes) -> list[int]:
    """Reference TIFF LZW encoder in plain Python: a clear first and whenever the table is full."""
    codes, table, prefix = [256], {}, None  # table: (prefix code, next byte) -> code
    for byte in data:
        if prefix is None:
            prefix = byte
        elif (prefix, byte) in table:
            prefix = table[prefix, byte]
        else:
            codes.append(prefix)
            table[prefix, byte], prefix = 258 + len(table), byte  # 256, 257: clear and EOI
            if 258 + len(table) == 4094:
                codes.append(256)
                table = {}
    return codes + ([] if prefix is None else [prefix]) + [257]


def lzw_encode(data: bytes) -> bytes:
    """Reference TIFF LZW stream of `data` (see lzw_codes and pack_codes)."""
    return pack_codes(lzw_codes(data))


def float_predict(rows: np.ndarray) -> np.ndarray:
    """Reference predictor 3, one row at a time: big-endian byte planes, then byte differences."""
    out = []
    for row in rows.astype(rows.dtype.newbyteorder(">")):
        planes = np.frombuffer(row.tobytes(), np.uint8).reshape(len(row), -1).T.ravel()
        out.append(np.diff(planes, prepend=np.uint8(0)))
    return np.array(out, np.uint8)


def smooth(shape, dtype=np.float32) -> np.ndarray:
    """A DSM-like row-wise random walk in metres: float bytes with short repeats, as LZW meets them."""
    steps = np.random.default_rng(0).normal(0, 0.4, shape)
    return (300 + np.cumsum(steps, axis=-1)).astype(dtype)


# ----------------------------------------------------------------------------- LZW codec
@pytest.mark.parametrize("kind", ["empty", "one", "random", "runs", "alphabet4", "floats", "long"])
def test_lzw_decode_inverts_reference_encoder(kind):
    rng = np.random.default_rng(1)
    data = {"empty": b"", "one": b"x", "random": rng.integers(0, 256, 20000, np.uint8).tobytes(),
            "runs": bytes(30000) + b"\1" * 5000 + bytes(100),
            "alphabet4": rng.integers(0, 4, 30000, np.uint8).tobytes(),
            "floats": smooth((40, 100)).tobytes(),
            "long": np.repeat(rng.integers(0, 256, 300, np.uint8), rng.integers(1, 400, 300)).tobytes(),
            }[kind]
    encoded = lzw_encode(data)
    assert tiff_codecs.lzw_decode(encoded) == data
    if imagecodecs is not None:
        assert imagecodecs.lzw_decode(encoded) == data
        assert tiff_codecs.lzw_decode(imagecodecs.lzw_encode(data)) == data


def test_lzw_stream_without_eoi_and_corrupt_code():
    data = bytes(range(256)) * 4
    encoded = lzw_encode(data)
    assert tiff_codecs.lzw_decode(encoded[:-2])[:900] == data[:900]  # truncated: decodes what is there
    assert tiff_codecs.lzw_decode(pack_codes([256, 97, 98, 258, 259, 257])) == b"ababba"
    assert tiff_codecs.lzw_decode(pack_codes([256, 97, 258, 256, 98, 257])) == b"aaab"  # KwKwK, re-clear
    with pytest.raises(ValueError, match="code 300 used before it is defined"):
        tiff_codecs.lzw_decode(pack_codes([256, 97, 300, 257]))
    with pytest.raises(ValueError, match="code 258 used before"):
        tiff_codecs.lzw_decode(pack_codes([256, 258, 257]))  # first code after a clear must be a byte


@pytest.mark.parametrize("kind", ["random", "floats", "long"])
def test_old_style_lzw_decodes_as_libtiff(kind):
    """Pre-libtiff-5 streams (LSB-first codes, widened one code later) are told apart as libtiff does."""
    from tests.tiff_builder import old_lzw_encode
    rng = np.random.default_rng(3)
    data = {"random": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "floats": smooth((40, 50)).tobytes(),
            "long": bytes(range(256)) * 300}[kind]  # "long": several clears, all four code widths
    old, new = old_lzw_encode(data), lzw_encode(data)
    assert tiff_codecs.is_old_style_lzw(old) and not tiff_codecs.is_old_style_lzw(new)
    assert tiff_codecs.lzw_decode_many([new, old, new]) == [data, data, data]
    raw = tiff_codecs.decode_segments([old], 5, 1, [(1, len(data), 1)], np.dtype("u1"))[0]
    assert raw.tobytes() == data


def test_lzw_bomb_is_refused_before_it_is_allocated():
    bomb = lzw_encode(bytes(2**22))  # 4 MiB of zeros in ~6 KB
    assert len(bomb) < 2**13 and tiff_codecs.lzw_decode(bomb) == bytes(2**22)
    with pytest.raises(ValueError, match="far more bytes than its block holds"):
        tiff_codecs.lzw_decode_many([bomb], max_bytes=2**20)
    with pytest.raises(ValueError, match="far more bytes"):
        tiff_codecs.decode_segments([bomb], 5, 1, [(16, 16, 1)], np.dtype("u1"))


def test_fill_order_2_reverses_the_stored_bits_of_any_codec():
    values = smooth((6, 20)).astype("<f4")
    for compression, encode in ((1, bytes), (5, lzw_encode), (8, zlib.compress)):
        stored = tiff_codecs.reverse_bits(encode(values.tobytes()))
        got = tiff_codecs.decode_segments([stored], compression, 1, [(6, 20, 1)], np.dtype("<f4"), fill_order=2)
        np.testing.assert_array_equal(got[0][:, :, 0], values)
    assert tiff_codecs.reverse_bits(b"\x01\x80\x0f") == b"\x80\x01\xf0"


def test_deflate_must_end_as_a_whole_stream():
    """libdeflate (GDAL's inflater) needs the whole stream: a longer valid one gives its first bytes,
    a cut or corrupt one (even past the block's bytes) is an error, never a guess."""
    data = bytes(range(256)) * 8
    decode = lambda stream: tiff_codecs.decode_segments([stream], 8, 1, [(4, 256, 1)], np.dtype("u1"))[0]
    assert decode(zlib.compress(data)).tobytes() == bytes(range(256)) * 4
    assert decode(zlib.compress(data) + b"junk").tobytes() == bytes(range(256)) * 4  # after the end: ignored
    with pytest.raises(ValueError, match="cut short"):
        decode(zlib.compress(data)[:-9])
    corrupt = bytearray(zlib.compress(data, 0))  # stored blocks: the checksum catches a flipped byte
    corrupt[-20] ^= 1
    with pytest.raises(ValueError, match="corrupt deflate data"):
        decode(bytes(corrupt))


def test_predictors_invert_reference():
    z = smooth((5, 33), np.float64)
    raw = float_predict(z).tobytes()
    got = tiff_codecs.decode_segments([raw], 1, 3, [(5, 33, 1)], np.dtype("<f8"))[0][:, :, 0]
    np.testing.assert_array_equal(got, z)
    np.testing.assert_array_equal(tiff_codecs.predict_float(z), float_predict(z))
    ints = np.random.default_rng(2).integers(-30000, 30000, (4, 50)).astype(np.int16)
    diff = tiff_codecs.predict_horizontal(ints)
    np.testing.assert_array_equal(np.cumsum(diff, axis=1, dtype=np.int16), ints)
    got = tiff_codecs.decode_segments([diff.astype(">i2").tobytes()], 1, 2, [(4, 50, 1)], np.dtype(">i2"))[0]
    np.testing.assert_array_equal(got[:, :, 0], ints)


def test_real_lzw_strips_decode_like_imagecodecs_and_reencode(real_data):
    with tifffile.TiffFile(real_data / "ALS_CHM_DUC.tif") as tif:
        page = tif.pages[0]
        assert page.compression == 5
        fh = tif.filehandle
        for i in (0, len(page.dataoffsets) - 1):
            fh.seek(page.dataoffsets[i])
            stream = fh.read(page.databytecounts[i])
            decoded = tiff_codecs.lzw_decode(stream)
            assert len(decoded) == page.rowsperstrip * page.imagewidth * 4
            assert tiff_codecs.lzw_decode(lzw_encode(decoded)) == decoded
            if imagecodecs is not None:
                assert decoded == imagecodecs.lzw_decode(stream)


# ----------------------------------------------------------------------------- GDAL
@pytest.mark.skipif(shutil.which("gdal_translate") is None, reason="gdal_translate not on PATH")
@pytest.mark.parametrize("options", [["PREDICTOR=2", "TILED=YES"], ["PREDICTOR=3"],
                                     ["PREDICTOR=1", "BLOCKYSIZE=5"]])
def test_gdal_lzw_files_read_like_source(tmp_path, real_data, options):
    source = real_data / "wellington_DTM.tif"
    dtype = "Int16" if "PREDICTOR=2" in options else "Float32"
    args = ["gdal_translate", "-q", "-ot", dtype, "-co", "COMPRESS=LZW"]
    for option in options:
        args += ["-co", option]
    subprocess.run(args + [str(source), str(tmp_path / "tiff_codecs.tif")], check=True)
    subprocess.run(["gdal_translate", "-q", "-co", "COMPRESS=NONE", str(tmp_path / "tiff_codecs.tif"),
                    str(tmp_path / "plain.tif")], check=True)
    got, info = read_raster(tmp_path / "tiff_codecs.tif")
    expected, _ = read_raster(tmp_path / "plain.tif")
    np.testing.assert_array_equal(got, expected)
    assert info.origin == read_info(source).origin and info.epsg == 2193

@pytest.mark.skipif(shutil.which("gdal_translate") is None, reason="gdal_translate not on PATH")
@pytest.mark.parametrize("name", ["ALS_CHM_DUC.tif", "ALS_CHM_CAU_2012.tif", "ALS_CHM_CAU_2014.tif"])
def test_real_lzw_matches_gdal_uncompressed_copy(tmp_path, real_data, name):
    plain = tmp_path / "plain.tif"
    subprocess.run(["gdal_translate", "-q", "-co", "COMPRESS=NONE", str(real_data / name),
                    str(plain)], check=True)
    ours, _ = read_raster(real_data / name)
    np.testing.assert_array_equal(ours, tifffile.imread(plain))
