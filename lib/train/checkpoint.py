"""Checkpoints: atomic writes (temp, fsync, rename) and safe loads (`weights_only=True`, never pickle).

A checkpoint holds everything a resumed run needs to continue exactly, plus the resolved config and the
normalisation so evaluate, predict and export need only the file.
"""
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from lib.core.errors import ModelError


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temp file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # torch.save turns a failed write (disk full) into a RuntimeError raised while handling the OSError
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(cause, OSError):
            raise
        from lib.core.errors import TrainingError
        raise TrainingError(f"cannot write checkpoint {path}: {cause.strerror or cause}",
                            hint="check free disk space and that the folder is writable") from None
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True; truncated or pickle-needing files give a ModelError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only met an object that only pickle could rebuild
        raise ModelError(f"cannot load checkpoint {path}: it holds Python objects that need pickle to load; "
                         "refused (checkpoints load with weights_only=True: pickle can run code)",
                         hint="load only checkpoints written by forestgaps") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError... for truncated or foreign files
        reason = str(exc).splitlines()[0][:200]
        raise ModelError(f"cannot load checkpoint {path}: {reason}",
                         hint="the file is truncated or not a forestgaps checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ModelError(f"{path} is not a forestgaps checkpoint (no 'model'/'config' entries)")
    return ckpt


def resume_trainer(trainer, path: str | Path, map_location="cpu") -> None:
    """trainer.load_state_dict(checkpoint); ModelError naming the file and the config keys that differ
    when the checkpoint was saved by another model or config."""
    state = load_checkpoint(path, map_location)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:  # torch's size/key mismatches, a foreign dict
        from lib.core.config import config_to_dict
        diff = _differences(state["config"], config_to_dict(trainer.cfg))
        reason = " ".join(str(exc).split())[:160]
        raise ModelError(f"cannot resume from {path}: it does not fit this run ({reason})",
                         hint=(f"the checkpoint was saved with {'; '.join(diff[:4])}; " if diff else "")
                         + "resume with its config, or start a new run with --init-from") from None


def _differences(saved, current, prefix: str = "") -> list[str]:
    """'key=<saved> (here <current>)' for every dotted key whose value differs; model keys first, no run keys."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [f"{prefix[:-1]}={saved!r} (here {current!r})"]
    keys = sorted(saved.keys() | current.keys(), key=lambda k: (k != "model", k))
    keys = [k for k in keys if prefix or k != "run"]  # the run name and folder may differ
    return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]


def rng_states() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors/plain types that weights_only can load."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    states = {"python": [py_version, list(py_state), py_gauss],
              "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
