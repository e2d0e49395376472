"""Crowns and gaps: rasterised areas against the analytic outline, max compositing, power-law sizes."""
import numpy as np
import pytest

from lib.data.synth_canopy import (CROWN_ROUGHNESS, FORESTS, N_LOBES, Gaps, Trees, make_trees, open_gaps, random_lobes,
                        render_crowns, render_gaps, sample_gaps, stand_trees, truncated_pareto)


def _trees(y, x, radius, height=20.0, depth=8.0, power=2.0, lobes=None):
    n = len(y)
    f32 = lambda v: np.broadcast_to(np.asarray(v, np.float32), (n,)).copy()  # noqa: E731
    lobes = np.zeros((n, 2 * N_LOBES), np.float32) if lobes is None else lobes
    return Trees(y=f32(y), x=f32(x), radius=f32(radius), lobes=lobes, height=f32(height), depth=f32(depth),
                 power=f32(power))


def _outline_area(radius, lobes):
    """Area inside r(theta) = radius (1 + sum a cos + b sin): pi r^2 (1 + sum(a^2 + b^2) / 2)."""
    return np.pi * radius**2 * (1 + 0.5 * (lobes**2).sum())


def test_crown_footprint_area_matches_the_lobed_outline_and_is_not_a_disc():
    lobes = random_lobes(np.random.default_rng(0), 1, strength=0.6)
    trees = _trees([60.0], [60.0], [25.0], lobes=lobes)
    surface = render_crowns(trees, np.zeros(1, np.float32), np.zeros((120, 120), np.float32))
    covered = np.isfinite(surface)
    assert abs(covered.sum() / _outline_area(25.0, lobes[0]) - 1) < 0.03
    ys, xs = np.nonzero(covered)
    reach = np.hypot(ys - 60, xs - 60).max()
    assert covered.sum() < 0.9 * np.pi * reach**2                       # lobed, not round


def test_crowns_match_a_brute_force_per_pixel_evaluation():
    rng = np.random.default_rng(7)
    n, size = 12, 48
    trees = _trees(rng.uniform(-4, size + 4, n), rng.uniform(-4, size + 4, n), rng.uniform(1.5, 9.0, n),
                   height=rng.uniform(5, 30, n), depth=rng.uniform(1, 10, n), power=rng.uniform(1, 4, n),
                   lobes=random_lobes(rng, n, 0.4))
    ground = rng.uniform(0, 3, n).astype(np.float32)
    jitter = rng.standard_normal((size, size)).astype(np.float32)
    expected = np.full((size, size), -np.inf)
    yy, xx = np.mgrid[:size, :size]
    k = np.arange(2, 2 + N_LOBES)
    for i in range(n):
        cy, cx = np.rint(trees.y[i]), np.rint(trees.x[i])
        theta = np.arctan2(yy - cy, xx - cx)[..., None]            # angles from the rounded centre
        outline = trees.radius[i] * (1 + np.concatenate([np.cos(k * theta), np.sin(k * theta)], -1) @ trees.lobes[i])
        u = np.hypot(yy - trees.y[i], xx - trees.x[i]) / outline
        u = np.where(u <= 1, np.maximum(u + CROWN_ROUGHNESS * jitter, 0), np.inf)
        top = ground[i] + trees.height[i] - trees.depth[i] * np.minimum(u, 1) ** trees.power[i]
        expected = np.maximum(expected, np.where(u <= 1, top, -np.inf))
    got = render_crowns(trees, ground, jitter)
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    assert np.allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], atol=1e-3)


def test_crown_profile_peaks_at_the_stem_and_falls_to_the_rim():
    trees = _trees([20.0], [20.0], [8.0], height=30.0, depth=12.0, power=1.0)
    surface = render_crowns(trees, np.full(1, 100.0, np.float32), np.zeros((41, 41), np.float32))
    assert surface[20, 20] == pytest.approx(130.0)
    row = surface[20, 20:29]
    assert np.all(np.diff(row) < 0) and row[-1] >= 118.0 - 1e-4       # cone: linear fall to h - depth
    assert np.isneginf(surface[20, 30]) and np.isneginf(surface[0, 0])


def test_canopy_is_the_max_over_crowns_and_translates_with_the_stems():
    rng = np.random.default_rng(1)
    trees = _trees([30.25, 36.75, 33.0], [30.0, 35.25, 41.125],   # exact in float32: shifts stay exact
                   [9.0, 6.5, 7.5], height=[25.0, 31.0, 18.0],
                   depth=[9.0, 14.0, 5.0], power=[2.0, 1.2, 3.5], lobes=random_lobes(rng, 3, 0.4))
    ground = np.zeros(3, np.float32)
    jitter = np.zeros((72, 72), np.float32)
    together = render_crowns(trees, ground, jitter)
    alone = [render_crowns(_trees(trees.y[i:i + 1], trees.x[i:i + 1], trees.radius[i], trees.height[i],
                                  trees.depth[i], trees.power[i], trees.lobes[i:i + 1]), ground[:1], jitter)
             for i in range(3)]
    assert np.array_equal(together, np.maximum.reduce(alone))
    moved = _trees(trees.y + 5, trees.x - 3, trees.radius, trees.height, trees.depth, trees.power, trees.lobes)
    assert np.array_equal(render_crowns(moved, ground, jitter)[5:, :-3], together[:-5, 3:])


def test_gap_opens_to_its_regrowth_with_a_rim_outside():
    lobes = random_lobes(np.random.default_rng(2), 1, strength=0.5)
    gaps = Gaps(y=np.float32([50]), x=np.float32([50]), radius=np.float32([20]), lobes=lobes,
                regrowth=np.float32([3.0]), edge=np.float32([4.0]))
    cap, regrowth = render_gaps(gaps, np.zeros((100, 100), np.float32))
    opening = cap <= 3.0
    assert abs(opening.sum() / _outline_area(20.0, lobes[0]) - 1) < 0.05
    rim = np.isfinite(cap) & ~opening
    assert rim.sum() > 0 and cap[rim].min() > 3.0 and np.isinf(cap[0, 0])
    assert regrowth[50, 50] == pytest.approx(2.4) and regrowth[opening].max() == pytest.approx(3.6, abs=0.05)


def test_gap_areas_follow_the_truncated_power_law():
    rng = np.random.default_rng(3)
    areas = truncated_pareto(rng, 200_000, 5.0, 10_000.0, 1.9)
    assert areas.min() >= 5.0 and areas.max() <= 10_000.0
    e = 1 - 1.9
    for a in (10.0, 50.0, 500.0, 5000.0):
        cdf = (a**e - 5.0**e) / (10_000.0**e - 5.0**e)
        assert abs((areas <= a).mean() - cdf) < 0.005


def test_sample_gaps_reaches_the_target_area_with_small_and_large_gaps():
    weight = np.zeros((200, 200))
    weight[:, :150] = 1.0                                               # 3/4 of the grid is forest
    gaps = sample_gaps(np.random.default_rng(4), weight, cell_px=2, pixel_size_m=1.0, gap_fraction=0.1,
                       exponent=1.8, max_area_m2=10_000.0, regrowth_max_m=12.0)
    areas = np.pi * gaps.radius**2 * (1 + 0.5 * (gaps.lobes**2).sum(1))
    forest_m2 = 200 * 150 * 4
    assert 0.1 * forest_m2 <= areas.sum() <= 0.1 * forest_m2 + areas.max() + 1
    assert areas.min() < 20 and np.sort(areas)[-5:].sum() > 0.2 * areas.sum()   # heavy tail
    assert (gaps.x < 300).all() and ((gaps.regrowth >= 0) & (gaps.regrowth <= 12)).all()
    none = sample_gaps(np.random.default_rng(4), weight, 2, 1.0, 0.0, 1.8, 10_000.0, 12.0)
    assert none.radius.size == 0


def test_open_gaps_removes_trees_inside_and_tilts_neighbours_in():
    cap = np.full((60, 60), np.inf, np.float32)
    cap[20:40, 20:40] = 1.0
    trees = _trees([30.0, 30.0, 5.0], [30.0, 44.0, 5.0], [5.0, 5.0, 5.0], height=25.0)
    kept = open_gaps(trees, cap)
    assert kept.y.size == 2
    assert kept.x[0] < 44.0 and kept.height[0] < 25.0                   # leans towards the opening
    assert kept.x[1] == 5.0 and kept.height[1] == 25.0                   # far away: untouched


@pytest.mark.parametrize("kind", ["closed_canopy", "gappy", "young_regrowth", "plantation_rows", "bare"])
def test_stand_trees_stay_in_box_and_crowns_grow_with_height(kind):
    rng = np.random.default_rng(5)
    box = (10.0, 110.0, 20.0, 140.0)
    y, x, height, crown, max_radius = stand_trees(rng, kind, FORESTS["tropical"], box, 1.0)
    assert ((y >= 10) & (y < 110) & (x >= 20) & (x < 140)).all()
    assert (height > 0).all() and height.size == crown.size == max_radius.size
    trees = make_trees(rng, y, x, height, crown, max_radius, FORESTS["tropical"], 1.0)
    assert (trees.radius <= max_radius + 1e-6).all()                    # planted rows cap crown width
    if kind in ("closed_canopy", "gappy", "young_regrowth"):
        broad = crown == 1
        tall, short = height[broad] > np.median(height[broad]), height[broad] <= np.median(height[broad])
        assert trees.radius[broad][tall].mean() > trees.radius[broad][short].mean()
