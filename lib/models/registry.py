"""The contract every model follows (ForestModel) and the registry that `@register` fills."""
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lib.core.errors import ModelError
from lib.models.blocks import MIN_BATCHNORM_BATCH


class ForestModel(nn.Module):
    """Base of every model: `stride`, `encoder_parameters()`, `attention_maps`, and a build record.

    `build_kwargs` (name, task, in_channels, num_classes and the resolved norm) travels in the state dict
    as `_extra_state`, so `rebuild_model` makes the same layers and a load into other norm layers fails.
    """

    stride: int = 1

    def __init__(self):
        super().__init__()
        self.build_kwargs: dict = {}
        self.prior: nn.Module | None = None  # lib.models.prior.ClassicalPrior, set by build_model

    def network(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """The architecture's own output (B, out_channels, H, W) before any prior; each dense model defines it."""
        raise NotImplementedError

    @property
    def threshold_free(self) -> bool:
        """True when the output at any threshold comes from one network pass (lib/models/height_head.py)."""
        return bool(getattr(self.prior, "threshold_free", False))

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), thresholds (B,) normalised -> (B, 1, H, W) logits (out_channels without a prior)."""
        if self.prior is None:
            return self.network(x, thresholds)
        body_thresholds = thresholds.new_zeros(x.shape[0]) if self.threshold_free else thresholds
        return self.prior(x, thresholds, self.network(x, body_thresholds))

    def forward_thresholds(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), thresholds (K,) normalised -> (B, K, H, W) logits from one network pass."""
        if not self.threshold_free:
            raise ModelError("forward_thresholds needs a model whose output does not depend on the threshold "
                             "(model.height_head); a threshold-conditioned model runs once per threshold")
        return self.prior.every_threshold(x, thresholds, self.network(x, x.new_zeros(x.shape[0])))

    def encoder_parameters(self):
        """Parameters of the encoder (to freeze, or to give a lower LR, in transfer learning)."""
        return self.encoder.parameters()

    @property
    def attention_maps(self) -> dict[str, torch.Tensor]:
        """The last eval-mode CBAM / gate maps, name -> (B, 1, h, w); empty before an eval forward."""
        return {name: m.last_map for name, m in self.named_modules() if getattr(m, "last_map", None) is not None}

    def check_input(self, x: torch.Tensor) -> None:
        """Fail clearly (instead of a skip-concat size mismatch) when H or W is not a multiple of the stride."""
        if x.dim() != 4 or x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ModelError(f"model input must be (B, C, H, W) with H and W divisible by the stride "
                             f"{self.stride}, found shape {tuple(x.shape)}")

    def get_extra_state(self) -> dict:
        return dict(self.build_kwargs)

    def set_extra_state(self, state: dict) -> None:
        # Only the norm is compared: other differences fail on shapes, and a segmentation checkpoint
        # may seed a classifier (strict=False), but BatchNorm vs GroupNorm could drop statistics silently.
        saved, here = state.get("norm"), self.build_kwargs.get("norm")
        if saved != here:
            raise ModelError(f"the checkpoint was saved from a model with {saved!r} norm layers, this one has "
                             f"{here!r} ({state} vs {self.build_kwargs})",
                             hint=f"set --model.norm={saved}: model.norm=adaptive builds batch norm for a per-device "
                                  f"--train.batch_size of {MIN_BATCHNORM_BATCH} or more and group norm below, so "
                                  f"another batch size changed the layers (in Python: "
                                  f"lib.models.rebuild_model(cfg.model, state_dict))")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture and which optional ModelConfig fields and `extra` keys it reads."""

    build: Callable  # (cfg, in_channels, out_channels, norm, **extra) -> ForestModel
    stride: Callable  # ModelConfig -> int
    uses: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    classifier_only: bool = False


MODELS: dict[str, ModelSpec] = {}


def _depth_stride(cfg) -> int:
    return 2 ** cfg.depth


def register(name: str, *, uses: tuple[str, ...] = (), extra: dict | None = None,
             stride: Callable = _depth_stride, classifier_only: bool = False):
    """Decorator: add a builder to MODELS under `name`."""
    def add(build):
        if name in MODELS:
            raise ModelError(f"model name {name!r} is registered twice")
        MODELS[name] = ModelSpec(build, stride, tuple(uses), dict(extra or {}), classifier_only)
        return build
    return add
