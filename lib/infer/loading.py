"""Checkpoint -> a model that takes raw DSM metres and thresholds in metres (or, for a tile classifier,
raw band values): the one loading path shared by evaluate, predict and export, so deployment cannot
drift from training.

Shipped weights (`weights/gaps_dsm_v5.pt`, used when no checkpoint is named) are checked against the
sha256 of their card before loading. A weights card is `<stem>.json` beside the file:

    {"file": "gaps_dsm_v5.pt", "sha256": "<64 hex digits>", "bytes": 1234567, "pixel_size_m": 1.0,
     "threshold_range_m": [1.0, 30.0], "command": "python train.py --config configs/pretrain.json", ...}

("file" and "sha256" are required, the rest is provenance), or, for the shipped file only,
`weights/MODEL_CARD.md` with a line `sha256: <64 hex digits>` (lib/infer/weights.py).
"""
import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.core import safejson
from lib.data.bands import normalizer_from_stats
from lib.train.checkpoint import check_weight_kinds, load_checkpoint, load_weights
from lib.core.config import build_config
from lib.core.errors import ConfigError, ForestGapsError, ModelError
from lib.models import build_model, rebuild_model
from lib.data.normalize import Normalizer, relative_height_channels
from lib.infer.weights import DEFAULT_WEIGHTS, file_sha256, verified_weights

log = logging.getLogger(__name__)
EXPORTED = (".ts", ".pt2")  # TorchScript, torch.export ExportedProgram: both need their model card


def each_threshold(net, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """net(x, t) of a model taking one threshold per sample, for every window of x (B, C, H, W) at each of
    the K thresholds -> (B, K, H, W). The B*K (window, threshold) pairs run B at a time, as many samples per
    forward as the caller's window batch and not K times more: on 2 CPU cores 32 samples at once cost 1.5x
    the time per sample of 8 (docs/benchmarks.md)."""
    b, k = x.shape[0], thresholds.numel()
    pairs = x.repeat_interleave(k, dim=0)                                   # (B*K, C, H, W), row = b*K + k
    out = torch.cat([net(part, part_t) for part, part_t in zip(pairs.split(b), thresholds.repeat(b).split(b))])
    return out.view(b, k, *x.shape[-2:])


class InferenceModel(torch.nn.Module):
    """normalise -> model -> gap logits -> sigmoid. forward(dsm (B,1,H,W) metres with NaN, thresholds (B,) metres)
    -> (B,1,H,W) gap probabilities.

    A segmentation model's output is the gap logit at the threshold it is given. A regression model predicts
    the CHM (in units of the normalisation scale, threshold input 0, as lib.train.tasks.RegressionTask feeds
    it); its gap logit at T is T - CHM in metres, the score the trainer's validation uses, so 0.5 means CHM = T.
    Nodata pixels enter the model as 0 (lib.data.normalize) and come out with a finite but meaningless
    probability: callers mask them (lib.infer.scene_windows writes nodata there).
    """

    def __init__(self, normalizer: Normalizer, model: torch.nn.Module, task: str = "segmentation"):
        super().__init__()
        self.normalizer, self.model = normalizer, model
        self.regression = task == "regression"

    @property
    def needs_ground(self) -> bool:
        """The input must carry the scene's ground filter as channel 1 (feature filtered_height)."""
        return self.normalizer.needs_ground

    def forward(self, dsm: torch.Tensor, thresholds_m: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(dsm)
        if self.regression:
            return torch.sigmoid(thresholds_m.view(-1, 1, 1, 1) - self._heights(x))
        logits = self.model(x, self.normalizer.normalise_threshold(thresholds_m))
        return torch.sigmoid(logits.float())

    def _heights(self, x: torch.Tensor) -> torch.Tensor:
        """A regression model's CHM in metres, (B,1,H,W), from normalised inputs x (B,C,H,W)."""
        return self.model(x, x.new_zeros(x.shape[0])).float() * self.normalizer.scale

    def forward_thresholds(self, dsm: torch.Tensor, thresholds_m: torch.Tensor) -> torch.Tensor:
        """dsm (B,1,H,W), thresholds (K,) -> (B,K,H,W) in one forward pass, each window normalised once.

        Equal to forward on the DSM repeated K times (the normalisation is per window), without K sorts. A
        regression model runs once per window, its CHM compared with every threshold; a model that has its own
        forward_thresholds (one forward for every threshold) is called once too; a threshold-conditioned one
        runs once per threshold (each_threshold).
        """
        if self.regression:
            k = thresholds_m.numel()
            return torch.sigmoid(thresholds_m.view(1, k, 1, 1) - self._heights(self.normalizer(dsm)))
        x = self.normalizer(dsm)                                              # (B, C, H, W)
        t = self.normalizer.normalise_threshold(thresholds_m)                # (K,)
        if getattr(self.model, "threshold_free", False):  # a height head: (B, C, H, W), (K,) -> (B, K, H, W) logits
            return torch.sigmoid(self.model.forward_thresholds(x, t).float())
        return torch.sigmoid(each_threshold(self.model, x, t).float())

    def compile(self, *args, **kwargs) -> None:
        """torch.compile the normaliser and the model in place, so forward and forward_thresholds both use them."""
        self.normalizer.compile(*args, **kwargs)
        self.model.compile(*args, **kwargs)


class EnsembleModel(torch.nn.Module):
    """The mean of several InferenceModels' probabilities: runs of one recipe trade the steep scene against
    the flat one differently (docs/quality.md), and their mean is steadier than any one of them."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, dsm: torch.Tensor, thresholds_m: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(dsm, thresholds_m) for m in self.members]).mean(0)

    def forward_thresholds(self, dsm: torch.Tensor, thresholds_m: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.forward_thresholds(dsm, thresholds_m) for m in self.members]).mean(0)

    @property
    def needs_ground(self) -> bool:
        return any(m.needs_ground for m in self.members)

    def compile(self, *args, **kwargs) -> None:
        for member in self.members:
            member.compile(*args, **kwargs)


class ClassifierModel(torch.nn.Module):
    """normalise bands -> model -> softmax. forward(image (B,C,H,W) raw band values, NaN = nodata) -> (B, classes)."""

    def __init__(self, normalizer: torch.nn.Module, model: torch.nn.Module):
        super().__init__()
        self.normalizer, self.model = normalizer, model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.normalizer(image))                         # (B, classes)
        return torch.softmax(logits.float(), dim=1)


@dataclass
class LoadedModel:
    net: torch.nn.Module          # InferenceModel, or an exported module with the same forward
    thresholds_m: list[float]     # thresholds seen in training
    pixel_size_m: float
    tile_px: int
    stride: int
    config: object = None         # lib.core.schema.Config, None for exported models
    meta: dict = field(default_factory=dict)  # metrics, version, normalisation
    task: str = "segmentation"    # data.task: segmentation and regression map gaps, classification labels tiles
    class_names: list[str] = field(default_factory=list)  # classification only, in output order


def describe_version(loaded: LoadedModel) -> str:
    """'model: <version>' naming what made the model (each member's for an ensemble), for evaluate and predict."""
    members = loaded.meta.get("members") or [loaded.meta]
    parts = []
    for meta in members:
        v = meta.get("version") or {}
        parts.append(f"forestgaps {v.get('project', '?')}, recipe {v.get('recipe_hash') or '?'}, dataset "
                     f"{(v.get('dataset_manifest') or '?')[:12]}, step {meta.get('step', '?')}")
    return "model: " + "; ".join(parts)


def resolve_checkpoint(path=None) -> Path:
    """path, or the shipped weights when path is None; ModelError when neither exists."""
    if path is not None:
        return Path(path)
    if not DEFAULT_WEIGHTS.is_file():
        raise ModelError(f"no --checkpoint given and no shipped model at {DEFAULT_WEIGHTS}",
                         hint="pass --checkpoint runs/<name>/best.ckpt, or restore the weights from git")
    return DEFAULT_WEIGHTS


def _read_card(card_path: Path, what: str) -> dict:
    """A JSON model/weights card as a dict; ModelError naming it when it is not one."""
    card = safejson.loads(card_path.read_bytes(), f"{card_path}: {what}", ModelError)
    if not isinstance(card, dict):
        raise ModelError(f"{card_path}: {what} is {type(card).__name__}, expected a JSON object")
    return card


def check_weights_card(path: Path) -> bool:
    """Verify path's sha256 against its weights card (<stem>.json naming it); the shipped file must have one.
    True when a card vouched for the file's bytes."""
    card_path = path.with_suffix(".json")
    card = _read_card(card_path, "weights card") if card_path.is_file() else {}
    if card.get("file") == path.name and "sha256" in card:
        got = file_sha256(path)
        if got != str(card["sha256"]).lower():
            raise ModelError(f"{path} has sha256 {got} but its card {card_path} records {card['sha256']}",
                             hint="the file is corrupt, partially downloaded, or not the weights the card describes")
        return True
    if path.resolve() == DEFAULT_WEIGHTS.resolve():
        verified_weights(path)                                              # weights/MODEL_CARD.md
        return True
    return False


@contextlib.contextmanager
def _part_of(path: Path, what: str):
    """Errors while rebuilding `what` from checkpoint `path` become a ModelError naming both."""
    try:
        yield
    except ModelError as exc:
        if str(path) in str(exc):
            raise
        raise ModelError(f"{path}: {what}: {exc}") from None
    except (ForestGapsError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: {what}: {reason}") from None


def load_model(path: str | Path, device="cpu") -> LoadedModel:
    """A checkpoint (.ckpt/.pt, weights_only) or an exported model (.ts TorchScript, .pt2 ExportedProgram)."""
    path = Path(path)
    if path.suffix in EXPORTED:
        return _load_exported(path, device)
    ckpt = load_checkpoint(path, map_location="cpu", verified=check_weights_card(path))
    cfg = build_config(ckpt["config"], source=f"{path} (embedded config)")
    if "normalization" not in ckpt:
        raise ModelError(f"{path} has no 'normalization' entry: the model's inputs cannot be scaled as in training")
    if cfg.data.task == "classification":
        return _load_classifier(path, ckpt, cfg, device)
    with _part_of(path, "normalization"):
        normalizer = Normalizer.from_stats(ckpt["normalization"])
    with _part_of(path, f"model {cfg.model.name!r}"):
        model = build_model(cfg.model, task=cfg.data.task, in_channels=normalizer.out_channels,
                            batch_size=cfg.train.batch_size,
                            prior_channels=relative_height_channels(normalizer.features))
    load_weights(model, ckpt["model"], path)
    net = InferenceModel(normalizer, model, cfg.data.task).to(device).eval()
    meta = {"metrics": ckpt.get("metrics", {}), "version": ckpt.get("version", {}),
            "normalization": ckpt["normalization"], "step": ckpt.get("step")}
    return LoadedModel(net, list(cfg.data.thresholds_m), cfg.data.pixel_size_m, cfg.data.tile_px,
                       getattr(model, "stride", 1), cfg, meta, cfg.data.task)


def load_models(paths, device="cpu") -> LoadedModel:
    """One checkpoint (load_model) or, for several, their ensemble (load_ensemble)."""
    return load_model(paths[0], device) if len(paths) == 1 else load_ensemble(paths, device)


def load_ensemble(paths, device="cpu") -> LoadedModel:
    """Several gap-map checkpoints averaged (EnsembleModel); the first one's config, window and thresholds.

    The members must map gaps (not exported, not classifiers) at one pixel size, from one training set of
    thresholds: otherwise their mean has no single meaning, and a ModelError names the odd one.
    """
    loaded = [load_model(p, device) for p in paths]
    first, name = loaded[0], paths[0]
    for path, member in zip(paths, loaded):
        if not isinstance(member.net, InferenceModel) or member.task == "classification":
            raise ModelError(f"{path}: an ensemble averages gap-map checkpoints (.ckpt/.pt of data.task "
                             f"'segmentation' or 'regression'), not {'an exported model' if member.config is None else member.task}")
        if not math.isclose(member.pixel_size_m, first.pixel_size_m, rel_tol=0.01):
            raise ModelError(f"{path} was trained on {member.pixel_size_m:g} m pixels but {name} on "
                             f"{first.pixel_size_m:g} m: ensemble members must share the pixel size")
        if _threshold_training(member) != _threshold_training(first):
            raise ModelError(f"{path} was trained on thresholds {_threshold_training(member)} but {name} on "
                             f"{_threshold_training(first)}: ensemble members must share them")
    meta = {"members": [{"checkpoint": str(p), **m.meta} for p, m in zip(paths, loaded)]}
    return LoadedModel(EnsembleModel([m.net for m in loaded]).eval(), first.thresholds_m, first.pixel_size_m,
                       first.tile_px, first.stride, first.config, meta)


def _threshold_training(loaded: LoadedModel) -> tuple:
    """What a model's thresholds mean: the fixed ones, or the continuous sampling and its range."""
    train = loaded.config.train
    if str(train.threshold_sampling).startswith("continuous"):
        return ("continuous", *map(float, train.threshold_range_m))
    return ("fixed", *map(float, loaded.thresholds_m))


def _load_classifier(path: Path, ckpt: dict, cfg, device) -> LoadedModel:
    """A tile classifier: per-band normaliser + model + softmax, and its class names."""
    with _part_of(path, f"model {cfg.model.name!r}"):
        model = rebuild_model(cfg.model, ckpt["model"])
    check_weight_kinds(model, ckpt["model"], path)  # after: the model keeps its own dtypes when loading
    classes = model.build_kwargs["num_classes"]
    names = ckpt.get("task", {}).get("class_names") or [f"class_{i}" for i in range(classes)]  # older checkpoints
    with _part_of(path, "normalization"):
        normalizer = normalizer_from_stats(ckpt["normalization"])
    net = ClassifierModel(normalizer, model).to(device).eval()
    meta = {"metrics": ckpt.get("metrics", {}), "version": ckpt.get("version", {}),
            "normalization": ckpt["normalization"], "step": ckpt.get("step")}
    return LoadedModel(net, [], cfg.data.pixel_size_m, cfg.data.tile_px, 1, cfg, meta, "classification", names)


def _load_exported(path: Path, device) -> LoadedModel:
    """An exported model and what its model card (same stem, .json, written by lib/export) says about it."""
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ModelError(f"{path}: exported model has no model card {card_path.name} beside it")
    card = _read_card(card_path, "model card")
    _check_card(card, card_path)
    try:
        if path.suffix == ".ts":
            net = torch.jit.load(str(path), map_location=device).eval()
        else:  # an ExportedProgram's module has no train/eval modes: it was exported in eval mode
            program = torch.export.load(str(path))
            if torch.device(device).type != "cpu":
                from torch.export.passes import move_to_device_pass
                program = move_to_device_pass(program, device)
            net = program.module()
    except Exception as exc:  # torch raises RuntimeError, ValueError... for foreign or truncated files
        raise ModelError(f"cannot load exported model {path}: {str(exc).splitlines()[0][:200]}") from None
    return LoadedModel(net, card["thresholds_m"], card["pixel_size_m"], card["tile_px"], card["stride"],
                       None, card, card.get("task", "segmentation"), card.get("class_names", []))


CARD_ENTRIES = {"thresholds_m": list, "pixel_size_m": (int, float), "tile_px": int, "stride": int}


def _check_card(card: dict, card_path: Path) -> None:
    """The entries an exported model's card must give, with their types."""
    for key, kind in CARD_ENTRIES.items():
        if not isinstance(card.get(key), kind) or isinstance(card.get(key), bool):
            raise ModelError(f"{card_path}: model card entry {key!r} is {card.get(key)!r:.60}, expected "
                             f"{getattr(kind, '__name__', 'a number')}")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in card["thresholds_m"]):
        raise ModelError(f"{card_path}: model card entry 'thresholds_m' must list numbers")


def check_thresholds(requested, trained_m, train_cfg, task: str = "segmentation") -> list[float]:
    """The thresholds to map: the trained ones when none are requested.

    They must be distinct finite heights > 0 m. A model trained on fixed thresholds maps only those; one
    trained with continuous thresholds (train.threshold_sampling continuous or continuous_log) maps any,
    with a warning outside train.threshold_range_m; a CHM-regression model maps any (gap: CHM <= T).
    """
    thresholds = [float(t) for t in (requested or trained_m)]
    bad = [t for t in thresholds if not (math.isfinite(t) and t > 0)]
    if bad:  # CHM <= 0 m is never a gap definition; NaN/inf would map nothing or everything
        raise ConfigError(f"--thresholds must be canopy heights in metres > 0, found {bad}",
                          hint="e.g. --thresholds 2 5 10 15")
    if len(set(thresholds)) != len(thresholds):
        raise ConfigError(f"--thresholds must be distinct, found {thresholds}")
    if task == "regression":
        return thresholds
    if str(getattr(train_cfg, "threshold_sampling", "")).startswith("continuous"):
        low, high = train_cfg.threshold_range_m
        outside = [t for t in thresholds if not low <= t <= high]
        if outside:
            log.warning("WARNING: thresholds %s m are outside the range the model was trained on "
                        "(continuous thresholds in [%g, %g] m): it extrapolates there", outside, low, high)
        return thresholds
    untrained = [t for t in thresholds if not any(math.isclose(t, u, abs_tol=1e-6) for u in trained_m)]
    if untrained:
        raise ConfigError(f"thresholds {untrained} m were not trained: this model was trained on the fixed "
                          f"thresholds {list(trained_m)} m (train.threshold_sampling is not 'continuous')",
                          hint="use trained thresholds, or a model trained with --train.threshold_sampling=continuous")
    return thresholds
