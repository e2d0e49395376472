"""GeoTIFF I/O: reading stripped/tiled/LZW files, georeferencing round trips, windows, grids, errors.

The LZW codec itself is tested in tests/test_tiff_codecs.py; its reference encoder builds the LZW files here.
"""
import json
import shutil
import struct
import subprocess
import warnings
from dataclasses import replace

import numpy as np
import pytest
import tifffile

from lib.core.errors import RasterError
from lib.geoio.georef import GeoInfo, check_same_grid, geotiff_tags, parse_geoinfo
from lib.geoio.geotiff_read import iter_strips, read_info, read_pair, read_raster
from lib.geoio.geotiff_write import RasterWriter, write_raster
from tests.test_tiff_codecs import float_predict, lzw_encode, pack_codes

try:
    import imagecodecs
except ImportError:
    imagecodecs = None

pytestmark = pytest.mark.filterwarnings("ignore:.*no georeferencing:UserWarning")

NZTM_KEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 1026, 34737, 12, 0, 3072, 0, 1, 2193)
INFO = GeoInfo(height=70, width=300, pixel_size=(0.5, 0.5), origin=(1802139.25, 5467490.5),
               geokeys=NZTM_KEYS, geo_double=(0.0, 6378137.0), geo_ascii="NZTM2000 2|")


def tiff_bytes(strips: list, shape, dtype, compression=1, predictor=1, rows_per_strip=None,
               byteorder="<", spp=1) -> bytes:
    """Minimal striped TIFF built with struct only: an independent writer for reader tests."""
    dtype = np.dtype(dtype)
    header = 8
    data = b"".join(strips)
    offsets = np.cumsum([header] + [len(s) for s in strips[:-1]]).tolist()
    tags = [(256, 4, [shape[1]]), (257, 4, [shape[0]]), (258, 3, [8 * dtype.itemsize] * spp),
            (259, 3, [compression]), (262, 3, [1]), (273, 4, offsets), (277, 3, [spp]),
            (278, 4, [rows_per_strip or shape[0]]), (279, 4, [len(s) for s in strips]),
            (317, 3, [predictor]), (339, 3, [{"u": 1, "i": 2, "f": 3}[dtype.kind]] * spp)]
    ifd_at = header + len(data) + len(data) % 2
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    entries, extra = b"", b""
    for code, typ, values in tags:
        packed = struct.pack(f"{byteorder}{len(values)}{'H' if typ == 3 else 'I'}", *values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\0")
        else:
            field = struct.pack(byteorder + "I", extra_at + len(extra))
            extra += packed
        entries += struct.pack(byteorder + "HHI", code, typ, len(values)) + field
    magic = b"II*\0" if byteorder == "<" else b"MM\0*"
    return (magic + struct.pack(byteorder + "I", ifd_at) + data + bytes(len(data) % 2)
            + struct.pack(byteorder + "H", len(tags)) + entries + bytes(4) + extra)


def surface(shape, dtype=np.float32, seed=0) -> np.ndarray:
    """A smooth DSM-like surface in metres with some exact repeats (flat roofs)."""
    rng = np.random.default_rng(seed)
    z = 300 + np.cumsum(rng.normal(0, 0.4, shape), axis=1) + np.cumsum(rng.normal(0, 0.4, shape), axis=0)
    z[: shape[0] // 3, : shape[1] // 4] = 312.5
    return z.astype(dtype)


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("dtype,predictor,byteorder", [
    ("<f4", 1, "<"), ("<f4", 3, "<"), (">f4", 3, ">"), ("<f8", 3, "<"),
    ("<u2", 2, "<"), (">i2", 2, ">"), ("<u1", 1, "<")])
def test_lzw_tiff_reads_like_uncompressed_copy(tmp_path, dtype, predictor, byteorder):
    dtype = np.dtype(dtype)
    values = surface((37, 45)) * (1 if dtype.kind == "f" else 50)
    values = values.astype(dtype) if dtype.kind == "f" else (values % np.iinfo(dtype).max).astype(dtype)
    rps = 8
    strips = []
    for r in range(0, 37, rps):
        rows = values[r : r + rps]
        if predictor == 3:
            rows = float_predict(rows)
        elif predictor == 2:
            rows = np.diff(rows, axis=1, prepend=np.zeros((len(rows), 1), dtype)).astype(dtype)
        strips.append(lzw_encode(rows.astype(rows.dtype.newbyteorder(byteorder)).tobytes()))
    lzw_path, plain_path = tmp_path / "lzw.tif", tmp_path / "plain.tif"
    lzw_path.write_bytes(tiff_bytes(strips, values.shape, dtype, 5, predictor, rps, byteorder))
    tifffile.imwrite(plain_path, values, photometric="minisblack")
    ours, _ = read_raster(lzw_path)
    reference, _ = read_raster(plain_path)
    np.testing.assert_array_equal(ours, tifffile.imread(plain_path).astype(np.float32))
    np.testing.assert_array_equal(ours, reference)
    if imagecodecs is not None:
        np.testing.assert_array_equal(tifffile.imread(lzw_path), values)

@pytest.mark.parametrize("name", ["ALS_CHM_DUC.tif", "ALS_CHM_CAU_2012.tif", "wellington_DTM.tif"])
def test_real_windows_and_strips_equal_full_read(real_data, name):
    full, info = read_raster(real_data / name)
    assert full.shape == (info.height, info.width) and full.dtype == np.float32
    assert 0 <= np.nanmin(full) and np.nanmax(full) < 1000  # heights in metres
    window, winfo = read_raster(real_data / name, window=(7, 11, 50, 61))
    np.testing.assert_array_equal(window, full[7:57, 11:72])
    assert winfo.origin == (info.origin[0] + 11 * info.pixel_size[0],
                            info.origin[1] - 7 * info.pixel_size[1])
    rows = [(r, b) for r, b in iter_strips(real_data / name, 23)]
    assert [r for r, _ in rows] == list(range(0, info.height, 23))
    np.testing.assert_array_equal(np.concatenate([b for _, b in rows]), full)
    if imagecodecs is not None:
        raw = tifffile.imread(real_data / name).astype(np.float32)
        raw[raw == (info.nodata if info.nodata is not None else np.nan)] = np.nan
        np.testing.assert_array_equal(full, raw)


def test_real_georeferencing(real_data):
    info = read_info(real_data / "wellington_DSM.tif")
    assert (info.height, info.width, info.pixel_size) == (195, 278, (1.0, 1.0))
    assert info.origin == (1802139.11, 5467490.5) and info.epsg == 2193 and info.nodata is None
    assert "NZGD2000" in info.geo_ascii
    assert read_info(real_data / "wellington_DTM.tif").nodata == 0.0
    duc = read_info(real_data / "ALS_CHM_DUC.tif")
    assert duc.epsg is None and np.isnan(duc.nodata) and duc.origin == (173000.0, 9673200.0)
    x, y = duc.xy_of(np.array([0, 199]), np.array([0, 199]))
    np.testing.assert_array_equal(x, [173000.5, 173199.5])
    np.testing.assert_array_equal(y, [9673199.5, 9673000.5])


def test_tiled_deflate_and_big_endian_from_tifffile(tmp_path):
    values = surface((70, 90))
    tifffile.imwrite(tmp_path / "tiled.tif", values, tile=(32, 48), compression="zlib")
    tifffile.imwrite(tmp_path / "be.tif", values.astype(np.int16), byteorder=">",
                     compression="zlib", predictor=2, rowsperstrip=9)
    for name, expected in (("tiled.tif", values), ("be.tif", values.astype(np.int16))):
        got, _ = read_raster(tmp_path / name)
        np.testing.assert_array_equal(got, expected.astype(np.float32))
        part, _ = read_raster(tmp_path / name, window=(31, 47, 35, 40))
        np.testing.assert_array_equal(part, got[31:66, 47:87])


def test_multiband_needs_band(tmp_path):
    rgb = np.stack([surface((20, 30), seed=s) for s in range(3)], axis=-1)  # (H, W, 3)
    tifffile.imwrite(tmp_path / "contig.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb",
                     planarconfig="separate")
    for name in ("contig.tif", "planar.tif"):
        with pytest.raises(RasterError, match="expected one band, found 3"):
            read_raster(tmp_path / name)
        got, _ = read_raster(tmp_path / name, band=2)
        np.testing.assert_array_equal(got, rgb[:, :, 1])
        with pytest.raises(RasterError, match="band 4"):
            read_raster(tmp_path / name, band=4)


def test_nodata_and_fill_values(tmp_path):
    dem = (surface((30, 40)) * 10).astype(np.int16)
    dem[0, :10] = -9999
    tifffile.imwrite(tmp_path / "int.tif", dem)
    with pytest.warns(UserWarning, match=r"0\.83% of pixels are \+-9999"):
        values, info = read_raster(tmp_path / "int.tif")
    assert values.dtype == np.float32 and info.nodata is None
    np.testing.assert_array_equal(values, dem.astype(np.float32))  # kept, only warned
    write_raster(tmp_path / "masked.tif", dem, INFO.with_shape(30, 40), nodata=-9999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked, info = read_raster(tmp_path / "masked.tif")
    assert info.nodata == -9999 and np.isnan(masked[0, :10]).all()
    assert np.isfinite(masked).sum() == dem.size - 10
    flt = surface((8, 9))
    flt[1, 1], flt[2, 2] = np.inf, -3.4028234663852886e38
    write_raster(tmp_path / "f.tif", flt, INFO.with_shape(8, 9), nodata=-3.4028234663852886e38)
    got, _ = read_raster(tmp_path / "f.tif")
    assert np.isnan(got[1, 1]) and np.isnan(got[2, 2]) and np.isfinite(got).sum() == 70


# ----------------------------------------------------------------------------- writing
@pytest.mark.parametrize("dtype,nodata", [(np.float32, float("nan")), (np.float64, None),
                                          (np.uint8, 255), (np.int16, -9999), (np.uint16, None)])
@pytest.mark.parametrize("compress", [True, False])
def test_write_read_round_trip(tmp_path, dtype, nodata, compress):
    values = surface((INFO.height, INFO.width), np.float64)
    values = values.astype(dtype) if np.dtype(dtype).kind == "f" else (values % 250).astype(dtype)
    if np.dtype(dtype).kind == "f":
        values[3, 4] = np.nan
    path = tmp_path / "out.tif"
    write_raster(path, values, INFO, nodata=nodata, compress=compress)
    got, info = read_raster(path)
    np.testing.assert_array_equal(got, values.astype(np.float32))
    assert (info.height, info.width, info.pixel_size, info.origin) == (
        INFO.height, INFO.width, INFO.pixel_size, INFO.origin)
    assert (info.geokeys, info.geo_double, info.geo_ascii, info.epsg) == (
        INFO.geokeys, INFO.geo_double, INFO.geo_ascii, 2193)
    assert info.nodata == nodata or (np.isnan(info.nodata) and np.isnan(nodata))
    if not compress or np.dtype(dtype).kind != "f":  # tifffile decodes these without imagecodecs
        np.testing.assert_array_equal(tifffile.imread(path), values)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_pixel_is_point_round_trip(tmp_path):
    keys = (1, 1, 0, 1, 1025, 0, 1, 2)  # GTRasterTypeGeoKey = PixelIsPoint
    info = GeoInfo(4, 5, (2.0, 3.0), (100.0, 200.0), geokeys=keys)
    write_raster(tmp_path / "p.tif", np.zeros((4, 5), np.float32), info)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.pages[0].tags[33922].value[3:5] == (101.0, 198.5)  # centre of the first pixel
    assert read_info(tmp_path / "p.tif").origin == (100.0, 200.0)


def test_writer_strips_equal_one_shot(tmp_path):
    values = surface((INFO.height * 4, INFO.width))  # 280 rows: crosses a tile row boundary
    info = INFO.with_shape(*values.shape)
    write_raster(tmp_path / "once.tif", values, info)
    with RasterWriter(tmp_path / "strips.tif", info, np.float32) as out:
        for row0 in range(0, values.shape[0], 37):
            out.write(row0, values[row0 : row0 + 37])
    assert (tmp_path / "once.tif").read_bytes() == (tmp_path / "strips.tif").read_bytes()
    strips = [block for _, block in iter_strips(tmp_path / "strips.tif", 100)]  # 256-row tiles
    np.testing.assert_array_equal(np.concatenate(strips), values)


def test_writer_errors_leave_nothing(tmp_path):
    path = tmp_path / "out.tif"
    path.write_bytes(b"old")
    with pytest.raises(RasterError, match="expected row0=10, got 20"):
        with RasterWriter(path, INFO, np.float32) as out:
            out.write(0, np.zeros((10, INFO.width)))
            out.write(20, np.zeros((10, INFO.width)))
    with pytest.raises(RasterError, match="only 10 of 70 rows"):
        with RasterWriter(path, INFO, np.float32) as out:
            out.write(0, np.zeros((10, INFO.width)))
    with pytest.raises(RasterError, match="cannot store float64 values as uint8"):
        with RasterWriter(path, INFO, np.uint8) as out:
            out.write(0, np.zeros((10, INFO.width)))
    with pytest.raises(RasterError, match="does not match the grid"):
        write_raster(path, np.zeros((3, 3)), INFO)
    with pytest.raises(RasterError, match="nodata 300 does not fit uint8"):
        write_raster(path, np.zeros((70, 300), np.uint8), INFO, nodata=300)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------- grids and pairs


def test_check_same_grid_names_differences():
    check_same_grid({"a": INFO, "b": INFO.window(0, 0, 70, 300)})
    shifted = INFO.window(0, 2, 70, 300)
    other_crs = GeoInfo(70, 300, (0.5, 0.5), INFO.origin, geokeys=(1, 1, 0, 1, 3072, 0, 1, 32760))
    with pytest.raises(RasterError) as err:
        check_same_grid({"dsm.tif": INFO, "dtm.tif": shifted, "chm.tif": other_crs,
                         "small.tif": INFO.with_shape(60, 300)})
    text = str(err.value)
    assert "origin: dsm.tif at (1802139.25, 5467490.5), dtm.tif at (1802140.25, 5467490.5)" in text
    assert "off by +1.000 m in x (+2.00 px), +0.000 m in y (+0.00 px)" in text
    assert "CRS: dsm.tif is EPSG:2193, chm.tif is EPSG:32760" in text
    assert "shape: dsm.tif is 70x300, small.tif is 60x300" in text
    coarse = GeoInfo(70, 300, (1.0, 1.0), INFO.origin, geokeys=NZTM_KEYS)
    with pytest.raises(RasterError, match=r"pixel size: a has \(0.5, 0.5\), b has \(1.0, 1.0\)"):
        check_same_grid({"a": INFO, "b": coarse})


def test_a_raster_without_crs_beside_one_with_a_crs_warns():
    bare = replace(INFO, geokeys=None, geo_double=None, geo_ascii=None)
    with pytest.warns(UserWarning, match=r"dsm.tif has no CRS but chm.tif has one: .* assumed to be the same"):
        check_same_grid({"chm.tif": INFO, "dsm.tif": bare})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # both or neither: nothing to say
        check_same_grid({"a": INFO, "b": INFO})
        check_same_grid({"a": bare, "b": bare})


@pytest.mark.parametrize("keys", [NZTM_KEYS, (1, 1, 0, 1, 1025, 0, 1, 2), None])
@pytest.mark.parametrize("nodata", [None, -9999, float("nan"), 0.25])
def test_geotiff_tags_parse_back(keys, nodata):
    info = replace(INFO, geokeys=keys, nodata=nodata)  # the second keys: PixelIsPoint
    tags = {code: values for code, _, values in geotiff_tags(info, nodata)}
    back = parse_geoinfo(tags, info.height, info.width, "t.tif")
    assert replace(back, nodata=None) == replace(info, nodata=None)
    assert back.nodata == nodata or (np.isnan(back.nodata) and np.isnan(nodata))


def test_read_pair_with_dtm_and_chm(tmp_path):
    dsm, dtm = surface((70, 300), seed=3) + 20, surface((70, 300), seed=4)
    dsm[5, 5], dtm[6, 6] = np.nan, -1
    write_raster(tmp_path / "dsm.tif", dsm, INFO, nodata=float("nan"))
    write_raster(tmp_path / "dtm.tif", dtm, INFO, nodata=-1)
    write_raster(tmp_path / "chm.tif", dsm - np.where(dtm == -1, np.nan, dtm), INFO)
    a, chm, info = read_pair(tmp_path / "dsm.tif", dtm=tmp_path / "dtm.tif", window=(0, 0, 10, 20))
    assert info == replace(INFO.window(0, 0, 10, 20), nodata=info.nodata)
    expected = dsm[:10, :20] - dtm[:10, :20]
    expected[6, 6] = np.nan
    np.testing.assert_array_equal(chm, expected)
    assert np.isnan(a[5, 5]) and np.isnan(a[6, 6]) and np.isnan(chm[5, 5])
    _, chm2, _ = read_pair(tmp_path / "dsm.tif", chm=tmp_path / "chm.tif")
    assert np.isnan(chm2[6, 6]) and np.isnan(chm2[5, 5])
    write_raster(tmp_path / "moved.tif", dtm, INFO.window(1, 0, 70, 300))
    with pytest.raises(RasterError, match="moved.tif"):
        read_pair(tmp_path / "dsm.tif", dtm=tmp_path / "moved.tif")
    with pytest.raises(RasterError, match="exactly one of chm= or dtm="):
        read_pair(tmp_path / "dsm.tif")


def test_real_pair_matches_dsm_minus_dtm(real_data):
    dsm, chm, info = read_pair(real_data / "wellington_DSM.tif", dtm=real_data / "wellington_DTM.tif")
    dtm, _ = read_raster(real_data / "wellington_DTM.tif")
    np.testing.assert_allclose(chm, dsm - dtm)
    assert info.epsg == 2193 and np.isnan(dsm).sum() == np.isnan(chm).sum()


# ----------------------------------------------------------------------------- errors


def test_broken_inputs_name_the_path(tmp_path):
    with pytest.raises(RasterError, match="missing.tif: no such file"):
        read_raster(tmp_path / "missing.tif")
    (tmp_path / "text.tif").write_text("not a tiff at all")
    with pytest.raises(RasterError, match="text.tif: not a readable TIFF"):
        read_info(tmp_path / "text.tif")
    tifffile.imwrite(tmp_path / "full.tif", surface((64, 64)), compression="zlib", rowsperstrip=8)
    data = (tmp_path / "full.tif").read_bytes()
    with tifffile.TiffFile(tmp_path / "full.tif") as tif:
        last = tif.pages[0].dataoffsets[-1]
    (tmp_path / "cut.tif").write_bytes(data[: last + 10])
    with pytest.raises(RasterError, match="cut.tif"):
        read_raster(tmp_path / "cut.tif")
    (tmp_path / "head.tif").write_bytes(data[:6])
    with pytest.raises(RasterError, match="head.tif"):
        read_info(tmp_path / "head.tif")


def test_unsupported_compression_is_named(tmp_path):
    strips = [bytes(16 * 16)]
    (tmp_path / "jpeg.tif").write_bytes(tiff_bytes(strips, (16, 16), np.uint8, compression=7))
    for read in (read_info, read_raster):  # refused before any pixel or grid is used
        with pytest.raises(RasterError, match=r"jpeg.tif: TIFF tag Compression \(259\) = 7 \(JPEG\) is not"
                                              r" read here.*\n  hint: gdal_translate"):
            read(tmp_path / "jpeg.tif")


def test_corrupt_block_is_named(tmp_path):
    good = lzw_encode(bytes(16 * 8))
    bad = pack_codes([256, 97, 300, 257])
    (tmp_path / "bad.tif").write_bytes(tiff_bytes([good, bad], (16, 16), np.uint8, 5, 1, 8))
    with pytest.raises(RasterError, match="bad.tif: cannot decode block 1: corrupt LZW"):
        read_raster(tmp_path / "bad.tif")
    top, _ = read_raster(tmp_path / "bad.tif", window=(0, 0, 8, 16))  # only strip 0 is read
    np.testing.assert_array_equal(top, 0)


def test_model_transformation_and_missing_georeferencing(tmp_path):
    matrix = (0.5, 0, 0, 1000.0, 0, -2.0, 0, 3000.0, 0, 0, 0, 0, 0, 0, 0, 1)
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((4, 4), np.float32),
                     extratags=[(34264, "d", 16, matrix, True)])
    info = read_info(tmp_path / "m.tif")
    assert info.pixel_size == (0.5, 2.0) and info.origin == (1000.0, 3000.0)
    rotated = (0.5, 0.1, 0, 1000.0, 0.1, -2.0, 0, 3000.0, 0, 0, 0, 0, 0, 0, 0, 1)
    tifffile.imwrite(tmp_path / "r.tif", np.zeros((4, 4), np.float32),
                     extratags=[(34264, "d", 16, rotated, True)])
    with pytest.raises(RasterError, match="rotated"):
        read_info(tmp_path / "r.tif")
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.float32))
    with pytest.warns(UserWarning, match="plain.tif: no georeferencing; assuming 1 m pixels"):
        assert read_info(tmp_path / "plain.tif").pixel_size == (1.0, 1.0)


def test_bigtiff_layout(tmp_path, monkeypatch):
    monkeypatch.setattr("lib.geoio.geotiff_write._BIGTIFF_BYTES", 0)
    values = surface((INFO.height, INFO.width))
    for compress in (False, True):
        write_raster(tmp_path / "big.tif", values, INFO, compress=compress)
        with tifffile.TiffFile(tmp_path / "big.tif") as tif:
            assert tif.is_bigtiff
            if not compress:
                np.testing.assert_array_equal(tif.asarray(), values)
        got, info = read_raster(tmp_path / "big.tif")
        np.testing.assert_array_equal(got, values)
        assert info.geo_ascii == INFO.geo_ascii


def test_window_outside_raster(tmp_path):
    write_raster(tmp_path / "a.tif", np.zeros((70, 300), np.float32), INFO)
    with pytest.raises(RasterError, match=r"window .* is not inside the 70x300 raster"):
        read_raster(tmp_path / "a.tif", window=(60, 0, 20, 10))


# ----------------------------------------------------------------------------- GDAL
@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo not on PATH")
def test_gdal_reads_what_we_write(tmp_path, real_data):
    source = real_data / "wellington_DSM.tif"
    values, info = read_raster(source)
    write_raster(tmp_path / "out.tif", values, info, nodata=float("nan"))
    report = json.loads(subprocess.run(["gdalinfo", "-json", "-checksum", str(tmp_path / "out.tif")],
                                       capture_output=True, text=True, check=True).stdout)
    reference = json.loads(subprocess.run(["gdalinfo", "-json", "-checksum", str(source)],
                                          capture_output=True, text=True, check=True).stdout)
    assert report["geoTransform"] == reference["geoTransform"]
    assert report["coordinateSystem"]["wkt"] == reference["coordinateSystem"]["wkt"]
    assert report["bands"][0]["checksum"] == reference["bands"][0]["checksum"]
    assert report["bands"][0]["noDataValue"] == "NaN"
    assert report["metadata"]["IMAGE_STRUCTURE"] == {"COMPRESSION": "DEFLATE", "INTERLEAVE": "BAND",
                                                     "PREDICTOR": "3"}
