"""Terrain and raster primitives: brute-force references for the filters, slope caps on any crop."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from lib.data.synth_terrain import box_blur, fractal_noise, gaussian_blur, make_terrain, max_filter3, slope_tan, upsample


def _slope_deg(dem, pixel_size_m=1.0):
    gy, gx = np.gradient(dem.astype(np.float64), pixel_size_m)
    return np.degrees(np.arctan(np.hypot(gx, gy)))


def test_fractal_noise_is_standardised_reproducible_and_smoother_for_larger_beta():
    a = fractal_noise(np.random.default_rng(1), (96, 128), beta=4.0)
    b = fractal_noise(np.random.default_rng(1), (96, 128), beta=4.0)
    assert a.shape == (96, 128) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert abs(a.mean()) < 1e-5 and abs(a.std() - 1) < 1e-4
    rough = fractal_noise(np.random.default_rng(1), (96, 128), beta=2.0)
    assert np.abs(np.diff(a, axis=1)).mean() < 0.5 * np.abs(np.diff(rough, axis=1)).mean()


def test_upsample_hits_grid_points_and_interpolates_linearly():
    coarse = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    fine = upsample(coarse, 4, (17, 21))
    assert np.allclose(fine[::4, ::4], coarse[:, :6], atol=1e-6)
    assert np.allclose(fine[2, 0], 0.5 * (coarse[0, 0] + coarse[1, 0]), atol=1e-6)
    assert np.allclose(fine[0, 1], 0.75 * coarse[0, 0] + 0.25 * coarse[0, 1], atol=1e-6)


@pytest.mark.parametrize("radius", [1, 3])
def test_box_blur_matches_brute_force_window_mean(radius):
    image = np.random.default_rng(2).random((23, 31)).astype(np.float32)
    padded = np.pad(image.astype(np.float64), radius, mode="edge")
    expected = sliding_window_view(padded, (2 * radius + 1,) * 2).mean(axis=(2, 3))
    assert np.allclose(box_blur(image, radius), expected, atol=1e-5)


def test_gaussian_blur_keeps_constants_and_has_the_asked_spread():
    assert np.allclose(gaussian_blur(np.full((20, 20), 7.0, np.float32), 2.0), 7.0)
    delta = np.zeros((61, 61), np.float32)
    delta[30, 30] = 1
    out = gaussian_blur(delta, 3.0).astype(np.float64)
    offsets = np.arange(61) - 30
    variance = (out.sum(axis=1) * offsets**2).sum() / out.sum()
    assert abs(out.sum() - 1) < 1e-4 and abs(np.sqrt(variance) - 3.0) < 0.25


def test_max_filter3_matches_brute_force():
    image = np.random.default_rng(3).random((17, 19)).astype(np.float32)
    expected = sliding_window_view(np.pad(image, 1, mode="edge"), (3, 3)).max(axis=(2, 3))
    assert np.array_equal(max_filter3(image), expected)


@pytest.mark.parametrize("relief, cap, hillside", [(250.0, 40.0, 0.7), (120.0, 20.0, 0.0), (60.0, 45.0, 0.0)])
def test_terrain_slope_never_exceeds_cap_even_on_crops(relief, cap, hillside):
    dem = make_terrain(np.random.default_rng(4), (160, 160), 1.0, relief, cap, ridges=0.8, gullies=0.8,
                       hillside=hillside)
    assert dem.dtype == np.float32 and dem.min() == 0 and dem.max() <= relief + 1
    assert _slope_deg(dem).max() <= cap
    assert _slope_deg(dem[37:101, 5:90]).max() <= cap                  # one-sided edges of a crop
    assert np.median(_slope_deg(dem)) > cap / 4                        # capped, not flattened away
    assert np.allclose(np.degrees(np.arctan(slope_tan(dem, 1.0))), _slope_deg(dem))


def test_terrain_pixel_size_scales_slopes_and_flat_relief_stays_flat():
    dem = make_terrain(np.random.default_rng(5), (128, 128), 0.5, 40.0, 30.0)
    assert _slope_deg(dem, 0.5).max() <= 30.0
    flat = make_terrain(np.random.default_rng(5), (128, 128), 1.0, 2.0, 30.0, terraces=0.8)
    assert flat.max() <= 3.0 and _slope_deg(flat).max() < 10


def test_terraces_make_flat_treads():
    kwargs = dict(relief_m=60.0, max_slope_deg=35.0, ridges=0.0, gullies=0.0)
    plain = make_terrain(np.random.default_rng(6), (128, 128), 1.0, **kwargs)
    stepped = make_terrain(np.random.default_rng(6), (128, 128), 1.0, terraces=1.0, **kwargs)
    assert (_slope_deg(stepped) < 2).mean() > (_slope_deg(plain) < 2).mean() + 0.05
