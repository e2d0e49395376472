"""The DSM-only ground filter and its primitives: cone erosion against brute force, hole filling, terrain
recovered under boxes on flat and steep ground, invariances, and gaps found where the opening misses them."""
import itertools
import math

import numpy as np
import pytest
import torch

from lib.core.errors import ConfigError
from lib.gaps.baselines import classical_relative_height
from lib.gaps.ground_filter import GroundFilter, ground_surface, terrain_slope
from lib.gaps.morphology import cone_erosion, fill_holes


def _brute_cone(z: torch.Tensor, slope: float, radius: int, pixel: float) -> torch.Tensor:
    """min over cells within `radius` chessboard steps of z + slope x octile distance, by shifting."""
    h, w = z.shape[-2:]
    best = z.clone()
    for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
        lo, hi = sorted((abs(dy), abs(dx)))
        shifted = torch.full_like(z, math.inf)
        shifted[..., max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)] = \
            z[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
        best = torch.minimum(best, shifted + slope * pixel * (lo * math.sqrt(2) + hi - lo))
    return best


@pytest.mark.parametrize("radius, pixel", [(1, 1.0), (3, 0.5), (4, 2.0)])
def test_cone_erosion_equals_brute_force(radius, pixel):
    z = torch.rand(1, 1, 23, 31, generator=torch.Generator().manual_seed(radius)) * 10
    torch.testing.assert_close(cone_erosion(z, 0.4, radius, pixel), _brute_cone(z, 0.4, radius, pixel))


def test_cone_erosion_ignores_nan_cells():
    z = torch.full((1, 1, 9, 9), 5.0)
    z[0, 0, 4, 4] = float("nan")
    z[0, 0, 0, 0] = 0.0
    out = cone_erosion(z, 1.0, 8, 1.0)
    assert torch.isfinite(out).all() and out[0, 0, 4, 4] == pytest.approx(4 * math.sqrt(2), abs=1e-5)


def test_fill_holes_keeps_known_cells_and_spans_a_plane():
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(80.0), indexing="ij")
    plane = (0.3 * rows - 0.2 * cols + 100)[None, None]
    known = torch.rand(plane.shape, generator=torch.Generator().manual_seed(0)) < 0.05
    known[..., 20:40, 30:60] = False                                         # a large hole too
    filled = fill_holes(plane, known)
    assert torch.equal(filled[known], plane[known])
    error = (filled - plane).abs()[0, 0]
    assert error.median() < 0.2 and error[8:-8, 8:-8].max() < 1.0         # inside; edges are extrapolated
    assert torch.isnan(fill_holes(plane, torch.zeros_like(known))).all()


def _boxes(terrain: np.ndarray, seed: int = 0, height: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Square 'crowns' of 6-16 px on terrain covering most of it; returns (dsm, chm)."""
    rng = np.random.default_rng(seed)
    chm = np.zeros_like(terrain)
    for _ in range(int(terrain.size / 150)):
        r, c, s = rng.integers(0, terrain.shape[0]), rng.integers(0, terrain.shape[1]), rng.integers(6, 16)
        chm[r:r + s, c:c + s] = height + rng.normal(0, 2)
    return terrain + chm, chm


def _ground(dsm: np.ndarray, pixel: float = 1.0, **settings) -> np.ndarray:
    return ground_surface(torch.from_numpy(dsm.astype(np.float32))[None, None], pixel,
                          GroundFilter(**settings))[0, 0].numpy()


@pytest.mark.parametrize("incline", [0.0, 0.6])
def test_terrain_recovered_under_crowns_on_flat_and_steep_ground(incline):
    rows, cols = np.mgrid[0:160, 0:160].astype(np.float32)
    terrain = 300 + incline * cols + 3 * np.sin(rows / 25)
    dsm, chm = _boxes(terrain)
    assert 0.3 < (chm > 0).mean() < 0.9
    error = _ground(dsm, lowest_floor=False) - terrain
    assert np.median(np.abs(error)) < 1.0                 # the crowns (20 m) are gone, the hillside is not
    assert np.percentile(np.abs(error), 90) < 3.0


def test_lowest_floor_sees_through_regrowth_in_gaps():
    """Flat ground, closed crowns, gaps whose floors carry 1-3 m of regrowth and a few bare patches: the lowest
    floor carried at the terrain's slope is nearer the ground under the gaps than each gap's own floor."""
    rng = np.random.default_rng(7)
    terrain = np.full((160, 160), 200.0, np.float32)
    chm = 25 + rng.uniform(-3, 3, terrain.shape).astype(np.float32)
    for r, c in rng.integers(10, 140, (12, 2)):
        chm[r:r + 10, c:c + 10] = rng.uniform(1.0, 3.0)               # regrowth floors
    chm[::40, ::40] = 0.0                                              # a few cells reach the ground
    gaps = chm < 5
    errors = {low: np.abs(_ground(terrain + chm, lowest_floor=low) - terrain)[gaps].mean() for low in (True, False)}
    assert errors[True] < 0.6 * errors[False]


def test_terrain_slope_is_measured_under_the_canopy():
    rows, cols = np.mgrid[0:120, 0:120].astype(np.float32)
    dsm, _ = _boxes(200 + 0.5 * cols)
    slope = terrain_slope(torch.from_numpy(dsm)[None, None], 1.0)[0, 0, 30:90, 30:90]
    assert abs(float(slope.median()) - 0.5) < 0.1


def test_ground_ignores_absolute_elevation_and_keeps_nodata():
    rows, cols = np.mgrid[0:96, 0:96].astype(np.float32)
    dsm, _ = _boxes(50 + 0.2 * rows, seed=3)
    dsm[10:14, 40:60] = np.nan
    low, high = _ground(dsm), _ground(dsm + 500.0)
    assert np.isnan(low[10:14, 40:60]).all() and np.isfinite(low[~np.isnan(dsm)]).all()
    np.testing.assert_allclose(high - 500.0, low, atol=2e-3)


def test_one_setting_serves_finer_pixels():
    rows, cols = np.mgrid[0:96, 0:96].astype(np.float32)
    dsm, _ = _boxes(80 + 0.4 * cols, seed=5)
    coarse = _ground(dsm, 1.0)
    fine = _ground(np.repeat(np.repeat(dsm, 2, 0), 2, 1), 0.5)[::2, ::2]
    assert np.median(np.abs(fine - coarse)) < 0.5


def test_filter_finds_gaps_on_a_steep_site_where_the_opening_misses_them():
    from lib.data.synthetic import SiteParams, generate_site
    site = generate_site(4242, SiteParams(size_px=192, relief_m=150.0, max_slope_deg=35.0, gap_fraction=0.2,
                                          nodata_fraction=0.0))
    truth = site.chm <= 5
    dsm = torch.from_numpy(site.dsm)[None, None]

    def iou(rel):
        pred = rel[0, 0].numpy() <= 5
        return (pred & truth).sum() / (pred | truth).sum()
    from lib.gaps.ground_filter import filtered_relative_height
    assert iou(filtered_relative_height(dsm)) > iou(classical_relative_height(dsm, 51.0)) + 0.05


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="method"):
        GroundFilter(method="cloth")
    with pytest.raises(ConfigError, match="radius_m"):
        GroundFilter(radius_m=0)
