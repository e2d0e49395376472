"""build_model(cfg.model, ...) and rebuild_model(cfg.model, state_dict): the only way models are made."""
import dataclasses
import difflib

from lib.core.errors import ModelError
from lib.models.blocks import FiLM, apply_spectral_norm, resolve_norm
from lib.models.classify import EncoderClassifier
from lib.models.height_head import HeightHead
from lib.models.prior import ClassicalPrior
from lib.models.registry import MODELS, ForestModel, ModelSpec

TASKS = ("segmentation", "regression", "classification")
# ModelConfig fields that only some architectures read: setting one elsewhere is an error, not a no-op
OPTIONAL_FIELDS = ("attention_gates", "drop_path", "blocks_per_stage", "dilation_stage3")


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        near = difflib.get_close_matches(name, list(MODELS), n=1)
        raise ModelError(f"unknown model.name {name!r}; valid names: {', '.join(sorted(MODELS))}",
                         hint=f"did you mean {near[0]!r}?" if near else None)
    return MODELS[name]


def stride_of(cfg) -> int:
    """Total downsampling of the model `cfg` (a ModelConfig) would build: tile sides must divide by it."""
    return _spec(cfg.name).stride(cfg)


def _check_fields(cfg, spec: ModelSpec) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in OPTIONAL_FIELDS:
        if name not in spec.uses and getattr(cfg, name) != defaults[name]:
            users = sorted(m for m, s in MODELS.items() if name in s.uses)
            raise ModelError(f"model.{name}={getattr(cfg, name)!r} has no effect on model {cfg.name!r} "
                             f"(default {defaults[name]!r}); it is read by: {', '.join(users)}")


def _extra_options(cfg, spec: ModelSpec) -> dict:
    """spec.extra defaults updated by cfg.extra; unknown keys and wrong types fail."""
    options = dict(spec.extra)
    for key, value in cfg.extra.items():
        if key not in options:
            valid = ", ".join(options) or "none"
            raise ModelError(f"model.extra.{key} is not an option of model {cfg.name!r}; valid keys: {valid}")
        default = options[key]
        if isinstance(value, bool) or not isinstance(value, type(default)) and not (
                isinstance(default, float) and isinstance(value, int)):
            raise ModelError(f"model.extra.{key} must be a {type(default).__name__} like {default!r}, "
                             f"found {value!r}")
        options[key] = value
    return options


def _construct(cfg, task: str, in_channels: int, num_classes: int | None, norm: str,
               prior_channels=(), prior_options: dict | None = None) -> ForestModel:
    """prior_options: ClassicalPrior's keywords (trust_map, trust_scope, bias, initial_trust, gate_inputs), or
    {"height_head": True, "pixel_mix", "gate_inputs", "gate_channel"} for a HeightHead."""
    spec = _spec(cfg.name)
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if task == "classification" and not num_classes:
        raise ModelError("task 'classification' needs num_classes (the number of tile classes)")
    if spec.classifier_only and task != "classification":
        raise ModelError(f"model {cfg.name!r} is a tile classifier; task {task!r} needs a segmentation model")
    _check_fields(cfg, spec)
    options = _extra_options(cfg, spec)
    prior_channels = _prior_channels(cfg, task, in_channels, prior_channels)
    prior = _prior(prior_channels, dict(prior_options or {}))
    if task != "classification":
        model = spec.build(cfg, in_channels, prior.network_channels if prior else 1, norm, **options)
    elif spec.classifier_only:
        model = spec.build(cfg, in_channels, num_classes, norm, **options)
    else:
        dense = spec.build(cfg, in_channels, 1, norm, **options)
        model = EncoderClassifier(dense.encoder, num_classes, cfg.dropout, dense.stride)
    model.prior = prior
    if task != "segmentation":  # the threshold input is a constant 0: FiLM's input weights never get a gradient
        for block in model.modules():
            if isinstance(block, FiLM):
                block.mlp[0].weight.requires_grad_(False)
    model.frozen_by_design = [name for name, p in model.named_parameters() if not p.requires_grad]
    zero_layers = ()
    if isinstance(prior, HeightHead) or prior is not None and prior.trust_map:
        prior.start_from_rule(getattr(model, "head", None))
        zero_layers = (model.head,)
    if cfg.spectral_norm:
        apply_spectral_norm(model, skip=zero_layers)
    model.build_kwargs = {"name": cfg.name, "task": task, "in_channels": in_channels,
                          "num_classes": num_classes if task == "classification" else None, "norm": norm,
                          "prior_channels": prior_channels,
                          "prior_trust_map": bool(getattr(prior, "trust_map", False)),
                          "prior_trust_scope": getattr(prior, "trust_scope", "pixel"),
                          "prior_bias": bool(prior is None or prior.bias is not None),
                          "height_head": isinstance(prior, HeightHead),
                          "height_head_pixel_mix": bool(getattr(prior, "pixel_mix", False)),
                          "prior_gate_inputs": (prior_options or {}).get("gate_inputs", 0) if prior else 0,
                          "prior_gate_channel": (prior_options or {}).get("gate_channel", -1)}
    return model


def _recorded_prior_options(record: dict) -> dict:
    """The prior's keywords from a checkpoint's build record (older records lack the newer keys)."""
    gate = {"gate_inputs": record.get("prior_gate_inputs", 0), "gate_channel": record.get("prior_gate_channel", -1)}
    if record.get("height_head"):
        return {"height_head": True, "pixel_mix": record.get("height_head_pixel_mix", False), **gate}
    return {"trust_map": record.get("prior_trust_map", False), "trust_scope": record.get("prior_trust_scope", "pixel"),
            "bias": record.get("prior_bias", True), **gate}


def _prior(channels, options: dict):
    """The model's prior module: None, a HeightHead or a ClassicalPrior."""
    if not channels:
        return None
    if options.pop("height_head", False):
        return HeightHead(channels, **options)
    return ClassicalPrior(channels, **options)


def _prior_channels(cfg, task: str, in_channels: int, channels) -> list[int]:
    """The checked relative-height channel indices of model.classical_prior ([] when it is off)."""
    if not cfg.classical_prior:
        return []
    if task != "segmentation":
        raise ModelError(f"model.classical_prior is a gap-segmentation prior; task is {task!r}",
                         hint="set --model.classical_prior=false")
    channels = [int(c) for c in channels]
    if not channels or not all(0 <= c < in_channels for c in channels):
        raise ModelError(f"model.classical_prior needs relative-height input channels (of {in_channels}), found "
                         f"{channels}", hint="add e.g. relative_height_51m to data.input_features")
    return channels


def build_model(cfg, task: str = "segmentation", in_channels: int = 1, num_classes: int | None = None,
                batch_size: int | None = None, prior_channels=()) -> ForestModel:
    """A fresh model for `cfg` (a ModelConfig). in_channels: data channels only (positional ones are added
    by the model). batch_size: per-device batch, which decides model.norm='adaptive' (None: large enough).
    prior_channels: indices of the relative-height input channels (lib.data.normalize.relative_height_channels),
    read when cfg.classical_prior is set.
    Output: (B, 1, H, W) logits for segmentation/regression, (B, num_classes) for classification.
    """
    if cfg.prior_trust_map and not cfg.classical_prior:
        raise ModelError("model.prior_trust_map scales the classical prior, but model.classical_prior is off",
                         hint="set --model.classical_prior=true, or --model.prior_trust_map=false")
    if cfg.prior_initial_trust and not cfg.prior_trust_map:
        raise ModelError("model.prior_initial_trust sets the trust knob, but model.prior_trust_map is off",
                         hint="set --model.prior_trust_map=true, or --model.prior_initial_trust=0")
    if not cfg.prior_bias and not cfg.classical_prior:
        raise ModelError("model.prior_bias=false removes the classical prior's bias, but model.classical_prior "
                         "is off", hint="set --model.classical_prior=true, or --model.prior_bias=true")
    if cfg.prior_gate and not cfg.classical_prior:
        raise ModelError("model.prior_gate chooses between the model and the classical method, but "
                         "model.classical_prior is off", hint="set --model.classical_prior=true, or "
                         "--model.prior_gate=false")
    if cfg.height_head and (not cfg.classical_prior or cfg.prior_trust_map or not cfg.prior_bias):
        raise ModelError("model.height_head reads the height off the classical prior's channels: it needs "
                         "model.classical_prior=true and takes neither prior_trust_map nor prior_bias=false",
                         hint="set --model.classical_prior=true --model.prior_trust_map=false --model.prior_bias=true")
    if cfg.height_head_pixel_mix and not cfg.height_head:
        raise ModelError("model.height_head_pixel_mix chooses the height head's mix per pixel, but "
                         "model.height_head is off", hint="set --model.height_head=true, or --model.height_head_pixel_mix=false")
    gate = {"gate_inputs": in_channels if cfg.prior_gate else 0, "gate_channel": cfg.prior_gate_channel}
    options = {"height_head": True, "pixel_mix": cfg.height_head_pixel_mix, **gate} if cfg.height_head else {
        "trust_map": cfg.prior_trust_map, "trust_scope": cfg.prior_trust_scope, "bias": cfg.prior_bias,
        "initial_trust": cfg.prior_initial_trust, **gate}
    return _construct(cfg, task, in_channels, num_classes, resolve_norm(cfg.norm, batch_size), prior_channels, options)


def rebuild_model(cfg, state_dict: dict) -> ForestModel:
    """The model a checkpoint's state dict was saved from, with its weights loaded (same norm layers)."""
    record = state_dict.get("_extra_state")
    if not isinstance(record, dict) or "norm" not in record:
        raise ModelError("state dict has no build record ('_extra_state'): it was not saved from a lib.models "
                         "model (or was saved from a wrapper: save raw_model.state_dict())")
    if record["name"] != cfg.name:
        raise ModelError(f"checkpoint holds model {record['name']!r} but model.name is {cfg.name!r}")
    model = _construct(cfg, record["task"], record["in_channels"], record["num_classes"], record["norm"],
                       record.get("prior_channels", ()),
                       _recorded_prior_options(record))
    model.load_state_dict(state_dict)
    return model
