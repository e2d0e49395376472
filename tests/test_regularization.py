"""CompositeRegularization finds the run's regularisers; the adaptive rule raises them only when the
val - train loss gap widens twice in a row, logs it, and survives a resume."""
import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from lib.models import build_model
from lib.train.optimizers import build_optimizer
from lib.train.regularization import AdaptiveRegularization, build_regularization


def _parts(tmp_path, **train):
    cfg = tiny_config(tmp_path, model={"name": "res_unet_film_cbam", "dropout": 0.2, "drop_path": 0.1,
                                       "spectral_norm": True}, optim={"weight_decay": 0.01}, train=train)
    model = build_model(cfg.model, batch_size=cfg.train.batch_size)
    optimizer = build_optimizer(cfg.optim, model)
    return cfg, model, optimizer, build_regularization(cfg, model, optimizer)


def test_composite_finds_and_scales_every_regulariser(tmp_path):
    cfg, model, optimizer, reg = _parts(tmp_path, max_dropout=0.3)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout2d)]
    assert reg.dropouts == dropouts and len(dropouts) >= 2
    assert reg.spectral > 0 and len(reg.drop_path) > 0
    text = reg.describe()
    assert f"in {len(dropouts)} layer(s)" in text and "DropPath up to 0.1" in text and "spectral norm on" in text
    reg.set_scale(1.25)
    assert all(m.p == pytest.approx(0.25) for m in dropouts)
    reg.set_scale(4.0)
    assert all(m.p == pytest.approx(0.3) for m in dropouts)  # capped at train.max_dropout
    for group in optimizer.param_groups:  # norms and biases keep no decay
        assert group["weight_decay"] == pytest.approx(0.04 if group["params"][0].ndim > 1 else 0.0)


def _validate(callback, trainer, train_losses, val_loss):
    for loss in train_losses:
        callback.on_batch_end(trainer, {"optimizer_step": True, "loss": loss})
    callback.on_validation_end(trainer, {"val/loss": val_loss})


def test_adaptive_raises_only_after_two_widenings_and_resumes(tmp_path, caplog):
    cfg, model, optimizer, reg = _parts(tmp_path)
    callback = AdaptiveRegularization(reg, factor=1.5)
    trainer = SimpleNamespace(device=torch.device("cpu"), monitor=None, step=0, epoch=0)
    _validate(callback, trainer, [1.0, 0.8], 1.0)     # gap 0.1
    _validate(callback, trainer, [0.6], 0.9)          # gap 0.3: widened once
    _validate(callback, trainer, [0.5], 0.7)          # gap 0.2: narrowed
    assert reg.scale == 1.0
    _validate(callback, trainer, [0.4], 0.7)          # gap 0.3
    with caplog.at_level(logging.INFO, logger="lib.train.regularization"):
        _validate(callback, trainer, [0.3], 0.8)      # gap 0.5: widened twice in a row
    assert reg.scale == pytest.approx(1.5)
    assert "widened twice" in caplog.text
    assert all(m.p == pytest.approx(0.3) for m in reg.dropouts)
    # a resumed run: fresh model and optimiser, state from the checkpoint, re-applied at train begin
    state = callback.state_dict()
    _, model2, _, reg2 = _parts(tmp_path)
    resumed = AdaptiveRegularization(reg2, factor=1.5)
    resumed.load_state_dict(state)
    resumed.on_train_begin(trainer)
    assert [m.p for m in reg2.dropouts] == [m.p for m in reg.dropouts]
    assert resumed.state_dict() == state


def test_adaptive_regularization_in_a_run_is_resumable(tiny_dataset):
    from lib.train import runner
    cfg = tiny_config(tiny_dataset, run={"name": "adaptive"}, train={"adaptive_regularization": True, "epochs": 1})
    run_dir = runner.train_model(cfg)
    from lib.train.checkpoint import load_checkpoint
    state = load_checkpoint(run_dir / "last.ckpt")["callbacks"]["AdaptiveRegularization"]
    assert state["scale"] == 1.0 and len(state["gaps"]) == 1 and state["loss_steps"] == 0
