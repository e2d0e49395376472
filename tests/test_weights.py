"""Shipped weights: slim fp16 checkpoints load like any checkpoint; the model card's sha256 is enforced."""
from pathlib import Path

import pytest
import torch

from lib.train.checkpoint import atomic_torch_save
from lib.core.errors import ModelError
from lib.infer.weights import DEFAULT_WEIGHTS, card_sha256, file_sha256, ship_checkpoint, verified_weights


def _checkpoint(tmp_path) -> Path:
    """A training-style checkpoint of a tiny untrained model with relative-height features."""
    from conftest import tiny_config
    from lib.core.config import config_to_dict
    from lib.models import build_model
    from lib.data.normalize import Normalizer
    cfg = tiny_config(tmp_path, data={"input_features": ["dsm", "relative_height_11m"]})
    norm = Normalizer(scale=5.0, features=cfg.data.input_features)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=norm.out_channels, batch_size=cfg.train.batch_size)
    path = tmp_path / "best.ckpt"
    atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg), "normalization": norm.stats(),
                       "optimizer": {"unused": torch.zeros(100)}, "metrics": {"val/iou_mean": 0.5}, "step": 7}, path)
    return path


def test_slim_fp16_checkpoint_loads_and_predicts_like_the_original(tmp_path):
    from lib.infer.loading import load_model
    ckpt = _checkpoint(tmp_path)
    info = ship_checkpoint(ckpt, tmp_path / "w.pt")
    assert info["sha256"] == file_sha256(tmp_path / "w.pt") and info["bytes"] < ckpt.stat().st_size
    full, slim = load_model(ckpt), load_model(tmp_path / "w.pt")
    assert slim.meta["normalization"]["features"] == ["dsm", "relative_height_11m"] and slim.meta["step"] == 7
    dsm = 300 + 20 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(slim.net(dsm, t), full.net(dsm, t), atol=2e-2, rtol=0)  # fp16 weights


def test_verified_weights_checks_the_card(tmp_path):
    weights = tmp_path / "gaps.pt"
    weights.write_bytes(b"weights v1")
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(f"# card\n\n| sha256 | `{file_sha256(weights)}` |\n")
    assert verified_weights(weights) == weights and card_sha256(card) == file_sha256(weights)
    weights.write_bytes(b"weights v1 but corrupted")
    with pytest.raises(ModelError, match="sha256"):
        verified_weights(weights)
    card.write_text("no hash here")
    with pytest.raises(ModelError, match="records no sha256"):
        verified_weights(weights)
    with pytest.raises(ModelError, match="not found"):
        verified_weights(tmp_path / "missing.pt")


def test_shipped_weights_match_their_card_when_present():
    if not DEFAULT_WEIGHTS.exists():
        pytest.skip(f"no shipped weights at {DEFAULT_WEIGHTS}")
    assert verified_weights() == DEFAULT_WEIGHTS
