"""Run a forestgaps script with one fault point armed: when the run reaches it, write a marker file and
hang until the test kills the process with SIGKILL (tests/test_faults.py). No hook lives in lib/.

    python tests/fault_hooks.py ckpt_partial:last:6 MARKER train --config c.json --resume auto
    python tests/fault_hooks.py shard_partial:train:0 MARKER prepare_data --config c.json

Points (N = optimiser step, or a count for file events):
    startup               after resume, before the first step        step:N        right after step N
    after_step:N          after step N's callbacks (and checkpoint)  validate:E    when epoch E validates
    ckpt_partial:NAME:N   half of NAME.ckpt (last/best) of step N written to its temp file
    ckpt_written:NAME:N   temp file complete and fsynced, not yet renamed
    ckpt_renamed:NAME:N   renamed into place, folder not yet fsynced
    replace:GLOB:N        before the N-th (1-based) os.replace onto a file matching GLOB
    replaced:GLOB:N       after it
    shard_partial:SPLIT:K some samples of shard K of SPLIT written to its temp file
    train_end             the run is over, the best weights are being restored
"""
import fnmatch
import io
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_replace = os.replace
_marker = ""


def pause(what: str) -> None:
    """Tell the test where we are, then wait for its SIGKILL (a timeout means the test lost us)."""
    tmp = f"{_marker}.tmp"
    with open(tmp, "w") as f:
        f.write(what)
    _replace(tmp, _marker)
    time.sleep(300)
    sys.exit(f"fault point {what} was not killed within 300 s")


def _arm_trainer(kind: str, n: int) -> None:
    from lib.train import trainer as trainer_mod
    cls = trainer_mod.Trainer
    if kind == "startup":
        fit = cls.fit
        cls.fit = lambda self: (pause("startup"), fit(self))[1]
    elif kind == "step":
        step = cls.train_step

        def train_step(self, batch):
            logs = step(self, batch)
            if logs.get("optimizer_step") and self.step == n:
                pause(f"step:{n}")
            return logs
        cls.train_step = train_step
    elif kind == "validate":
        validate = cls.validate
        cls.validate = lambda self: (self.epoch == n and pause(f"validate:{n}"), validate(self))[1]
    elif kind == "train_end":
        cls.restore_best = lambda self: pause("train_end")
    elif kind == "after_step":
        from lib.train import runner
        from lib.train.callbacks import Callback

        class Pause(Callback):
            order = 99  # after the checkpoint callback

            def on_batch_end(self, trainer, logs):
                if logs.get("optimizer_step") and trainer.step == n:
                    pause(f"after_step:{n}")
        build = runner.build_callbacks
        runner.build_callbacks = lambda *a, **k: build(*a, **k) + [Pause()]


def _arm_checkpoint(kind: str, name: str, step: int) -> None:
    """Hooks torch.save (the bytes) and os.replace (the rename) for NAME.ckpt saved at `step`."""
    import torch
    save, current = torch.save, {}

    def torch_save(obj, f, *args, **kwargs):
        target = Path(getattr(f, "name", "")).name  # '.last.ckpt.<pid>.tmp'
        current["hit"] = (isinstance(obj, dict) and obj.get("step") == step
                          and target.startswith(f".{name}.ckpt."))
        if not (current["hit"] and kind == "ckpt_partial"):
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        pause(f"ckpt_partial:{name}:{step}")

    def replace(src, dst, **kwargs):
        hit = current.get("hit") and Path(dst).name == f"{name}.ckpt"
        if hit and kind == "ckpt_written":
            pause(f"ckpt_written:{name}:{step}")
        _replace(src, dst, **kwargs)
        if hit and kind == "ckpt_renamed":
            pause(f"ckpt_renamed:{name}:{step}")
        if hit:
            current["hit"] = False
    torch.save, os.replace = torch_save, replace


def _arm_replace(kind: str, pattern: str, n: int) -> None:
    seen = [0]

    def replace(src, dst, **kwargs):
        hit = fnmatch.fnmatch(Path(dst).name, pattern)
        seen[0] += hit
        if hit and seen[0] == n and kind == "replace":
            pause(f"replace:{pattern}:{n}")
        _replace(src, dst, **kwargs)
        if hit and seen[0] == n and kind == "replaced":
            pause(f"replaced:{pattern}:{n}")
    os.replace = replace


def _arm_shard(split: str, index: int) -> None:
    from lib.data import shards
    write = shards.ShardWriter.write

    def shard_write(self, sample):
        write(self, sample)
        if self.prefix == split and len(self.shards) == index and self._count == 3:
            self._file.flush()
            pause(f"shard_partial:{split}:{index}")
    shards.ShardWriter.write = shard_write


def arm(point: str) -> None:
    kind, *args = point.split(":")
    if kind in ("startup", "step", "validate", "train_end", "after_step"):
        _arm_trainer(kind, int(args[0]) if args else 0)
    elif kind.startswith("ckpt_"):
        _arm_checkpoint(kind, args[0], int(args[1]))
    elif kind in ("replace", "replaced"):
        _arm_replace(kind, args[0], int(args[1]))
    elif kind == "shard_partial":
        _arm_shard(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, _marker, script, *argv = sys.argv[1:]
    os.chdir(REPO)
    arm(point)
    module = __import__(script)
    sys.exit(module.main(argv))
