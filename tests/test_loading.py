"""The one loading path: thresholds in one pass with one normalisation per window, nodata output, the
thresholds a model may map, and the shipped weights' default and sha256 card."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch

import predict
from conftest import make_checkpoint
from lib.infer import loading
from lib.core.config import build_config
from lib.core.errors import ConfigError, ModelError
from lib.infer.loading import check_thresholds, load_model, resolve_checkpoint
from lib.geoio.geotiff_read import read_raster
from lib.infer.scene_windows import predict_thresholds
from lib.infer.weights import file_sha256
from tests.test_scene_windows import random_dsm, write_dsm


def dsm_batch(b=3, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dsm = 300 + 5 * torch.randn(b, 1, size, size, generator=g)
    dsm[0, 0, 4:12, 3:9] = float("nan")
    return dsm


def test_forward_thresholds_equals_forward_on_repeated_windows(tmp_path):
    net = load_model(make_checkpoint(tmp_path / "m.ckpt")).net
    dsm, t = dsm_batch(), torch.tensor([2.0, 5.0, 10.0, 15.0])
    with torch.no_grad():
        once = net.forward_thresholds(dsm, t)                                  # (3, 4, 32, 32)
        repeated = net(dsm.repeat_interleave(4, dim=0), t.repeat(3)).view(3, 4, 32, 32)
    torch.testing.assert_close(once, repeated, atol=1e-6, rtol=0)
    assert not torch.allclose(once[:, 0], once[:, 3], atol=1e-3)              # the threshold matters
    assert torch.isfinite(once).all()  # the docstring's promise: nodata pixels get a finite value to mask


def test_predict_thresholds_normalises_each_window_once(tmp_path):
    net = load_model(make_checkpoint(tmp_path / "m.ckpt")).net
    seen = []
    net.normalizer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        predict_thresholds(net, dsm_batch(), torch.tensor([2.0, 5.0, 10.0, 15.0]))
        assert seen == [3]                                                      # not 3 x 4 windows
        predict_thresholds(net, dsm_batch(), torch.tensor([2.0, 5.0]), tta=True)
    assert seen == [3] + [3] * 8


def test_fixed_threshold_models_map_only_their_thresholds():
    fixed = build_config({}).train
    assert check_thresholds(None, [2.0, 5.0], fixed) == [2.0, 5.0]
    assert check_thresholds([5], [2.0, 5.0], fixed) == [5.0]
    with pytest.raises(ConfigError, match=r"thresholds \[7.5\] m were not trained.*\[2.0, 5.0\]"):
        check_thresholds([5, 7.5], [2.0, 5.0], fixed)
    with pytest.raises(ConfigError, match="distinct"):
        check_thresholds([5, 5], [2.0, 5.0], fixed)


def test_continuous_models_map_any_threshold_and_warn_outside_their_range(caplog):
    continuous = build_config({"train": {"threshold_sampling": "continuous", "threshold_range_m": [1, 30]}}).train
    with caplog.at_level(logging.WARNING):
        assert check_thresholds([3.3, 12.0], [2.0, 5.0], continuous) == [3.3, 12.0]
        assert not caplog.records
        check_thresholds([0.5, 12.0, 40.0], [2.0, 5.0], continuous)
    assert "[0.5, 40.0] m are outside the range" in caplog.text and "[1, 30] m" in caplog.text


def test_predict_maps_an_untrained_threshold_of_a_continuous_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", train={"threshold_sampling": "continuous"})
    write_dsm(tmp_path / "dsm.tif", random_dsm(40, 48))
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "dsm.tif"), "--out", str(out),
                         "--thresholds", "3.5", "7", "--no-quicklook"]) == 0
    assert json.loads((out / "predict.json").read_text())["thresholds_m"] == [3.5, 7.0]
    assert (out / "gaps_3.5m.tif").is_file() and (out / "gaps_7m.csv").is_file()
    fixed = make_checkpoint(tmp_path / "f.ckpt")
    assert predict.main(["--checkpoint", fixed, "--dsm", str(tmp_path / "dsm.tif"), "--out", str(out),
                         "--thresholds", "3.5"]) == 2


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A stand-in for the shipped weights in tmp_path/weights (the real one may not exist yet)."""
    weights = tmp_path / "weights" / "gaps_dsm_v5.pt"
    weights.parent.mkdir()
    monkeypatch.setattr(loading, "DEFAULT_WEIGHTS", weights)
    return weights


def test_no_checkpoint_and_no_shipped_model_is_a_clear_error(shipped, tmp_path, capsys):
    with pytest.raises(ModelError, match="no --checkpoint given and no shipped model at .*gaps_dsm_v5.pt"):
        resolve_checkpoint(None)
    write_dsm(tmp_path / "dsm.tif", random_dsm(32, 32))
    assert predict.main(["--dsm", str(tmp_path / "dsm.tif"), "--out", str(tmp_path / "o")]) == 2
    assert "no shipped model" in capsys.readouterr().err


def test_shipped_weights_are_the_default_and_their_card_is_checked(shipped, tmp_path):
    shutil.copy(make_checkpoint(tmp_path / "m.ckpt"), shipped)
    card = shipped.with_suffix(".json")
    card.write_text(json.dumps({"file": shipped.name, "sha256": file_sha256(shipped), "pixel_size_m": 1.0}))
    assert resolve_checkpoint(None) == shipped
    write_dsm(tmp_path / "dsm.tif", random_dsm(32, 40))
    assert predict.main(["--dsm", str(tmp_path / "dsm.tif"), "--out", str(tmp_path / "o"), "--no-quicklook"]) == 0
    assert json.loads((tmp_path / "o" / "predict.json").read_text())["checkpoint"] == str(shipped)
    card.write_text(json.dumps({"file": shipped.name, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="its card .* records 0000"):
        load_model(shipped)
    card.unlink()                                  # no JSON card: the shipped file needs weights/MODEL_CARD.md
    with pytest.raises(ModelError, match="MODEL_CARD.md not found"):
        load_model(shipped)
    (shipped.parent / "MODEL_CARD.md").write_text(f"| sha256 | `{file_sha256(shipped)}` |\n")
    assert load_model(shipped).pixel_size_m == 1.0


def test_any_checkpoint_with_a_weights_card_is_verified(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    (tmp_path / "m.json").write_text(json.dumps({"file": "other.ckpt", "sha256": "0" * 64}))
    assert load_model(ckpt).tile_px == 32         # a card about another file (e.g. an export's) is not this one's
    (tmp_path / "m.json").write_text(json.dumps({"file": "m.ckpt", "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="sha256"):
        load_model(ckpt)
    (tmp_path / "m.json").write_text(json.dumps({"file": "m.ckpt", "sha256": file_sha256(ckpt)}))
    assert load_model(ckpt).tile_px == 32


def test_an_ensemble_maps_the_mean_of_its_members(tmp_path):
    first = make_checkpoint(tmp_path / "a.ckpt", train={"threshold_sampling": "continuous"})
    ckpt = torch.load(first, weights_only=True)
    torch.manual_seed(1)
    ckpt["model"] = {k: v + 0.05 * torch.randn_like(v) if torch.is_tensor(v) and v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "b.ckpt")
    second = str(tmp_path / "b.ckpt")
    a, b = load_model(first).net, load_model(second).net
    both = loading.load_ensemble([first, second])
    dsm, t = dsm_batch(), torch.tensor([2.0, 10.0])
    with torch.no_grad():
        pa, pb, mean = a.forward_thresholds(dsm, t), b.forward_thresholds(dsm, t), both.net.forward_thresholds(dsm, t)
        assert not torch.allclose(pa, pb, atol=1e-3)
        torch.testing.assert_close(mean, (pa + pb) / 2)
        one_t = t[:1].repeat(3)
        torch.testing.assert_close(both.net(dsm, one_t), (a(dsm, one_t) + b(dsm, one_t)) / 2)
    write_dsm(tmp_path / "dsm.tif", random_dsm(40, 48))
    for name, checkpoints in (("one", [first]), ("same", [first, first]), ("pair", [first, second])):
        assert predict.main(["--checkpoint", *checkpoints, "--dsm", str(tmp_path / "dsm.tif"), "--out",
                             str(tmp_path / name), "--thresholds", "3", "--write-prob", "--no-quicklook"]) == 0
    prob = {name: read_raster(tmp_path / name / "prob_3m.tif")[0] for name in ("one", "same", "pair")}
    np.testing.assert_allclose(prob["same"], prob["one"], atol=1e-6, equal_nan=True)   # a model with itself
    assert np.nanmax(np.abs(prob["pair"] - prob["one"])) > 1e-3
    record = json.loads((tmp_path / "pair" / "predict.json").read_text())
    assert record["checkpoint"] == f"{first} + {second}"


def test_ensemble_members_must_agree(tmp_path):
    continuous = make_checkpoint(tmp_path / "c.ckpt", train={"threshold_sampling": "continuous"})
    fixed = make_checkpoint(tmp_path / "f.ckpt")
    coarse = make_checkpoint(tmp_path / "p.ckpt", train={"threshold_sampling": "continuous"},
                             data={"tile_px": 32, "pixel_size_m": 2.0})
    with pytest.raises(ModelError, match=r"f.ckpt was trained on thresholds .*fixed.* but .*c.ckpt"):
        loading.load_ensemble([continuous, fixed])
    with pytest.raises(ModelError, match=r"p.ckpt was trained on 2 m pixels but .*c.ckpt on 1 m"):
        loading.load_ensemble([continuous, coarse])


def test_a_height_head_maps_any_number_of_thresholds_with_one_network_pass(tmp_path):
    """predict's window loop with K = 1 and K = 8 thresholds: the network runs once per window batch both
    times, and its masks equal the per-threshold forward and nest across thresholds."""
    from lib.core.schema import ModelConfig
    from lib.data.normalize import Normalizer
    from lib.infer.loading import InferenceModel
    from lib.infer.scene_windows import iter_scene, plan_scene
    from lib.models import build_model

    torch.manual_seed(0)
    features = ["dsm", "relative_height_11m", "relative_height_21m"]
    model = build_model(ModelConfig(name="unet_cbam", base_channels=4, depth=2, classical_prior=True,
                                    height_head=True), in_channels=3, prior_channels=[1, 2]).eval()
    for p in model.head.parameters():  # a trained-looking head: corrections and spreads that vary per pixel
        torch.nn.init.normal_(p, std=0.3)
    net = InferenceModel(Normalizer(scale=10.0, features=features), model)
    passes = []
    model.head.register_forward_hook(lambda *_: passes.append(1))
    dsm = 300 + 8 * torch.rand(1, 1, 48, 56)
    from tests.test_scene_windows import write_dsm
    write_dsm(tmp_path / "dsm.tif", dsm[0, 0].numpy())
    plan = plan_scene(48, 56, 32, 0.25, 4)
    counts = {}
    for k in (1, 8):
        passes.clear()
        thresholds = torch.linspace(2.0, 16.0, k).tolist()
        list(iter_scene(net, tmp_path / "dsm.tif", plan, thresholds, batch_size=2))
        counts[k] = len(passes)
    windows = len(plan.rows) * len(plan.cols)
    assert counts[1] == counts[8] == -(-windows // 2)

    t = torch.tensor([2.0, 4.0, 8.0, 16.0])
    with torch.no_grad():
        every = net.forward_thresholds(dsm[:, :, :32, :32], t)                    # (1, 4, 32, 32)
        one_by_one = torch.cat([net(dsm[:, :, :32, :32], t[i:i + 1]) for i in range(4)], 1)
    assert torch.allclose(every, one_by_one, atol=1e-6)
    assert (every.diff(dim=1) >= 0).all() and every.std() > 0.01  # nested by construction, not constant

