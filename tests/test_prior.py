"""model.classical_prior: the classical rule as a starting logit, in every model, checkpoint and export."""
import math

import pytest
import torch

from conftest import tiny_config
from lib.gaps.baselines import classical_relative_height
from lib.core.errors import ModelError
from lib.models import build_model, rebuild_model
from lib.models.prior import INITIAL_GAIN, TRUST_RANGE, ClassicalPrior
from lib.data.normalize import Normalizer, relative_height_channels

FEATURES = ["dsm", "relative_height_9m", "relative_height_15m"]


def _dsm(seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 300 + 25 * torch.rand(2, 1, size, size, generator=g)


def test_relative_height_channels_index_the_features():
    assert relative_height_channels(FEATURES) == [1, 2]
    assert relative_height_channels(["relative_height_51m", "dsm"]) == [0]
    assert relative_height_channels(["dsm"]) == []
    assert relative_height_channels(["relative_height_101m", "dsm", "relative_height_31m"]) == [2, 0]  # widest last


def test_prior_at_init_is_the_classical_rule_on_the_mean_relative_height():
    norm = Normalizer(scale=5.0, features=FEATURES)
    dsm = _dsm()
    x = norm(dsm)
    prior = ClassicalPrior(relative_height_channels(FEATURES))
    for t_m in (2.0, 5.0, 10.0):
        logits = prior.rule(x, norm.normalise_threshold(torch.full((2,), t_m)))
        mean_rel = (classical_relative_height(dsm, 9.0, 1.0) + classical_relative_height(dsm, 15.0, 1.0)) / 2
        decided = (mean_rel - t_m).abs() > 1e-3  # pixels exactly at T may round either way
        assert torch.equal((logits > 0)[decided], (mean_rel <= t_m)[decided])
        assert decided.float().mean() > 0.95


@pytest.mark.parametrize("trust,scope", [(False, "pixel"), (True, "pixel"), (True, "tile")])
@pytest.mark.parametrize("name", ["unet_film_cbam", "unet", "deeplabv3plus"])
def test_models_with_the_prior_add_it_rebuild_and_trace(tmp_path, name, trust, scope):
    cfg = tiny_config(tmp_path, model={"name": name, "base_channels": 8, "depth": 3, "classical_prior": True,
                                       "prior_trust_map": trust, "prior_trust_scope": scope})
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=3, prior_channels=[1, 2]).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        with_prior = model(x, t)
        model.prior, kept = None, model.prior
        network = model(x, t)
        model.prior = kept
        # correction, then with the trust map: trust and one mix offset per window (2 windows here)
        assert network.shape == (2, 4 if trust else 1, 32, 32) and with_prior.shape == (2, 1, 32, 32)
        rule = model.prior.rule(x, t, network[:, 1:] if trust else None)
        torch.testing.assert_close(with_prior, network[:, :1] + rule)
        again = rebuild_model(cfg.model, model.state_dict()).eval()
        assert again.prior.trust_scope == scope
        torch.testing.assert_close(again(x, t), with_prior)
        traced = torch.jit.trace(model, (x, t), check_trace=False)
        torch.testing.assert_close(traced(x.flip(-1), t.flip(0)), model(x.flip(-1), t.flip(0)))


def test_trust_map_scales_the_gain_within_its_bound_and_leaves_the_decision_boundary():
    prior = ClassicalPrior([0], trust_map=True)
    x, t = torch.linspace(-1, 1, 9).view(1, 1, 3, 3), torch.tensor([0.1])
    plain = prior.rule(x, t)
    for raw, factor in ((0.0, 1.0), (2.0, math.exp(TRUST_RANGE * math.tanh(2.0 / TRUST_RANGE))),
                        (1e4, math.exp(TRUST_RANGE)), (-1e4, math.exp(-TRUST_RANGE))):
        scaled = prior.rule(x, t, torch.full_like(x, raw))
        torch.testing.assert_close(scaled, plain * factor, rtol=1e-5, atol=1e-6)
        assert torch.equal(scaled > 0, plain > 0)  # bias is 0 at init: trust moves confidence, not the boundary


@pytest.mark.parametrize("spectral", [False, True])
def test_with_a_trust_map_the_untrained_model_is_exactly_the_rule(tmp_path, spectral):
    cfg = tiny_config(tmp_path, model={"name": "unet_film_cbam", "base_channels": 8, "depth": 3,
                                       "classical_prior": True, "prior_trust_map": True, "spectral_norm": spectral})
    model = build_model(cfg.model, in_channels=3, prior_channels=[1, 2]).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model.prior.rule(x, t), rtol=0, atol=0)
    loss = model(x, t).square().mean() + model(x, t).mean()
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0  # the zero layer learns, and through it the network
    assert not hasattr(model.head, "parametrizations")  # spectral norm of a zero weight would divide by 0


def test_trust_map_picks_the_window_per_pixel():
    prior = ClassicalPrior([0, 1], trust_map=True)
    x, t = torch.randn(1, 2, 4, 4), torch.tensor([0.3])
    only = [ClassicalPrior([c]).rule(x, t) for c in (0, 1)]                  # each window alone
    offsets = torch.zeros(1, 3, 4, 4)
    offsets[:, 1, :, :2], offsets[:, 2, :, 2:] = 50.0, 50.0                  # left: window 0, right: window 1
    picked = prior.rule(x, t, offsets)
    torch.testing.assert_close(picked[..., :2], only[0][..., :2])
    torch.testing.assert_close(picked[..., 2:], only[1][..., 2:])
    torch.testing.assert_close(prior.rule(x, t, torch.zeros(1, 3, 4, 4)), prior.rule(x, t))  # 0: the global mix


def test_tile_scope_uses_one_set_of_knobs_per_tile():
    pixel, tile = ClassicalPrior([0, 1], trust_map=True), ClassicalPrior([0, 1], trust_map=True, trust_scope="tile")
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([0.3, 0.6])
    knobs = torch.randn(2, 3, 4, 4) * 3
    uniform = knobs.mean((2, 3), keepdim=True).expand_as(knobs)
    torch.testing.assert_close(tile.rule(x, t, knobs), pixel.rule(x, t, uniform))
    assert not torch.allclose(tile.rule(x, t, knobs), pixel.rule(x, t, knobs))
    changed = knobs.clone()
    changed[1] += 5.0                                     # one tile's knobs do not reach the other tile
    torch.testing.assert_close(tile.rule(x, t, changed)[0], tile.rule(x, t, knobs)[0])
    with pytest.raises(ModelError, match="trust scope"):
        ClassicalPrior([0], trust_map=True, trust_scope="scene")


def test_trust_map_needs_the_prior(tmp_path):
    cfg = tiny_config(tmp_path, model={"prior_trust_map": True})
    with pytest.raises(ModelError, match="classical_prior is off"):
        build_model(cfg.model, in_channels=2, prior_channels=[1])


def test_prior_needs_relative_height_channels_and_segmentation(tmp_path):
    cfg = tiny_config(tmp_path, model={"classical_prior": True})
    with pytest.raises(ModelError, match="relative-height input channels"):
        build_model(cfg.model, in_channels=1, prior_channels=[])
    with pytest.raises(ModelError, match="relative-height input channels"):
        build_model(cfg.model, in_channels=2, prior_channels=[2])
    with pytest.raises(ModelError, match="segmentation prior"):
        build_model(cfg.model, task="regression", in_channels=2, prior_channels=[1])
    plain = build_model(tiny_config(tmp_path).model, in_channels=2, prior_channels=[1])
    assert plain.prior is None and not any("prior" in k for k in plain.state_dict())


def test_training_with_the_prior_gives_a_checkpoint_predict_can_load(tiny_dataset, tmp_path):
    """Train on relative-height features with the prior, then load the checkpoint as predict does."""
    from lib.infer.loading import load_model
    from lib.train.runner import train_model
    cfg = tiny_config(tmp_path, data={"root": str(tiny_dataset / "data"),
                                      "input_features": ["dsm", "relative_height_9m"]},
                      model={"classical_prior": True, "prior_trust_map": True}, train={"epochs": 1, "max_steps": 3},
                      log={"tensorboard": False, "images_every_epochs": 0})
    run_dir = train_model(cfg)
    loaded = load_model(run_dir / "last.ckpt")
    assert loaded.net.model.prior is not None
    assert loaded.net.model.prior.mix is None and loaded.net.model.prior.trust_map  # one window: nothing to mix
    with torch.no_grad():
        probs = loaded.net(_dsm(1), torch.tensor([2.0, 20.0]))
    assert probs.shape == (2, 1, 32, 32) and torch.isfinite(probs).all()


def test_init_from_a_plain_prior_run_starts_the_knob_model_at_its_learnt_rule(tiny_dataset, tmp_path):
    """v4's recipe: --init-from a plain-prior checkpoint into a per-tile-knob model takes the body and the
    learnt gain and mix; the wider output layer starts at zero, so the first output is that rule."""
    from lib.train.checkpoint import load_checkpoint
    from lib.train.runner import build_trainer, train_model
    common = dict(data={"root": str(tiny_dataset / "data"), "input_features": FEATURES},
                  train={"epochs": 1, "max_steps": 3},
                  log={"tensorboard": False, "images_every_epochs": 0})
    plain_cfg = tiny_config(tmp_path, model={"classical_prior": True}, run={"name": "plain"}, **common)
    plain_ckpt = train_model(plain_cfg) / "last.ckpt"
    plain = rebuild_model(plain_cfg.model, load_checkpoint(plain_ckpt)["model"]).eval()
    knob_cfg = tiny_config(tmp_path, model={"classical_prior": True, "prior_trust_map": True,
                                            "prior_trust_scope": "tile"}, run={"name": "knobs"}, **common)
    knobs = build_trainer(knob_cfg, torch.device("cpu"), init_from=str(plain_ckpt), callbacks=[]).raw_model.eval()
    assert torch.equal(knobs.prior.log_gain, plain.prior.log_gain) and torch.equal(knobs.prior.mix, plain.prior.mix)
    assert not torch.equal(plain.prior.log_gain, torch.tensor(math.log(INITIAL_GAIN)))   # learnt, not the initial value
    assert knobs.head.weight.abs().sum() == 0 and knobs.head.bias.abs().sum() == 0
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(knobs(x, t), plain.prior.rule(x, t), rtol=0, atol=0)
        assert not torch.allclose(plain(x, t), plain.prior.rule(x, t))           # the plain model's correction


def test_the_prior_hands_over_its_last_training_parts_once():
    prior = ClassicalPrior([1], trust_map=True)
    x, t, network = torch.randn(2, 2, 4, 4), torch.tensor([0.2, 0.5]), torch.randn(2, 2, 4, 4)
    prior(x, t, network)
    assert prior.recorded_parts is None                       # off unless the trainer asks for it
    prior.record_parts = True
    prior.eval()(x, t, network)
    assert prior.recorded_parts is None                       # validation and prediction record nothing
    out = prior.train()(x, t, network)
    correction, rule = prior.pop_parts()
    assert torch.equal(correction, network[:, :1])
    assert torch.equal(rule, prior.rule(x, t, network[:, 1:])) and torch.equal(out, correction + rule)
    with pytest.raises(ModelError, match="no parts recorded"):
        prior.pop_parts()


def _network_output(model, x, t) -> torch.Tensor:
    """The network's raw output (correction, then knobs) without the rule added."""
    kept, model.prior = model.prior, None
    with torch.no_grad():
        out = model(x, t)
    model.prior = kept
    return out


def _mean_correction(model, x, t) -> float:
    return float(_network_output(model.eval(), x, t)[:, :1].abs().mean())


def test_the_correction_penalty_keeps_the_network_closer_to_its_rule(tiny_dataset, tmp_path):
    """loss.prior_correction_weight: the same short run from the rule grows a smaller correction."""
    from lib.core.errors import ConfigError
    from lib.train.runner import build_trainer
    common = dict(data={"root": str(tiny_dataset / "data"), "input_features": FEATURES},
                  train={"epochs": 1, "max_steps": 4}, log={"tensorboard": False, "images_every_epochs": 0})
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    sizes = {}
    for weight in (0.0, 5.0):
        cfg = tiny_config(tmp_path, model={"classical_prior": True, "prior_trust_map": True},
                          loss={"prior_correction_weight": weight}, run={"name": f"w{weight:g}"}, **common)
        trainer = build_trainer(cfg, torch.device("cpu"), callbacks=[])
        trainer.fit()
        assert trainer.raw_model.prior.recorded_parts is None   # each step's parts were consumed
        sizes[weight] = _mean_correction(trainer.raw_model, x, t)
    assert 0 < sizes[5.0] < 0.5 * sizes[0.0]
    cfg = tiny_config(tmp_path, loss={"prior_correction_weight": 1.0}, **common)
    with pytest.raises(ConfigError, match="prior_correction_weight"):
        build_trainer(cfg, torch.device("cpu"), callbacks=[])


def test_the_rule_loss_adds_the_task_loss_of_the_rule_alone(tiny_dataset, tmp_path):
    """loss.prior_rule_weight: the training loss gains weight x the criterion on the rule's logits (no
    correction), so the knobs are asked to make the rule right by itself."""
    from lib.core.errors import ConfigError
    from lib.train.runner import build_trainer
    common = dict(data={"root": str(tiny_dataset / "data"), "input_features": FEATURES},
                  model={"classical_prior": True, "prior_trust_map": True}, augment={"enabled": False},
                  log={"tensorboard": False, "images_every_epochs": 0})
    plain = build_trainer(tiny_config(tmp_path, run={"name": "plain"}, **common), torch.device("cpu"), callbacks=[])
    ruled = build_trainer(tiny_config(tmp_path, loss={"prior_rule_weight": 2.0}, run={"name": "ruled"}, **common),
                          torch.device("cpu"), callbacks=[])
    ruled.raw_model.load_state_dict(plain.raw_model.state_dict())
    with torch.no_grad():                        # a correction that is not zero, so the two losses differ
        ruled.raw_model.head.bias[0] = plain.raw_model.head.bias[0] = 3.0
    batch = next(iter(plain.train_loader_fn(0)))

    def drawn(trainer):  # the same threshold draw for every call
        trainer.task.generator.manual_seed(0)
        return trainer
    x, t, target, t_idx = drawn(plain).task.train_inputs(batch)
    model = plain.raw_model.train()
    with torch.no_grad():
        rule_alone = plain.criterion(model.prior.rule(x, t, _network_output(model, x, t)[:, 1:]), target, t_idx)
        torch.testing.assert_close(drawn(ruled)._forward_loss(batch)[0],
                                   drawn(plain)._forward_loss(batch)[0] + 2.0 * rule_alone)
    assert ruled.raw_model.prior.recorded_parts is None and plain.raw_model.prior.recorded_parts is None
    with pytest.raises(ConfigError, match="prior_rule_weight"):
        build_trainer(tiny_config(tmp_path, loss={"prior_rule_weight": 1.0}, **{k: v for k, v in common.items()
                                                                               if k != "model"}),
                      torch.device("cpu"), callbacks=[])


def test_without_a_bias_the_rule_decides_at_relative_height_t_whatever_the_knobs(tmp_path):
    prior = ClassicalPrior([0], trust_map=True, bias=False)
    x, t = torch.linspace(-1, 1, 16).view(1, 1, 4, 4), torch.tensor([0.1])
    for raw in (-1e4, -1.0, 0.0, 3.0):
        assert torch.equal(prior.rule(x, t, torch.full_like(x, raw)) > 0, x < 0.1)
    cfg = tiny_config(tmp_path, model={"base_channels": 8, "depth": 3, "classical_prior": True,
                                       "prior_trust_map": True, "prior_bias": False})
    model = build_model(cfg.model, in_channels=3, prior_channels=[1, 2])
    assert model.prior.bias is None and "prior.bias" not in model.state_dict()
    again = rebuild_model(cfg.model, model.state_dict())
    assert again.prior.bias is None
    with_bias = build_model(tiny_config(tmp_path, model={"classical_prior": True}).model, in_channels=2,
                            prior_channels=[1])
    assert isinstance(with_bias.prior.bias, torch.nn.Parameter)             # the default keeps it


def test_the_initial_trust_starts_the_rule_sharper_and_needs_the_trust_map(tmp_path):
    def model(**options):
        cfg = tiny_config(tmp_path, model={"base_channels": 8, "depth": 3, "classical_prior": True, **options})
        return build_model(cfg.model, in_channels=3, prior_channels=[1, 2]).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    sharp = model(prior_trust_map=True, prior_initial_trust=2.0)
    with torch.no_grad():
        torch.testing.assert_close(sharp(x, t), sharp.prior.rule(x, t) * math.exp(2.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="prior_trust_map is off"):
        model(prior_initial_trust=2.0)
    with pytest.raises(ModelError, match="classical_prior is off"):
        model(classical_prior=False, prior_bias=False)
    with pytest.raises(ModelError, match="initial trust"):
        ClassicalPrior([0], trust_map=True, initial_trust=TRUST_RANGE)
