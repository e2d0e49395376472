"""Gradient clipping in its three modes (and off), as one real training step applies it: with plain SGD
(lr 1, no momentum, no decay) the weight change is the clipped gradient itself."""
import pytest
import torch

from conftest import tiny_config
from lib.train import runner
from lib.train.checkpoint import seed_everything

CAP = 1e-2


def applied_gradients(tiny_dataset, mode: str, clip: float):
    """(pre-clip norm the step logged, {name: (weight before, gradient the step applied)})."""
    cfg = tiny_config(tiny_dataset, optim={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0,
                                           "grad_clip": clip, "clip_mode": mode},
                      schedule={"warmup_steps": 0}, log={"tensorboard": False, "images_every_epochs": 0})
    seed_everything(0)
    trainer = runner.build_trainer(cfg, torch.device("cpu"), callbacks=[])
    before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    trainer.model.train()
    logs = trainer.train_step(next(iter(trainer.train_loader_fn(0))))
    assert logs["lr"] == 1.0 and not logs["skipped"]
    after = dict(trainer.raw_model.named_parameters())
    return logs["grad_norm"], {n: (w, (w - after[n].detach()) / logs["lr"]) for n, w in before.items()}


def total_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def test_norm_mode_scales_the_whole_gradient_to_the_cap(tiny_dataset):
    pre, steps = applied_gradients(tiny_dataset, "norm", CAP)
    assert pre > 10 * CAP                                                  # the logged norm is before clipping
    assert total_norm(g for _, g in steps.values()) == pytest.approx(CAP, rel=1e-2)


def test_value_mode_caps_every_element(tiny_dataset):
    pre, steps = applied_gradients(tiny_dataset, "value", CAP)
    largest = max(float(g.abs().max()) for _, g in steps.values())
    assert pre > CAP and largest == pytest.approx(CAP, rel=1e-2)
    assert any(float(g.abs().max()) < CAP / 2 for _, g in steps.values())  # elements below the cap untouched


def test_adaptive_mode_caps_each_tensors_gradient_relative_to_its_weights(tiny_dataset):
    _, steps = applied_gradients(tiny_dataset, "adaptive", CAP)
    ratios = [float(torch.linalg.vector_norm(g) / torch.linalg.vector_norm(w).clamp_min(1e-3))
              for w, g in steps.values()]
    assert max(ratios) == pytest.approx(CAP, rel=1e-2)
    assert sum(r == pytest.approx(CAP, rel=1e-2) for r in ratios) > 1     # several tensors were capped
    assert min(ratios) < CAP / 2                                           # and the others left alone


def test_no_clipping_applies_the_logged_gradient(tiny_dataset):
    pre, steps = applied_gradients(tiny_dataset, "norm", 0.0)
    assert total_norm(g for _, g in steps.values()) == pytest.approx(pre, rel=1e-2)
