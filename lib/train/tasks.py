"""What a batch means for each task: model inputs, target, per-sample threshold, output units and metrics.

The trainer knows only this interface (it never names a concrete task):
    x, t, target, t_idx = task.train_inputs(batch) / task.eval_inputs(batch)
    pred = task.output(model(x, t))                  # what the loss and the metrics compare with target
    metrics = task.metrics(device); task.update_metrics(metrics, pred, target, t_idx, batch)
    scores, masks, rows_t_idx = task.gap_logits(pred, target, t_idx, batch)   # every tile at every threshold
Segmentation draws one threshold PER SAMPLE (never one per batch), so loss weights and metrics follow
each sample's own threshold. Regression predicts the CHM once per tile; its gaps at threshold T are the
pixels it predicts at or below T, scored with the same gap metrics as segmentation. Classification
maps a tile to class logits (one forward per tile, no threshold) and has no gap maps.
"""
import torch

from lib.core.errors import ConfigError
from lib.gaps.masks import IGNORE
from lib.train.metrics import ClassificationMetrics, RegressionMetrics, SegmentationMetrics


class Task:
    """Shared parts: thresholds, and gap metrics updated from `gap_logits`."""

    name = "task"
    arrays, meta_keys = ("dsm", "chm", "mask_*"), ("site",)  # what ShardDataset reads for this task

    def __init__(self, thresholds_m: list[float], normalizer):
        self.thresholds_m = list(thresholds_m)
        self.normalizer = normalizer

    def thresholds_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.thresholds_m, dtype=torch.float32, device=device)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's raw output in the units the loss and the metrics use (identity by default)."""
        return raw

    def metrics(self, device):
        return SegmentationMetrics(self.thresholds_m, device=device)

    def update_metrics(self, metrics, pred, target, t_idx, batch: dict) -> None:
        metrics.update(*self.gap_logits(pred, target, t_idx, batch))


class SegmentationTask(Task):
    """Threshold-conditioned gap segmentation: (DSM, T) -> logits of the gap mask at T."""

    name = "segmentation"

    def __init__(self, thresholds_m: list[float], normalizer, sampling: str = "uniform",
                 gap_fractions: list[float] | None = None, seed: int = 0, threshold_range_m=(1.0, 30.0)):
        super().__init__(thresholds_m, normalizer)
        self.range_m = tuple(threshold_range_m) if sampling.startswith("continuous") else None
        self.log_sampling = sampling == "continuous_log"
        self.weights = self._sampling_weights("uniform" if self.range_m else sampling, gap_fractions)
        self.generator = torch.Generator().manual_seed(seed + 7)

    def _sampling_weights(self, sampling: str, gap_fractions) -> torch.Tensor:
        k = len(self.thresholds_m)
        if sampling == "uniform" or not gap_fractions:
            return torch.full((k,), 1.0 / k)
        if sampling == "rare":
            # Rarer thresholds (smaller gap fraction) are drawn more often: weight ∝ 1/sqrt(fraction).
            w = torch.tensor(gap_fractions, dtype=torch.float64).clamp_min(1e-4).rsqrt()
            return (w / w.sum()).float()
        raise ConfigError(f"train.threshold_sampling {sampling!r} is not one of uniform, rare, continuous")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def train_inputs(self, batch: dict):
        """-> x (B,C,H,W), t_norm (B,), target (B,1,H,W) uint8, t_idx (B,) long."""
        if self.range_m:
            return self._continuous_inputs(batch)
        masks = batch["masks"]  # (B, K, H, W) uint8
        b = masks.shape[0]
        t_idx = torch.multinomial(self.weights, b, replacement=True, generator=self.generator)
        t_idx = t_idx.to(masks.device)
        target = masks.gather(1, t_idx.view(b, 1, 1, 1).expand(b, 1, *masks.shape[2:]))
        x = self.normalizer(batch["dsm"])
        t_m = self.thresholds_tensor(masks.device)[t_idx]
        return x, self.normalizer.normalise_threshold(t_m), target, t_idx

    def _continuous_inputs(self, batch: dict):
        """T ~ U(threshold_range_m) (or log T ~ U(log range)) per sample; target = CHM <= T, IGNORE where the
        CHM or the stored masks are nodata. No area filter (prepare the data with min_area_m2 <= one pixel).
        t_idx: the listed threshold nearest to T, for per-threshold loss weights."""
        chm, masks = batch["chm"], batch["masks"]  # (B, 1, H, W) metres, (B, K, H, W) uint8
        b, (lo, hi) = chm.shape[0], self.range_m
        u = torch.rand(b, generator=self.generator)
        t_m = (lo * (hi / lo) ** u if self.log_sampling else lo + (hi - lo) * u).to(chm.device)  # (B,)
        valid = torch.isfinite(chm) & (masks[:, :1] != IGNORE)
        target = torch.where(valid, (chm <= t_m.view(b, 1, 1, 1)).to(torch.uint8), IGNORE)
        listed = self.thresholds_tensor(chm.device)
        t_idx = torch.bucketize(t_m, (listed[1:] + listed[:-1]) / 2)
        return self.normalizer(batch["dsm"]), self.normalizer.normalise_threshold(t_m), target, t_idx

    def eval_inputs(self, batch: dict):
        """Every tile at every threshold: B tiles -> B*K rows, tile-major (row = b*K + k)."""
        masks = batch["masks"]
        b, k = masks.shape[:2]
        x = self.normalizer(batch["dsm"]).repeat_interleave(k, dim=0)
        t_idx = torch.arange(k, device=masks.device).repeat(b)
        target = masks.reshape(b * k, 1, *masks.shape[2:])
        t_m = self.thresholds_tensor(masks.device)[t_idx]
        return x, self.normalizer.normalise_threshold(t_m), target, t_idx

    def gap_logits(self, pred, target, t_idx, batch: dict):
        """Eval rows are already (tile, threshold) pairs: (logits, masks, t_idx), each (B*K, 1, H, W) / (B*K,)."""
        return pred, target, t_idx


class RegressionTask(Task):
    """CHM regression: DSM -> canopy height in metres (NaN target = nodata), one forward per tile.

    The network's output is in units of the normalisation scale (the inputs' units), so `output`
    multiplies by it: the loss (masked L1/Huber) and MAE/RMSE/R² are in metres. The threshold input is
    a constant 0: a FiLM model ignores it.
    """

    name = "regression"

    def _inputs(self, batch: dict):
        """-> x (B,C,H,W), t (B,) zeros, target CHM (B,1,H,W) metres, t_idx None."""
        dsm = batch["dsm"]
        return self.normalizer(dsm), dsm.new_zeros(dsm.shape[0]), batch["chm"], None

    train_inputs = eval_inputs = _inputs

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.normalizer.scale

    def gap_logits(self, pred, target, t_idx, batch: dict):
        """Gap at T where predicted CHM <= T: score T - CHM (metres, used as a logit; > 0 means gap).

        pred (B,1,H,W) metres, batch["masks"] (B,K,H,W) -> rows (B*K, 1, H, W), row = b*K + k.
        Pixel-wise: unlike the masks, no gap-area filter is applied to the prediction.
        """
        masks = batch["masks"]
        b, k = masks.shape[:2]
        scores = self.thresholds_tensor(pred.device).view(1, k, 1, 1) - pred  # (B, K, H, W)
        rows = (b * k, 1, *masks.shape[2:])
        return scores.reshape(rows), masks.reshape(rows), torch.arange(k, device=masks.device).repeat(b)

    def metrics(self, device):
        return HeightMetrics(self.thresholds_m, device)

    def update_metrics(self, metrics, pred, target, t_idx, batch: dict) -> None:
        metrics.gaps.update(*self.gap_logits(pred, target, t_idx, batch))
        metrics.heights.update(pred, target)


class HeightMetrics:
    """Gap metrics at every threshold plus MAE/RMSE/bias/R² of heights; both sums of counts (DDP-exact)."""

    def __init__(self, thresholds_m: list[float], device="cpu"):
        self.gaps = SegmentationMetrics(thresholds_m, device=device)
        self.heights = RegressionMetrics(device=device)

    def all_reduce(self) -> None:
        self.gaps.all_reduce()
        self.heights.all_reduce()

    def compute(self) -> dict[str, float]:
        return {**self.gaps.compute(), **self.heights.compute()}


def topk_of(num_classes: int) -> int:
    """The k of the reported top-k accuracy: 5, or half the classes when fewer (top-k of most classes says little)."""
    return min(5, num_classes // 2)


class ClassificationTask(Task):
    """Tile classification: image (B, C, H, W) -> (B, num_classes) logits; one forward per tile, no threshold.

    Batches hold "image" (B, C, H, W) and "label" (B,) from the json (ShardDataset arrays/meta_keys below).
    """

    name = "classification"
    arrays, meta_keys = ("image",), ("label",)

    def __init__(self, class_names: list[str], normalizer):
        super().__init__([], normalizer)
        self.class_names = list(class_names)

    def state_dict(self) -> dict:
        """The class names travel in every checkpoint, so inference and export need no dataset."""
        return {"class_names": self.class_names}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("class_names", self.class_names)  # older checkpoints hold none
        if saved != self.class_names:
            raise ConfigError(f"the checkpoint was trained on classes {saved}, the dataset lists {self.class_names}",
                              hint="resume on the dataset the run was trained on (data.root)")

    def _inputs(self, batch: dict):
        """-> x (B,C,H,W), t (B,) zeros, target (B,) long, t_idx None."""
        image = batch["image"]
        return self.normalizer(image), image.new_zeros(image.shape[0]), batch["label"].long(), None

    train_inputs = eval_inputs = _inputs

    def metrics(self, device):
        c = len(self.class_names)
        return ClassificationMetrics(c, self.class_names, (1, topk_of(c)), device=device)

    def update_metrics(self, metrics, pred, target, t_idx, batch: dict) -> None:
        metrics.update(pred, target)

    def gap_logits(self, pred, target, t_idx, batch: dict):
        raise ConfigError("task 'classification' predicts tile classes, not gap maps",
                          hint="set --log.images_every_epochs=0 (gap panels) for classification runs")


def build_task(cfg, normalizer, manifest: dict, rank: int = 0):
    """The task object for cfg.data.task, using the dataset's thresholds, class balance or class names."""
    task = _build_task(cfg, normalizer, manifest, rank)
    if getattr(normalizer, "needs_ground", False):  # filtered_height: the site's ground, stored by prepare_data
        task.arrays = (*task.arrays, "ground")
    return task


def _build_task(cfg, normalizer, manifest: dict, rank: int):
    name = cfg.data.task
    thresholds = manifest.get("thresholds_m", cfg.data.thresholds_m)
    if name == "regression":
        return RegressionTask(thresholds, normalizer)
    if name == "classification":
        if not manifest.get("class_names"):
            raise ConfigError(f"data.task is 'classification' but the dataset in {cfg.data.root} lists no "
                              f"class_names (found task {manifest.get('task')!r})",
                              hint="prepare it with --data.task=classification")
        return ClassificationTask(manifest["class_names"], normalizer)
    if name != "segmentation":
        raise ConfigError(f"data.task {name!r} is not supported; valid: classification, regression, segmentation")
    train = manifest.get("summary", {}).get("train", {}).get("gap_fraction", {})
    fractions = list(train.values()) if len(train) == len(thresholds) else None
    # each rank its own threshold draws (rank 0 keeps the single-process sequence)
    return SegmentationTask(thresholds, normalizer, cfg.train.threshold_sampling, fractions, cfg.run.seed + rank,
                            cfg.train.threshold_range_m)
