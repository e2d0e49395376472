"""Checkpoints: atomic writes (temp, fsync, rename) and safe loads (`weights_only=True`, never pickle).

A checkpoint holds everything a resumed run needs to continue exactly, plus the resolved config and the
normalisation so evaluate, predict and export need only the file.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from lib.errors import ModelError


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
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        from lib.errors import TrainingError
        raise TrainingError(f"cannot write checkpoint {path}: {exc.strerror or exc}",
                            hint="check free disk space and that the folder is writable") from None
    _fsync_dir(path.parent)


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
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = str(exc).splitlines()[0][:200]
        raise ModelError(f"cannot load checkpoint {path}: {reason}",
                         hint="the file is truncated, not a forestgaps checkpoint, or needs pickle "
                              "(refused for safety)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ModelError(f"{path} is not a forestgaps checkpoint (no 'model'/'config' entries)")
    return ckpt


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
