"""Metrics as sums of counts, so a DDP all-reduce (SUM) gives exactly the single-process numbers.

Division policy: a ratio whose denominator is 0 is NaN (undefined, e.g. precision when nothing is
predicted), never a silent 0 or 1. Means over thresholds or classes skip NaN and are NaN only when
every term is. Accumulators live on `device` so `update` never syncs with the host; `compute` does.
MPS has no float64: accumulate on "cpu" there.
"""
import math

import torch
import torch.distributed as dist

from lib.gaps.masks import IGNORE, threshold_tag

EMPTY_TILE_POLICY = ("per-tile IoU and F1: a tile with no gap in its target nor in its prediction scores 1, "
                     "a tile with gaps in only one of them scores 0, a tile without valid pixels is excluded")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den in float64, NaN where den == 0."""
    num, den = num.double(), den.double()
    return torch.where(den != 0, num / den, torch.full_like(den, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """SUM across ranks when torch.distributed is initialised; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


class SegmentationMetrics:
    """Per-threshold confusion counts and per-tile IoU/F1 sums; see EMPTY_TILE_POLICY.

    Dataset-wide (micro) metrics come from the summed counts; `tile_*` metrics average per-tile scores.
    `*_mean` keys average the thresholds (each threshold counts once, whatever its pixel count).
    """

    TILE_FIELDS = ("tiles", "iou", "f1")

    def __init__(self, thresholds_m: list[float], device="cpu"):
        self.thresholds_m = list(thresholds_m)
        self.tags = [threshold_tag(t) for t in self.thresholds_m]
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        k = len(self.thresholds_m)
        self.confusion = torch.zeros(k, 4, dtype=torch.int64, device=self.device)    # tp, fp, fn, tn
        self.tile_sums = torch.zeros(k, 3, dtype=torch.float64, device=self.device)  # TILE_FIELDS

    @torch.no_grad()
    def update(self, logits_or_probs, target, t_idx, prob_threshold=0.5, from_logits=True) -> None:
        """Add a batch: scores (B,1,H,W), target (B,1,H,W) uint8 0/1/255, t_idx (B,) each sample's threshold.

        A pixel is predicted gap when its probability > prob_threshold (for logits: logit > logit(p)).
        """
        if not 0 < prob_threshold < 1:
            raise ValueError(f"prob_threshold must be in (0, 1), got {prob_threshold}")
        cut = math.log(prob_threshold / (1 - prob_threshold)) if from_logits else prob_threshold
        valid = target != IGNORE                                         # (B, 1, H, W)
        pred = (logits_or_probs > cut) & valid
        gap = target == 1
        dims = tuple(range(1, target.dim()))
        tp = (pred & gap).sum(dims)                                      # (B,) int64
        fp = pred.sum(dims) - tp
        fn = gap.sum(dims) - tp
        tn = valid.sum(dims) - tp - fp - fn
        t_idx = t_idx.to(self.device, torch.long)
        self.confusion.index_add_(0, t_idx, torch.stack([tp, fp, fn, tn], 1).to(self.device))
        self.tile_sums.index_add_(0, t_idx, self._tile_scores(tp, fp, fn, tn).to(self.device))

    @staticmethod
    def _tile_scores(tp, fp, fn, tn) -> torch.Tensor:
        """(B, 3) float64 rows (has_valid, iou, f1) per tile, following EMPTY_TILE_POLICY."""
        tp, fp, fn = tp.double(), fp.double(), fn.double()
        has_valid = ((tp + fp + fn + tn) > 0).double()
        wrong = fp + fn
        iou = torch.where(tp + wrong > 0, tp / (tp + wrong).clamp_min(1), 1.0)
        f1 = torch.where(tp + wrong > 0, 2 * tp / (2 * tp + wrong).clamp_min(1), 1.0)
        return torch.stack([has_valid, iou * has_valid, f1 * has_valid], 1)

    def counts(self) -> torch.Tensor:
        """(K, 4) int64 tp, fp, fn, tn per threshold (per-tile sums are in `tile_sums`, (K, 3))."""
        return self.confusion.clone()

    def merge(self, other: "SegmentationMetrics") -> None:
        """Add another object's counts (same thresholds): equal to one object updated with both."""
        if other.thresholds_m != self.thresholds_m:
            raise ValueError(f"cannot merge metrics over {other.thresholds_m} into {self.thresholds_m}")
        self.confusion += other.confusion.to(self.device)
        self.tile_sums += other.tile_sums.to(self.device)

    def all_reduce(self) -> None:
        """Sum the counts over DDP ranks (every rank must call it); no-op when not distributed."""
        _all_reduce_sum(self.confusion, self.tile_sums)

    def per_threshold(self) -> dict[str, torch.Tensor]:
        """Metric name -> (K,) float64 values (NaN where undefined)."""
        tp, fp, fn, tn = self.confusion.double().cpu().unbind(1)
        recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        tiles = self.tile_sums.cpu()
        return {
            "iou": _ratio(tp, tp + fp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "recall": recall,
            "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
            "balanced_accuracy": (recall + specificity) / 2,
            # Cohen's kappa (po - pe) / (1 - pe), written in counts
            "kappa": _ratio(2 * (tp * tn - fn * fp), (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)),
            "tile_iou": _ratio(tiles[:, 1], tiles[:, 0]),
            "tile_f1": _ratio(tiles[:, 2], tiles[:, 0]),
        }

    def compute(self) -> dict[str, float]:
        """{"iou_5m": ..., "iou_mean": ..., "tile_iou_5m": ..., ...} as Python floats (a host sync)."""
        out = {}
        for name, values in self.per_threshold().items():
            out.update({f"{name}_{tag}": v for tag, v in zip(self.tags, values.tolist())})
            out[f"{name}_mean"] = _nanmean(values)
        return out


class ThresholdMetrics(SegmentationMetrics):
    """SegmentationMetrics plus per-threshold 2x2 confusion matrices and a printable table."""

    def confusion_matrices(self) -> torch.Tensor:
        """(K, 2, 2) int64: rows true class (no gap, gap), columns predicted: [[tn, fp], [fn, tp]]."""
        tp, fp, fn, tn = self.confusion.cpu().unbind(1)
        return torch.stack([torch.stack([tn, fp], 1), torch.stack([fn, tp], 1)], 1)

    def table(self) -> str:
        """One row per threshold: counts and the main metrics."""
        per = self.per_threshold()
        names = ("iou", "f1", "precision", "recall", "kappa", "tile_iou")
        header = f"{'threshold':>9} {'tp':>11} {'fp':>11} {'fn':>11} {'tn':>11} " + \
            " ".join(f"{n:>9}" for n in names)
        rows = [header]
        for k, tag in enumerate(self.tags):
            counts = " ".join(f"{int(c):>11d}" for c in self.confusion[k].tolist())
            rows.append(f"{tag:>9} {counts} " + " ".join(f"{float(per[n][k]):>9.4f}" for n in names))
        return "\n".join(rows)


class RegressionMetrics:
    """MAE, RMSE, bias and R² of heights (metres) over pixels with a finite target."""

    FIELDS = ("n", "abs_error", "error", "sq_error", "y", "sq_y")

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, pred, target) -> None:
        """pred, target (B,1,H,W) metres; NaN target = nodata (a NaN prediction on valid pixels shows as NaN)."""
        valid = torch.isfinite(target)
        e = torch.where(valid, pred.double() - target.double(), 0.0)
        y = torch.where(valid, target.double(), 0.0)
        batch = torch.stack([valid.sum().double(), e.abs().sum(), e.sum(), (e * e).sum(), y.sum(), (y * y).sum()])
        self.sums += batch.to(self.device)

    def merge(self, other: "RegressionMetrics") -> None:
        self.sums += other.sums.to(self.device)

    def all_reduce(self) -> None:
        _all_reduce_sum(self.sums)

    def compute(self) -> dict[str, float]:
        n, sae, se, sse, sy, syy = self.sums.cpu().unbind()
        sst = syy - sy * _ratio(sy, n)                                   # total sum of squares
        return {"mae_m": float(_ratio(sae, n)), "rmse_m": math.sqrt(float(_ratio(sse, n))),
                "bias_m": float(_ratio(se, n)), "r2": float(1 - _ratio(sse, sst))}


class ClassificationMetrics:
    """Accuracy, top-k accuracy, per-class precision/recall/F1 and macro-F1 from a confusion matrix.

    Targets < 0 are ignored (cross-entropy's ignore_index). Values of topk above num_classes are
    dropped (they would be 1); top-1 is reported as "accuracy".
    """

    def __init__(self, num_classes: int, class_names=None, topk=(1, 5), device="cpu"):
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.topk = tuple(sorted(k for k in set(topk) if 1 < k <= num_classes))
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.confusion = torch.zeros(c, c, dtype=torch.int64, device=self.device)  # rows true, cols predicted
        self.topk_correct = torch.zeros(len(self.topk), dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, logits, target) -> None:
        """logits (B, C), target (B,) long class indices."""
        valid = target >= 0
        target = target.clamp_min(0)
        cells = target * self.num_classes + logits.argmax(1)                       # (B,)
        self.confusion.view(-1).index_add_(0, cells.to(self.device), valid.long().to(self.device))
        if self.topk:
            ranked = logits.topk(self.topk[-1], dim=1).indices                      # (B, kmax)
            hit = (ranked == target[:, None]).long().cumsum(1) > 0                 # hit within top j+1
            hits = hit[:, [k - 1 for k in self.topk]] & valid[:, None]             # (B, len(topk))
            self.topk_correct += hits.sum(0).to(self.device)

    def merge(self, other: "ClassificationMetrics") -> None:
        self.confusion += other.confusion.to(self.device)
        self.topk_correct += other.topk_correct.to(self.device)

    def all_reduce(self) -> None:
        _all_reduce_sum(self.confusion, self.topk_correct)

    def compute(self) -> dict[str, float]:
        cm = self.confusion.double().cpu()
        n, tp = cm.sum(), cm.diagonal()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        per_class = {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                     "f1": _ratio(2 * tp, 2 * tp + fp + fn)}
        out = {"accuracy": float(_ratio(tp.sum(), n)), "macro_f1": _nanmean(per_class["f1"])}
        out.update({f"top{k}_accuracy": float(_ratio(c, n)) for k, c in zip(self.topk, self.topk_correct.cpu())})
        for name, values in per_class.items():
            out.update({f"{name}_{cls}": v for cls, v in zip(self.class_names, values.tolist())})
        return out
