"""A longer run of the GeoTIFF reader's fuzzer (tests/test_geotiff_fuzz.py): more seeds, more mutants.

    python benchmarks/fuzz_geotiff.py
    python benchmarks/fuzz_geotiff.py --seeds 1 2 3 4 5 6 7 8 --mutants 400

Per seed: cases, read (pixels compared with GDAL's, or tifffile's without GDAL), refused (a
ForestGapsError naming the file), other (another exception, or a read over 10 s), unnamed (an error
that does not name the file) and differ (read, but not as the oracle reads it). Exits 1 when any of
the last three is not 0. Reads run with a 256 MiB memory budget, as in the test.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import lib.geoio.geotiff_read  # noqa: E402
import lib.geoio.tiff_layout  # noqa: E402
from tests.gdal_oracle import gdal_python  # noqa: E402
from tests.test_geotiff_fuzz import compare, run_fuzz  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--mutants", type=int, default=300, help="mutants per seed file")
    args = parser.parse_args(argv)
    lib.geoio.geotiff_read.memory_budget = lib.geoio.tiff_layout.memory_budget = lambda: 2**28
    print(f"oracle: {'GDAL via ' + gdal_python() if gdal_python() else 'tifffile'}")
    print("seed  cases  read  refused  other  unnamed  differ  seconds")
    bad = 0
    for seed in args.seeds:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = run_fuzz(Path(tmp), seed, args.mutants)
            differ = compare(out["read"])
        problems = out["other"] + out["unnamed"] + differ
        bad += len(problems)
        cases = sum(len(v) for v in out.values())
        print(f"{seed:4d}  {cases:5d}  {len(out['read']):4d}  {len(out['refused']):7d}  {len(out['other']):5d}"
              f"  {len(out['unnamed']):7d}  {len(differ):6d}  {time.perf_counter() - start:7.1f}")
        for line in problems[:20]:
            print("   ", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
