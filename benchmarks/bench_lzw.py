"""Throughput of lib/geoio/tiff_codecs.py's numpy LZW decoder against a peer, in MB/s of decoded output.

    python benchmarks/bench_lzw.py
    python benchmarks/bench_lzw.py --size-mb 4 --repeats 7

The peer is imagecodecs.lzw_decode when importable, else tifffile reading an uncompressed copy
of the same bytes (what reading costs when no decoding is needed). Streams are made by the
plain-Python reference encoder of tests/test_geotiff.py, plus the real LZW strips of the shared
rasters when present. Ours decodes a case's segments in one lzw_decode_many call, as
read_raster does for a window. Prints `case  ours  peer  ratio` (ratio = ours / peer).
"""
import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lib.geoio.tiff_codecs import lzw_decode_many  # noqa: E402
from tests.test_tiff_codecs import lzw_encode  # noqa: E402  (the reference encoder)
from tests.test_geotiff import surface  # noqa: E402

try:
    import imagecodecs
except ImportError:
    imagecodecs = None

REAL = REPO.parent / "shared" / "data" / "real"


def synthetic_cases(size_mb: float) -> dict[str, list[bytes]]:
    """Decoded payloads cut into 256 KiB segments, like the tiles of a GeoTIFF."""
    n = int(size_mb * 2**20)
    side = int(np.sqrt(n / 4))
    dsm = surface((side, side)).tobytes()  # float32 surface: short LZW strings
    nodata = np.full(n // 4, np.nan, np.float32).tobytes()  # long strings
    mask = (surface((side, side * 4), seed=1) > 300).astype(np.uint8).tobytes()  # runs
    noise = np.random.default_rng(0).integers(0, 256, n, np.uint8).tobytes()  # incompressible
    seg = 2**18
    return {name: [data[i : i + seg] for i in range(0, len(data), seg)]
            for name, data in (("float32 dsm", dsm), ("nan nodata", nodata),
                               ("uint8 mask", mask), ("random bytes", noise))}


def real_streams(path: Path) -> list[bytes]:
    """The stored LZW strips of one file, as they are on disk."""
    with tifffile.TiffFile(path) as tif:
        page, fh = tif.pages[0], tif.filehandle
        streams = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            fh.seek(offset)
            streams.append(fh.read(count))
        return streams


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peer_seconds(streams: list[bytes], decoded: bytes, repeats: int) -> float:
    if imagecodecs is not None:
        return best_seconds(lambda: [imagecodecs.lzw_decode(s) for s in streams], repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plain.tif"
        tifffile.imwrite(path, np.frombuffer(decoded, np.uint8).reshape(1, -1))
        return best_seconds(lambda: tifffile.imread(path), repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=4.0, help="decoded MB per synthetic case")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is kept")
    args = parser.parse_args(argv)

    cases = {name: [lzw_encode(s) for s in segs] for name, segs in synthetic_cases(args.size_mb).items()}
    for path in sorted(REAL.glob("ALS_CHM_*.tif")):
        cases[path.stem] = real_streams(path)
    peer = "imagecodecs" if imagecodecs is not None else "tifffile uncompressed read"
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()},"
          f" numpy {np.__version__}; peer: {peer}; MB/s of decoded bytes, best of {args.repeats}")
    print(f"{'case':24s} {'ours':>8s} {'peer':>8s} {'ratio':>7s}")
    for name, streams in cases.items():
        decoded = b"".join(lzw_decode_many(streams))
        if imagecodecs is not None:
            assert decoded == b"".join(imagecodecs.lzw_decode(s) for s in streams), name
        mb = len(decoded) / 1e6
        ours = mb / best_seconds(lambda: lzw_decode_many(streams), args.repeats)
        theirs = mb / peer_seconds(streams, decoded, args.repeats)
        print(f"{name:24s} {ours:8.1f} {theirs:8.1f} {ours / theirs:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
