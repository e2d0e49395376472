"""Synthetic sites: reproducibility, exact labels, terrain bounds, gap masks, stands, sensors, hybrids."""
from dataclasses import replace

import numpy as np
import pytest

from lib.core.errors import ConfigError, DataError
from lib.data.synthetic import (STAND_TYPES, STAND_UNKNOWN, Site, SiteParams, generate_site, generate_stand_tile,
                           hybrid_site, random_site_params, stand_tile_params)

THRESHOLDS_M = (2, 5, 10, 15)
CLOSED = (1.0, 0.0, 0.0, 0.0, 0.0)


def _slope_deg(dem, pixel_size_m=1.0):
    gy, gx = np.gradient(dem.astype(np.float64), pixel_size_m)
    return np.degrees(np.arctan(np.hypot(gx, gy)))


def _pit_fraction(chm):
    """Share of pixels more than 5 m below the median of their 3x3 neighbourhood (isolated pits)."""
    c = np.where(np.isnan(chm), np.nanmedian(chm), chm)
    padded = np.pad(c, 1, mode="edge")
    window = np.stack([padded[i:i + c.shape[0], j:j + c.shape[1]] for i in range(3) for j in range(3)])
    return float((np.median(window, axis=0) - c > 5).mean())


@pytest.fixture(scope="module")
def site() -> Site:
    return generate_site(11, SiteParams(size_px=160, forest="mixed", stand_weights=(0.6, 0.3, 0.1, 0.0, 0.0),
                                        gap_fraction=0.1, nodata_fraction=0.02))


def test_same_seed_and_params_give_bitwise_equal_sites(site):
    again = generate_site(11, replace(site.params))
    for name in ("dsm", "dtm", "chm", "stand"):
        assert np.array_equal(getattr(site, name), getattr(again, name), equal_nan=True), name
    other = generate_site(12, site.params)
    assert not np.array_equal(site.dsm, other.dsm, equal_nan=True)


def test_shapes_dtypes_and_provenance(site):
    for name in ("dsm", "dtm", "chm"):
        assert getattr(site, name).shape == (160, 160) and getattr(site, name).dtype == np.float32
    assert site.stand.shape == (160, 160) and site.stand.dtype == np.uint8
    assert site.seed == 11 and site.params.size_px == 160


def test_chm_is_dsm_minus_dtm_and_nan_only_at_nodata(site):
    valid = ~np.isnan(site.dsm)
    assert np.array_equal(site.chm[valid], site.dsm[valid] - site.dtm[valid])
    assert np.array_equal(np.isnan(site.chm), ~valid)
    assert np.isfinite(site.dtm).all()
    assert (~valid).sum() == round(0.02 * 160 * 160)                     # exactly the asked share
    assert generate_site(3, SiteParams(size_px=64, nodata_fraction=0.0)).dsm.dtype == np.float32
    assert not np.isnan(generate_site(3, SiteParams(size_px=64, nodata_fraction=0.0)).dsm).any()


@pytest.mark.parametrize("relief, cap", [(250.0, 40.0), (80.0, 15.0)])
def test_terrain_slopes_stay_within_the_cap(relief, cap):
    site = generate_site(5, SiteParams(size_px=128, relief_m=relief, max_slope_deg=cap, hillside=0.6,
                                       nodata_fraction=0.0))
    slope = _slope_deg(site.dtm)
    assert slope.max() <= cap and np.median(slope) > cap / 4
    assert site.dtm.min() == pytest.approx(site.params.base_elevation_m, abs=0.01)


def test_flat_scene_is_flat():
    site = generate_site(5, SiteParams(size_px=128, relief_m=2.0, nodata_fraction=0.0))
    assert np.ptp(site.dtm) < 3.0


def test_threshold_masks_nest_and_differ(site):
    valid = ~np.isnan(site.chm)
    masks = [(site.chm <= t) & valid for t in THRESHOLDS_M]
    for lower, upper in zip(masks, masks[1:]):
        assert not (lower & ~upper).any()                               # nested
        assert upper.sum() > lower.sum() * 1.1                          # and visibly different


def test_gap_fraction_roughly_as_asked():
    """The opening added by the gap process (CHM <= 5 m beyond a gap-free twin) is near gap_fraction.

    Gaps up to 0.2 ha here: on 6.5 ha one 1-ha gap would make the realised share a coin toss.
    """
    base = SiteParams(size_px=256, forest="tropical", stand_weights=CLOSED, nodata_fraction=0.0, pit_fraction=0.0,
                      max_gap_area_m2=2000.0)
    without = np.mean(generate_site(21, replace(base, gap_fraction=0.0)).chm <= 5)
    for fraction in (0.05, 0.2):
        added = np.mean(generate_site(21, replace(base, gap_fraction=fraction)).chm <= 5) - without
        assert 0.5 * fraction < added < 1.5 * fraction, (fraction, added)


def test_stand_ids_in_range_and_several_types_on_a_large_site():
    site = generate_site(8, SiteParams(size_px=400, stand_area_ha=1.0, forest="mixed", nodata_fraction=0.0))
    present = np.unique(site.stand)
    assert present.max() < len(STAND_TYPES) and present.size >= 3
    bare = site.stand == STAND_TYPES.index("bare")
    closed = site.stand == STAND_TYPES.index("closed_canopy")
    if bare.sum() > 500 and closed.sum() > 500:
        assert np.median(site.chm[bare]) < 2 < 10 < np.median(site.chm[closed])


def test_tropical_canopy_is_taller_than_temperate():
    def heights(forest):
        chm = np.concatenate([generate_site(seed, SiteParams(size_px=160, forest=forest, stand_weights=CLOSED,
                                                             stand_area_ha=0.5, gap_fraction=0.02,
                                                             nodata_fraction=0.0)).chm.ravel()
                              for seed in (4, 5)])                        # ~10 stands of each
        return np.median(chm), np.percentile(chm, 99)
    tropical, temperate = heights("tropical"), heights("temperate")
    assert tropical[0] > temperate[0] + 2 and tropical[1] > temperate[1] + 1


def test_photogrammetry_has_fewer_pits_than_lidar():
    base = SiteParams(size_px=160, forest="tropical", stand_weights=CLOSED, gap_fraction=0.05, nodata_fraction=0.0)
    lidar = _pit_fraction(generate_site(6, replace(base, sensor="lidar", pit_fraction=0.02)).chm)
    photo = _pit_fraction(generate_site(6, replace(base, sensor="photogrammetry")).chm)
    assert lidar > 0.01 and photo < 0.25 * lidar


def test_flight_line_steps_offset_whole_strips():
    base = SiteParams(size_px=128, nodata_fraction=0.0, strip_width_m=40.0)
    stepped, plain = (generate_site(9, replace(base, strip_offset_m=sd)).dsm for sd in (0.5, 0.0))
    steps = stepped - plain
    assert np.ptp(steps) > 0.2 and np.unique(np.round(steps, 4)).size <= 10   # a few constant strips


def test_random_site_params_are_varied_and_valid():
    rng = np.random.default_rng(0)
    drawn = [random_site_params(rng, 64) for _ in range(60)]
    assert {p.forest for p in drawn} == {"temperate", "tropical", "mixed"}
    assert {p.sensor for p in drawn} == {"lidar", "photogrammetry"}
    assert any(p.relief_m <= 5 for p in drawn) and any(p.relief_m > 100 for p in drawn)
    assert min(p.gap_fraction for p in drawn) < 0.02 and max(p.gap_fraction for p in drawn) > 0.1
    site = generate_site(1, drawn[0])
    assert np.isfinite(site.chm[~np.isnan(site.dsm)]).all()


@pytest.mark.parametrize("bad", [dict(forest="boreal"), dict(sensor="radar"), dict(size_px=8),
                                 dict(gap_fraction=1.5), dict(max_slope_deg=0.0), dict(stand_weights=(1, 0))])
def test_invalid_params_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=f"SiteParams.{field}"):
        SiteParams(**bad)


def test_hybrid_site_keeps_the_chm_exactly():
    chm = np.random.default_rng(2).gamma(4.0, 6.0, (50, 70)).astype(np.float32)
    chm[3:6, 10:14] = np.nan
    site = hybrid_site(chm, seed=3, relief_m=150.0, max_slope_deg=30.0)
    assert site.chm.dtype == np.float32 and np.array_equal(site.chm, chm, equal_nan=True)
    assert np.array_equal(np.isnan(site.dsm), np.isnan(chm)) and np.isfinite(site.dtm).all()
    assert np.allclose(site.dsm - site.dtm, chm, atol=1e-3, equal_nan=True)
    assert _slope_deg(site.dtm).max() <= 30.0 and np.ptp(site.dtm) > 5
    assert (site.stand == STAND_UNKNOWN).all()
    again = hybrid_site(chm, seed=3, relief_m=150.0, max_slope_deg=30.0)
    assert np.array_equal(site.dtm, again.dtm)


def test_hybrid_site_on_real_chm(real_data):
    import tifffile
    chm = tifffile.imread(real_data / "wellington_CHM.tif")
    site = hybrid_site(chm, seed=0, relief_m=200.0, max_slope_deg=40.0)
    assert np.array_equal(site.chm, chm.astype(np.float32)) and site.dsm.shape == chm.shape


@pytest.mark.parametrize("bad", [np.zeros(10), np.full((4, 4), np.inf)])
def test_hybrid_site_rejects_bad_chm(bad):
    with pytest.raises(DataError, match="chm"):
        hybrid_site(bad, seed=0)


def _tile_features(chm):
    """(median CHM, share <= 5 m, log peak-to-mean power at 2-6 px wavelengths: planting rows)."""
    c = np.where(np.isnan(chm), np.nanmedian(chm), chm).astype(np.float64)
    power = np.abs(np.fft.fft2(c - c.mean())) ** 2
    freq = np.hypot(np.fft.fftfreq(c.shape[0])[:, None], np.fft.fftfreq(c.shape[1])[None, :])
    band = power[(freq > 1 / 6) & (freq < 1 / 2)]
    return np.array([np.median(c), (c <= 5).mean(), np.log(band.max() / band.mean())])


def test_stand_tiles_have_distinguishable_statistics():
    features = {}
    for kind in STAND_TYPES:
        rows = []
        for seed in range(6):
            site = generate_site(seed, stand_tile_params(seed, kind, 64))
            assert (site.stand == STAND_TYPES.index(kind)).all()
            rows.append(_tile_features(site.chm))
        features[kind] = np.mean(rows, axis=0)
    height = {k: f[0] for k, f in features.items()}
    assert height["bare"] < 2 < height["young_regrowth"] < height["gappy"] < height["closed_canopy"]
    assert features["gappy"][1] > 2 * features["closed_canopy"][1] and features["bare"][1] > 0.9
    others = max(f[2] for k, f in features.items() if k != "plantation_rows")
    assert features["plantation_rows"][2] > others + 0.5


def test_generate_stand_tile_is_the_dsm_of_its_params_and_rejects_unknown_types():
    tile = generate_stand_tile(4, "gappy", 48)
    assert tile.shape == (48, 48) and tile.dtype == np.float32
    assert np.array_equal(tile, generate_site(4, stand_tile_params(4, 1, 48)).dsm, equal_nan=True)
    with pytest.raises(ConfigError, match="closed_canopy"):
        generate_stand_tile(0, "meadow", 32)


def test_photogrammetric_occlusion_bridges_narrow_gaps_and_keeps_wide_floors():
    """30 m canopy with a 6 m and a 60 m wide gap, views 20 degrees off nadir: the ground is hidden within
    30 x tan(20) = 10.9 m of the crowns, so the narrow floor is gone and the wide one keeps its middle."""
    from lib.data.synthetic import occluded
    veg = np.full((40, 200), 30.0, np.float32)
    veg[:, 20:26] = 0.0
    veg[:, 100:160] = 0.0
    seen = occluded(veg, 20.0, 1.0)
    assert seen[:, 20:26].min() > 15.0                         # bridged
    assert np.all(seen[:, 111:149] == 0.0)                     # the floor beyond 10.9 m of the crowns
    assert np.isclose(seen[20, 103], 30 - 4 / np.tan(np.radians(20)), atol=0.01)  # the sight line 4 m in
    assert np.all(seen >= veg) and np.array_equal(occluded(veg, 0.0, 1.0), veg)
