"""How the training data's synthetic forests compare with the real rasters in ../shared/data/real/.

    python benchmarks/synthetic_realism.py            # 24 synthetic sites of each sensor, as prepare_data draws them

For each real CHM (ForestGapR's three Amazon ALS CHMs, Wellington's) and for synthetic sites drawn like the
training sites (lib.data.synthetic.random_site_params; LiDAR and photogrammetry apart), prints: the share of
pixels in a gap (CHM <= T, 8-connected, >= 10 m2) at 2 / 5 / 10 / 15 m, gaps per hectare at 5 m, the median and
95th percentile of canopy height, and the surface's pixel roughness (median |Laplacian| of the CHM, m), the
statistic that tells a LiDAR surface (pits, sharp crowns) from a photogrammetric one (smooth, bridged gaps).
Synthetic rows give the median over sites and, in brackets, the 10th-90th percentile range: a real value
inside that range is a regime the training data covers. There is no real photogrammetric raster in
../shared, so the photogrammetry rows are compared with the LiDAR ones only (smoother, fewer small gaps).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.data.synthetic import generate_site, random_site_params  # noqa: E402
from lib.gaps.masks import gap_labels  # noqa: E402
from lib.geoio.geotiff_read import read_raster  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL_CHMS = ("ALS_CHM_DUC", "ALS_CHM_CAU_2012", "ALS_CHM_CAU_2014", "wellington_CHM")
THRESHOLDS = (2.0, 5.0, 10.0, 15.0)


def statistics(chm: np.ndarray) -> list[float]:
    """[gap share at each threshold, gaps/ha at 5 m, height p50, p95, median |Laplacian|] of a 1 m CHM."""
    valid = np.isfinite(chm)
    shares = [float((gap_labels(chm, t, 10.0, 1e9, 1.0)[0] > 0).sum() / valid.sum()) for t in THRESHOLDS]
    per_ha = gap_labels(chm, 5.0, 10.0, 1e9, 1.0)[1] / (valid.sum() / 1e4)
    lap = 4 * chm[1:-1, 1:-1] - chm[:-2, 1:-1] - chm[2:, 1:-1] - chm[1:-1, :-2] - chm[1:-1, 2:]
    heights = chm[valid]
    return shares + [per_ha, float(np.percentile(heights, 50)), float(np.percentile(heights, 95)),
                     float(np.nanmedian(np.abs(lap)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=24, help="synthetic sites per sensor")
    parser.add_argument("--size", type=int, default=384, help="synthetic site side, px (1 m)")
    args = parser.parse_args(argv)
    header = [f"gap@{t:g}m" for t in THRESHOLDS] + ["gaps/ha@5m", "h p50", "h p95", "|lap| p50"]
    print(f"{'raster':28s} " + " ".join(f"{h:>18s}" for h in header))
    for name in REAL_CHMS:
        if (REAL / f"{name}.tif").exists():
            chm = read_raster(REAL / f"{name}.tif")[0]
            print(f"{name:28s} " + " ".join(f"{v:18.3f}" for v in statistics(chm)))
    rows = {"lidar": [], "photogrammetry": []}
    seed = 0
    while min(len(r) for r in rows.values()) < args.sites:
        params = random_site_params(np.random.default_rng(seed * 100_003 + 7), args.size)
        if len(rows[params.sensor]) < args.sites:
            rows[params.sensor].append(statistics(generate_site(seed, params).chm))
        seed += 1
    for sensor, values in rows.items():
        lo, mid, hi = np.percentile(np.array(values), [10, 50, 90], axis=0)
        print(f"{'synthetic ' + sensor:28s} " + " ".join(f"{m:.3g} [{a:.2g}, {b:.2g}]".rjust(18)
                                                      for a, m, b in zip(lo, mid, hi)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
