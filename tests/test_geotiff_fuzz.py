"""Seeded, bounded fuzzing of the GeoTIFF reader: mutated files give pixels equal to GDAL's (or to
tifffile's, without GDAL) or a ForestGapsError naming the file; never another exception or a hang.

Seeds are files of tests/tiff_builder.py (SEEDS) and the small real rasters of ../shared/data/real/; mutations
are byte flips (in the image directory and anywhere), truncations, tag type/count/value edits and IFD
loops. Each read runs under a 10 s alarm and a 256 MiB memory budget.
"""
import signal
import struct
import warnings

import numpy as np
import pytest
import tifffile

from lib.core.errors import ForestGapsError
from lib.geoio.geotiff_read import read_raster
from tests.conftest import REAL_DATA
from tests.gdal_oracle import gdal_python, gdal_reads
from tests.test_geotiff_differential import _samples, expected
from tests.tiff_builder import Variant, tiff_file

N_MUTANTS = 120  # per seed file
SPECIAL = [0, 1, 2, 3, 7, 255, 32767, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


SEEDS = {  # name: (dtype, Variant): the layouts and codecs the reader honours
    "lzw_strips_int16": ("<i2", Variant(compression=5, predictor=2, rows_per_strip=7, nodata="-9999")),
    "deflate_tiles_bigtiff": (">f4", Variant(byteorder=">", bigtiff=True, compression=8, predictor=3, tile=(16, 16))),
    "lzma_planar_rgb": ("u2", Variant(compression=34925, planar=2, photometric=2, tile=(16, 32))),
    "old_lzw_fill_order_2": ("f4", Variant(compression=5, old_lzw=True, fill_order=2, predictor=3)),
    "sparse_deflate": ("f8", Variant(compression=8, tile=(16, 16), sparse=True, fill=-9999.0, nodata="-9999")),
    "packbits_miniswhite": ("u1", Variant(compression=32773, photometric=0, rows_per_strip=5, orientation=3)),
    "plain_float64": (">f8", Variant(byteorder=">", nodata="nan", rows_per_strip=2**32 - 1)),
}


def _seeds() -> dict[str, bytes]:
    """Generated files of SEEDS and the small real rasters (when present), by name."""
    rng = np.random.default_rng(0)
    seeds = {}
    for name, (dtype, variant) in SEEDS.items():
        samples = _samples(rng, np.dtype(dtype), 3 if variant.photometric == 2 else 1)
        if variant.sparse:
            samples[:, :16] = variant.fill
        seeds[name] = tiff_file(samples, variant)
    for name in ("ALS_CHM_DUC.tif", "wellington_DTM.tif"):
        if (REAL_DATA / name).exists():
            seeds[name[:-4]] = (REAL_DATA / name).read_bytes()
    return seeds


def _entries(data: bytes) -> tuple[str, bool, int, list[int]]:
    """(byte order, BigTIFF, next-IFD pointer position, positions of the first IFD's entries)."""
    e = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(e + "H", data[2:4])[0] == 43
    at = struct.unpack(e + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    n = struct.unpack(e + ("Q" if big else "H"), data[at : at + (8 if big else 2)])[0]
    first, size = at + (8 if big else 2), 20 if big else 12
    return e, big, first + n * size, [first + i * size for i in range(n)]


def mutate(data: bytes, rng) -> bytes:
    """One seeded mutation of a TIFF's bytes."""
    e, big, next_at, entries = _entries(data)
    out = bytearray(data)
    kind = rng.integers(6)
    if kind == 0:  # flip bytes of the image directory
        for _ in range(rng.integers(1, 4)):
            out[int(rng.integers(entries[0], next_at))] = int(rng.integers(256))
    elif kind == 1:  # flip bytes anywhere
        for _ in range(rng.integers(1, 8)):
            out[int(rng.integers(len(out)))] = int(rng.integers(256))
    elif kind == 2:  # truncate
        out = out[: int(rng.integers(8, len(out)))]
    elif kind == 3:  # a tag's type
        entry = entries[rng.integers(len(entries))]
        out[entry + 2 : entry + 4] = struct.pack(e + "H", int(rng.integers(0, 19)))
    elif kind == 4:  # a tag's count or inline value
        entry = entries[rng.integers(len(entries))] + (4 if rng.random() < 0.5 else (12 if big else 8))
        value = int(rng.choice(SPECIAL)) if rng.random() < 0.7 else int(rng.integers(2**32))
        out[entry : entry + 4] = struct.pack(e + "I", value)
    else:  # the next IFD points back at the first: a loop
        out[next_at : next_at + (8 if big else 4)] = out[8:16] if big else out[4:8]
    return bytes(out)


def _alarm(signum, frame):
    raise TimeoutError("read took over 10 s")


def run_fuzz(folder, seed: int, n_mutants: int) -> dict[str, list]:
    """Mutate every seed file n_mutants times into `folder` and read each: {"read": [(path, values,
    nodata)], "refused": [path], "other": [text], "unnamed": [text]} (other: an exception that is not a
    ForestGapsError, or a read over 10 s; unnamed: a ForestGapsError that does not name the file)."""
    rng = np.random.default_rng(seed)
    out = {"read": [], "refused": [], "other": [], "unnamed": []}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name, data in _seeds().items():
            for i in range(n_mutants):
                path = folder / f"{name}_{i}.tif"
                path.write_bytes(mutate(data, rng))
                signal.alarm(10)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        values, info = read_raster(path)
                    out["read"].append((path, values, info.nodata))
                except ForestGapsError as exc:
                    out["refused" if str(path) in str(exc) else "unnamed"].append(f"{path.name}: {exc}")
                except Exception as exc:  # noqa: BLE001 - the fuzzer's whole point
                    out["other"].append(f"{path.name}: {type(exc).__name__}: {exc}")
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return out


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the per-read time limit needs SIGALRM (Unix)")
def test_mutated_tiffs_read_as_oracle_or_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr("lib.geoio.geotiff_read.memory_budget", lambda: 2**28)
    monkeypatch.setattr("lib.geoio.tiff_layout.memory_budget", lambda: 2**28)
    out = run_fuzz(tmp_path, 20261207, N_MUTANTS)
    assert not out["other"] and not out["unnamed"], "\n".join(out["other"] + out["unnamed"])
    assert out["refused"] and out["read"], (len(out["refused"]), len(out["read"]))
    differ = compare(out["read"])
    assert not differ, "\n".join(differ)


def _tifffile_read(path):
    """tifffile's decoding, or None where it cannot decode (LZW, PackBits or predictor 3 without
    imagecodecs) or parts from libtiff (a predictor on uncompressed or PackBits data, sparse blocks,
    strip and tile tags mixed)."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if (page.compression in (1, 32773) and page.predictor != 1) or 0 in page.databytecounts \
                    or len(page.databytecounts) != len(page.dataoffsets):  # e.g. TileByteCounts in strips
                return None
            raw = page.asarray(maxworkers=1)
            return raw[..., 0] if raw.ndim == 3 and raw.shape[-1] == 1 else raw  # RGB with one sample
    except Exception as exc:  # noqa: BLE001 - tifffile's refusals are the oracle's answer
        return None if "imagecodecs" in str(exc) else f"{type(exc).__name__}: {exc}"


def compare(read: list, use_gdal: bool = True) -> list[str]:
    """Files read whose pixels differ from GDAL's (tifffile's where GDAL is absent), or that the oracle
    cannot read at all."""
    if use_gdal and gdal_python() is not None:
        theirs = gdal_reads([(path, 1, None) for path, _, _ in read])
    else:
        theirs = []
        theirs = [_tifffile_read(path) for path, _, _ in read]
    differ = []
    for (path, values, nodata), raw in zip(read, theirs):
        if raw is None:
            continue
        if isinstance(raw, str):
            differ.append(f"{path.name}: read here, the oracle refuses it: {raw}")
        elif raw.shape != values.shape or not np.array_equal(
                values, expected(raw, None if nodata is None else repr(nodata)), equal_nan=True):
            differ.append(f"{path.name}: pixels differ from the oracle's")
    return differ
