"""Per-band normalisation of classification tiles: train-split mean/std per band, in the manifest and the
checkpoint, so training, evaluation and export see the same inputs.

The DSM tasks use lib.data.normalize.Normalizer (per-tile reference, one height scale); multispectral tiles have
no such reference, so each band is standardised with its own statistics. `normalizer_from_stats` picks
the right one from the stats a manifest or checkpoint holds ("kind": "bands" marks these).
"""
from collections.abc import Iterable

import numpy as np
import torch

from lib.core.errors import DataError

KIND = "bands"


class BandStats:
    """Streaming per-band count, sum and sum of squares (float64) over the finite pixels of (C, H, W) tiles."""

    def __init__(self):
        self.n = self.total = self.squares = None

    def add(self, image: np.ndarray) -> None:
        x = np.asarray(image, np.float64).reshape(image.shape[0], -1)      # (C, H*W)
        finite = np.isfinite(x)
        x = np.where(finite, x, 0.0)
        n, total, squares = finite.sum(1), x.sum(1), (x * x).sum(1)
        if self.n is None:
            self.n, self.total, self.squares = n, total, squares
        elif len(n) != len(self.n):
            raise DataError(f"tile has {len(n)} bands, earlier tiles had {len(self.n)}")
        else:
            self.n, self.total, self.squares = self.n + n, self.total + total, self.squares + squares

    def summary(self) -> dict:
        """{"kind": "bands", "mean": [C], "std": [C], "count": [C]}; fails on an empty or constant band."""
        if self.n is None or not self.n.all():
            raise DataError("cannot compute band statistics: a band has no finite pixel in the train split")
        mean = self.total / self.n
        std = np.sqrt(np.maximum(self.squares / self.n - mean**2, 0.0))
        if not (std > 0).all():
            raise DataError(f"band(s) {np.flatnonzero(std <= 0).tolist()} are constant over the train split: "
                            f"nothing to learn from them")
        return {"kind": KIND, "mean": mean.tolist(), "std": std.tolist(), "count": self.n.tolist()}


def band_stats(images: Iterable[np.ndarray]) -> dict:
    """Per-band statistics of (C, H, W) train tiles (see BandStats.summary)."""
    stats = BandStats()
    for image in images:
        stats.add(image)
    return stats.summary()


class BandNormalizer(torch.nn.Module):
    """(B, C, H, W) -> (x - mean_c) / std_c with NaN -> 0; the statistics are buffers (in the state_dict)."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.dim() != 1 or mean.shape != std.shape or not bool((std > 0).all() & mean.isfinite().all()):
            raise DataError(f"band normalisation needs equal-length finite means and stds > 0, found "
                            f"mean {mean.tolist()}, std {std.tolist()}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    @property
    def out_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() - self.mean) / self.std                            # (B, C, H, W)
        return torch.where(x.isfinite(), x, torch.zeros_like(x))

    def normalise_threshold(self, threshold_m) -> torch.Tensor:
        """Classifiers take no threshold: zeros of the same shape (a FiLM encoder then sees 0)."""
        return torch.zeros_like(torch.as_tensor(threshold_m, dtype=torch.float32, device=self.mean.device))

    def stats(self) -> dict:
        return {"kind": KIND, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    @classmethod
    def from_stats(cls, stats: dict) -> "BandNormalizer":
        missing = [k for k in ("mean", "std") if not isinstance(stats.get(k), list)]
        if missing or stats.get("kind") != KIND:
            raise DataError(f"band normalisation stats need kind 'bands' and lists {missing or ['mean', 'std']}; "
                            f"found keys {sorted(stats)}")
        return cls(stats["mean"], stats["std"])


def normalizer_from_stats(stats: dict, data_cfg=None) -> torch.nn.Module:
    """BandNormalizer for per-band stats, else the DSM Normalizer (with data_cfg's features and pixel size)."""
    if stats.get("kind") == KIND:
        return BandNormalizer.from_stats(stats)
    from lib.data.normalize import Normalizer
    if data_cfg is None:
        return Normalizer.from_stats(stats)
    return Normalizer.from_stats(stats, features=data_cfg.input_features, pixel_size_m=data_cfg.pixel_size_m)
