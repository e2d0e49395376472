"""The training loop end to end on a tiny dataset: outputs, TensorBoard tags, exact resume, guards."""
import json
import shutil

import pytest
import torch

from conftest import tiny_config
from lib.train import runner
from lib.train.callbacks import Callback
from lib.train.checkpoint import load_checkpoint
from lib.core.errors import TrainingError


class Crash(Callback):
    """Simulates a kill right after optimiser step `at` (and after any checkpoint of that step)."""
    order = 99

    def __init__(self, at):
        self.at = at

    def on_batch_end(self, trainer, logs):
        if logs.get("optimizer_step") and trainer.step == self.at:
            raise KeyboardInterrupt("simulated kill")


def _train(cfg, monkeypatch=None, crash_at=None, resume=None):
    if crash_at is not None:
        build = runner.build_callbacks
        monkeypatch.setattr(runner, "build_callbacks", lambda *a: build(*a) + [Crash(crash_at)])
    try:
        return runner.train_model(cfg, resume=resume)
    except KeyboardInterrupt:
        return None
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def _weights(run_dir):
    return load_checkpoint(run_dir / "last.ckpt")["model"]


def test_train_writes_run_directory_and_tensorboard_tags(tiny_dataset):
    cfg = tiny_config(tiny_dataset, run={"name": "outputs"})
    run_dir = runner.train_model(cfg)
    for name in ("best.ckpt", "last.ckpt", "config.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/iou_mean" in r for r in records) and any("train/loss" in r for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "val/iou_mean", "val/iou_2m", "val/iou_15m"} <= set(tags["scalars"])
    assert any(t.startswith("val_panel/") for t in tags["images"])
    assert tags["graph"], "model graph missing"
    histograms = set(tags["histograms"])
    assert "weights/head.weight" in histograms and "grads/head.weight" in histograms
    hparams = EventAccumulator(str(run_dir / "tb" / "hparams"), size_guidance={"scalars": 0})
    hparams.Reload()
    assert "_hparams_/experiment" in hparams.PluginTagToContent("hparams")
    assert "hparam/val/iou_mean" in hparams.Tags()["scalars"]
    ckpt = load_checkpoint(run_dir / "best.ckpt")
    assert {"model", "optimizer", "config", "normalization", "rng", "callbacks", "version"} <= set(ckpt)


@pytest.mark.parametrize("crash_at, every", [(10, 0), (5, 3)], ids=["epoch_end", "mid_epoch"])
def test_resume_is_bitwise_identical(tiny_dataset, monkeypatch, crash_at, every):
    """Uninterrupted vs killed-and-resumed (from an epoch-end or a mid-epoch last.ckpt) runs."""
    cfg = tiny_config(tiny_dataset, run={"name": f"full_{crash_at}"}, train={"checkpoint_every_steps": every})
    full = runner.train_model(cfg)
    cfg2 = tiny_config(tiny_dataset, run={"name": f"killed_{crash_at}"}, train={"checkpoint_every_steps": every})
    assert _train(cfg2, monkeypatch, crash_at=crash_at) is None
    ckpt = load_checkpoint(runner.run_dir_of(cfg2) / "last.ckpt")
    assert ckpt["step"] < crash_at  # the kill lost work that resume must redo
    resumed = _train(cfg2, resume="auto")
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    differ = [k for k in a if (not torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] != b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run: {differ[:5]}"


def test_nonfinite_guard_stops_and_keeps_last_good_checkpoint(tiny_dataset):
    cfg = tiny_config(tiny_dataset, run={"name": "nan"}, optim={"lr": 1e30, "grad_clip": 0.0},
                      train={"epochs": 3})
    with pytest.raises(TrainingError, match="non-finite"):
        runner.train_model(cfg)
    last = runner.run_dir_of(cfg) / "last.ckpt"
    if last.exists():
        assert all(torch.isfinite(v).all() for v in load_checkpoint(last)["model"].values() if v.is_floating_point())


def test_resume_auto_without_checkpoint_starts_fresh(tiny_dataset):
    cfg = tiny_config(tiny_dataset, run={"name": "fresh"}, train={"epochs": 1})
    shutil.rmtree(runner.run_dir_of(cfg), ignore_errors=True)
    run_dir = runner.train_model(cfg, resume="auto")
    assert load_checkpoint(run_dir / "last.ckpt")["epoch"] == 1


def test_compiled_training_steps_like_eager_and_saves_the_raw_model(tiny_dataset, monkeypatch):
    """train.compile: the loop steps a torch.compile'd model to the eager losses and weights, and checkpoints
    hold the raw model's keys (no _orig_mod. prefix), loadable without compiling. Dynamo traces the real
    model; the aot_eager backend stands in for inductor, whose C++ build takes ~100 s on this CPU."""
    import functools
    from lib.train.checkpoint import seed_everything
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        cfg = tiny_config(tiny_dataset, run={"name": f"compile_{compiled}"}, model={"dropout": 0.0},
                          train={"compile": compiled}, log={"tensorboard": False, "images_every_epochs": 0})
        seed_everything(0)
        trainer = runner.build_trainer(cfg, torch.device("cpu"), callbacks=[])
        trainer.model.train()
        batches = iter(trainer.train_loader_fn(0))
        losses = [trainer.train_step(next(batches))["loss"] for _ in range(3)]
        runs[compiled] = (trainer, losses)
    (eager, eager_losses), (compiled, compiled_losses) = runs[False], runs[True]
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    state = compiled.state_dict()["model"]
    assert state.keys() == eager.state_dict()["model"].keys()
    worst = max(float((v - eager.raw_model.state_dict()[k]).abs().max()) for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point())
    assert worst < 1e-4


def test_resuming_with_other_norm_layers_says_which_option_to_set(tiny_dataset):
    """Batch 4 built group norm (model.norm adaptive); resuming at batch 16 would build batch norm."""
    from lib.core.errors import ModelError
    quiet = {"log": {"tensorboard": False, "images_every_epochs": 0}, "schedule": {"warmup_steps": 0}}
    runner.train_model(tiny_config(tiny_dataset, run={"name": "norms"}, train={"epochs": 1, "max_steps": 2}, **quiet))
    bigger = tiny_config(tiny_dataset, run={"name": "norms"}, train={"epochs": 2, "batch_size": 16}, **quiet)
    with pytest.raises(ModelError) as info:
        runner.train_model(bigger, resume="auto")
    assert "'group' norm layers, this one has 'batch'" in str(info.value)
    assert "--model.norm=group" in info.value.hint and "--train.batch_size" in info.value.hint
