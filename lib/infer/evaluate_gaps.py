"""Evaluate a model on a dataset split, every tile at every threshold, beside the baselines it must beat.

Methods: "model", "all_canopy", "random" (gap at the train split's gap rate of each threshold) and
"classical" (DSM-only grey opening, lib/baselines). Each gets dataset-wide (micro) metrics from summed
counts, per-tile means (lib.train.metrics.EMPTY_TILE_POLICY), a breakdown per site and recall per gap-size
class. Gap sizes are connected components of the TARGET tile: a gap cut by the tile border is measured
by its part inside the tile. Model and baselines see exactly the same tiles, and none of them gets an
area filter at tile level (predict.py filters whole scenes).
"""
import math

import numpy as np
import torch

from lib.gaps.baselines import classical_gaps
from lib.gaps.components import component_sizes, label_components
from lib.core.errors import DataError
from lib.gaps.masks import IGNORE, threshold_tag
from lib.train.metrics import EMPTY_TILE_POLICY, ThresholdMetrics
from lib.infer.scene_windows import predict_thresholds

METHODS = ("model", "all_canopy", "random", "classical")
SIZE_CLASSES = ("small", "medium", "large")
TABLE_KEYS = ("iou", "f1", "precision", "recall", "accuracy", "balanced_accuracy", "tile_iou", "tile_f1")
PR_BINS = 200  # probability bins of the PR curves: exact counts at thresholds j / PR_BINS


class GapSizes:
    """Connected gaps of a batch of target tiles at one threshold, each with its size class.

    Classes: small < bounds[0] m² <= medium <= bounds[1] m² < large. The B tiles are labelled in one call
    as a mosaic with a blank row between tiles, so no gap crosses from one tile into the next.
    """

    def __init__(self, target: np.ndarray, bounds_m2, pixel_area_m2: float):
        b, h, w = target.shape                                             # (B, H, W) uint8 0/1/IGNORE
        mosaic = np.zeros((b, h + 1, w), bool)
        mosaic[:, :h] = target == 1
        labels, n = label_components(mosaic.reshape(-1, w), connectivity=8)
        self.labels = np.ascontiguousarray(labels.reshape(b, h + 1, w)[:, :h])  # (B, H, W) ids 1..n
        self.n = n
        self.sizes = component_sizes(labels, n)                            # (n,) pixels
        area = self.sizes * pixel_area_m2
        self.classes = (area >= bounds_m2[0]).astype(np.int64) + (area > bounds_m2[1])  # (n,) 0/1/2

    def counts(self, pred: np.ndarray) -> np.ndarray:
        """pred (B, H, W) bool -> (classes, 4) int64: gap pixels, of them predicted, gaps, gaps found
        (a gap is found when at least half of its pixels are predicted gap)."""
        hits = np.bincount(self.labels.ravel(), weights=pred.ravel(), minlength=self.n + 1)[1:]  # (n,)
        found = hits >= 0.5 * self.sizes
        c = len(SIZE_CLASSES)
        return np.stack([np.bincount(self.classes, self.sizes, c), np.bincount(self.classes, hits, c),
                         np.bincount(self.classes, minlength=c), np.bincount(self.classes, found, c)], 1
                        ).round().astype(np.int64)


class MethodScores:
    """Everything measured for one method: overall counts, counts per site, gap-size-class counts."""

    def __init__(self, thresholds_m):
        self.thresholds_m = list(thresholds_m)
        self.overall = ThresholdMetrics(self.thresholds_m)
        self.sites: dict[str, ThresholdMetrics] = {}
        self.sizes = np.zeros((len(self.thresholds_m), len(SIZE_CLASSES), 4), np.int64)

    def update(self, probs: torch.Tensor, masks: torch.Tensor, sites: list[str], gap_sizes: list[GapSizes]):
        """probs (B,K,H,W) in [0, 1] (hard 0/1 for baselines), masks (B,K,H,W) uint8, sites (B,)."""
        b, k, h, w = masks.shape
        t_idx = torch.arange(k).repeat(b)                                  # row = b*K + k
        self.overall.update(probs.reshape(b * k, 1, h, w), masks.reshape(b * k, 1, h, w), t_idx, from_logits=False)
        for site in sorted(set(sites)):
            rows = torch.tensor([i for i, s in enumerate(sites) if s == site])
            n = len(rows)
            self.sites.setdefault(site, ThresholdMetrics(self.thresholds_m)).update(
                probs[rows].reshape(n * k, 1, h, w), masks[rows].reshape(n * k, 1, h, w),
                torch.arange(k).repeat(n), from_logits=False)
        pred = (probs > 0.5).numpy()
        for ki, sizes in enumerate(gap_sizes):
            self.sizes[ki] += sizes.counts(pred[:, ki])

    def result(self) -> dict:
        tags = self.overall.tags
        cm = self.overall.confusion_matrices().tolist()                    # (K, 2, 2) [[tn, fp], [fn, tp]]
        size = {}
        for ki, tag in enumerate(tags):
            rows = {}
            for ci, name in enumerate(SIZE_CLASSES):
                pixels, hit, gaps, found = self.sizes[ki, ci].tolist()
                rows[name] = {"gap_pixels": pixels, "pixel_recall": hit / pixels if pixels else math.nan,
                              "gaps": gaps, "gaps_found": found, "gap_recall": found / gaps if gaps else math.nan}
            size[tag] = rows
        return {"metrics": self.overall.compute(), "confusion": dict(zip(tags, cm)),
                "per_site": {site: m.compute() for site, m in sorted(self.sites.items())}, "size_classes": size}


class PRHistogram:
    """Per-threshold histograms of the model's probability on gap and non-gap pixels -> PR curves, AP."""

    def __init__(self, k: int, bins: int = PR_BINS):
        self.bins = bins
        self.counts = torch.zeros(k, 2, bins, dtype=torch.int64)           # [k, is_gap, bin]

    def update(self, probs: torch.Tensor, masks: torch.Tensor) -> None:
        """probs (B,K,H,W), masks (B,K,H,W) uint8; IGNORE pixels are skipped."""
        k = masks.shape[1]
        valid = masks != IGNORE
        cell = (probs * self.bins).long().clamp(0, self.bins - 1) + self.bins * (masks == 1).long() \
            + 2 * self.bins * torch.arange(k).view(1, k, 1, 1)
        self.counts += torch.bincount(cell[valid], minlength=k * 2 * self.bins).view(k, 2, self.bins)

    def curves(self) -> dict[str, torch.Tensor]:
        """(K, bins) tp, fp, tn, fn, precision, recall at probability thresholds j / bins, j = 0..bins-1."""
        neg, pos = self.counts[:, 0].double(), self.counts[:, 1].double()
        tp, fp = pos.flip(1).cumsum(1).flip(1), neg.flip(1).cumsum(1).flip(1)  # predicted gap: bin >= j
        fn, tn = pos.sum(1, keepdim=True) - tp, neg.sum(1, keepdim=True) - fp
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), 1.0)
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), 0.0)
        return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall}

    def average_precision(self) -> list[float]:
        """Step-wise area under each PR curve: sum over thresholds of (R_j - R_j+1) * P_j."""
        c = self.curves()
        drop = c["recall"] - torch.cat([c["recall"][:, 1:], torch.zeros_like(c["recall"][:, :1])], 1)
        return (drop * c["precision"]).sum(1).tolist()


def train_gap_rates(manifest: dict, thresholds_m) -> torch.Tensor:
    """(K,) gap fraction of each threshold in the train split (the random baseline's rate)."""
    rates = manifest.get("summary", {}).get("train", {}).get("gap_fraction", {})
    missing = [threshold_tag(t) for t in thresholds_m if threshold_tag(t) not in rates]
    if missing:
        raise DataError(f"manifest summary.train.gap_fraction lacks thresholds {missing}; found {sorted(rates)}",
                        hint="re-run prepare_data.py to rebuild the manifest")
    return torch.tensor([float(rates[threshold_tag(t)]) for t in thresholds_m])


class Evaluator:
    """Feeds batches to the model and the baselines and accumulates every method's scores."""

    def __init__(self, net, thresholds_m, pixel_size_m: float, rates: torch.Tensor, ecfg, device="cpu",
                 seed: int = 0):
        self.net, self.device, self.ecfg = net, torch.device(device), ecfg
        self.thresholds_m, self.pixel_size_m, self.rates = list(thresholds_m), pixel_size_m, rates
        self.t = torch.tensor(self.thresholds_m, dtype=torch.float32, device=self.device)
        self.methods = {name: MethodScores(self.thresholds_m) for name in METHODS}
        self.pr = PRHistogram(len(self.thresholds_m))
        self.generator = torch.Generator().manual_seed(seed)
        self.tiles, self.panels = 0, []

    @torch.no_grad()
    def update(self, batch: dict) -> None:
        dsm, masks, sites = batch["dsm"].to(self.device), batch["masks"], list(batch["site"])  # (B,1,H,W), (B,K,H,W)
        probs = predict_thresholds(self.net, dsm, self.t, self.ecfg.tta).float().cpu()
        window_m = self.ecfg.classical_window_m
        preds = {"model": probs, "all_canopy": torch.zeros_like(probs),
                 "random": (torch.rand(masks.shape, generator=self.generator)
                            < self.rates.view(1, -1, 1, 1)).float(),
                 "classical": classical_gaps(dsm[:, :1], self.thresholds_m, window_m, self.pixel_size_m).float().cpu()}
        masks_np = masks.numpy()
        sizes = [GapSizes(masks_np[:, k], self.ecfg.size_bounds_m2, self.pixel_size_m ** 2)
                 for k in range(masks.shape[1])]
        for name, p in preds.items():
            self.methods[name].update(p, masks, sites, sizes)
        self.pr.update(probs, masks)
        self.tiles += masks.shape[0]
        for b in range(min(self.ecfg.panels - len(self.panels), masks.shape[0])):
            self.panels.append((batch["key"][b], dsm[b, 0].cpu(), masks[b], probs[b]))

    def report(self) -> dict:
        tags = [threshold_tag(t) for t in self.thresholds_m]
        bounds = self.ecfg.size_bounds_m2
        return {"tiles": self.tiles, "thresholds_m": self.thresholds_m, "tta": self.ecfg.tta,
                "empty_tile_policy": EMPTY_TILE_POLICY, "pixel_size_m": self.pixel_size_m,
                "size_classes_m2": {"small": f"< {bounds[0]:g}", "medium": f"{bounds[0]:g} to {bounds[1]:g}",
                                    "large": f"> {bounds[1]:g}"},
                "classical_window_m": self.ecfg.classical_window_m,
                "random_gap_rates": dict(zip(tags, self.rates.tolist())),
                "model_average_precision": dict(zip(tags, self.pr.average_precision())),
                "methods": {name: m.result() for name, m in self.methods.items()}}

    def log_tensorboard(self, monitor, report: dict, prefix: str, step: int = 0) -> None:
        """Scalars of every method, PR curves per threshold and example panels (lib.train.monitor)."""
        from lib.train.monitor import prediction_panel

        scalars = {f"{prefix}/{name}/{key}": v for name, body in report["methods"].items()
                   for key, v in body["metrics"].items() if math.isfinite(v)}
        monitor.log_scalars(scalars, step)
        if monitor.writer:
            curves = self.pr.curves()
            for k, tag in enumerate(threshold_tag(t) for t in self.thresholds_m):
                monitor.writer.add_pr_curve_raw(f"{prefix}/pr_{tag}", *(curves[n][k] for n in (
                    "tp", "fp", "tn", "fn", "precision", "recall")), global_step=step, num_thresholds=self.pr.bins)
        for key, dsm, masks, probs in self.panels:
            for k, t in enumerate(self.thresholds_m):
                monitor.log_image(f"{prefix}_panel/{key}_{threshold_tag(t)}",
                                  prediction_panel(dsm, masks[k], probs[k]), step)
        monitor.flush()


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _site_cell(metrics: dict, tag: str) -> str:
    """'IoU (precision / recall)' at one threshold tag."""
    return f"{_fmt(metrics[f'iou_{tag}'])} ({_fmt(metrics[f'precision_{tag}'])} / {_fmt(metrics[f'recall_{tag}'])})"


def report_markdown(report: dict) -> str:
    """The report as Markdown tables (also what evaluate.py prints): main, per site, gap sizes, confusion."""
    tags = [threshold_tag(t) for t in report["thresholds_m"]]
    methods = report["methods"]
    main = [[name, tag] + [_fmt(body["metrics"][f"{key}_{tag}"]) for key in TABLE_KEYS]
            for name, body in methods.items() for tag in tags + ["mean"]]
    sites = sorted({s for body in methods.values() for s in body["per_site"]})
    per_site = [[site, name] + [_site_cell(body["per_site"][site], tag) for tag in tags + ["mean"]]
                for site in sites for name, body in methods.items() if site in body["per_site"]]
    sizes = [[name, tag] + [f"{_fmt(c['pixel_recall'])} ({c['gaps_found']}/{c['gaps']})"
                            for c in body["size_classes"][tag].values()]
             for name, body in methods.items() for tag in tags]
    confusion = [[tag] + [str(v) for row in methods["model"]["confusion"][tag] for v in row] for tag in tags]
    bounds = report["size_classes_m2"]
    return "\n\n".join([
        f"# Evaluation: {report.get('checkpoint', '')}",
        f"split **{report.get('split', '')}**, {report['tiles']} tiles, thresholds {tags}, "
        f"TTA {'on' if report['tta'] else 'off'}. Baselines: all-canopy, random at the train gap rate "
        f"{ {t: round(r, 4) for t, r in report['random_gap_rates'].items()} }, classical DSM-only "
        f"(opening window {report['classical_window_m']:g} m).",
        f"Micro metrics sum the pixel counts of all tiles; tile_iou / tile_f1 average per-tile scores. "
        f"Empty tiles: {report['empty_tile_policy']}.",
        "## Metrics per threshold\n\n" + _table(["method", "threshold", *TABLE_KEYS], main),
        "## IoU per site (precision / recall)\n\nPrecision below recall: the method over-predicts gaps at that "
        "site; above: it under-predicts them.\n\n" + _table(["site", "method", *tags, "mean"], per_site),
        f"## Recall per gap-size class\n\npixel recall (gaps found / gaps; found = at least half its pixels "
        f"predicted). Classes: small {bounds['small']} m², medium {bounds['medium']} m², large "
        f"{bounds['large']} m²; gap areas are components of the target tile (gaps cut by the tile border "
        f"are measured inside the tile).\n\n" + _table(["method", "threshold", *SIZE_CLASSES], sizes),
        "## Model confusion matrices (pixels)\n\n" + _table(["threshold", "TN", "FP", "FN", "TP"], confusion),
        "## Model average precision\n\n" + _table(tags, [[_fmt(report["model_average_precision"][t]) for t in tags]]),
    ]) + "\n"
