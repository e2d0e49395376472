"""DDP with 2 CPU processes (gloo), wired exactly as torchrun would.

What is equal between 2 ranks x batch b and 1 process x batch 2b on the same dataset:
- the optimiser steps and the LR at every step, exactly (the schedule's length is counted per rank);
- the validation metrics of given weights, exactly (counts are all-reduced integers; every val tile once);
- the weights after the same samples per step, within 1e-5 with SGD (measured 8e-7 after 4 steps that moved
  them by 2e-2): DDP averages the two half-batch gradients, which equals the full-batch gradient up to float
  summation order and, for losses that average over valid pixels, up to the per-half valid counts. With
  Adam(W) no such bound holds: its first steps are lr * sign(g), so a near-zero gradient component that
  those tiny differences flip moves by a whole LR step (seen: 5e-3 after 4 steps).
What is not equal: which samples form a step (each rank reads a contiguous half of the epoch's stream), the
per-sample threshold draws (each rank has its own generator), dropout and augmentation draws, and BatchNorm
statistics (per rank unless train.sync_batchnorm): so the trained weights of two such runs differ.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from lib.train import runner
from lib.train.callbacks import Callback
from lib.train.checkpoint import seed_everything

WORLD = 2
DDP_RUN = {"run": {"name": "ddp"}, "train": {"epochs": 2, "batch_size": 4, "ema_decay": 0.5},
           "log": {"tensorboard": False, "images_every_epochs": 0}}


class LRs(Callback):
    """The LR of every optimiser step, saved at the end of training."""

    def __init__(self, path):
        self.path, self.lrs = path, []

    def on_batch_end(self, trainer, logs):
        if logs.get("optimizer_step"):
            self.lrs.append(logs["lr"])

    def on_train_end(self, trainer):
        torch.save({"lrs": self.lrs, "step": trainer.step}, self.path)


class Capture(Callback):
    """Saves, at every validation, the weights that were evaluated and the metrics, per rank."""
    order = 99

    def __init__(self, out, rank):
        self.out, self.rank = out, rank

    def on_validation_end(self, trainer, metrics):
        model = trainer.ema.module if trainer.ema else trainer.raw_model
        torch.save({"model": model.state_dict(), "raw": trainer.raw_model.state_dict(), "metrics": metrics,
                    "step": trainer.step}, os.path.join(self.out, f"rank{self.rank}.pt"))


def _worker(rank, port, root, out):
    """One torchrun-like process: the env variables torchrun sets, then the normal train_model."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    build = runner.build_callbacks
    runner.build_callbacks = lambda *a: build(*a) + [Capture(out, rank), LRs(os.path.join(out, f"lr{rank}.pt"))]
    runner.train_model(tiny_config(root, **DDP_RUN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_stay_in_step_and_metrics_match_single_process(tiny_dataset, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(_free_port(), tiny_dataset, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["step"] == r1["step"] > 0
    for key in ("model", "raw"):  # gradients were averaged: identical weights, bitwise
        for name, v in r0[key].items():
            if torch.is_tensor(v):
                assert torch.equal(v, r1[key][name]), f"{key} {name} differs between ranks"
    assert r0["metrics"] == r1["metrics"]
    # the same evaluated weights, one process, every validation tile
    single = runner.build_trainer(tiny_config(tiny_dataset, **{**DDP_RUN, "run": {"name": "ddp_check"}}),
                                  torch.device("cpu"), callbacks=[])
    single.ema = None
    single.raw_model.load_state_dict(r0["model"])
    metrics = single.validate()
    assert set(metrics) == set(r0["metrics"])
    for k, v in r0["metrics"].items():
        assert metrics[k] == pytest.approx(v, rel=1e-6, nan_ok=True), k
    # counts are integers: the IoUs are exactly equal, not just close
    assert metrics["val/iou_mean"] == r0["metrics"]["val/iou_mean"]


def test_two_ranks_follow_the_single_process_schedule(tiny_dataset, tmp_path):
    """2 ranks x batch 4 take as many steps, at the same LR each, as 1 process x batch 8 (not half a schedule)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(_free_port(), tiny_dataset, str(tmp_path)), nprocs=WORLD, join=True)
    single = dict(DDP_RUN, run={"name": "single"}, train={**DDP_RUN["train"], "batch_size": 8})
    build = runner.build_callbacks
    try:
        runner.build_callbacks = lambda *a: build(*a) + [LRs(tmp_path / "single.pt")]
        runner.train_model(tiny_config(tiny_dataset, **single))
    finally:
        runner.build_callbacks = build
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"lr{rank}.pt", weights_only=True)
        assert ddp["step"] == one["step"] > 2
        assert ddp["lrs"] == one["lrs"]
    assert one["lrs"][-1] < max(one["lrs"])  # the schedule decays over the run: a halved one would differ


SAME_SAMPLES = {"run": {"name": "same"}, "optim": {"name": "sgd"},  # see the module docstring for Adam
                "data": {"task": "regression"}, "loss": {"name": "huber"},
                "model": {"dropout": 0.0}, "augment": {"enabled": False},
                "train": {"epochs": 1, "batch_size": 8}, "log": {"tensorboard": False, "images_every_epochs": 0}}


BUILD_DATA = runner.build_data


def _fixed_data(batches):
    """build_data's stand-in: the same list of batches every epoch (the schedule's length from its size)."""
    def build_data(cfg, root, device, *a, **k):
        _, val_loader, _ = BUILD_DATA(cfg, root, device, *a, **k)
        return (lambda epoch: batches), val_loader, len(batches)
    return build_data


def _same_samples_worker(rank, port, root, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    half = [{k: v[4 * rank:4 * rank + 4] for k, v in b.items()} for b in torch.load(os.path.join(out, "batches.pt"))]
    runner.build_data = _fixed_data(half)
    build = runner.build_callbacks
    runner.build_callbacks = lambda *a: build(*a) + [Capture(out, rank)]
    cfg = tiny_config(root, **{**SAME_SAMPLES, "train": {**SAME_SAMPLES["train"], "batch_size": 4}})
    runner.train_model(cfg)


def test_same_samples_per_step_give_the_same_weights_within_tolerance(tiny_dataset, tmp_path):
    """Each rank gets one half of the single process's batches: after training the weights agree within 1e-5 (SGD)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    cfg = tiny_config(tiny_dataset, **SAME_SAMPLES)
    loader_fn, _, _ = runner.build_data(cfg, tiny_dataset / "data", torch.device("cpu"))
    batches = [{k: v for k, v in b.items() if torch.is_tensor(v)} for b in loader_fn(0)]
    torch.save(batches, tmp_path / "batches.pt")
    try:
        runner.build_data = _fixed_data(batches)
        seed_everything(cfg.run.seed)  # as train_model does: the same initial weights as the ranks'
        single = runner.build_trainer(cfg, torch.device("cpu"), callbacks=[])
        initial = {k: v.clone() for k, v in single.raw_model.state_dict().items() if torch.is_tensor(v)}
    finally:
        runner.build_data = BUILD_DATA
    single.fit()
    mp.spawn(_same_samples_worker, args=(_free_port(), tiny_dataset, str(tmp_path)), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert ddp["step"] == single.step == len(batches)
    worst = max((v - ddp["raw"][k]).abs().max().item() for k, v in single.raw_model.state_dict().items()
                if torch.is_tensor(v) and v.is_floating_point())
    moved = max((v - initial[k]).abs().max().item() for k, v in single.raw_model.state_dict().items()
                if torch.is_tensor(v) and v.is_floating_point())
    assert worst < 1e-5, f"largest weight difference {worst:.2e}"
    assert moved > 100 * worst  # training moved the weights far more than the two runs differ
