"""The one-pass height head and the scene-level ground input: the head starts at the classical rule, nests
across thresholds, survives a checkpoint round trip; the ground travels from the site or scene into the
model's input (shards, normaliser, blocked scene filter, window pass) unchanged."""
import math

import numpy as np
import pytest
import torch

from lib.core.errors import DataError, ModelError
from lib.core.schema import ModelConfig
from lib.data.normalize import Normalizer, relative_height_channels
from lib.data.scene_ground import site_ground, write_scene_ground
from lib.data.synthetic import SiteParams, generate_site
from lib.geoio.geotiff_read import read_raster
from lib.models import build_model, prior as lib_prior, rebuild_model
from lib.models.height_head import INITIAL_SPREAD, WIDEST_START

FEATURES = ["dsm", "relative_height_21m", "filtered_height"]


def _model(**kw):
    cfg = ModelConfig(name="unet_cbam", base_channels=4, depth=2, classical_prior=True, height_head=True, **kw)
    return cfg, build_model(cfg, in_channels=3, prior_channels=relative_height_channels(FEATURES))


def test_the_height_head_starts_at_the_classical_rule_and_nests():
    _, model = _model()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.2, -0.1])
    w = math.exp(WIDEST_START) / (math.exp(WIDEST_START) + 1)                  # the mix starts on the filter
    rule = (t.view(-1, 1, 1, 1) - (1 - w) * x[:, 1:2] - w * x[:, 2:3]) / INITIAL_SPREAD  # no bias, no correction
    assert torch.allclose(model(x, t), rule, atol=1e-4)
    every = model.forward_thresholds(x, torch.linspace(-1, 1, 7))
    assert (every.diff(dim=1) > 0).all()


def test_a_pixel_mix_starts_at_the_global_mix_and_then_picks_a_channel_per_pixel():
    _, plain = _model()
    _, pixel = _model(height_head_pixel_mix=True)
    assert pixel.head.out_channels == 2 + 2 and plain.head.out_channels == 2
    pixel.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("head.")}, strict=False)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, -0.1])
    assert torch.allclose(pixel.eval()(x, t), plain.eval()(x, t), atol=1e-5)     # zero offsets: the same mix
    network = torch.zeros(2, 4, 32, 32)
    network[:, 2, :, :16] = 50.0                                                  # left half: the 21 m opening
    height, _ = pixel.prior.height_spread(x, network)
    assert torch.allclose(height[:, 0, :, :16], x[:, 1, :, :16], atol=1e-4)
    assert not torch.allclose(height[:, 0, :, 16:], x[:, 1, :, 16:], atol=1e-2)
    again = rebuild_model(ModelConfig(name="unet_cbam", base_channels=4, depth=2, classical_prior=True,
                                      height_head=True), pixel.state_dict())       # the record says pixel mix
    assert again.prior.pixel_mix and torch.equal(again.eval()(x, t), pixel(x, t))


def test_a_gated_height_head_trains_the_model_and_maps_the_mixture_in_one_pass():
    cfg, model = _model(prior_gate=True, prior_gate_channel=0)                  # the gate hands tiles to the 21 m opening
    torch.nn.init.normal_(model.head.weight, std=0.5)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, -0.1])
    model.train()
    logits = model(x, t)
    gate, classical, recorded = model.prior.pop_gate()
    assert gate.shape == (2, 1, 1, 1) and torch.equal(recorded, logits.detach())
    assert torch.allclose(classical, lib_prior.CLASSICAL_GAIN * (t.view(-1, 1, 1, 1) - x[:, 1:2]))
    model.eval()
    with torch.no_grad():
        model.prior.gate[2].bias.fill_(0.0)                                       # weight 0.5 on each
        every = model.forward_thresholds(x, torch.linspace(-1, 1, 9))
        one = model(x, torch.full((2,), every.new_tensor(0.5).item()))
        at_half = model.forward_thresholds(x, torch.tensor([0.5]))
    assert (every.diff(dim=1) >= -1e-4).all()                                     # still nested
    assert torch.allclose(one, at_half, atol=1e-5)
    again = rebuild_model(cfg, model.state_dict()).eval()
    assert again.prior.gate_channel == 1 and torch.equal(again(x, t), model(x, t))


def test_the_body_never_sees_the_threshold():
    _, model = _model()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    a, b = model(x, torch.tensor([0.1])), model(x, torch.tensor([0.6]))
    height_a = 0.1 - a * model.prior.height_spread(x, model.network(x, torch.zeros(1)))[1]
    height_b = 0.6 - b * model.prior.height_spread(x, model.network(x, torch.zeros(1)))[1]
    assert torch.allclose(height_a, height_b, atol=1e-5)  # the same height whatever T was asked for


def test_a_height_head_checkpoint_rebuilds_the_same_model():
    cfg, model = _model()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    again = rebuild_model(cfg, model.state_dict()).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([0.3])
    assert torch.equal(model.eval()(x, t), again(x, t))


@pytest.mark.parametrize("bad", [dict(classical_prior=False), dict(prior_trust_map=True), dict(prior_bias=False)])
def test_the_height_head_refuses_options_it_cannot_honour(bad):
    with pytest.raises(ModelError, match="height_head"):
        _model(**bad) if "classical_prior" not in bad else build_model(
            ModelConfig(name="unet_cbam", base_channels=4, depth=2, height_head=True, **bad), in_channels=3)


def test_a_pixel_mix_without_the_height_head_is_refused():
    with pytest.raises(ModelError, match="height_head_pixel_mix"):
        build_model(ModelConfig(name="unet_cbam", base_channels=4, depth=2, classical_prior=True,
                                height_head_pixel_mix=True), in_channels=3, prior_channels=[1, 2])


def test_filtered_height_is_the_dsm_minus_the_ground_channel():
    norm = Normalizer(scale=4.0, features=FEATURES)
    dsm = 300 + 10 * torch.rand(2, 1, 16, 16)
    ground = dsm - 3.0
    x = norm(torch.cat([dsm, ground], 1))
    assert torch.allclose(x[:, 2], torch.full_like(x[:, 2], 0.75))
    assert torch.equal(norm(torch.cat([dsm + 50, ground + 50], 1))[:, 2], x[:, 2])
    with pytest.raises(DataError, match="takes 2 input channel"):
        norm(dsm)


def test_the_blocked_scene_ground_equals_the_whole_site_run(tmp_path):
    from tests.test_scene_windows import write_dsm
    site = generate_site(5, SiteParams(size_px=200))
    write_dsm(tmp_path / "dsm.tif", site.dsm)
    write_scene_ground(tmp_path / "dsm.tif", tmp_path / "ground.tif")        # one block with its margin
    whole = site_ground(site.dsm, 1.0)
    assert np.array_equal(read_raster(tmp_path / "ground.tif")[0], whole, equal_nan=True)
    write_scene_ground(tmp_path / "dsm.tif", tmp_path / "blocks.tif", block_px=64)  # 16 blocks, margins clipped
    blocks = read_raster(tmp_path / "blocks.tif")[0]
    gaps = lambda g: site.dsm - g <= 5.0  # noqa: E731 - the decision that matters
    assert (gaps(blocks) == gaps(whole)).mean() > 0.99


def test_the_window_pass_feeds_the_scene_ground_to_a_model_that_reads_it(tmp_path):
    """A stand-in model whose gap is filtered height <= T: the windowed map equals the whole-scene filter's."""
    from lib.infer.scene_windows import iter_scene, plan_scene
    from tests.test_scene_windows import write_dsm

    class FilterRule(torch.nn.Module):
        needs_ground = True

        def forward_thresholds(self, dsm, t):                     # (B, 2, H, W), (K,) -> (B, K, H, W)
            return torch.sigmoid(50 * (t.view(1, -1, 1, 1) - torch.nan_to_num(dsm[:, :1] - dsm[:, 1:])))

    site = generate_site(6, SiteParams(size_px=160))
    write_dsm(tmp_path / "dsm.tif", site.dsm)
    plan = plan_scene(160, 160, 64, 0.25, 4)
    probs = np.concatenate([b for _, b in iter_scene(FilterRule(), tmp_path / "dsm.tif", plan, [2.0, 10.0], 4)], 1)
    expected = site.dsm - site_ground(site.dsm, 1.0)
    for k, t in enumerate((2.0, 10.0)):
        far = np.abs(expected - t) > 0.1                          # away from the decision boundary
        assert np.array_equal(probs[k][far] > 0.5, expected[far] <= t)


def test_shards_carry_the_site_ground_as_the_dsm_second_channel(tmp_path):
    from lib.core.config import build_config
    from lib.data.build_segmentation import build_dataset
    from lib.data.dataset import ShardDataset
    from lib.data.site_sources import sources_from_config

    cfg = build_config({"data": {"root": str(tmp_path), "synthetic_sites": 5, "synthetic_size_px": 128,
                                 "tile_px": 64, "stride_px": 64, "input_features": FEATURES}})
    sources = sources_from_config(cfg.data, cfg.run.seed)
    build_dataset(cfg, sources, tmp_path)
    sample = next(iter(ShardDataset(tmp_path, "train", shuffle=False, arrays=("dsm", "ground"), meta_keys=("site",))))
    site = next(s.load() for s in sources if s.name == sample["site"])
    r, c = (int(v) for v in sample["key"].split("_r")[1].split("_c"))
    ground = site_ground(site.dsm, 1.0)[r:r + 64, c:c + 64]
    assert sample["dsm"].shape == (2, 64, 64)
    assert np.array_equal(sample["dsm"][1].numpy(), ground, equal_nan=True)
    assert math.isfinite(float(sample["dsm"][1].nanmean()))


def test_the_one_pass_weights_load_checked_by_their_card_and_map_every_threshold_at_once():
    from pathlib import Path
    from lib.infer.loading import check_weights_card, load_model
    path = Path(__file__).resolve().parents[1] / "weights" / "gaps_dsm_v6.pt"
    if not path.exists():
        pytest.skip("no weights/gaps_dsm_v6.pt in this checkout")
    assert check_weights_card(path)                          # sha256 against weights/gaps_dsm_v6.json
    loaded = load_model(path)
    assert loaded.net.needs_ground and loaded.net.model.threshold_free
    dsm = 300 + 20 * torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        probs = loaded.net.forward_thresholds(torch.cat([dsm, dsm - 10], 1), torch.tensor([2.0, 5.0, 10.0, 15.0]))
    assert probs.shape == (1, 4, 128, 128) and (probs.diff(dim=1) >= 0).all()
