"""DDP with 2 CPU processes (gloo), wired exactly as torchrun would: both ranks stay in step, and the
all-reduced validation metrics equal a single-process evaluation of the same weights."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from lib.train import runner
from lib.train.callbacks import Callback

WORLD = 2
DDP_RUN = {"run": {"name": "ddp"}, "train": {"epochs": 2, "batch_size": 4, "ema_decay": 0.5},
           "log": {"tensorboard": False, "images_every_epochs": 0}}


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
    runner.build_callbacks = lambda *a: build(*a) + [Capture(out, rank)]
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
