"""One DSM normalisation that ignores absolute elevation, and the train-split statistics behind it.

A tile's reference is a low quantile of its valid pixels (close to the ground in gaps), so a DSM at
500 m and the same DSM at 20 m give the same input; heights above that reference are divided by one
global scale, the std of those relative heights over the train split.
"""
import math
from collections.abc import Iterable

import numpy as np
import torch

from lib.errors import DataError

HIST_RANGE_M = (-200.0, 300.0)  # relative heights and CHM outside are clipped into the edge bins
HIST_BIN_M = 0.01  # percentiles are exact to half a bin
PERCENTILES = (1, 5, 50, 95, 99)


def tile_reference(dsm: torch.Tensor, q: float) -> torch.Tensor:
    """Per-tile `q` quantile (nearest lower rank) of the finite pixels; (B, C, H, W) -> (B, 1, 1, 1).

    Sort + gather rather than nanquantile: exact under a shift, and exportable. All-invalid tiles get 0.
    """
    x = dsm.flatten(1)  # (B, N)
    valid = torch.isfinite(x)
    x = torch.where(valid, x, torch.full_like(x, float("inf"))).sort(dim=1).values  # invalid sort last
    n = valid.sum(dim=1, keepdim=True)  # (B, 1)
    k = ((n - 1).clamp(min=0).to(x.dtype) * q).floor().long()
    ref = x.gather(1, k)
    ref = torch.where(n > 0, ref, torch.zeros_like(ref))
    return ref.view(-1, 1, 1, 1)


class Normalizer(torch.nn.Module):
    """(dsm - per-tile low quantile) / scale, NaN -> 0; optional second channel 1 where valid.

    The statistics live in buffers, so they travel in the state_dict and in exported models.
    """

    def __init__(self, scale: float = 1.0, ref_quantile: float = 0.05, validity: bool = False):
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise DataError(f"normalisation scale must be a finite number > 0 metres, found {scale}")
        if not 0.0 <= ref_quantile <= 1.0:
            raise DataError(f"normalisation ref_quantile must be in [0, 1], found {ref_quantile}")
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("ref_quantile", torch.tensor(float(ref_quantile)))
        self.validity = validity

    @property
    def out_channels(self) -> int:
        """Channels of forward's output: 1, or 2 with the validity channel."""
        return 2 if self.validity else 1

    def forward(self, dsm: torch.Tensor) -> torch.Tensor:
        """dsm (B, 1, H, W) metres, NaN nodata -> (B, out_channels, H, W) float32."""
        dsm = dsm.float()
        valid = torch.isfinite(dsm)
        x = (dsm - tile_reference(dsm, self.ref_quantile)) / self.scale
        x = torch.where(valid, x, torch.zeros_like(x))
        return torch.cat([x, valid.float()], dim=1) if self.validity else x

    def normalise_threshold(self, threshold_m) -> torch.Tensor:
        """CHM threshold(s) in metres -> the same units as forward's output (for FiLM conditioning)."""
        return torch.as_tensor(threshold_m, dtype=torch.float32, device=self.scale.device) / self.scale

    def stats(self) -> dict:
        """JSON-safe statistics; `Normalizer.from_stats(n.stats())` rebuilds the same normalisation."""
        return {"scale": float(self.scale), "ref_quantile": float(self.ref_quantile)}

    @classmethod
    def from_stats(cls, stats: dict, validity: bool = False) -> "Normalizer":
        """From `stats()` or `compute_height_stats(...)` output (keys 'scale', 'ref_quantile')."""
        missing = [k for k in ("scale", "ref_quantile") if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise DataError(f"normalisation stats lack number(s) {missing}; found keys {sorted(stats)}")
        return cls(float(stats["scale"]), float(stats["ref_quantile"]), validity)


class _StreamStats:
    """Count, mean, M2 (Chan et al. merge), min, max and a fixed histogram of a stream of arrays."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf
        lo, hi = HIST_RANGE_M
        self.hist = np.zeros(round((hi - lo) / HIST_BIN_M), np.int64)

    def add(self, x: np.ndarray) -> None:
        x = x[np.isfinite(x)].astype(np.float64)
        if x.size == 0:
            return
        n, mean = x.size, x.mean()
        m2 = ((x - mean) ** 2).sum()
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.n * n / total
        self.n = total
        self.min, self.max = min(self.min, x.min()), max(self.max, x.max())
        bins = np.clip(((x - HIST_RANGE_M[0]) / HIST_BIN_M).astype(np.int64), 0, self.hist.size - 1)
        self.hist += np.bincount(bins, minlength=self.hist.size)

    def summary(self) -> dict:
        if self.n == 0:
            return {"count": 0}
        cdf = np.cumsum(self.hist)
        out = {"count": self.n, "mean": float(self.mean), "std": math.sqrt(self.m2 / self.n),
               "min": float(self.min), "max": float(self.max)}
        for p in PERCENTILES:
            rank = math.floor(p / 100 * (self.n - 1))  # 0-based, numpy's lower neighbour
            i = int(np.searchsorted(cdf, rank + 1))  # the bin holding that sorted value
            centre = HIST_RANGE_M[0] + (i + 0.5) * HIST_BIN_M
            out[f"p{p}"] = round(float(min(max(centre, self.min), self.max)), 6)  # no float noise in JSON
        return out


def compute_height_stats(tiles_iter: Iterable, ref_quantile: float = 0.05) -> dict:
    """Streams (dsm, chm) numpy pairs, (H, W) metres (chm may be None), of the TRAIN split only.

    Returns {"scale", "ref_quantile", "dsm_rel": {...}, "chm": {...}} where each summary has count,
    mean, std, min, max and p1/p5/p50/p95/p99; scale is dsm_rel's std (what Normalizer divides by).
    """
    dsm_rel, chm_stats = _StreamStats(), _StreamStats()
    for dsm, chm in tiles_iter:
        dsm = torch.as_tensor(np.asarray(dsm, np.float32))[None, None]  # (1, 1, H, W)
        dsm_rel.add((dsm - tile_reference(dsm, ref_quantile)).numpy())
        if chm is not None:
            chm_stats.add(np.asarray(chm, np.float32))
    rel = dsm_rel.summary()
    if rel["count"] == 0 or rel["std"] <= 0:
        raise DataError(f"cannot compute a normalisation scale: {rel['count']} valid DSM pixels, "
                        f"std {rel.get('std')}", hint="the train split is empty or flat")
    return {"scale": rel["std"], "ref_quantile": ref_quantile, "dsm_rel": rel, "chm": chm_stats.summary()}
