"""Scene-level quality of a gap model against a reference CHM, beside the classical DSM-only method.

Pixel-wise, as the shipped-model criterion is stated: reference gap = CHM <= T (no area filter), pixels
where the DSM or the CHM is nodata excluded; model gap = probability > 0.5 of the whole-scene
prediction (lib.infer.scene_windows: windows of `window_px`, blended); classical gap = relative height <= T for each
opening window, and "classical_best" keeps the best window per threshold (an upper bound on what a
user tuning that one knob could reach).
"""
import tempfile
from pathlib import Path

import numpy as np
import torch

from lib.gaps.baselines import classical_gaps
from lib.gaps.nesting import nest_probabilities, nesting_violations
from lib.gaps.masks import IGNORE
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import write_raster
from lib.infer.scene_windows import iter_scene, plan_scene

CLASSICAL_WINDOWS_M = (31.0, 51.0, 71.0, 101.0)
DENSE_THRESHOLDS_M = tuple(float(t) for t in range(1, 31))   # nesting measured over the trained range


def reference_gaps(chm: np.ndarray, dsm: np.ndarray, thresholds_m) -> np.ndarray:
    """(H, W) CHM and DSM metres -> (K, H, W) uint8: 1 where CHM <= T, 0 above, IGNORE where either is NaN."""
    valid = np.isfinite(chm) & np.isfinite(dsm)
    t = np.asarray(thresholds_m, np.float32).reshape(-1, 1, 1)
    ref = (np.where(valid, chm, np.inf)[None] <= t).astype(np.uint8)
    ref[:, ~valid] = IGNORE
    return ref


def ious(pred: np.ndarray, ref: np.ndarray) -> list[float]:
    """pred (K, H, W) bool, ref (K, H, W) uint8 0/1/IGNORE -> IoU per threshold (NaN when both are empty)."""
    valid = ref != IGNORE
    pred, gap = pred & valid, ref == 1
    inter = (pred & gap).sum(axis=(1, 2))
    union = (pred | gap).sum(axis=(1, 2))
    return [float(i / u) if u else float("nan") for i, u in zip(inter, union)]


def classical_ious(dsm: np.ndarray, ref: np.ndarray, thresholds_m, pixel_size_m: float = 1.0,
                   windows_m=CLASSICAL_WINDOWS_M) -> dict:
    """{"windows": {"51m": [IoU per T]}, "best": [IoU per T], "best_window_m": [window per T]}."""
    x = torch.from_numpy(np.ascontiguousarray(dsm, np.float32))[None, None]   # (1, 1, H, W)
    per = {w: ious(classical_gaps(x, thresholds_m, w, pixel_size_m)[0].numpy(), ref) for w in windows_m}
    table = np.array([per[w] for w in windows_m])                                 # (windows, K)
    best = np.nanargmax(np.nan_to_num(table, nan=-1.0), axis=0)
    return {"windows": {f"{w:g}m": v for w, v in per.items()}, "best": table[best, range(table.shape[1])].tolist(),
            "best_window_m": [float(windows_m[i]) for i in best]}


def scene_probabilities(net, dsm_path, thresholds_m, window_px: int, overlap: float = 0.25, stride: int = 1,
                        batch_size: int = 8, tta: bool = False, device="cpu") -> np.ndarray:
    """Whole-scene probabilities (K, H, W) float32, NaN at nodata, with the prediction pipeline (lib.infer.scene_windows)."""
    info = read_info(dsm_path)
    plan = plan_scene(info.height, info.width, window_px, overlap, stride)
    out = np.empty((len(thresholds_m), info.height, info.width), np.float32)
    for row0, block in iter_scene(net, dsm_path, plan, thresholds_m, batch_size, tta, device):
        out[:, row0:row0 + block.shape[1]] = block
    return out


def score_scene(net, dsm_path, chm_path, thresholds_m, window_px: int, overlap: float = 0.25, stride: int = 1,
                batch_size: int = 8, tta: bool = False, device="cpu", dense_thresholds_m=DENSE_THRESHOLDS_M) -> dict:
    """IoU per threshold of the model (raw and nested), of each classical window and the best of them, and
    the model's nesting violation rate at the listed thresholds and over dense_thresholds_m."""
    dsm, info = read_raster(dsm_path)
    chm, _ = read_raster(chm_path)
    ref = reference_gaps(chm, dsm, thresholds_m)
    run = dict(window_px=window_px, overlap=overlap, stride=stride, batch_size=batch_size, tta=tta, device=device)
    probs = scene_probabilities(net, dsm_path, thresholds_m, **run)
    nested = nest_probabilities(probs, thresholds_m)
    report = {"dsm": str(dsm_path), "chm": str(chm_path), "thresholds_m": [float(t) for t in thresholds_m],
              "valid_pixels": int((ref[0] != IGNORE).sum()),
              "gap_fraction": [float((r == 1).sum() / max((r != IGNORE).sum(), 1)) for r in ref],
              "model": ious(probs > 0.5, ref), "model_nested": ious(nested > 0.5, ref),
              "classical": classical_ious(dsm, ref, thresholds_m, info.pixel_size[0]),
              "nesting": nesting_violations(probs > 0.5, thresholds_m)}
    if dense_thresholds_m:
        dense = scene_probabilities(net, dsm_path, dense_thresholds_m, **run)
        report["nesting_dense"] = nesting_violations(dense > 0.5, dense_thresholds_m)
        report["nesting_dense"].pop("pairs")
    return report


def flat_closed_scene(folder, size_px: int = 512, seed: int = 7_000_001) -> tuple[Path, Path]:
    """Write a flat, closed-canopy temperate LiDAR scene (the classical method's best case) as
    flat_closed_DSM.tif / _CHM.tif into folder; returns (dsm path, chm path). Not a training seed."""
    from lib.data.synthetic import SiteParams, generate_site
    params = SiteParams(size_px=size_px, forest="temperate", relief_m=2.0, max_slope_deg=5.0, ridges=0.0,
                        gullies=0.0, stand_weights=(1.0, 0.0, 0.0, 0.0, 0.0), gap_fraction=0.08,
                        sensor="lidar", pit_fraction=0.02, nodata_fraction=0.0, base_elevation_m=250.0)
    site = generate_site(seed, params)
    info = GeoInfo(height=size_px, width=size_px, pixel_size=(1.0, 1.0), origin=(0.0, float(size_px)))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "flat_closed_DSM.tif", folder / "flat_closed_CHM.tif"
    for path, array in zip(paths, (site.dsm, site.chm)):
        write_raster(path, array.astype(np.float32), info, nodata=float("nan"))
    return paths


def score_flat_closed(net, thresholds_m, window_px: int, **run) -> dict:
    """score_scene on flat_closed_scene() written to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        dsm_path, chm_path = flat_closed_scene(tmp)
        return score_scene(net, dsm_path, chm_path, thresholds_m, window_px, **run)
