"""The GeoTIFF reader against independent decoders, on a seeded matrix of TIFF variants.

tests/tiff_builder.py writes each variant (byte orders, BigTIFF, 8-64 bit integers, 16-64 bit floats,
strips and tiles, planar configurations, every codec and predictor read here, FillOrder 2, old-style
LZW, photometrics, orientations, sparse blocks, nodata tags); full, windowed and strip reads must equal
the array written, tifffile's decoding where it decodes without imagecodecs, and GDAL's (Debian
python3-gdal, tests/gdal_oracle.py) when installed.
"""
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lib.core.errors import RasterError
from lib.geoio.geotiff_read import iter_strips, read_info, read_raster
from lib.geoio.tiff_layout import tag_table
from tests.gdal_oracle import gdal_python, gdal_reads
from tests.tiff_builder import Variant, tiff_file

pytestmark = pytest.mark.filterwarnings("ignore:.*no georeferencing:UserWarning",
                                        "ignore:.*nodata tag:UserWarning")
SHAPE = (29, 37)  # not a multiple of any block size: short last strips, padded edge tiles
DTYPES = ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"]
N_CASES = 120


def _samples(rng, dtype: np.dtype, spp: int) -> np.ndarray:
    """(spp, H, W): full-range integers, or a DSM-like float surface with repeats, NaN and inf."""
    shape = (spp, *SHAPE)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        values[:, 20:, :9] = values[0, 20, 0]  # a run: long LZW strings
        return values
    values = (300 + np.cumsum(rng.normal(0, 0.7, shape), axis=-1)).astype(dtype)
    values[:, 21:, 30:] = 312.5
    values[0, 3, 4], values[0, 5, 6] = np.nan, np.inf
    return values


def make_case(k: int) -> tuple[np.ndarray, Variant]:
    """Case k of the matrix: every dtype in turn, the other axes drawn with seed k."""
    rng = np.random.default_rng(k)
    dtype = np.dtype(DTYPES[k % len(DTYPES)])
    spp = int(rng.choice([1, 1, 3]))
    photometric = int(rng.choice([2, 1] if spp == 3 else [0, 1, 1] + ([3] if dtype.str[1:] in ("u1", "u2") else [])))
    compression = int(rng.choice([1, 5, 5, 8, 32773, 34925]))
    nodata = rng.choice([None, "0"] + (["-9999"] if dtype != "f2" else []) + (["nan"] if dtype.kind == "f" else [])
                        + (["-3.4028234663852886e+38"] if dtype.str[1:] in ("f4", "f8") else []))
    v = Variant(byteorder=str(rng.choice(["<", ">"])), bigtiff=bool(rng.random() < 0.3),
                tile=[None, None, (16, 16), (16, 32), (32, 16), (8, 24)][rng.integers(6)],
                rows_per_strip=int(rng.choice([1, 7, 29, 2**32 - 1])), planar=int(rng.choice([1, 2])),
                compression=compression, predictor=int(rng.choice([1, 2] + ([3, 3] if dtype.kind == "f" else []))),
                fill_order=int(rng.choice([1, 2])), old_lzw=compression == 5 and rng.random() < 0.4,
                photometric=photometric, orientation=int(rng.integers(1, 9)),
                nodata=None if nodata is None else str(nodata), sparse=bool(rng.random() < 0.3))
    samples = _samples(rng, dtype, spp)
    if v.sparse:  # the top 16 rows are fill: whole strips/tiles that a sparse writer leaves out
        fill = float(v.nodata) if v.nodata is not None else 0.0
        if dtype.kind in "ui" and not np.iinfo(dtype).min <= fill <= np.iinfo(dtype).max:
            v.sparse = dtype.itemsize < 8 and dtype != "i1"  # GDAL clamps it; int8, 64-bit: refused
            fill = float(np.clip(fill, np.iinfo(dtype).min, np.iinfo(dtype).max))
        v.fill = 0.0 if np.isnan(fill) and dtype.kind in "ui" else fill
        samples[:, :16] = v.fill
    return samples, v


def expected(raw: np.ndarray, nodata: str | None) -> np.ndarray:
    """What read_raster returns for stored samples: float32, nodata and non-finite values NaN."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, then NaN below
        out = raw.astype(np.float32)
    if nodata is not None:
        value = float(nodata)
        ref = raw if raw.dtype.kind != "f" or raw.dtype.itemsize >= 4 else out
        if raw.dtype.kind == "f" or value.is_integer():
            out[ref == (ref.dtype.type(value) if raw.dtype.kind == "f" else value)] = np.nan
    out[~np.isfinite(out)] = np.nan
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """[(path, samples (spp, H, W), Variant)] of every case, written once."""
    root = tmp_path_factory.mktemp("matrix")
    cases = []
    for k in range(N_CASES):
        samples, v = make_case(k)
        path = root / f"case{k}.tif"
        path.write_bytes(tiff_file(samples, v))
        cases.append((path, samples, v))
    return cases


def _window(k: int) -> tuple[int, int, int, int]:
    rng = np.random.default_rng(1000 + k)
    row0, col0 = int(rng.integers(0, SHAPE[0] - 1)), int(rng.integers(0, SHAPE[1] - 1))
    return row0, col0, int(rng.integers(1, SHAPE[0] - row0 + 1)), int(rng.integers(1, SHAPE[1] - col0 + 1))


@pytest.mark.parametrize("k", range(N_CASES))
def test_reads_equal_the_written_samples(matrix, k):
    path, samples, v = matrix[k]
    row0, col0, h, w = _window(k)
    for b in range(len(samples)):
        band = b + 1 if len(samples) > 1 else None
        want = expected(samples[b], v.nodata)
        got, info = read_raster(path, band=band)
        np.testing.assert_array_equal(got, want, err_msg=f"{v}")
        part, _ = read_raster(path, window=(row0, col0, h, w), band=band)
        np.testing.assert_array_equal(part, want[row0 : row0 + h, col0 : col0 + w])
        strips = [block for _, block in iter_strips(path, 1 + k % 9, band=band)]
        np.testing.assert_array_equal(np.concatenate(strips), want)


def test_fill_order_2_uncompressed_16_bit(tmp_path):
    """The issue's file: FillOrder 2 on uncompressed 16-bit samples, every byte stored bit-reversed."""
    values = (np.arange(29 * 37, dtype=np.uint16) * 53).reshape(SHAPE)
    (tmp_path / "lsb.tif").write_bytes(tiff_file(values, Variant(fill_order=2)))
    got, _ = read_raster(tmp_path / "lsb.tif")
    np.testing.assert_array_equal(got, values.astype(np.float32))
    if gdal_python() is not None:
        np.testing.assert_array_equal(gdal_reads([(tmp_path / "lsb.tif", 1, None)])[0], values)


def test_tifffile_decodes_the_matrix_alike(matrix):
    """The builder's files mean what it says: tifffile (without imagecodecs: no LZW, PackBits,
    predictor 3) decodes them to the samples written, in stored order (it ignores Orientation too)."""
    checked = 0
    for path, samples, v in matrix:
        if v.compression not in (1, 8, 34925) or v.predictor == 3 or v.sparse:
            continue  # LZW, PackBits and predictor 3 need imagecodecs; sparse blocks come back as 0
        if v.compression == 1 and v.predictor != 1:
            continue  # tifffile undoes a predictor on uncompressed data; libtiff and GDAL ignore it
        stored = tifffile.imread(path)
        stored = stored.reshape(samples.shape) if v.planar == 2 or len(samples) == 1 else np.moveaxis(stored, -1, 0)
        np.testing.assert_array_equal(stored, samples, err_msg=f"{v}")
        checked += 1
    assert checked >= 20


@pytest.mark.skipif(gdal_python() is None, reason="GDAL's Python binding (Debian python3-gdal) not installed")
def test_gdal_reads_the_matrix_as_we_do(matrix):
    reads, ours = [], []
    for k, (path, samples, v) in enumerate(matrix):
        row0, col0, h, w = _window(k)
        for b in range(len(samples)):
            band = b + 1 if len(samples) > 1 else None
            reads += [(path, b + 1, None), (path, b + 1, (col0, row0, w, h))]
            ours += [(read_raster(path, band=band)[0], v.nodata, f"case {k} band {b + 1}"),
                     (read_raster(path, window=(row0, col0, h, w), band=band)[0], v.nodata, f"case {k} window")]
    for theirs, (got, nodata, what) in zip(gdal_reads(reads), ours):
        assert not isinstance(theirs, str), f"{what}: GDAL failed: {theirs}"
        np.testing.assert_array_equal(got, expected(theirs, nodata), err_msg=what)


@pytest.mark.skipif(gdal_python() is None, reason="GDAL's Python binding (Debian python3-gdal) not installed")
def test_gdal_reads_real_files_as_we_do(real_data):
    names = sorted(p.name for p in real_data.glob("*.tif"))
    theirs = gdal_reads([(real_data / name, 1, None) for name in names])
    for name, raw in zip(names, theirs):
        info = read_info(real_data / name)
        nodata = None if info.nodata is None else repr(info.nodata)
        np.testing.assert_array_equal(read_raster(real_data / name)[0], expected(raw, nodata), err_msg=name)


# ----------------------------------------------------------------------------- refused as GDAL would not read them
REFUSED = {  # name: (variant changes, what the error names)
    "cmyk": (dict(photometric=5), r"Photometric \(262\) = 5 .*CMYK to RGBA"),
    "cielab": (dict(photometric=8), r"Photometric \(262\) = 8 .*CIELab"),
    "ycbcr": (dict(photometric=6), r"Photometric \(262\) = 6"),
    "mask": (dict(photometric=4), r"Photometric \(262\) = 4"),
    "planar_0": (dict(tags={284: ("H", [0])}), r"PlanarConfiguration \(284\) = 0"),
    "planar_32767": (dict(tags={284: ("H", [32767])}), r"PlanarConfiguration \(284\) = 32767"),
    "fill_order_3": (dict(tags={266: ("H", [3])}), r"FillOrder \(266\) = 3"),
    "predictor_3_on_ints": (dict(compression=8, tags={317: ("H", [3])}), r"Predictor \(317\) = 3"),
    "predictor_7": (dict(compression=8, tags={317: ("H", [7])}), r"Predictor \(317\) = 7"),
    "predictor_pair": (dict(compression=8, tags={317: ("H", [2, 1])}), r"Predictor \(317\) = \(2, 1\)"),
    "predictor_text": (dict(compression=8, tags={317: ("s", "2")}), r"Predictor \(317\) = '2'"),
    "jpeg": (dict(tags={259: ("H", [7])}), r"Compression \(259\) = 7 \(JPEG\)"),
    "complex": (dict(tags={339: ("H", [6])}), r"BitsPerSample \(258\) = 16 with SampleFormat 6"),
    "void": (dict(tags={339: ("H", [4])}), r"SampleFormat 4 \(void\)"),
    "12_bit": (dict(tags={258: ("H", [12])}), r"BitsPerSample \(258\) = 12"),
    "samples_0": (dict(tags={277: ("H", [0])}), r"SamplesPerPixel \(277\) = 0"),
    "extra_samples_3": (dict(tags={338: ("H", [3])}), r"ExtraSamples \(338\) = \(3,\)"),
    "orientation_9": (dict(tags={274: ("H", [9])}), r"Orientation \(274\) = 9"),
    "tile_length_0": (dict(tile=(16, 16), tags={323: ("I", [0])}), r"TileLength/TileWidth .* has a zero"),
    "rows_per_strip_0": (dict(tags={278: ("I", [0])}), r"RowsPerStrip \(278\) = 0"),
    "one_strip_offset": (dict(rows_per_strip=1, tags={273: ("I", [8])}), r"StripOffsets \(273\) has 1 values, but the block grid has 29 blocks"),
    "huge_tiled": (dict(tile=(16, 16), tags={257: ("I", [2**31 - 1])}), r"TileOffsets \(324\) has 6 values, but the block grid has 402653184 blocks"),
    "tile_offset_0": (dict(tile=(16, 16), tags={324: ("I", [0, 8, 8, 8, 8, 8])}), r"block 0 starts at byte 0"),
    "offset_past_end": (dict(tags={273: ("I", [8, 8, 8, 8, 10**6])}), r"block 4 ends at byte"),
    "only_strip_count_0": (dict(rows_per_strip=2**32 - 1, tags={279: ("I", [0])}),
                           r"StripByteCounts \(279\) = 0 for the only strip \(at byte 8\) is bogus"),
    "pixel_scale_one": (dict(tags={33550: ("d", [1.0])}), r"ModelPixelScale \(33550\) has 1 values; expected 2 or 3"),
    "pixel_scale_text": (dict(tags={33550: ("s", "1 1 0")}), r"ModelPixelScale \(33550\) = '1 1 0' is not a list"),
    "pixel_scale_nan": (dict(tags={33550: ("d", [np.nan, 1.0, 0.0]), 33922: ("d", [0] * 6)}),
                        r"ModelPixelScale .* not a list of finite numbers"),
    "tiepoint_five": (dict(tags={33550: ("d", [1.0, 1.0, 0.0]), 33922: ("d", [0, 0, 0, 5, 5])}),
                      r"ModelTiepoint \(33922\) has 5 values; expected 6 per tiepoint"),
    "transform_eight": (dict(tags={34264: ("d", [1.0] * 8)}), r"ModelTransformation \(34264\) has 8 values"),
    "geokeys_short": (dict(tags={34735: ("H", [1, 1, 0, 5, 1024, 0, 1, 1])}), r"GeoKeyDirectory \(34735\)"),
    "geokeys_doubles": (dict(tags={34735: ("d", [1.0, 1.0, 0.0, 0.0])}), r"GeoKeyDirectory \(34735\)"),
    "geoascii_shorts": (dict(tags={34737: ("H", [65, 66])}), r"GeoAsciiParams \(34737\) = \(65, 66\) is not text"),
    "nodata_text": (dict(nodata="none"), r"GDAL_NODATA tag 'none' is not a number"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_tag_value_and_command(tmp_path, case):
    changes, message = REFUSED[case]
    path = tmp_path / f"{case}.tif"
    path.write_bytes(tiff_file((np.arange(29 * 37) % 251).astype(np.uint16).reshape(SHAPE), Variant(**changes)))
    for read in (read_info, read_raster):
        with pytest.raises(RasterError, match=f"(?s){case}.tif: .*{message}") as caught:
            read(path)
        assert caught.value.hint, "a refusal says what to run instead"


def test_docs_tag_table_is_the_code_table():
    text = (Path(__file__).resolve().parents[1] / "docs" / "rasters.md").read_text(encoding="utf-8")
    assert tag_table() in text, "docs/rasters.md is stale: paste lib.geoio.tiff_layout.tag_table()"


def test_duplicated_tag_is_refused(tmp_path):
    """libtiff keeps the first of two RowsPerStrip tags, tifffile the last: neither is guessed."""
    data = bytearray(tiff_file(np.zeros(SHAPE, np.uint8), Variant(rows_per_strip=7)))
    at = data.index(b"\x12\x01\x03\x00")  # the Orientation entry (274, SHORT) becomes a RowsPerStrip
    data[at : at + 2] = b"\x16\x01"
    (tmp_path / "twice.tif").write_bytes(bytes(data))
    with pytest.raises(RasterError, match=r"twice.tif: TIFF tag 278 appears more than once"):
        read_raster(tmp_path / "twice.tif")


@pytest.mark.parametrize("dtype,nodata,fill", [("u1", "70000", 255), ("u2", "-9999", 0), ("i2", "3.5", 4),
                                               ("i2", "-2.5", -3), ("i4", "1e20", 2**31 - 1), ("u2", "nan", 0)])
def test_sparse_fill_with_a_nodata_the_samples_cannot_hold(tmp_path, dtype, nodata, fill):
    """GDAL fills left-out blocks with the nodata value rounded half away from zero and clamped."""
    values = np.ones((32, 16), dtype)
    values[:16] = 0
    (tmp_path / "s.tif").write_bytes(tiff_file(values, Variant(tile=(16, 16), sparse=True, fill=0, nodata=nodata)))
    values[:16] = fill
    np.testing.assert_array_equal(read_raster(tmp_path / "s.tif")[0], values.astype(np.float32))
    if gdal_python() is not None:
        np.testing.assert_array_equal(gdal_reads([(tmp_path / "s.tif", 1, None)])[0], values)


@pytest.mark.parametrize("dtype", ["u8", "i1"])
def test_sparse_int8_or_64_bit_with_a_nodata_the_samples_cannot_hold(tmp_path, dtype):
    """GDAL parses a 64-bit nodata as an integer prefix ("-9999" is 2**64 - 9999 for uint64) and, before
    3.7, clamps an int8 one to Byte: refused."""
    values = np.ones((32, 16), dtype)
    values[:16] = 0
    (tmp_path / "s.tif").write_bytes(tiff_file(values, Variant(tile=(16, 16), sparse=True, nodata="-9999")))
    read_info(tmp_path / "s.tif")
    with pytest.raises(RasterError, match=rf"s.tif: .*sparse.* nodata value -9999 does not fit its {np.dtype(dtype).name}"):
        read_raster(tmp_path / "s.tif")
