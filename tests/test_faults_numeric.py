"""Numeric faults in training: NaN/Inf in a batch, a run of overflowing batches, an exploding LR, CUDA OOM.

A non-finite step is skipped (no weight changes); five in a row stop the run with a TrainingError (exit 2);
checkpoints on disk keep the last finite weights. Out of memory names the batch sizes and the finder.
"""
import torch

from conftest import tiny_config
from lib.train.checkpoint import load_checkpoint
from test_faults import checkpoints_readable, write_config


class Recorder:
    """A callback keeping (step, skipped, parameters) after every optimiser step."""
    order = 99

    def __init__(self):
        self.steps = {}

    def __getattr__(self, hook):  # every other hook does nothing
        return lambda *args, **kwargs: None

    def on_batch_end(self, trainer, logs):
        if logs.get("optimizer_step"):
            params = {k: p.detach().clone() for k, p in trainer.raw_model.named_parameters()}
            self.steps[trainer.step] = (logs["skipped"], params)


def corrupt(monkeypatch, edits: dict) -> Recorder:
    """Train batches {(epoch, index): edit(dsm)} are edited in place; returns the armed Recorder."""
    from lib.train import runner
    build_data, build_callbacks, recorder = runner.build_data, runner.build_callbacks, Recorder()

    class Loader:
        def __init__(self, loader, epoch):
            self.loader, self.epoch = loader, epoch

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if (self.epoch, i) in edits:
                    edits[self.epoch, i](batch["dsm"])
                yield batch

    def data(*args, **kwargs):
        loader_fn, *rest = build_data(*args, **kwargs)
        return (lambda epoch: Loader(loader_fn(epoch), epoch), *rest)
    monkeypatch.setattr(runner, "build_data", data)
    monkeypatch.setattr(runner, "build_callbacks", lambda *a, **k: build_callbacks(*a, **k) + [recorder])
    return recorder


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def holes(dsm):
    """NaN and +-Inf pixels: nodata, which the normalisation masks; the step must go on."""
    dsm[:, :, :4] = float("nan")
    dsm[:, :, 4, :] = float("inf")
    dsm[:, :, 5, :] = -float("inf")


def absurd(dsm):
    """Valid but absurd heights (3e38 m in half of each tile): the loss overflows; the step is skipped."""
    dsm[:, :, :16] = 3e38


def test_nonfinite_batch_is_skipped_and_training_goes_on(tiny_dataset, tmp_path, monkeypatch):
    from lib.train import runner
    recorder = corrupt(monkeypatch, {(0, 2): holes, (0, 5): absurd})
    cfg = tiny_config(tiny_dataset, run={"name": "skip", "output_root": str(tmp_path)}, train={"epochs": 1})
    run_dir = runner.train_model(cfg)
    assert [step for step, (skipped, _) in recorder.steps.items() if skipped] == [6]
    assert same_tensors(recorder.steps[6][1], recorder.steps[5][1])  # the bad step changed no weight
    assert not same_tensors(recorder.steps[7][1], recorder.steps[6][1])
    assert all_finite(load_checkpoint(run_dir / "last.ckpt")["model"])


def test_nonfinite_streak_stops_with_training_error(tiny_dataset, tmp_path, monkeypatch, capsys):
    """From step 7 on every batch overflows: 5 skips, then exit 2; checkpoints keep step 6's weights."""
    import train
    recorder = corrupt(monkeypatch, {(0, i): absurd for i in range(6, 9)} | {(1, i): absurd for i in range(9)})
    config = write_config(tmp_path, tiny_dataset / "data", "streak")
    assert train.main(["--config", str(config)]) == 2
    assert "5 optimiser steps in a row had a non-finite loss or gradient (step 11)" in capsys.readouterr().err
    assert [step for step, (skipped, _) in recorder.steps.items() if skipped] == [7, 8, 9, 10]  # 11 raised
    run_dir = tmp_path / "runs" / "streak"
    assert checkpoints_readable(run_dir)["last.ckpt"] == (1, 9)
    state = load_checkpoint(run_dir / "last.ckpt")["model"]
    assert same_tensors({k: state[k] for k in recorder.steps[6][1]}, recorder.steps[6][1])
    assert all_finite(state), "a skipped batch still reached the checkpoint (normalisation statistics?)"


def test_exploding_lr_stops_with_training_error(tiny_dataset, tmp_path, capsys):
    import train
    config = write_config(tmp_path, tiny_dataset / "data", "lr", checkpoint_every_steps=1)
    assert train.main(["--config", str(config), "--optim.lr=1e30", "--optim.grad_clip=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 5 optimiser steps in a row had a non-finite loss") and "lower optim.lr" in err
    for path in (tmp_path / "runs" / "lr").glob("*.ckpt"):
        assert all_finite(load_checkpoint(path)["model"]), path.name


def test_out_of_memory_names_the_batch_size_and_keeps_checkpoints(tiny_dataset, tmp_path, monkeypatch, capsys):
    """A CUDA OOM in the fifth step (raised on CPU by a patched forward): exit 2 with advice; step 3 kept."""
    import train
    from lib.train.trainer import Trainer
    forward = Trainer._forward_loss

    def forward_oom(self, batch):
        if self.step == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch)
    monkeypatch.setattr(Trainer, "_forward_loss", forward_oom)
    config = write_config(tmp_path, tiny_dataset / "data", "oom")
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory on cpu at step 4 with train.batch_size=4 (eval.batch_size=8")
    assert "batch-size finder: python sanity_check.py" in err
    assert checkpoints_readable(tmp_path / "runs" / "oom") == {"last.ckpt": (0, 3)}
