"""What a batch means for each task: model inputs, target and per-sample threshold, for training and evaluation.

The trainer knows only this interface; segmentation draws one threshold PER SAMPLE (never one per batch),
so loss weights and metrics follow each sample's own threshold.
"""
import torch

from lib.errors import ConfigError


class SegmentationTask:
    """Threshold-conditioned gap segmentation: (DSM, T) -> logits of the gap mask at T."""

    name = "segmentation"

    def __init__(self, thresholds_m: list[float], normalizer, sampling: str = "uniform",
                 gap_fractions: list[float] | None = None, seed: int = 0):
        self.thresholds_m = list(thresholds_m)
        self.normalizer = normalizer
        self.weights = self._sampling_weights(sampling, gap_fractions)
        self.generator = torch.Generator().manual_seed(seed + 7)

    def _sampling_weights(self, sampling: str, gap_fractions) -> torch.Tensor:
        k = len(self.thresholds_m)
        if sampling == "uniform" or not gap_fractions:
            return torch.full((k,), 1.0 / k)
        if sampling == "rare":
            # Rarer thresholds (smaller gap fraction) are drawn more often: weight ∝ 1/sqrt(fraction).
            w = torch.tensor(gap_fractions, dtype=torch.float64).clamp_min(1e-4).rsqrt()
            return (w / w.sum()).float()
        raise ConfigError(f"train.threshold_sampling {sampling!r} is not one of uniform, rare")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def thresholds_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.thresholds_m, dtype=torch.float32, device=device)

    def train_inputs(self, batch: dict):
        """-> x (B,C,H,W), t_norm (B,), target (B,1,H,W) uint8, t_idx (B,) long."""
        masks = batch["masks"]  # (B, K, H, W) uint8
        b = masks.shape[0]
        t_idx = torch.multinomial(self.weights, b, replacement=True, generator=self.generator)
        t_idx = t_idx.to(masks.device)
        target = masks.gather(1, t_idx.view(b, 1, 1, 1).expand(b, 1, *masks.shape[2:]))
        x = self.normalizer(batch["dsm"])
        t_m = self.thresholds_tensor(masks.device)[t_idx]
        return x, self.normalizer.normalise_threshold(t_m), target, t_idx

    def eval_inputs(self, batch: dict):
        """Every tile at every threshold: B tiles -> B*K rows, tile-major (row = b*K + k)."""
        masks = batch["masks"]
        b, k = masks.shape[:2]
        x = self.normalizer(batch["dsm"]).repeat_interleave(k, dim=0)
        t_idx = torch.arange(k, device=masks.device).repeat(b)
        target = masks.reshape(b * k, 1, *masks.shape[2:])
        t_m = self.thresholds_tensor(masks.device)[t_idx]
        return x, self.normalizer.normalise_threshold(t_m), target, t_idx


TASKS = {"segmentation": SegmentationTask}


def build_task(cfg, normalizer, manifest: dict):
    """The task object for cfg.data.task, using the dataset's thresholds and class balance."""
    name = cfg.data.task
    if name not in TASKS:
        raise ConfigError(f"data.task {name!r} is not supported yet; valid: {sorted(TASKS)}")
    thresholds = manifest.get("thresholds_m", cfg.data.thresholds_m)
    train = manifest.get("summary", {}).get("train", {}).get("gap_fraction", {})
    fractions = list(train.values()) if len(train) == len(thresholds) else None
    return SegmentationTask(thresholds, normalizer, cfg.train.threshold_sampling, fractions, cfg.run.seed)
