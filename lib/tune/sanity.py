"""Checks before a long run (Karpathy's recipe): the floor to beat, the initial loss, batch shapes and
value ranges, finite weights, a gradient for every parameter, overfitting a few tiles, the largest batch.
Every task: gap maps (segmentation, regression) and tile classes (classification: initial loss vs ln C,
majority/random baselines, overfit scored by accuracy).

Each check returns a Check(name, status, message, details) with status "ok", "warn" or "fail" and a
message in plain words. They use the run's own Trainer (`build_trainer`), never a copy of its wiring.
"""
from dataclasses import asdict, dataclass, field

import torch

from lib.gaps.baselines import random_gaps
from lib.tune.batch_finder import batch_count, estimate_cpu_batch, find_batch_size
from lib.core.config import build_config, config_to_dict
from lib.gaps.masks import IGNORE
from lib.train.losses import expected_initial_loss
from lib.tune.lr_finder import endless_batches
from lib.train.metrics import SegmentationMetrics
from lib.models.blocks import resolve_norm
from lib.data.shards import read_manifest


@dataclass
class Check:
    name: str
    status: str                      # "ok", "warn" or "fail"
    message: str
    details: dict = field(default_factory=dict)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def score_key(task) -> str:
    """The metric that tells whether the model learned a subset: accuracy for classes, IoU for gap maps."""
    return "accuracy" if task.name == "classification" else "iou_mean"


def first_batch(trainer) -> dict:
    """The first training batch of the trainer's epoch, on its device (DataError when there is none)."""
    return to_device(next(endless_batches(trainer)), trainer.device)


@torch.no_grad()
def predict(trainer, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's output in the loss's units (task.output), in eval mode; the model is left training."""
    trainer.raw_model.eval()
    try:
        return trainer.task.output(trainer.raw_model(x, t).float())
    finally:
        trainer.raw_model.train()


def check_weights(model: torch.nn.Module) -> Check:
    """Every floating parameter and buffer is finite (one host sync for all of them)."""
    named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu() if named else torch.ones(0, dtype=bool)
    bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
    if bad:
        return Check("weights", "fail", f"{len(bad)} tensor(s) hold NaN or Inf at initialisation: {_names(bad)}")
    return Check("weights", "ok", f"all {len(named)} parameter and buffer tensors are finite")


def _names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _range(t: torch.Tensor) -> str:
    t = t.float()
    if t.numel() == 0:
        return "(no finite value)"
    return f"in [{t.min():.3g}, {t.max():.3g}] (mean {t.mean():.3g}, std {t.std():.3g})"


@torch.no_grad()
def model_io(trainer, batch: dict) -> tuple[list[str], list[str], str]:
    """(problems, warnings, description) of the model's input and output on the batch."""
    x, t, target, _ = trainer.task.train_inputs(batch)
    pred = predict(trainer, x, t)
    classes = len(getattr(trainer.task, "class_names", ()))
    expected = (target.shape[0], classes) if classes else target.shape   # (B, classes) or the target's shape
    problems, warnings = [], []
    if not torch.isfinite(x).all() or not torch.isfinite(pred).all():
        problems.append("the model input or output holds NaN or Inf")
    if pred.shape != expected:
        problems.append(f"output {tuple(pred.shape)} does not match the target: expected {tuple(expected)}")
    if x.abs().max() > 50:
        warnings.append(f"model inputs reach {float(x.abs().max()):.0f}: the normalisation looks off")
    return problems, warnings, (f"model input {tuple(x.shape)} {_range(x)}; threshold input {_range(t)}; "
                                f"output {tuple(pred.shape)}")


def batch_layout(trainer, batch: dict):
    """(input name, input (B,C,H,W), label name, labels, shape problem or False, allowed labels, their text)."""
    if trainer.task.name == "classification":
        image, labels, c = batch["image"], batch["label"], len(trainer.task.class_names)   # (B, C, H, W), (B,)
        bad = image.dim() != 4 or labels.shape != image.shape[:1]
        return ("image", image, "labels", labels, bad and "should be (B, C, H, W) and (B,)", set(range(c)),
                f"0 to {c - 1} ({c} classes)")
    dsm, masks, k = batch["dsm"], batch["masks"], len(trainer.task.thresholds_m)       # (B, 1, H, W), (B, K, H, W)
    bad = dsm.dim() != 4 or dsm.shape[1] != 1 or masks.shape != (dsm.shape[0], k, *dsm.shape[2:])
    return ("dsm", dsm, "masks", masks, bad and f"should be (B, 1, H, W) and (B, {k}, H, W)", {0, 1, IGNORE},
            f"only 0 (canopy), 1 (gap) and {IGNORE} (nodata)")


@torch.no_grad()
def check_batch(trainer, batch: dict) -> Check:
    """Shapes of a batch and of the model output, value ranges of the inputs, mask values or class labels."""
    name, image, label_name, labels, shape_problem, allowed, allowed_text = batch_layout(trainer, batch)
    px = trainer.cfg.data.tile_px
    problems, warnings, io = model_io(trainer, batch)
    if shape_problem:
        problems.append(f"{name} {tuple(image.shape)} and {label_name} {tuple(labels.shape)} {shape_problem}")
    if tuple(image.shape[2:]) != (px, px):
        warnings.append(f"tiles are {tuple(image.shape[2:])} px but data.tile_px is {px}")
    found = sorted(torch.unique(labels).tolist())
    if not set(found) <= allowed:
        problems.append(f"{label_name} values {found}: expected {allowed_text}")
    nodata = float((~torch.isfinite(image)).float().mean())
    if nodata > 0.5:
        warnings.append(f"{100 * nodata:.0f}% of the {name} pixels are nodata")
    message = (f"{name} {tuple(image.shape)} {str(image.dtype)[6:]} {_range(image[torch.isfinite(image)])}, nodata "
               f"{100 * nodata:.1f}%; {label_name} {tuple(labels.shape)} values {found}; {io}")
    status = "fail" if problems else "warn" if warnings else "ok"
    return Check("batch", status, "; ".join(problems + warnings + [message]))


@torch.no_grad()
def check_initial_loss(trainer, batch: dict, tolerance: float = 0.25) -> Check:
    """The untrained model's loss beside an uninformed model's (zero output) and the textbook value
    (classification: -ln(1/C), whatever the label smoothing or class weights)."""
    x, t, target, t_idx = trainer.task.train_inputs(batch)
    pred = predict(trainer, x, t)                                     # (B, 1, H, W) or (B, classes)
    loss = float(trainer.criterion(pred, target, t_idx))
    zero = float(trainer.criterion(torch.zeros_like(pred), target, t_idx))
    classes = len(getattr(trainer.task, "class_names", ())) or None
    if classes:
        gap_fraction, why = None, f"-ln(1/{classes}) for {classes} classes"
    else:
        gap_fraction = float((batch["masks"] == 1).sum() / (batch["masks"] != IGNORE).sum().clamp_min(1))
        why = f"gap fraction {gap_fraction:.2f}"
    expected = expected_initial_loss(trainer.cfg.loss, trainer.cfg.data.task, classes, gap_fraction)
    textbook = f"; the formula for {trainer.cfg.loss.name} gives {expected:.4g}" if expected is not None else ""
    message = (f"initial loss {loss:.4g}; a zero output (an uninformed model) scores {zero:.4g} on this batch"
               f"{textbook} ({why}); initial output {_range(pred)}")
    details = {"initial": loss, "zero_output": zero, "expected": expected}
    ratio = loss / max(zero, 1e-12)
    if abs(ratio - 1) > tolerance:
        return Check("initial loss", "warn", f"the untrained model is not uninformed ({ratio:.2f}x the "
                     f"zero-output loss): check the last layer's initialisation; " + message, details)
    return Check("initial loss", "ok", message, details)


@torch.no_grad()
def check_class_baselines(trainer) -> Check:
    """Majority-class and uniform-random scores on the validation split (lib.infer.evaluate_classes): the floor to beat."""
    from lib.infer.evaluate_classes import majority_class, score_split
    names, model = trainer.task.class_names, trainer.raw_model
    majority = majority_class(read_manifest(trainer.cfg.data.root))
    net = torch.nn.Sequential(trainer.task.normalizer, model)             # raw bands -> logits
    model.eval()
    try:
        scores = score_split(net, trainer.cfg, "val", names, majority, trainer.device)
    finally:
        model.train()
    values = {m: {f"val/{k}": v for k, v in scores[m].compute().items() if k in ("accuracy", "macro_f1")}
              for m in ("majority", "random")}
    tiles = int(scores["model"].confusion.sum())
    parts = [f"{m} ({names[majority]})" if m == "majority" else m for m in values]
    text = "; ".join(f"{p}: " + ", ".join(f"{k} {v:.3f}" for k, v in values[m].items()) for p, m in zip(parts, values))
    return Check("baselines", "ok", f"floor to beat on {tiles} validation tiles: {text}", values)


@torch.no_grad()
def check_baselines(trainer, seed: int = 0) -> Check:
    """All-canopy and random-at-the-train-gap-rate scores on the validation split: the floor to beat."""
    if trainer.task.name == "classification":
        return check_class_baselines(trainer)
    from lib.infer.evaluate_gaps import train_gap_rates
    task, device = trainer.task, trainer.device
    rates = train_gap_rates(read_manifest(trainer.cfg.data.root), task.thresholds_m).to(device)   # (K,)
    scores = {name: SegmentationMetrics(task.thresholds_m, device=device) for name in ("all_canopy", "random")}
    generator = torch.Generator(device=device).manual_seed(seed)
    tiles = 0
    for batch in trainer.val_loader:
        masks = batch["masks"].to(device)                                      # (B, K, H, W)
        b, k = masks.shape[:2]
        target = masks.reshape(b * k, 1, *masks.shape[2:])                     # every tile at every threshold
        t_idx = torch.arange(k, device=device).repeat(b)
        tiles += b
        scores["all_canopy"].update(torch.zeros(target.shape, device=device), target, t_idx, from_logits=False)
        guess = random_gaps(target.shape, rates[t_idx].view(-1, 1, 1, 1), generator, device)
        scores["random"].update(guess.float(), target, t_idx, from_logits=False)
    values = {name: {f"val/{k}": v for k, v in m.compute().items()} for name, m in scores.items()}
    key = trainer.cfg.train.monitor
    shown = [key] + [k for k in ("val/iou_mean", "val/f1_mean", "val/accuracy_mean") if k != key]
    parts = [f"{name.replace('_', '-')}: " + ", ".join(f"{k} {v[k]:.3f}" for k in shown if k in v)
             for name, v in values.items()]
    return Check("baselines", "ok", f"floor to beat on {tiles} validation tiles x {len(task.thresholds_m)} "
                 f"thresholds: " + "; ".join(parts), values)


def overfit_config(cfg, tiles: int):
    """cfg for memorising `tiles` tiles: no augmentation, dropout, drop path, weight decay, EMA or frozen
    encoder, a constant LR, and the norm layers the real batch size gives (the same architecture)."""
    norm = resolve_norm(cfg.model.norm, cfg.train.batch_size)
    return build_config(config_to_dict(cfg), [
        "augment.enabled=false", "model.dropout=0", "model.drop_path=0", "optim.weight_decay=0",
        "train.ema_decay=0", "train.freeze_encoder_epochs=0", f"model.norm={norm}", f"train.batch_size={tiles}",
        "schedule.name=constant", "schedule.warmup_steps=0", "optim.accumulate_steps=1"])


@torch.no_grad()
def subset_scores(trainer, batch: dict) -> tuple[float, float]:
    """(loss, score_key metric) of the model on every (tile, threshold) pair of the batch, in eval mode."""
    x, t, target, t_idx = trainer.task.eval_inputs(batch)
    pred = predict(trainer, x, t)
    metrics = trainer.task.metrics(trainer.device)
    trainer.task.update_metrics(metrics, pred, target, t_idx, batch)
    return float(trainer.criterion(pred, target, t_idx)), metrics.compute()[score_key(trainer.task)]


def overfit(trainer, batch: dict, steps: int = 100, target: float = 0.5, every: int = 10) -> Check:
    """Train on one fixed batch; pass once its loss (all thresholds) falls to `target` x the start."""
    loss0, score0 = subset_scores(trainer, batch)
    curve = [[0, loss0, score0]]
    trainer.model.train()
    for step in range(1, steps + 1):
        trainer.train_step(batch)
        trainer.batch_in_epoch += 1
        if step % every == 0 or step == steps:
            curve.append([step, *subset_scores(trainer, batch)])
            if curve[-1][1] <= target * loss0:
                break
    step, loss, score = curve[-1]
    n, key = batch_count(batch), score_key(trainer.task)
    text = (f"{n} tiles, loss {loss0:.4g} -> {loss:.4g} ({100 * loss / loss0:.0f}% of the start) in {step} "
            f"steps, {key} on them {score0:.2f} -> {score:.2f}; target <= {100 * target:.0f}%")
    details = {"curve": curve, "tiles": n, "target": target, "score": key}
    if loss <= target * loss0:
        return Check("overfit", "ok", f"the model memorises a few tiles: {text}", details)
    if steps < SURE_OVERFIT_STEPS and loss < 0.99 * loss0:  # learning, but the budget is short
        return Check("overfit", "warn", f"not memorised yet: {text}; {steps} steps are too few to tell, run "
                     f"--steps {SURE_OVERFIT_STEPS} or more", details)
    return Check("overfit", "fail", f"the model cannot overfit {text}. That is a bug: any working pipeline "
                 f"memorises a handful of tiles. Look for frozen layers (gradient check), optim.lr=0, a target "
                 f"misaligned with its input, or a loss that ignores the output", details)


SURE_OVERFIT_STEPS = 100  # a working pipeline memorises a few tiles within this many steps


class GradientTally:
    """Records which parameters get a non-zero gradient while active. Tensor hooks observe the real
    training step unchanged; flags stay on the device (no host sync per step)."""

    def __init__(self, named_parameters, frozen_by_design=()):
        named = list(named_parameters)
        self.frozen = [n for n, p in named if not p.requires_grad and n not in set(frozen_by_design)]
        self.params = {n: p for n, p in named if p.requires_grad}
        self.nonzero = {n: torch.zeros((), dtype=torch.bool, device=p.device) for n, p in self.params.items()}
        self.reached: set[str] = set()
        self.handles = []

    def _hook(self, name: str):
        def hook(grad):
            self.reached.add(name)
            self.nonzero[name] |= grad.ne(0).any()
        return hook

    def __enter__(self) -> "GradientTally":
        self.handles = [p.register_hook(self._hook(n)) for n, p in self.params.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def check(self, steps: int) -> Check:
        """steps: optimiser steps observed; after one, layers behind a zero-initialised output (FiLM's identity
        start) have had no gradient yet, so zero gradients alone are only a warning."""
        unreached = [n for n in self.params if n not in self.reached]
        zero = [n for n in self.params if n in self.reached and not bool(self.nonzero[n])]
        details = {"frozen": self.frozen, "no_gradient": unreached, "zero_gradient": zero}
        problems = [f"{label}: {_names(names)}" for label, names in (
            ("frozen (requires_grad=False)", self.frozen), ("never reached by the loss", unreached),
            ("gradient exactly zero at every step", zero)) if names]
        if zero and not (self.frozen or unreached) and steps < 2:
            return Check("gradients", "warn", f"{len(zero)} parameters had a zero gradient in the only step "
                         f"({_names(zero)}): layers behind a zero-initialised output learn from the second step "
                         f"on; run --steps 2 or more to tell", details)
        if problems:
            return Check("gradients", "fail", f"{len(self.frozen) + len(unreached) + len(zero)} of "
                         f"{len(self.frozen) + len(self.params)} parameters do not learn; " + "; ".join(problems),
                         details)
        return Check("gradients", "ok", f"all {len(self.params)} parameters received a non-zero gradient", details)


def check_batch_size(trainer, batch: dict, limit: int, search: bool | None = None) -> Check:
    """Does train.batch_size fit? search (default: off CPU): the largest batch that does (lib.tune.batch_finder,
    up to `limit`) and its peak memory; on CPU an estimate from measured per-sample memory and free RAM."""
    configured = trainer.cfg.train.batch_size
    if not (trainer.device.type != "cpu" if search is None else search):
        return _cpu_batch_size(trainer, batch, limit, configured)
    found = find_batch_size(trainer, batch, limit)
    device, peak_gib = trainer.device, found.peak_mb.get(found.largest, 0) / 1024
    where = f"{peak_gib:.2f} GiB peak {'allocated' if device.type == 'cuda' else 'RSS'} on {device}"
    details = asdict(found)
    if found.largest < configured:
        return Check("batch size", "fail", f"train.batch_size={configured} does not fit: the largest batch "
                     f"that does is {found.largest} ({where})", details)
    reach = (f"every size up to the limit {limit} fits" if found.largest == limit else
             f"the largest batch that fits is {found.largest}")
    return Check("batch size", "ok", f"{reach} ({where}); train.batch_size is {configured}; tried {found.tried}",
                 details)


def _cpu_batch_size(trainer, batch: dict, limit: int, configured: int) -> Check:
    """The CPU estimate as a check: 'fail' only when a configured-size step ran out of memory."""
    found = estimate_cpu_batch(trainer, batch, configured, max(limit, 2 * configured))
    details = asdict(found)
    if not found.tried:
        return Check("batch size", "fail", f"train.batch_size={configured} does not fit: its training step ran "
                     "out of memory on CPU", details)
    if found.per_sample_mb is None:
        return Check("batch size", "ok", f"steps of {found.tried} samples ran; the batch-size finder searches "
                     "only on GPU, and the per-sample memory on CPU could not be measured (the process's peak "
                     f"RSS did not grow with the batch); train.batch_size is {configured}", details)
    return Check("batch size", "ok", f"CPU estimate: a sample adds {found.per_sample_mb:.1f} MB to a training "
                 f"step (peak RSS at batches {found.tried}); with {found.available_mb / 1024:.1f} GiB of RAM "
                 f"available, batches up to about {found.largest} fit (estimated, not tried: on CPU running out of "
                 f"memory means swapping or the OOM killer, not an error); train.batch_size is {configured}", details)


def _all_parameters(trainer):
    """The model's parameters and the loss's own (e.g. the adaptive loss's weights)."""
    yield from trainer.raw_model.named_parameters()
    yield from ((f"loss.{n}", p) for n, p in trainer.criterion.named_parameters())


def run_sanity(cfg, device, tiles: int = 4, steps: int = 100, target: float = 0.5,
               max_batch: int | None = None) -> list[Check]:
    """Every check in the order a practitioner runs them. max_batch: None = 4096 on CUDA, else 16 x the batch."""
    from lib.train.checkpoint import seed_everything
    from lib.train.runner import build_trainer
    seed_everything(cfg.run.seed)
    trainer = build_trainer(cfg, device, callbacks=[])
    batch = first_batch(trainer)
    checks = [check_weights(trainer.raw_model), check_batch(trainer, batch), check_initial_loss(trainer, batch),
              check_baselines(trainer)]
    limit = max_batch or (4096 if device.type == "cuda" else 16 * cfg.train.batch_size)
    checks.append(check_batch_size(trainer, batch, limit))
    del trainer, batch
    seed_everything(cfg.run.seed)
    small = build_trainer(overfit_config(cfg, tiles), device, callbacks=[])
    subset = first_batch(small)
    with GradientTally(_all_parameters(small), getattr(small.raw_model, "frozen_by_design", ())) as tally:
        fit = overfit(small, subset, steps, target)
    return checks + [tally.check(fit.details["curve"][-1][0]), fit]


def report(checks: list[Check]) -> str:
    """One line per check, then the verdict."""
    tag = {"ok": "[ ok ]", "warn": "[WARN]", "fail": "[FAIL]"}
    lines = [f"{tag[c.status]} {c.name}: {c.message}" for c in checks]
    failed = [c.name for c in checks if c.status == "fail"]
    warned = [c.name for c in checks if c.status == "warn"]
    verdict = (f"{len(failed)} of {len(checks)} checks FAILED ({', '.join(failed)})" if failed
               else f"all {len(checks)} checks passed")
    return "\n".join(lines + [verdict + (f"; warnings: {', '.join(warned)}" if warned else "")])


def log_tensorboard(folder, checks: list[Check], text: str) -> None:
    """The overfit curve, the baseline scores and the report text."""
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(log_dir=str(folder)) as writer:
        for c in checks:
            if c.name == "overfit":
                for step, loss, score in c.details["curve"]:
                    writer.add_scalar("sanity/overfit_loss", loss, step)
                    writer.add_scalar(f"sanity/overfit_{c.details['score']}", score, step)
            if c.name == "baselines":
                for name, values in c.details.items():
                    for key, value in values.items():
                        writer.add_scalar(f"baseline_{name}/{key}", value, 0)
        writer.add_text("sanity/report", text.replace("\n", "  \n"))
