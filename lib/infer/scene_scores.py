"""A mapped scene against its reference CHM (or DTM): pixel scores beside the DSM-only methods (the ground
filter of lib/gaps/ground_filter.py, and the grey opening as "classical"),
and the gap statistics ecologists compare (count, λ by Asner and by Hanel, Clark–Evans R; lib.gaps.analysis)
of the predicted map next to those of the reference map, threshold by threshold.

Reference gaps follow the training labels: CHM <= T, 8-connected, [min, max] area filter. Holds the scene.
"""
from pathlib import Path

import numpy as np
import torch

from lib.gaps.analysis import summarize_gap_map
from lib.gaps.baselines import classical_relative_height
from lib.gaps.ground_filter import filtered_relative_height
from lib.gaps.masks import IGNORE, gap_labels, gap_masks, threshold_tag
from lib.train.metrics import ThresholdMetrics
from lib.geoio.geotiff_read import read_pair, read_raster
from lib.geoio.geotiff_write import write_raster
from lib.infer.scene_gaps import mask_labels

SCORE_KEYS = ("iou", "f1", "precision", "recall")


def pixel_scores(pred: np.ndarray, ref: np.ndarray, thresholds_m) -> dict:
    """pred (K, H, W) bool gaps, ref (K, H, W) uint8 0/1/IGNORE -> {tag: {iou, f1, precision, recall}, "mean": ...}."""
    metrics = ThresholdMetrics(thresholds_m)
    metrics.update(torch.from_numpy(pred)[:, None].float(), torch.from_numpy(ref)[:, None],
                   torch.arange(len(thresholds_m)), from_logits=False)
    values = metrics.compute()
    tags = [threshold_tag(t) for t in thresholds_m] + ["mean"]
    return {tag: {key: values[f"{key}_{tag}"] for key in SCORE_KEYS} for tag in tags}


def reference_maps(chm: np.ndarray, thresholds_m, min_area_m2: float, max_area_m2: float, info):
    """(K, H, W) uint8 reference masks (1 gap, 0, IGNORE nodata) and lib.gaps.analysis summaries per threshold."""
    masks, summaries = np.empty((len(thresholds_m), *chm.shape), np.uint8), []
    for k, t in enumerate(thresholds_m):
        labels, n = gap_labels(chm, t, min_area_m2, max_area_m2, info.pixel_area)
        masks[k] = labels > 0
        summaries.append(summarize_gap_map(labels, n, info))
    masks[:, np.isnan(chm)] = IGNORE
    return masks, summaries


def score_scene(out_dir, dsm_path, thresholds_m, min_area_m2: float, max_area_m2: float, chm_path=None,
                dtm_path=None, classical_window_m: float = 51.0) -> dict:
    """Writes ref_gaps_{tag}.tif into out_dir and scores its gaps_{tag}.tif and the classical baseline.

    Returns {"model", "classical": pixel scores per tag, "gap_statistics": {tag: {"model", "reference"}}, ...};
    the predicted map's statistics use the same area filter as the reference (idempotent on filtered maps).
    """
    out_dir = Path(out_dir)
    dsm, chm, info = read_pair(dsm_path, chm=chm_path, dtm=dtm_path)
    ref, ref_stats = reference_maps(chm, thresholds_m, min_area_m2, max_area_m2, info)  # (K, H, W)
    del chm
    tags = [threshold_tag(t) for t in thresholds_m]
    for tag, mask in zip(tags, ref):
        write_raster(out_dir / f"ref_gaps_{tag}.tif", mask, info, nodata=IGNORE)
    pred = np.stack([read_raster(out_dir / f"gaps_{tag}.tif")[0] == 1 for tag in tags])  # (K, H, W) bool
    pred_stats = [summarize_gap_map(*mask_labels(p, min_area_m2, max_area_m2, info.pixel_area), info) for p in pred]
    x = torch.from_numpy(dsm)[None, None]
    baselines = {}
    for name, rel in (("classical", classical_relative_height(x, classical_window_m, info.pixel_size[0])),
                      ("ground_filter", filtered_relative_height(x, info.pixel_size[0]))):
        masks = gap_masks(rel[0, 0].numpy(), thresholds_m, min_area_m2, max_area_m2, info.pixel_area)
        baselines[name] = pixel_scores(masks == 1, ref, thresholds_m)
    return {"reference": str(chm_path or dtm_path), "reference_kind": "chm" if chm_path else "dtm",
            "thresholds_m": list(thresholds_m), "valid_pixels": int((ref[0] != IGNORE).sum()),
            "model": pixel_scores(pred, ref, thresholds_m),
            **baselines, "classical_window_m": classical_window_m,
            "gap_statistics": {tag: {"model": p, "reference": r} for tag, p, r in zip(tags, pred_stats, ref_stats)}}
