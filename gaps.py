"""Find ForestGapR-style canopy gaps in a CHM: a gap-id GeoTIFF and a statistics CSV per threshold.

    python gaps.py --chm ../shared/data/real/ALS_CHM_DUC.tif --thresholds 10 --min-area 5 --max-area 1000 --out runs/gaps_duc
    python gaps.py --chm ../shared/data/real/ALS_CHM_CAU_2012.tif --thresholds 5 10 15 --out runs/gaps_cau
    python gaps.py --dsm ../shared/data/real/wellington_DSM.tif --dtm ../shared/data/real/wellington_DTM.tif --thresholds 2.5 --out runs/gaps_wel
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from lib.cli import handle_errors
from lib.gaps import gap_labels, gap_stats, threshold_tag, write_gap_table
from lib.raster import read_pair, read_raster, write_raster


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A gap is an 8-connected patch where CHM <= threshold whose area (m²) lies within "
                    "[--min-area, --max-area], as in ForestGapR's getForestGaps. Writes "
                    "OUT/gaps_<T>m.tif (int32 gap ids, 0 = no gap, georeferenced like the input) and "
                    "OUT/gaps_<T>m.csv (one row per gap: area, CHM max/min/mean/sd/gini/range, centroid).",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--chm", type=Path, help="canopy height model GeoTIFF (m)")
    source.add_argument("--dsm", type=Path,
                        help="digital surface model GeoTIFF; needs --dtm (CHM = DSM - DTM)")
    parser.add_argument("--dtm", type=Path, help="digital terrain model GeoTIFF on the DSM's grid")
    parser.add_argument("--thresholds", type=float, nargs="+", required=True, metavar="M",
                        help="canopy height thresholds in m, e.g. 5 10 15")
    parser.add_argument("--min-area", type=float, default=1.0, metavar="M2",
                        help="smallest gap kept, m² inclusive (default 1, as ForestGapR)")
    parser.add_argument("--max-area", type=float, default=10_000.0, metavar="M2",
                        help="largest gap kept, m² inclusive (default 10000 = 1 ha, as ForestGapR)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    args = parser.parse_args(argv)
    if (args.dsm is None) != (args.dtm is None):
        parser.error("--dsm and --dtm go together (or give --chm alone)")
    return args


@handle_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.chm is not None:
        chm, info = read_raster(args.chm)
    else:
        _, chm, info = read_pair(args.dsm, dtm=args.dtm)
    valid_m2 = np.count_nonzero(~np.isnan(chm)) * info.pixel_area
    args.out.mkdir(parents=True, exist_ok=True)
    for threshold in dict.fromkeys(args.thresholds):            # unique, in the order given
        labels, n = gap_labels(chm, threshold, args.min_area, args.max_area, info.pixel_area)
        stats = gap_stats(labels, n, chm, info)
        stem = args.out / f"gaps_{threshold_tag(threshold)}"    # not with_suffix: "2.5m" has a dot
        write_raster(f"{stem}.tif", labels, info, nodata=0)
        write_gap_table(f"{stem}.csv", stats)
        gap_m2 = float(stats["gap_area"].sum())
        fraction = gap_m2 / valid_m2 if valid_m2 else float("nan")
        print(f"{threshold_tag(threshold):>6}: {n} gaps, {gap_m2:.1f} m² of gap = {fraction:.2%} of the "
              f"valid area -> {stem}.tif, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
