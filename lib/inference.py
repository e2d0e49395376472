"""Checkpoint -> a model that takes raw DSM metres and thresholds in metres: the one loading path shared
by evaluate, predict and export, so deployment cannot drift from training.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.checkpoint import load_checkpoint
from lib.config import build_config
from lib.errors import ModelError
from lib.models import build_model
from lib.normalize import Normalizer


class InferenceModel(torch.nn.Module):
    """normalise -> model -> sigmoid. forward(dsm (B,1,H,W) metres with NaN, thresholds (B,) metres) -> (B,1,H,W) probabilities.

    NaN pixels come out as probability 0; callers carry nodata themselves.
    """

    def __init__(self, normalizer: Normalizer, model: torch.nn.Module):
        super().__init__()
        self.normalizer, self.model = normalizer, model

    def forward(self, dsm: torch.Tensor, thresholds_m: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(dsm)
        logits = self.model(x, self.normalizer.normalise_threshold(thresholds_m))
        return torch.sigmoid(logits.float())


@dataclass
class LoadedModel:
    net: torch.nn.Module          # InferenceModel (or a TorchScript module with the same signature)
    thresholds_m: list[float]     # thresholds seen in training
    pixel_size_m: float
    tile_px: int
    stride: int
    config: object = None         # lib.schema.Config, None for exported models
    meta: dict = field(default_factory=dict)  # metrics, version, normalisation


def load_model(path: str | Path, device="cpu") -> LoadedModel:
    """A checkpoint (.ckpt/.pt, weights_only) or an exported TorchScript file (.ts/.pt2 with model card)."""
    path = Path(path)
    if path.suffix == ".ts":
        return _load_torchscript(path, device)
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = build_config(ckpt["config"], source=f"{path} (embedded config)")
    normalizer = Normalizer.from_stats(ckpt["normalization"])
    model = build_model(cfg.model, task=cfg.data.task, in_channels=normalizer.out_channels,
                        batch_size=cfg.train.batch_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit model {cfg.model.name!r}: {str(exc).splitlines()[0]}") from None
    net = InferenceModel(normalizer, model).to(device).eval()
    meta = {"metrics": ckpt.get("metrics", {}), "version": ckpt.get("version", {}),
            "normalization": ckpt["normalization"], "step": ckpt.get("step")}
    return LoadedModel(net, list(cfg.data.thresholds_m), cfg.data.pixel_size_m, cfg.data.tile_px,
                       getattr(model, "stride", 1), cfg, meta)


def _load_torchscript(path: Path, device) -> LoadedModel:
    import json
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ModelError(f"{path}: exported model has no model card {card_path.name} beside it")
    card = json.loads(card_path.read_text())
    net = torch.jit.load(str(path), map_location=device).eval()
    return LoadedModel(net, card["thresholds_m"], card["pixel_size_m"], card["tile_px"], card["stride"],
                       None, card)
