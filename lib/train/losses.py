"""Losses for the three tasks behind one call: `criterion(logits, target, t_idx) -> scalar`.

Segmentation targets are uint8: 0 not gap, 1 gap, 255 ignore (nodata). Ignored pixels contribute
exactly nothing: their logits are replaced by 0 before any arithmetic, so even a NaN there is
harmless and gets zero gradient. A batch mixes gap thresholds: sample b is weighted by
`threshold_weights[t_idx[b]]`, its own threshold (a previous tool used the first sample's).
Losses are computed in float32 whatever the autocast dtype of the logits.
"""
import difflib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.core.errors import ConfigError
from lib.gaps.masks import IGNORE


def _mask(logits, target):
    """(x, y, v), all (B, 1, H, W) float32: logits with 0 where ignored, 0/1 gap target, validity."""
    valid = target != IGNORE
    x = torch.where(valid, logits.float(), 0.0)
    return x, (target == 1).float(), valid.float()


class SegmentationLoss(nn.Module):
    """Base: per-threshold weights (a buffer, so it follows .to(device)) looked up per sample."""

    def __init__(self, threshold_weights=None):
        super().__init__()
        w = torch.as_tensor(threshold_weights, dtype=torch.float32) if threshold_weights else None
        self.register_buffer("threshold_weights", w, persistent=False)

    def sample_weights(self, t_idx, batch: int, device) -> torch.Tensor:
        """(B,) weight of each sample's own threshold; ones when no weights are configured."""
        w = self.threshold_weights
        if w is None:
            return torch.ones(batch, device=device)
        if t_idx is None:
            raise ValueError("threshold weights are configured: pass t_idx (B,) with each sample's threshold")
        return w[t_idx]


class PixelLoss(SegmentationLoss):
    """A per-pixel loss, weighted per sample and averaged over all valid pixels of the batch."""

    def pixel_loss(self, x, y):
        raise NotImplementedError

    def forward(self, logits, target, t_idx=None):
        x, y, v = _mask(logits, target)                                  # (B, 1, H, W)
        w = self.sample_weights(t_idx, x.shape[0], x.device).view(-1, 1, 1, 1)
        # no valid pixel: 0 / 1 = 0, still attached to the graph (DDP needs every rank's backward)
        return (self.pixel_loss(x, y) * v * w).sum() / v.sum().clamp_min(1.0)


class BCELoss(PixelLoss):
    """Binary cross-entropy on logits."""

    def pixel_loss(self, x, y):
        return F.binary_cross_entropy_with_logits(x, y, reduction="none")


class FocalLoss(PixelLoss):
    """Focal loss -alpha_t (1 - p_t)^gamma log p_t (Lin et al.); gamma 0 and alpha None is BCE."""

    def __init__(self, gamma=2.0, alpha=None, threshold_weights=None):
        super().__init__(threshold_weights)
        self.gamma, self.alpha = gamma, alpha

    def pixel_loss(self, x, y):
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")   # -log p_t
        # 1 - p_t via expm1 (exact near p_t = 1); the floor keeps gamma < 1 from an infinite gradient
        loss = (-torch.expm1(-bce)).clamp_min(1e-12).pow(self.gamma) * bce
        if self.alpha is not None:
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        return loss


class RegionLoss(SegmentationLoss):
    """A per-sample overlap loss from soft tp/fp/fn, averaged over samples that have a valid pixel.

    Empty-target convention: `smooth` (pixels) is added to both sides of the ratio, so a tile with no
    gap predicted empty scores loss 0, and predicted gap mass m on it costs 1 - smooth / (m + smooth).
    """

    def __init__(self, smooth=1.0, threshold_weights=None):
        super().__init__(threshold_weights)
        self.smooth = smooth

    def region_loss(self, tp, fp, fn):
        raise NotImplementedError

    def forward(self, logits, target, t_idx=None):
        x, y, v = _mask(logits, target)                                  # (B, 1, H, W)
        p = torch.sigmoid(x) * v                                         # ignored: p = 0 and y = 0
        dims = (1, 2, 3)
        tp = (p * y).sum(dims)                                           # (B,)
        fp = p.sum(dims) - tp
        fn = y.sum(dims) - tp
        has_valid = (v.sum(dims) > 0).float()
        w = self.sample_weights(t_idx, x.shape[0], x.device) * has_valid
        return (w * self.region_loss(tp, fp, fn)).sum() / has_valid.sum().clamp_min(1.0)


class DiceLoss(RegionLoss):
    """Soft Dice 1 - (2 tp + s) / (2 tp + fp + fn + s), per sample then averaged."""

    def region_loss(self, tp, fp, fn):
        return 1 - (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth)


class TverskyLoss(RegionLoss):
    """Tversky 1 - (tp + s) / (tp + alpha fp + beta fn + s): beta > alpha favours recall."""

    def __init__(self, alpha=0.3, beta=0.7, smooth=1.0, threshold_weights=None):
        super().__init__(smooth, threshold_weights)
        self.alpha, self.beta = alpha, beta

    def region_loss(self, tp, fp, fn):
        return 1 - (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)


def _lovasz_grad(gt_sorted):
    """(B, N) gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted descending."""
    gts = gt_sorted.sum(1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(1)
    union = gts + (1 - gt_sorted).cumsum(1)                              # >= 1 everywhere
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)


class LovaszHingeLoss(SegmentationLoss):
    """Lovász hinge (Berman et al.), per image, averaged over images that have a valid pixel.

    All images are sorted at once: ignored pixels get hinge error -1 with label 0, so they sort after
    every pixel with a positive error and change neither the loss nor the gradient.
    """

    def forward(self, logits, target, t_idx=None):
        x, y, v = (t.flatten(1) for t in _mask(logits, target))          # (B, N)
        errors = torch.where(v > 0, 1 - x * (2 * y - 1), -1.0)
        errors, order = errors.sort(dim=1, descending=True)
        per_image = (F.relu(errors) * _lovasz_grad(y.gather(1, order))).sum(1)   # (B,)
        has_valid = (v.sum(1) > 0).float()
        w = self.sample_weights(t_idx, x.shape[0], x.device) * has_valid
        return (w * per_image).sum() / has_valid.sum().clamp_min(1.0)


class CombinedFocalDiceLoss(nn.Module):
    """focal_weight * focal + dice_weight * Dice, both with the same per-threshold weights."""

    def __init__(self, focal_weight=1.0, dice_weight=1.0, threshold_weights=None, gamma=2.0, alpha=None,
                 smooth=1.0):
        super().__init__()
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        self.focal = FocalLoss(gamma, alpha, threshold_weights)
        self.dice = DiceLoss(smooth, threshold_weights)

    def forward(self, logits, target, t_idx=None):
        return (self.focal_weight * self.focal(logits, target, t_idx)
                + self.dice_weight * self.dice(logits, target, t_idx))


class AdaptiveLoss(nn.Module):
    """sum_i exp(-s_i) L_i + s_i with learnable s_i = log sigma_i^2 (Kendall et al., 2018).

    The s_i are parameters of this module: give `criterion.parameters()` to the optimiser (without
    weight decay) and save `criterion.state_dict()` in checkpoints. They start at 0 (weights 1).
    """

    def __init__(self, terms):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.log_vars = nn.Parameter(torch.zeros(len(terms)))

    def forward(self, logits, target, t_idx=None):
        losses = torch.stack([term(logits, target, t_idx) for term in self.terms])   # (n_terms,)
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum()

    def term_weights(self) -> list[float]:
        """Current exp(-s_i), for logging (a CPU-GPU sync)."""
        return torch.exp(-self.log_vars).tolist()


class MaskedRegressionLoss(nn.Module):
    """Per-pixel height loss averaged over pixels whose target is finite (NaN = nodata)."""

    def pixel_loss(self, pred, target):
        raise NotImplementedError

    def forward(self, pred, target, t_idx=None):
        valid = torch.isfinite(target)                                   # (B, 1, H, W)
        pred = torch.where(valid, pred.float(), 0.0)
        target = torch.where(valid, target.float(), 0.0)
        return (self.pixel_loss(pred, target) * valid).sum() / valid.sum().clamp_min(1)


class MaskedL1Loss(MaskedRegressionLoss):
    """Mean absolute height error in metres."""

    def pixel_loss(self, pred, target):
        return (pred - target).abs()


class MaskedHuberLoss(MaskedRegressionLoss):
    """Huber: squared below `delta` metres, linear above (robust to crown-edge outliers)."""

    def __init__(self, delta=1.0):
        super().__init__()
        self.delta = delta

    def pixel_loss(self, pred, target):
        return F.huber_loss(pred, target, reduction="none", delta=self.delta)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy on (B, C) logits and (B,) long targets, with label smoothing and class weights."""

    def __init__(self, label_smoothing=0.0, class_weights=None):
        super().__init__()
        self.label_smoothing = label_smoothing
        w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", w, persistent=False)

    def forward(self, logits, target, t_idx=None):
        return F.cross_entropy(logits.float(), target, weight=self.class_weights,
                               label_smoothing=self.label_smoothing)


SEGMENTATION_LOSSES = {
    "bce": lambda c, w: BCELoss(w),
    "focal": lambda c, w: FocalLoss(c.focal_gamma, c.focal_alpha, w),
    "dice": lambda c, w: DiceLoss(c.dice_smooth, w),
    "tversky": lambda c, w: TverskyLoss(c.tversky_alpha, c.tversky_beta, c.dice_smooth, w),
    "lovasz": lambda c, w: LovaszHingeLoss(w),
    "focal_dice": lambda c, w: CombinedFocalDiceLoss(c.focal_weight, c.dice_weight, w, c.focal_gamma,
                                                     c.focal_alpha, c.dice_smooth),
    "adaptive": lambda c, w: AdaptiveLoss([SEGMENTATION_LOSSES[t](c, w) for t in c.adaptive_terms]),
}
LOSSES = {
    "segmentation": SEGMENTATION_LOSSES,
    "regression": {"l1": lambda c, n: MaskedL1Loss(), "huber": lambda c, n: MaskedHuberLoss(c.huber_delta_m)},
    "classification": {"cross_entropy": lambda c, n: CrossEntropyLoss(c.label_smoothing, c.class_weights)},
}


def _check_loss_config(cfg_loss, task, num_thresholds, num_classes) -> None:
    losses = LOSSES.get(task)
    if losses is None:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(LOSSES)}")
    if cfg_loss.name not in losses:
        raise ConfigError(f"loss.name {cfg_loss.name!r} is not a {task} loss; valid: {', '.join(losses)}")
    if cfg_loss.extra:                       # not read: every loss parameter is a named key
        key, fields = next(iter(cfg_loss.extra)), [k for k in vars(cfg_loss) if k != "extra"]
        near = [f for f in fields if key in f] or difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
        raise ConfigError(f"loss.extra.{key} is not read: loss parameters are named keys of the loss section",
                          hint=f"use loss.{' or loss.'.join(near or fields)}")
    w = cfg_loss.threshold_weights
    if w and (len(w) != num_thresholds or min(w) < 0):
        raise ConfigError(f"loss.threshold_weights must be empty or {num_thresholds} non-negative numbers "
                          f"(one per data.thresholds_m), found {w}")
    if cfg_loss.name == "adaptive":
        bad = [t for t in cfg_loss.adaptive_terms if t not in SEGMENTATION_LOSSES or t == "adaptive"]
        if bad or not cfg_loss.adaptive_terms:
            raise ConfigError(f"loss.adaptive_terms must name segmentation losses other than 'adaptive', "
                              f"found {cfg_loss.adaptive_terms}")
    if task == "classification" and cfg_loss.class_weights and len(cfg_loss.class_weights) != num_classes:
        raise ConfigError(f"loss.class_weights has {len(cfg_loss.class_weights)} values, expected one per "
                          f"class ({num_classes})")


def build_loss(cfg_loss, task="segmentation", num_thresholds=4, num_classes=None) -> nn.Module:
    """The criterion named by `cfg_loss.name` for `task`; ConfigError lists the valid names."""
    _check_loss_config(cfg_loss, task, num_thresholds, num_classes)
    factory = LOSSES[task][cfg_loss.name]
    if task == "segmentation":
        return factory(cfg_loss, list(cfg_loss.threshold_weights) or None)
    return factory(cfg_loss, num_classes)


def _initial_segmentation_loss(c, name, f):
    """Loss at zero logits (p = 0.5) when every tile has gap fraction f (None: unknown)."""
    if name == "bce":
        return math.log(2)
    if name == "lovasz":
        return 1.0                                   # all hinge errors are 1: the Lovász sum telescopes to 1
    if name == "focal":
        if c.focal_alpha is None:
            return 0.5 ** c.focal_gamma * math.log(2)
        return None if f is None else \
            0.5 ** c.focal_gamma * math.log(2) * (c.focal_alpha * f + (1 - c.focal_alpha) * (1 - f))
    if f is None:
        return None
    if name == "dice":
        return 0.5 / (0.5 + f)                       # tp = f/2, fp = (1-f)/2, fn = f/2 per pixel
    if name == "tversky":
        return 1 - 0.5 * f / (0.5 * f + c.tversky_alpha * 0.5 * (1 - f) + c.tversky_beta * 0.5 * f)
    terms = {"focal_dice": [("focal", c.focal_weight), ("dice", c.dice_weight)],
             "adaptive": [(t, 1.0) for t in c.adaptive_terms]}[name]
    values = [_initial_segmentation_loss(c, t, f) for t, _ in terms]
    return None if None in values else sum(v * k for v, (_, k) in zip(values, terms))


def expected_initial_loss(cfg_loss, task="segmentation", num_classes=None, pos_fraction=None) -> float | None:
    """Loss of an untrained model (zero logits), for the start-of-training sanity check; None if undefined.

    BCE: ln 2; Lovász: 1; CE with C classes: ln C. Dice/Tversky and alpha-weighted focal depend on the
    gap fraction of the tiles: pass `pos_fraction` (approximate: smoothing ignored, equal fractions).
    Threshold weights enter through their mean (thresholds drawn uniformly). Regression: None.
    """
    if task == "classification":
        return math.log(num_classes) if num_classes else None
    if task != "segmentation":
        return None
    value = _initial_segmentation_loss(cfg_loss, cfg_loss.name, pos_fraction)
    w = cfg_loss.threshold_weights
    return None if value is None else value * (sum(w) / len(w) if w else 1.0)
