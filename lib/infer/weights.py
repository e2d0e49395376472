"""Shipped pretrained weights: a slim checkpoint (fp16 model, config, normalisation, metrics) whose sha256
is recorded in the model card beside it and checked before every load.

    slim = ship_checkpoint("runs/pretrain/best.ckpt", "weights/gaps_dsm_v5.pt")   # -> {"sha256", "bytes"}
    path = verified_weights()              # weights/gaps_dsm_v5.pt, after checking weights/MODEL_CARD.md
"""
import hashlib
import re
from pathlib import Path

import torch

from lib.train.checkpoint import atomic_torch_save, load_checkpoint
from lib.core.errors import ModelError

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "gaps_dsm_v5.pt"
CARD_NAME = "MODEL_CARD.md"
SLIM_KEYS = ("config", "normalization", "metrics", "version", "step")   # what load_model reads besides "model"
CARD_HASH = re.compile(r"sha256\W*([0-9a-f]{64})\b", re.IGNORECASE)


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_sha256(card_path) -> str:
    """The sha256 a model card records (a line like `sha256: <64 hex digits>`)."""
    card_path = Path(card_path)
    if not card_path.is_file():
        raise ModelError(f"model card {card_path} not found: shipped weights are loaded only with their card")
    match = CARD_HASH.search(card_path.read_text(encoding="utf-8"))
    if not match:
        raise ModelError(f"{card_path} records no sha256 (expected a line 'sha256: <64 hex digits>')")
    return match.group(1).lower()


def verified_weights(path=DEFAULT_WEIGHTS, card_path=None) -> Path:
    """path, after checking its sha256 against the model card beside it (or card_path); ModelError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"pretrained weights {path} not found",
                         hint="give --checkpoint, or restore the file from git (it is tracked)")
    card_path = Path(card_path) if card_path else path.parent / CARD_NAME
    want, got = card_sha256(card_path), file_sha256(path)
    if got != want:
        raise ModelError(f"{path} has sha256 {got} but {card_path} records {want}",
                         hint="the file is corrupt, partially downloaded, or not the weights the card describes")
    return path


def ship_checkpoint(ckpt_path, out_path, half: bool = True) -> dict:
    """Write the inference part of a training checkpoint (weights in fp16 when half), atomically.

    The result loads with lib.infer.loading.load_model like any checkpoint. Returns {"sha256", "bytes"}.
    """
    ckpt = load_checkpoint(ckpt_path)
    model = {k: v.half() if half and torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in ckpt["model"].items()}
    atomic_torch_save({"model": model, **{k: ckpt[k] for k in SLIM_KEYS if k in ckpt}}, out_path)
    return {"sha256": file_sha256(out_path), "bytes": Path(out_path).stat().st_size}
