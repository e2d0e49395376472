"""Checkpoints: atomic writes (temp, fsync, rename) and safe loads (`weights_only=True`, never pickle).

A checkpoint holds everything a resumed run needs to continue exactly, plus the resolved config and the
normalisation so evaluate, predict and export need only the file. It also holds a sha256 of everything
else in it ("digest"), checked on load: torch's zip reader checks no CRC, so a flipped byte in a tensor
would otherwise load as different weights. Checkpoints written before the digest load with a warning.
"""
import hashlib
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from lib.core.errors import ModelError
from lib.core.safejson import check_depth

log = logging.getLogger(__name__)
DIGEST = "digest"
ENTRY_TYPES = {"model": dict, "config": dict, "normalization": dict, "metrics": dict, "version": dict,
               "task": dict, "step": int, "epoch": int}   # what readers expect of each entry, when present


def payload_digest(ckpt: dict) -> str:
    """sha256 of every entry but the digest, walked in key order without recursion: tensors by dtype,
    shape and bytes, everything else by type and repr (which round-trips ints, floats and strings)."""
    digest = hashlib.sha256()
    stack = [("", {k: v for k, v in ckpt.items() if k != DIGEST})]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            digest.update(f"{where}:dict{len(node)};".encode())
            stack.extend((f"{where}/{k!r}", node[k]) for k in sorted(node, key=repr, reverse=True))
        elif isinstance(node, (list, tuple)):
            digest.update(f"{where}:{type(node).__name__}{len(node)};".encode())
            stack.extend((f"{where}/{i}", v) for i, v in reversed(list(enumerate(node))))
        elif torch.is_tensor(node):
            t = node.detach().cpu().contiguous()
            digest.update(f"{where}:{t.dtype}{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(f"{where}:{type(node).__name__}={node!r};".encode())
    return digest.hexdigest()


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temp file, fsync, then rename: a crash never leaves a half-written checkpoint.
    A checkpoint (a dict with a "model" entry) is saved with its digest."""
    path = Path(path)
    if isinstance(obj, dict) and "model" in obj:
        obj = {**obj, DIGEST: payload_digest(obj)}
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


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (torch's EOFError on 0 bytes)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def load_checkpoint(path: str | Path, map_location="cpu", verified: bool = False) -> dict:
    """Load with weights_only=True and check it: digest, entry types, finite weights. Anything wrong is a
    ModelError naming the path. verified: its bytes were already checked (a weights card's sha256), so a
    checkpoint without a digest loads without a warning."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"cannot load checkpoint {path}: the file is empty (0 bytes)",
                         hint="it was truncated by a failed copy or download")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only met an object that only pickle could rebuild
        raise ModelError(f"cannot load checkpoint {path}: it holds Python objects that need pickle to load; "
                         "refused (checkpoints load with weights_only=True: pickle can run code)",
                         hint="load only checkpoints written by forestgaps") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError... for truncated or foreign files
        raise ModelError(f"cannot load checkpoint {path}: {_first_line(exc)}",
                         hint="the file is truncated or not a forestgaps checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ModelError(f"{path} is not a forestgaps checkpoint (no 'model'/'config' entries)")
    check_depth(ckpt, str(path), ModelError)
    _check_digest(ckpt, path, verified)
    _check_entries(ckpt, path)
    return ckpt


def _check_digest(ckpt: dict, path: Path, verified: bool) -> None:
    saved = ckpt.get(DIGEST)
    if saved is None:
        if not verified:
            log.warning("WARNING: %s has no digest (written by an older forestgaps): its contents cannot be "
                        "verified; loading it as is", path)
        return
    try:
        found = payload_digest(ckpt)
    except Exception as exc:  # a tensor that cannot be viewed as bytes (sparse, quantised): not ours
        raise ModelError(f"{path}: cannot compute its digest ({_first_line(exc)})") from None
    if found != saved:
        raise ModelError(f"{path}: contents do not match the digest recorded when it was saved (sha256 "
                         f"{found[:12]}..., recorded {str(saved)[:12]}...)",
                         hint="the file was corrupted after it was written (disk, copy, download); use another copy")


def _check_entries(ckpt: dict, path: Path) -> None:
    """Entry types, and model weights that are tensors (or build records) with finite values."""
    for key, kind in ENTRY_TYPES.items():
        value = ckpt.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ModelError(f"{path}: entry {key!r} is {type(value).__name__}, expected {kind.__name__}")
    for name, value in ckpt["model"].items():
        if not isinstance(name, str):
            raise ModelError(f"{path}: model entry {name!r} is not named by a string")
        if name.endswith("_extra_state"):  # a module's build record
            if not isinstance(value, dict):
                raise ModelError(f"{path}: model entry {name!r} is {type(value).__name__}, expected a dict")
            continue
        if not torch.is_tensor(value):
            raise ModelError(f"{path}: model entry {name!r} is {type(value).__name__}, expected a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ModelError(f"{path}: model weight {name!r} holds {bad} non-finite value(s) (NaN or inf)",
                             hint="the run diverged before this checkpoint was saved; use an earlier one")


def check_weight_kinds(model: torch.nn.Module, state: dict, path) -> None:
    """ModelError unless each tensor of `state` is float where the model's is and integer where it is not:
    load_state_dict would cast an int32 conv weight silently."""
    own = model.state_dict()
    for name, value in state.items():
        if torch.is_tensor(value) and name in own and torch.is_tensor(own[name]) \
                and value.is_floating_point() != own[name].is_floating_point():
            raise ModelError(f"{path}: model weight {name!r} is {value.dtype}, the model's is {own[name].dtype}")


def load_weights(model: torch.nn.Module, state: dict, path, strict: bool = True) -> None:
    """model.load_state_dict(state) after check_weight_kinds; ModelError naming the checkpoint otherwise."""
    check_weight_kinds(model, state, path)
    try:
        model.load_state_dict(state, strict=strict)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = " ".join(str(exc).split()).removeprefix(f"Error(s) in loading state_dict for {type(model).__name__}:")
        raise ModelError(f"{path}: weights do not fit model {type(model).__name__}: {reason.strip()[:300]}") from None


def resume_trainer(trainer, path: str | Path, map_location="cpu") -> None:
    """trainer.load_state_dict(checkpoint); ModelError naming the file and the config keys that differ
    when the checkpoint was saved by another model or config."""
    state = load_checkpoint(path, map_location)
    check_weight_kinds(trainer.raw_model, state["model"], path)
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
