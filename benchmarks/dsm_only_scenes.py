"""Scenes with a known CHM for judging DSM-only methods, across the regimes users bring.

Validation scenes (choose settings here): real CHMs (ForestGapR's Amazon examples) laid over a real DTM
from elsewhere (Wellington's, steep) and over synthetic flat terrain, and synthetic sites for open
woodland, volcanic-steep terrain, drone photogrammetry at 0.5 m and 2 m, and a plot under 150 m across.
Development scene (report, never select on it): Wellington's own DSM and CHM.
Each scene: (name, regime, dsm (H, W) float32, chm (H, W) float32, pixel size m); NaN = nodata.
"""
from pathlib import Path

import numpy as np

from lib.data.synthetic import SiteParams, generate_site, hybrid_site
from lib.geoio.geotiff_read import read_raster

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
AMAZON = ("ALS_CHM_DUC", "ALS_CHM_CAU_2012", "ALS_CHM_CAU_2014")


def _read(name: str) -> np.ndarray:
    return read_raster(REAL / f"{name}.tif")[0]


def _coarsen(a: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks (NaN if any is NaN): a coarser grid of the same scene."""
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _refine(a: np.ndarray, f: int) -> np.ndarray:
    """Each pixel repeated f x f: the same scene on a finer grid."""
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def real_hybrids():
    """Amazon CHMs over Wellington's DTM (steep, real) and over flat synthetic terrain."""
    if not (REAL / "wellington_DTM.tif").exists():
        return []
    dtm = _read("wellington_DTM")
    scenes = []
    for name in AMAZON:
        chm = _read(name)
        h, w = min(chm.shape[0], dtm.shape[0]), min(chm.shape[1], dtm.shape[1])
        c = chm[:h, :w]
        scenes.append((f"{name}+wellington_dtm", "closed tropical, steep real terrain", dtm[:h, :w] + c, c, 1.0))
        flat = hybrid_site(chm, seed=11, relief_m=3.0, max_slope_deg=3.0, ridges=0.0, gullies=0.0)
        scenes.append((f"{name}+flat", "closed tropical, flat", flat.dsm, flat.chm, 1.0))
    return scenes


def _site(seed: int, **fields):
    site = generate_site(seed, SiteParams(**fields))
    return site.dsm, site.chm


def synthetic_regimes():
    """Synthetic sites for the regimes the real hybrids do not cover (seeds outside the training range)."""
    open_w = dict(stand_weights=(0.2, 1.0, 0.0, 0.0, 0.3), gap_fraction=0.35, forest="temperate")
    scenes = [("open_woodland", "open woodland, rolling, LiDAR 1 m", *_site(9_100_001, size_px=384, **open_w), 1.0),
              ("volcanic_steep", "closed, steep volcanic relief, LiDAR 1 m",
               *_site(9_100_002, size_px=384, relief_m=260.0, max_slope_deg=42.0, ridges=0.7, gullies=0.7), 1.0),
              ("drone_2m", "photogrammetry 2 m, conifers and cuts",
               *_site(9_100_003, size_px=256, pixel_size_m=2.0, sensor="photogrammetry",
                      gap_fraction=0.15, relief_m=120.0), 2.0)]
    dsm, chm = _site(9_100_004, size_px=512, pixel_size_m=0.5, sensor="photogrammetry", relief_m=60.0,
                     max_slope_deg=35.0, forest="temperate", smoothing_m=1.0)
    scenes.append(("drone_plot_0.5m", "photogrammetry 0.5 m plot, 140 x 110 m, steep",
                   dsm[:220, :280], chm[:220, :280], 0.5))
    return scenes


def pixel_size_variants(scenes):
    """The first real hybrid at 0.5 m and 2 m as well: one setting must serve every pixel size."""
    if not scenes:
        return []
    name, regime, dsm, chm, _ = scenes[0]
    return [(f"{name}@2m", regime + ", 2 m", _coarsen(dsm, 2), _coarsen(chm, 2), 2.0),
            (f"{name}@0.5m", regime + ", 0.5 m", _refine(dsm, 2), _refine(chm, 2), 0.5)]


def validation_scenes():
    hybrids = real_hybrids()
    return hybrids + pixel_size_variants(hybrids) + synthetic_regimes()


def development_scenes():
    if not (REAL / "wellington_DSM.tif").exists():
        return []
    return [("wellington", "steep LiDAR, New Zealand (development)", _read("wellington_DSM"),
             _read("wellington_CHM"), 1.0)]
