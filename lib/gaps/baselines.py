"""Baselines a model must beat: all-canopy, random at the train gap rate, and the classical DSM-only method.

The classical method estimates the ground as a grey opening of the DSM (min filter then max filter over a
window of tens of metres, then smoothed), subtracts it, and thresholds the relative height. It needs no
training, is strong on flat ground and weak on slopes. Computed in torch (separable filters), NaN-aware.
"""
import torch

from lib.gaps.morphology import mean_filter, odd, opening


def ground_estimate(dsm: torch.Tensor, window_px: int, smooth_px: int | None = None) -> torch.Tensor:
    """Grey opening of the DSM (erosion then dilation), then a box smoothing; (B,1,H,W) metres, NaN kept."""
    valid = torch.isfinite(dsm)
    k = odd(window_px)
    opened = opening(dsm, k)
    ok = torch.isfinite(opened)
    smooth = odd(smooth_px if smooth_px is not None else k // 2)
    ground = mean_filter(torch.where(ok, opened, torch.zeros_like(opened)), ok, smooth)
    return torch.where(valid, ground, torch.full_like(dsm, float("nan")))


def classical_relative_height(dsm: torch.Tensor, window_m: float, pixel_size_m: float = 1.0) -> torch.Tensor:
    """DSM minus its ground estimate: a CHM estimate from the DSM alone; (B,1,H,W) metres."""
    return dsm - ground_estimate(dsm, int(round(window_m / pixel_size_m)))


def classical_gaps(dsm: torch.Tensor, thresholds_m, window_m: float = 51.0, pixel_size_m: float = 1.0) -> torch.Tensor:
    """Gap masks (B, K, H, W) bool from the relative height (no area filter); nodata -> False."""
    rel = classical_relative_height(dsm, window_m, pixel_size_m)  # (B,1,H,W)
    t = torch.as_tensor(thresholds_m, dtype=rel.dtype, device=rel.device).view(1, -1, 1, 1)
    return torch.isfinite(rel) & (rel <= t)


def random_gaps(shape, rate: float, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Uniform random gap mask at a given gap rate (the 'random at the train gap rate' baseline)."""
    return torch.rand(shape, generator=generator, device=device) < rate
