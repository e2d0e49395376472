"""Pretraining data: continuous-threshold targets, hybrid sites (real CHM on synthetic terrain), steep terrain."""
import numpy as np
import pytest
import torch

from lib.gaps.masks import IGNORE
from lib.data.normalize import Normalizer
from lib.train.tasks import SegmentationTask


def _batch(seed=0, b=6, size=16):
    g = torch.Generator().manual_seed(seed)
    chm = torch.rand(b, 1, size, size, generator=g) * 35                     # (B, 1, H, W) metres
    chm[0, 0, :3, :5] = float("nan")
    masks = torch.zeros(b, 4, size, size, dtype=torch.uint8)                 # stored masks: only nodata matters
    masks[:, :, torch.isnan(chm[:, 0]).any(0)] = IGNORE
    masks[1, :, 7:9, 2:4] = IGNORE                                           # e.g. an augmentation hole
    dsm = 300 + chm.nan_to_num(0)
    return {"dsm": dsm, "chm": chm, "masks": masks}


def test_continuous_targets_are_chm_at_or_below_t_on_valid_pixels():
    task = SegmentationTask([2.0, 5.0, 10.0, 15.0], Normalizer(scale=8.0), "continuous", seed=3,
                            threshold_range_m=(1.0, 30.0))
    batch = _batch()
    x, t_norm, target, t_idx = task.train_inputs(batch)
    t_m = t_norm * 8.0                                                       # back to metres
    assert x.shape == (6, 1, 16, 16) and target.shape == (6, 1, 16, 16) and target.dtype == torch.uint8
    assert ((t_m >= 1.0) & (t_m <= 30.0)).all() and t_m.unique().numel() == 6   # one draw per sample
    for b in range(6):
        chm, valid = batch["chm"][b, 0], (batch["masks"][b, 0] != IGNORE) & torch.isfinite(batch["chm"][b, 0])
        want = torch.full_like(target[b, 0], IGNORE)
        want[valid] = (chm[valid] <= t_m[b]).to(torch.uint8)
        assert torch.equal(target[b, 0], want)
        nearest = int(torch.argmin((torch.tensor([2.0, 5.0, 10.0, 15.0]) - t_m[b]).abs()))
        assert int(t_idx[b]) == nearest


def test_continuous_draws_resume_exactly_and_fixed_sampling_is_unchanged():
    a = SegmentationTask([2.0, 5.0], Normalizer(), "continuous", seed=1, threshold_range_m=(3.0, 4.0))
    a.train_inputs(_batch())
    state = a.state_dict()
    first = a.train_inputs(_batch(1))[1]
    b = SegmentationTask([2.0, 5.0], Normalizer(), "continuous", seed=99, threshold_range_m=(3.0, 4.0))
    b.load_state_dict(state)
    assert torch.equal(b.train_inputs(_batch(1))[1], first) and ((first >= 3) & (first <= 4)).all()
    fixed = SegmentationTask([2.0, 5.0], Normalizer(), "uniform", seed=1)
    _, t, target, t_idx = fixed.train_inputs(_batch())
    assert set(t.tolist()) <= {2.0, 5.0} and torch.equal(t, torch.tensor([2.0, 5.0])[t_idx])


def test_log_uniform_draws_cover_the_range_with_equal_mass_per_ratio():
    task = SegmentationTask([2.0, 5.0], Normalizer(), "continuous_log", seed=4, threshold_range_m=(1.0, 25.0))
    t = torch.cat([task.train_inputs(_batch())[1] for _ in range(400)])              # 2400 draws, metres
    assert ((t >= 1.0) & (t <= 25.0)).all()
    assert abs(float((t <= 5.0).float().mean()) - 0.5) < 0.05                         # log 5 / log 25 = 1/2
    uniform = SegmentationTask([2.0, 5.0], Normalizer(), "continuous", seed=4, threshold_range_m=(1.0, 25.0))
    u = torch.cat([uniform.train_inputs(_batch())[1] for _ in range(400)])
    assert abs(float((u <= 5.0).float().mean()) - 4 / 24) < 0.05


def test_validation_stays_on_the_listed_thresholds():
    task = SegmentationTask([2.0, 5.0, 10.0], Normalizer(), "continuous", seed=0)
    batch = _batch(b=2)
    batch["masks"] = batch["masks"][:, :3]
    _, t, target, t_idx = task.eval_inputs(batch)
    assert t.tolist() == [2.0, 5.0, 10.0] * 2 and torch.equal(target, batch["masks"].reshape(6, 1, 16, 16))


def test_config_validates_the_range():
    from lib.core.config import build_config
    from lib.core.errors import ConfigError
    cfg = build_config({"train": {"threshold_sampling": "continuous", "threshold_range_m": [1, 30]}})
    assert cfg.train.threshold_range_m == [1, 30]
    with pytest.raises(ConfigError, match="threshold_range_m"):
        build_config({"train": {"threshold_range_m": [30, 1]}})
    with pytest.raises(ConfigError, match="continuous_log needs threshold_range_m above 0"):
        build_config({"train": {"threshold_sampling": "continuous_log", "threshold_range_m": [0, 30]}})


def test_hybrid_sources_keep_the_chm_in_every_orientation(real_data):
    from lib.geoio.geotiff_read import read_raster
    from lib.data.site_sources import hybrid_sources
    chm, _ = read_raster(real_data / "ALS_CHM_DUC.tif")
    sources = hybrid_sources([real_data / "ALS_CHM_DUC.tif"], 8, 1.0, seed=5)
    assert [s.name for s in sources] == [f"hyb-ALS_CHM_DUC-{i:02d}" for i in range(8)]
    seen = set()
    for i, source in enumerate(sources):
        site = source.load()
        want = np.rot90(chm, i % 4)
        want = want[:, ::-1] if i >= 4 else want
        assert np.array_equal(site.chm, want, equal_nan=True)               # the label is the real CHM
        assert site.dsm.shape == want.shape and np.isfinite(site.dsm).all()
        seen.add(site.provenance["seed"])
        if site.provenance["sensor"] == "lidar":
            dtm = site.dsm - site.chm                                        # terrain under the real canopy
            assert np.ptp(dtm) > 1.0
    assert len(seen) == 8                                                    # each copy its own terrain
    again = hybrid_sources([real_data / "ALS_CHM_DUC.tif"], 8, 1.0, seed=5)[3].load()
    assert np.array_equal(again.dsm, sources[3].load().dsm)


def test_hybrid_sources_refuse_another_pixel_size(real_data):
    from lib.core.errors import DataError
    from lib.data.site_sources import hybrid_sources
    with pytest.raises(DataError, match="pixel_size_m is 0.5"):
        hybrid_sources([real_data / "ALS_CHM_DUC.tif"], 1, 0.5, seed=0)[0].load()


def test_sources_from_config_mix_hybrid_and_synthetic(real_data):
    from lib.core.config import build_config
    from lib.data.site_sources import sources_from_config
    cfg = build_config({"data": {"synthetic_sites": 2, "synthetic_size_px": 64,
                                 "hybrid_chms": [str(real_data / "ALS_CHM_DUC.tif")], "hybrid_per_chm": 3}})
    names = [s.name for s in sources_from_config(cfg.data, 0)]
    assert names == ["syn000", "syn001", "hyb-ALS_CHM_DUC-00", "hyb-ALS_CHM_DUC-01", "hyb-ALS_CHM_DUC-02"]


def test_photogrammetric_hybrid_smooths_the_surface_but_keeps_the_label():
    from lib.data.synthetic import SiteParams, hybrid_site
    chm = np.random.default_rng(0).gamma(4.0, 6.0, (64, 64)).astype(np.float32)
    lidar = hybrid_site(chm, 1, SiteParams(sensor="lidar", relief_m=0.0, strip_offset_m=0.0))
    photo = hybrid_site(chm, 1, SiteParams(sensor="photogrammetry", relief_m=0.0, strip_offset_m=0.0))
    assert np.array_equal(photo.chm, chm) and np.array_equal(photo.dtm, lidar.dtm)
    rough = lambda z: np.abs(np.diff(z, axis=1)).mean()                      # noqa: E731
    assert rough(photo.dsm) < 0.5 * rough(lidar.dsm)


def test_random_sites_include_steep_mountain_sides():
    from lib.data.synthetic import random_site_params
    rng = np.random.default_rng(0)
    drawn = [random_site_params(rng, 256) for _ in range(200)]
    steep = [p for p in drawn if p.relief_m > 256 * np.tan(np.radians(20))]
    assert 0.3 < len(steep) / len(drawn) < 0.6 and max(p.max_slope_deg for p in drawn) > 50
    assert all(p.max_slope_deg <= 60 for p in drawn)


def test_a_closed_fraction_turns_drawn_sites_into_closed_stands_and_leaves_the_others_unchanged():
    from lib.data.site_sources import synthetic_site
    plain = [synthetic_site(i, 64, 1.0, seed=3) for i in range(6)]
    mixed = [synthetic_site(i, 64, 1.0, seed=3, closed_fraction=0.5) for i in range(6)]
    changed = [not np.array_equal(a.dsm, b.dsm, equal_nan=True) for a, b in zip(plain, mixed)]
    assert any(changed) and not all(changed)                       # some sites drawn, others byte-identical
    closed = synthetic_site(0, 96, 1.0, seed=3, closed_fraction=1.0)
    gap_share = float((closed.chm <= 2.0).mean())
    assert gap_share < 0.1, f"a closed stand with 0.5-5 % gaps has {gap_share:.2f} of its area at or below 2 m"


def test_a_coarse_fraction_brings_drawn_sites_from_a_coarser_sensor_and_leaves_the_others_unchanged():
    from lib.data.site_sources import synthetic_site
    plain = [synthetic_site(i, 64, 1.0, seed=3) for i in range(6)]
    mixed = [synthetic_site(i, 64, 1.0, seed=3, coarse_fraction=0.5) for i in range(6)]
    changed = [not np.array_equal(a.dsm, b.dsm, equal_nan=True) for a, b in zip(plain, mixed)]
    assert any(changed) and not all(changed)                       # some sites drawn, others byte-identical
    assert all(("sensor_pixel_m" in b.provenance) == c for b, c in zip(mixed, changed))
    site = synthetic_site(0, 97, 1.0, seed=3, coarse_fraction=1.0, coarse_factor=3)
    assert site.dsm.shape == site.chm.shape == (97, 97) and site.info.pixel_size == (1.0, 1.0)
    assert site.provenance["sensor_pixel_m"] == 3.0
    blocks = site.chm[:96, :96].reshape(32, 3, 32, 3)              # labels: the sensor's 3 m cells
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :1, :, :1], blocks.shape), equal_nan=True)
    dsm_blocks = site.dsm[:96, :96].reshape(32, 3, 32, 3)          # heights: interpolated, not blocky
    assert np.nanmax(np.abs(dsm_blocks - dsm_blocks[:, 1:2, :, 1:2])) > 0.1
