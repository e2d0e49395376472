"""The model zoo: shared blocks, a registry filled by `@register(name)`, and `build_model(cfg.model)`.

A new architecture is a module here whose builder is decorated with `@register("name")`, imported below.
Every model is called as `model(x, thresholds)`: x (B, C, H, W) normalised, thresholds (B,) normalised.
"""
from lib.models import classify, deeplab, unet  # noqa: F401  (importing fills MODELS)
from lib.models.build import build_model, rebuild_model, stride_of
from lib.models.registry import MODELS, ForestModel, register
from lib.models.summary import model_summary

__all__ = ["MODELS", "ForestModel", "build_model", "model_summary", "rebuild_model", "register", "stride_of"]
