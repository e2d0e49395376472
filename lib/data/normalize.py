"""One DSM normalisation that ignores absolute elevation, and the train-split statistics behind it.

A tile's reference is a low quantile of its valid pixels (close to the ground in gaps), so a DSM at
500 m and the same DSM at 20 m give the same input; heights above that reference are divided by one
global scale, the std of those relative heights over the train split.

Optional extra input channels ("features") are the classical relative height (DSM minus its grey
opening, lib/baselines) at given windows, in the same units. They are computed on whatever the model
is given: a training tile, or one prediction window. The opening near a tile edge sees only the tile,
so prediction must use windows of the training tile size (predict's default) to see what training saw.
The one exception, filtered_height, is the DSM minus the ground filter run over the whole site or scene
(lib.data.scene_ground): its ground arrives as the input's second channel, computed before tiling.
"""
import math
from collections.abc import Iterable

import numpy as np
import torch

from lib.gaps.baselines import classical_relative_height
from lib.core.errors import DataError
from lib.core.schema import INPUT_FEATURE, valid_input_feature

HIST_RANGE_M = (-200.0, 300.0)  # relative heights and CHM outside are clipped into the edge bins
HIST_BIN_M = 0.01  # percentiles are exact to half a bin
PERCENTILES = (1, 5, 50, 95, 99)


FILTERED = "filtered_height"  # the feature read off the scene-level ground (the input's channel 1)


def parse_features(features) -> list[tuple[str, float]]:
    """["dsm", "relative_height_51m", "filtered_height"] -> [("dsm", 0.0), ("relative_height", 51.0),
    ("filtered_height", inf)]; unknown names fail. The filter's window is the whole scene: infinite."""
    features = [str(f) for f in features]
    bad = [f for f in features if not valid_input_feature(f)]
    if bad or not features or len(set(features)) != len(features):
        raise DataError(f"input features {features}: expected distinct names 'dsm', 'filtered_height' or "
                        f"'relative_height_<W>m' with W > 0 metres (e.g. relative_height_51m)")
    parsed = []
    for f in features:
        window = INPUT_FEATURE.fullmatch(f).group(1)
        parsed.append((f, math.inf) if f == FILTERED else ("dsm", 0.0) if window is None
                      else ("relative_height", float(window)))
    return parsed


def relative_height_channels(features) -> list[int]:
    """Indices of the relative-height features (relative_height_<W>m and filtered_height) in the normalised
    input (model.classical_prior), narrowest window first: the prior's gate takes the last one as the
    classical method's ground."""
    parsed = parse_features(features)
    return sorted((i for i, (kind, _) in enumerate(parsed) if kind != "dsm"), key=lambda i: parsed[i][1])


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


def tile_reference_numpy(dsm: np.ndarray, q: float) -> float:
    """tile_reference of one (H, W) tile, bit-identical, by selection instead of a sort (50x faster on a
    512 px tile): the train-split statistics visit every tile of every site."""
    valid = dsm[np.isfinite(dsm)]
    if valid.size == 0:
        return 0.0
    k = int(np.floor(np.float32(valid.size - 1) * np.float32(q)))   # float32 rank, as in tile_reference
    return float(np.partition(valid, k)[k])


class Normalizer(torch.nn.Module):
    """One channel per feature, each in metres / scale with NaN -> 0; optional last channel 1 where valid.

    "dsm": (dsm - per-tile low quantile) / scale. "relative_height_<W>m": (dsm - grey opening of the
    tile over W metres) / scale. Both are unchanged by adding a constant to the DSM. The statistics live
    in buffers, so they travel in the state_dict and in exported models.
    """

    def __init__(self, scale: float = 1.0, ref_quantile: float = 0.05, validity: bool = False,
                 features=("dsm",), pixel_size_m: float = 1.0):
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise DataError(f"normalisation scale must be a finite number > 0 metres, found {scale}")
        if not 0.0 <= ref_quantile <= 1.0:
            raise DataError(f"normalisation ref_quantile must be in [0, 1], found {ref_quantile}")
        if not (math.isfinite(pixel_size_m) and pixel_size_m > 0):
            raise DataError(f"normalisation pixel_size_m must be a finite number > 0, found {pixel_size_m}")
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("ref_quantile", torch.tensor(float(ref_quantile)))
        self.validity = validity
        self.features = [str(f) for f in features]
        self.parsed = parse_features(self.features)
        self.pixel_size_m = float(pixel_size_m)

    @property
    def out_channels(self) -> int:
        """Channels of forward's output: one per feature, plus the validity channel."""
        return len(self.features) + int(self.validity)

    @property
    def needs_ground(self) -> bool:
        """True when the input must carry the scene-level ground filter as channel 1 (feature filtered_height)."""
        return any(kind == FILTERED for kind, _ in self.parsed)

    def forward(self, dsm: torch.Tensor) -> torch.Tensor:
        """dsm (B, 1, H, W) metres, NaN nodata -> (B, out_channels, H, W) float32. With filtered_height the
        input is (B, 2, H, W): the DSM, then the ground filter's ground over the whole scene (lib.data.scene_ground)."""
        if not torch.jit.is_tracing() and dsm.shape[1] != 1 + self.needs_ground:  # a trace fixes the shape anyway
            raise DataError(f"the normaliser of features {self.features} takes {1 + self.needs_ground} input "
                            f"channel(s) (the DSM{', then the scene ground' if self.needs_ground else ''}), "
                            f"found shape {tuple(dsm.shape)}")
        ground = dsm[:, 1:].float() if self.needs_ground else None
        dsm = dsm[:, :1].float()
        valid = torch.isfinite(dsm)
        channels = []
        for kind, window_m in self.parsed:
            if kind == "dsm":
                rel = dsm - tile_reference(dsm, self.ref_quantile)
            elif kind == FILTERED:
                rel = dsm - ground
            else:  # cost: two separable max filters and one box mean of window_m / pixel_size_m pixels
                rel = classical_relative_height(dsm, window_m, self.pixel_size_m)
            channels.append(torch.where(valid, rel / self.scale, torch.zeros_like(rel)))
        if self.validity:
            channels.append(valid.float())
        return torch.cat(channels, dim=1) if len(channels) > 1 else channels[0]

    def normalise_threshold(self, threshold_m) -> torch.Tensor:
        """CHM threshold(s) in metres -> the same units as forward's output (for FiLM conditioning)."""
        # type_as, not as_tensor(device=...): a trace would bake the export-time device in
        t = threshold_m if torch.is_tensor(threshold_m) else torch.as_tensor(threshold_m, dtype=torch.float32)
        return t.type_as(self.scale) / self.scale

    def stats(self) -> dict:
        """JSON-safe statistics; `Normalizer.from_stats(n.stats())` rebuilds the same normalisation."""
        return {"scale": float(self.scale), "ref_quantile": float(self.ref_quantile),
                "features": list(self.features), "pixel_size_m": self.pixel_size_m}

    @classmethod
    def from_stats(cls, stats: dict, validity: bool = False, features=None,
                   pixel_size_m: float | None = None) -> "Normalizer":
        """From `stats()` or `compute_height_stats(...)` output (keys 'scale', 'ref_quantile').

        features / pixel_size_m, when given (a training run's data config), override the stats' own
        ones; stats without them (older checkpoints, dataset manifests) mean ["dsm"] at 1 m.
        """
        missing = [k for k in ("scale", "ref_quantile") if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise DataError(f"normalisation stats lack number(s) {missing}; found keys {sorted(stats)}")
        features = features if features is not None else stats.get("features", ["dsm"])
        pixel_size_m = pixel_size_m if pixel_size_m is not None else stats.get("pixel_size_m", 1.0)
        return cls(float(stats["scale"]), float(stats["ref_quantile"]), validity, features, float(pixel_size_m))


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
        dsm = np.asarray(dsm, np.float32)
        dsm_rel.add(dsm - np.float32(tile_reference_numpy(dsm, ref_quantile)))
        if chm is not None:
            chm_stats.add(np.asarray(chm, np.float32))
    rel = dsm_rel.summary()
    if rel["count"] == 0 or rel["std"] <= 0:
        raise DataError(f"cannot compute a normalisation scale: {rel['count']} valid DSM pixels, "
                        f"std {rel.get('std')}", hint="the train split is empty or flat")
    return {"scale": rel["std"], "ref_quantile": ref_quantile, "dsm_rel": rel, "chm": chm_stats.summary()}
