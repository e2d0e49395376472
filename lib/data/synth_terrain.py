"""Terrain for synthetic sites, and the raster primitives scenes are built from (numpy only).

Fractal noise by spectral synthesis, bilinear upsampling, separable blurs and a 3x3 max filter:
all vectorised, O(pixels) or O(pixels log pixels), float32.
"""
import numpy as np


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float,
                  corr_px: float | None = None) -> np.ndarray:
    """(H, W) float32 periodic noise, zero mean and unit std, power spectrum ~ (f^2 + f0^2)^(-beta/2).

    beta 2 is rough, 4 is smooth hills. corr_px is the correlation length (a Matern field,
    f0 = 1 / (2 pi corr_px)): blobs about corr_px across, uncorrelated beyond a few corr_px.
    """
    height, width = shape
    fy = np.fft.fftfreq(height).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    f0 = 1.0 / (2 * np.pi * corr_px) if corr_px else 1.0 / max(shape)
    amplitude = (fy * fy + fx * fx + f0 * f0) ** np.float32(-beta / 4)   # (H, W//2+1)
    amplitude[0, 0] = 0.0
    spectrum = np.empty(amplitude.shape, np.complex64)
    spectrum.real = rng.standard_normal(amplitude.shape, dtype=np.float32) * amplitude
    spectrum.imag = rng.standard_normal(amplitude.shape, dtype=np.float32) * amplitude
    field = np.fft.irfft2(spectrum, s=shape).astype(np.float32, copy=False)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def upsample(coarse: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a grid sampled every `step` pixels onto a (H, W) pixel grid.

    Pixel i sits at coarse coordinate i / step, so coarse needs ceil((H-1)/step)+1 rows. Bilinear
    interpolation never steepens the coarse grid's per-axis differences, which keeps slope caps.
    """
    out = coarse.astype(np.float32, copy=False)
    for axis, size in enumerate(shape):
        pos = np.arange(size, dtype=np.float32) / step
        lo = np.minimum(pos.astype(np.int64), out.shape[axis] - 2)
        weight = (pos - lo).astype(np.float32)      # float32 - int64 would promote to float64
        weight = weight[:, None] if axis == 0 else weight[None, :]
        out = np.take(out, lo, axis=axis) * (1 - weight) + np.take(out, lo + 1, axis=axis) * weight
    return out


def box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge replication, via cumulative sums (cost independent of r)."""
    out = image.astype(np.float32, copy=True)
    if radius < 1:
        return out
    width = 2 * radius + 1
    for axis in (0, 1):
        padded = np.pad(out, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)],
                        mode="edge").astype(np.float64)   # float64: long cumsums lose float32 bits
        sums = np.cumsum(padded, axis=axis)
        upper = np.take(sums, np.arange(width, sums.shape[axis]), axis=axis)
        lower = np.take(sums, np.arange(0, sums.shape[axis] - width), axis=axis)
        out = ((upper - lower) / width).astype(np.float32)
    return out


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Approximate Gaussian blur: three box blurs of two neighbouring odd widths whose summed
    variance is closest to sigma_px^2 (Kovesi's choice of widths)."""
    variance = 12.0 * sigma_px**2                                 # summed (width^2 - 1) over 3 passes
    lower = int(np.sqrt(variance / 3 + 1))
    lower -= 1 - lower % 2                                        # odd width: a centred window
    n_lower = min(3, max(0, int(round((variance - 3 * lower**2 - 12 * lower - 9) / (-4 * lower - 4)))))
    out = image
    for width in [lower] * n_lower + [lower + 2] * (3 - n_lower):
        out = box_blur(out, (width - 1) // 2)
    return out.astype(np.float32, copy=False)


def max_filter3(image: np.ndarray) -> np.ndarray:
    """3x3 grayscale dilation (separable), edges replicated."""
    out = image
    for axis in (0, 1):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = out.shape[axis]
        out = np.maximum(np.maximum(np.take(padded, range(0, n), axis=axis),
                                    np.take(padded, range(1, n + 1), axis=axis)),
                         np.take(padded, range(2, n + 2), axis=axis))
    return out


def slope_tan(dem: np.ndarray, pixel_size_m: float) -> np.ndarray:
    """(H, W) tangent of the terrain slope from np.gradient (central differences, one-sided at edges)."""
    gy, gx = np.gradient(dem.astype(np.float64), pixel_size_m)
    return np.hypot(gx, gy)


def _steepest(dem: np.ndarray, pixel_size_m: float) -> float:
    """Upper bound of slope_tan over any crop of dem: each axis takes the larger adjacent difference,
    which bounds both the central differences inside and the one-sided ones at a crop's edge."""
    def adjacent_max(axis):
        step = np.abs(np.diff(dem.astype(np.float64), axis=axis))
        pad = [(1, 1) if a == axis else (0, 0) for a in (0, 1)]
        step = np.pad(step, pad)
        n = dem.shape[axis]
        return np.maximum(np.take(step, range(0, n), axis=axis), np.take(step, range(1, n + 1), axis=axis))
    return float(np.hypot(adjacent_max(0), adjacent_max(1)).max()) / pixel_size_m


def _compress_slopes(height: np.ndarray, spacing_m: float, max_tan: float) -> np.ndarray:
    """Soft-limit gradients to max_tan (tanh on the magnitude), then re-integrate (periodic Poisson).

    Keeps the landform but turns cliffs into slopes near the cap, so steep scenes stay steep over
    large areas instead of being scaled flat by their single steepest pixel.
    """
    gy = (np.roll(height, -1, 0) - height) / spacing_m      # forward differences, periodic
    gx = (np.roll(height, -1, 1) - height) / spacing_m
    magnitude = np.hypot(gx, gy)
    scale = np.where(magnitude > 1e-9, max_tan * np.tanh(magnitude / max_tan) / np.maximum(magnitude, 1e-9), 1.0)
    ky = np.exp(2j * np.pi * np.fft.fftfreq(height.shape[0]))[:, None] - 1   # forward-difference symbols
    kx = np.exp(2j * np.pi * np.fft.fftfreq(height.shape[1]))[None, :] - 1
    numerator = np.conj(ky) * np.fft.fft2(gy * scale) + np.conj(kx) * np.fft.fft2(gx * scale)
    denominator = np.abs(ky) ** 2 + np.abs(kx) ** 2
    denominator[0, 0] = 1.0                                   # the mean is free: keep it at 0
    return np.real(np.fft.ifft2(numerator / denominator)) * spacing_m


def _landform(rng: np.random.Generator, shape: tuple[int, int], ridges: float, gullies: float,
              terraces: float) -> np.ndarray:
    """(h, w) float64 relief in [0, 1]: fractal hills + sharp ridges - V-shaped gullies, optionally terraced."""
    hills = fractal_noise(rng, shape, beta=5.0).astype(np.float64)
    ridge = (1 - np.minimum(np.abs(fractal_noise(rng, shape, beta=4.5)) / 2, 1)) ** 2
    gully = np.clip(1 - np.abs(fractal_noise(rng, shape, beta=4.5)) / 0.3, 0, 1) ** 1.5
    relief = hills + 1.2 * ridges * ridge - 0.8 * gullies * gully
    relief = (relief - relief.min()) / max(relief.max() - relief.min(), 1e-12)
    if terraces > 0:
        steps = rng.uniform(4, 12)
        level = relief * steps
        frac = level - np.floor(level)
        sharp = 0.5 + 0.5 * np.tanh(8 * (frac - 0.5)) / np.tanh(4.0)   # flat treads, steep risers
        relief = (1 - terraces) * relief + terraces * (np.floor(level) + sharp) / steps
    return relief


def make_terrain(rng: np.random.Generator, shape: tuple[int, int], pixel_size_m: float,
                 relief_m: float, max_slope_deg: float, ridges: float = 0.3, gullies: float = 0.3,
                 terraces: float = 0.0, hillside: float = 0.0) -> np.ndarray:
    """(H, W) float32 terrain in metres, minimum 0, range about relief_m (less where the slope cap
    binds); the slope from np.gradient never exceeds max_slope_deg, on dem or any crop of it.

    hillside (0-1) is the share of relief_m given to one planar incline across the scene (a valley
    side); the rest is landform. Built on a coarse grid (at most ~320 cells a side) padded by a
    quarter so the crop is not periodic, slope-compressed there, upsampled bilinearly, plus a
    planar incline and decimetre micro-relief.
    """
    height, width = shape
    max_tan = np.tan(np.radians(max_slope_deg))
    extent_m = max(shape) * pixel_size_m
    incline_tan = min(hillside * relief_m / extent_m, 0.7 * max_tan)
    step = max(1, int(np.ceil(max(shape) / 320)))
    need = ((height - 1) // step + 2, (width - 1) // step + 2)
    grid = tuple(int(np.ceil(n * 1.25)) + 2 for n in need)
    coarse = _landform(rng, grid, ridges, gullies, terraces) * (relief_m - incline_tan * extent_m)
    if relief_m > 0:
        for _ in range(3):   # each pass leaves less overshoot where compressed gradients do not integrate
            coarse = _compress_slopes(coarse, step * pixel_size_m, max_tan - incline_tan)
    dem = upsample(coarse[: need[0], : need[1]], step, shape)
    azimuth = rng.uniform(0, 2 * np.pi)
    yy, xx = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    dem += (incline_tan * pixel_size_m) * (np.cos(azimuth) * xx + np.sin(azimuth) * yy)
    half = ((height - 1) // 2 + 2, (width - 1) // 2 + 2)   # micro-relief on a 2-pixel grid: smooth at 1 px
    micro = fractal_noise(rng, half, beta=4.0, corr_px=max(2.0, 3.0 / pixel_size_m))   # ~6 m blobs
    dem += min(0.15, 0.03 + 0.001 * relief_m) * upsample(micro, 2, shape)
    steepest = _steepest(dem, pixel_size_m)
    if steepest > 0.995 * max_tan:   # exact cap, on any crop too; 0.5% margin for float32 rounding
        dem *= np.float32(0.995 * max_tan / steepest)
    return (dem - dem.min()).astype(np.float32)
