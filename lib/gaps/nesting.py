"""Consistency of gap maps across thresholds: a gap at T must stay a gap at every T' > T.

A threshold-conditioned model predicts each threshold separately, so nothing forces its masks to nest.
Taking the cumulative maximum of the probabilities over increasing thresholds makes them nest (the
mask at T is then contained in the mask at T' > T for any probability cut) and changes a pixel only
where the raw prediction contradicted itself.
"""
import numpy as np

from lib.core.errors import DataError


def _order(thresholds_m, k: int) -> np.ndarray:
    """Indices that sort the K thresholds increasingly; they must be K distinct numbers."""
    t = np.asarray(thresholds_m, dtype=np.float64)
    if t.shape != (k,) or len(np.unique(t)) != k:
        raise DataError(f"thresholds {list(thresholds_m)} must be {k} distinct values, one per probability map")
    return np.argsort(t, kind="stable")


def nest_probabilities(probs: np.ndarray, thresholds_m) -> np.ndarray:
    """probs (K, ...) at thresholds_m (K,), any order -> the cumulative max over increasing thresholds.

    NaN (nodata) stays NaN: a pixel is nodata at every threshold. Returns a new float array.
    """
    probs = np.asarray(probs)
    order = _order(thresholds_m, probs.shape[0])
    nested = np.empty_like(probs)
    nested[order] = np.maximum.accumulate(probs[order], axis=0)  # NaN propagates along its own pixel only
    return nested


def nesting_violations(masks: np.ndarray, thresholds_m) -> dict:
    """masks (K, ...) bool at thresholds_m -> how often a gap at one threshold is not a gap at the next.

    Returns {"pairs": [{"lower_m", "upper_m", "gap_pixels", "violations", "rate"}], "rate": overall},
    rate = pixels gap at T but not at the next higher T', over the pixels gap at T (NaN when none).
    """
    masks = np.asarray(masks, dtype=bool)
    order = _order(thresholds_m, masks.shape[0])
    t = np.asarray(thresholds_m, dtype=np.float64)[order]
    pairs, total_gap, total_bad = [], 0, 0
    for i in range(len(order) - 1):
        low, high = masks[order[i]], masks[order[i + 1]]
        gap, bad = int(low.sum()), int((low & ~high).sum())
        pairs.append({"lower_m": float(t[i]), "upper_m": float(t[i + 1]), "gap_pixels": gap,
                      "violations": bad, "rate": bad / gap if gap else float("nan")})
        total_gap, total_bad = total_gap + gap, total_bad + bad
    return {"pairs": pairs, "rate": total_bad / total_gap if total_gap else float("nan")}
