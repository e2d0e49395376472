"""Baselines a model must beat: all-canopy, random at the train gap rate, and the classical DSM-only method.

The classical method estimates the ground as a grey opening of the DSM (min filter then max filter over a
window of tens of metres, then smoothed), subtracts it, and thresholds the relative height. It needs no
training, is strong on flat ground and weak on slopes. Computed in torch (separable filters), NaN-aware.
"""
import torch
import torch.nn.functional as F


def _odd(n: int) -> int:
    return max(1, n | 1)


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Square max filter of odd side k, separable (exact for max); x (B,1,H,W) with -inf as 'no value'."""
    p = k // 2
    x = F.max_pool2d(F.pad(x, (0, 0, p, p), value=float("-inf")), (k, 1), stride=1)
    return F.max_pool2d(F.pad(x, (p, p, 0, 0), value=float("-inf")), (1, k), stride=1)


def _mean_filter(x: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Box mean over valid pixels only (separable sums), x and valid (B,1,H,W)."""
    p = k // 2
    num = torch.where(valid, x, torch.zeros_like(x))
    den = valid.to(x.dtype)
    for kernel, pad in (((k, 1), (0, 0, p, p)), ((1, k), (p, p, 0, 0))):
        num = F.avg_pool2d(F.pad(num, pad), kernel, stride=1)
        den = F.avg_pool2d(F.pad(den, pad), kernel, stride=1)
    return num / den.clamp_min(1e-12)


def ground_estimate(dsm: torch.Tensor, window_px: int, smooth_px: int | None = None) -> torch.Tensor:
    """Grey opening of the DSM (erosion then dilation), then a box smoothing; (B,1,H,W) metres, NaN kept."""
    valid = torch.isfinite(dsm)
    k = _odd(window_px)
    eroded = -_max_filter(torch.where(valid, -dsm, torch.full_like(dsm, float("-inf"))), k)
    opened = _max_filter(torch.where(torch.isfinite(eroded), eroded, torch.full_like(dsm, float("-inf"))), k)
    ok = torch.isfinite(opened)
    smooth = _odd(smooth_px if smooth_px is not None else k // 2)
    ground = _mean_filter(torch.where(ok, opened, torch.zeros_like(opened)), ok, smooth)
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
