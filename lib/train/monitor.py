"""MonitoringSystem: one place that writes TensorBoard events and `metrics.jsonl` with the same keys."""
import json
import resource
import time
import warnings
from pathlib import Path

import torch

from lib.core.atomic import write_text
from lib.train.callbacks import Callback


def process_memory_mb() -> dict[str, float]:
    """Peak RSS of this process and current GPU memory, in MB."""
    out = {"sys/rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/gpu_mem_mb"] = torch.cuda.memory_allocated() / 2 ** 20
        out["sys/gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Stretch finite values to [0, 1] (NaN -> 0) for display."""
    finite = torch.isfinite(x)
    if not finite.any():
        return torch.zeros_like(x)
    lo, hi = x[finite].min(), x[finite].max()
    return torch.where(finite, (x - lo) / (hi - lo).clamp_min(1e-6), torch.zeros_like(x))


def prediction_panel(dsm: torch.Tensor, target: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """(H, W) DSM, target (0/1/255), probability -> (3, H, 3W) RGB: DSM | target | prediction.

    Ignored pixels are shown in red so nodata is visible.
    """
    grey = _unit_range(dsm.float().cpu())
    t = target.cpu()
    ignore = t == 255
    tgt = torch.where(ignore, torch.zeros_like(grey), t.float())
    pred = prob.float().cpu().clamp(0, 1)
    rgb = []
    for img in (grey, tgt, pred):
        r = torch.where(ignore, torch.ones_like(img), img)
        rgb.append(torch.stack([r, img, img]))
    return torch.cat(rgb, dim=2)


def class_panel(images: torch.Tensor, correct: torch.Tensor, border_px: int = 2) -> torch.Tensor:
    """Tiles (N, C, H, W) -> (3, H, N*W) RGB of their first band, each framed green when its class was
    predicted right and red when wrong."""
    grey = torch.stack([_unit_range(tile[0].float().cpu()) for tile in images])   # (N, H, W)
    rgb = grey[:, None].repeat(1, 3, 1, 1)                                          # (N, 3, H, W)
    frame = torch.ones_like(grey, dtype=torch.bool)
    frame[:, border_px:-border_px, border_px:-border_px] = False
    colour = torch.where(correct.cpu().view(-1, 1), torch.tensor([0.0, 0.8, 0.0]), torch.tensor([0.9, 0.0, 0.0]))
    rgb = torch.where(frame[:, None], colour.view(-1, 3, 1, 1), rgb)
    return torch.cat(list(rgb), dim=2)


class MonitoringSystem:
    """TensorBoard (optional) + append-only metrics.jsonl in the run directory; rank 0 only."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.lines = 0  # lines of metrics.jsonl this run stands on; checkpoints record it
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def truncate(self, lines: int | None) -> None:
        """Keep the first `lines` lines: on resume, those the checkpoint had seen (the rest is logged again).

        A count, not a step: validation logs at the step of a mid-epoch checkpoint, after it was written.
        """
        if not self.jsonl.exists():
            return
        kept = self.jsonl.read_text().splitlines(keepends=True)[:lines]
        write_text(self.jsonl, "".join(kept))
        self.lines = len(kept)

    def log_scalars(self, values: dict[str, float], step: int, epoch: int | None = None) -> None:
        record = {"step": step, **({"epoch": epoch} if epoch is not None else {})}
        for key, value in values.items():
            value = float(value)
            record[key] = value
            if self.writer:
                self.writer.add_scalar(key, value, step)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, text.replace("\n", "  \n"), step)

    def log_config(self, cfg_dict: dict) -> None:
        self.log_text("config", "```\n" + json.dumps(cfg_dict, indent=2) + "\n```")

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image (3, H, W) float in [0, 1]."""
        if self.writer:
            self.writer.add_image(tag, image.clamp(0, 1), step)

    def log_histograms(self, model: torch.nn.Module, step: int) -> None:
        if not self.writer:
            return
        for name, p in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)

    def log_graph(self, model: torch.nn.Module, inputs) -> None:
        if not self.writer:
            return
        try:
            with warnings.catch_warnings():  # tracing warns about every shape check, and is deprecated
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                self.writer.add_graph(model, inputs)
        except Exception as exc:  # tracing can fail on data-dependent control flow; the graph is optional
            self.log_text("graph_error", f"model graph not logged: {exc}")

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()},
                                    run_name="hparams")

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None


class MonitorCallback(Callback):
    """Train scalars every N steps, validation metrics, prediction panels, histograms and HParams."""

    order = 80

    def __init__(self, monitor: MonitoringSystem, every_steps: int = 20, images_every_epochs: int = 5):
        self.monitor, self.every_steps, self.images_every = monitor, every_steps, images_every_epochs
        self.panel_batch, self.t_last, self.samples = None, None, 0
        self.resume_lines = 0  # from the checkpoint: metrics.jsonl lines written before it
        self.histograms_due = False

    def state_dict(self):
        return {"jsonl_lines": self.monitor.lines}

    def load_state_dict(self, state):
        self.resume_lines = state.get("jsonl_lines")  # None (older checkpoints): keep every line

    def on_train_begin(self, trainer):
        from lib.core.config import config_to_dict
        self.monitor.log_config(config_to_dict(trainer.cfg))
        self.monitor.truncate(self.resume_lines)
        self.t_last = time.perf_counter()
        if trainer.step == 0:
            self._log_graph(trainer)
        if self.images_every:
            self.panel_batch = next(iter(trainer.val_loader), None)

    @torch.no_grad()
    def _log_graph(self, trainer):
        """Trace the raw model once, in eval mode: no BatchNorm update and no RNG draw, so logging it
        changes nothing in the run."""
        model, px = trainer.raw_model, trainer.cfg.data.tile_px
        x = torch.zeros(1, model.build_kwargs["in_channels"], px, px, device=trainer.device)  # (1, C, H, W)
        model.eval()
        self.monitor.log_graph(model, (x, torch.zeros(1, device=trainer.device)))
        model.train()

    def on_epoch_begin(self, trainer):
        self.histograms_due = bool(self.images_every) and trainer.epoch % self.images_every == 0

    def on_before_optimizer_step(self, trainer):
        # once per due epoch, here where the (unscaled) gradients exist: after the step they are gone
        if self.histograms_due:
            self.monitor.log_histograms(trainer.raw_model, trainer.step)
            self.histograms_due = False

    def on_batch_end(self, trainer, logs):
        self.samples += logs.get("batch_size", 0)
        if not logs.get("optimizer_step") or trainer.step % self.every_steps:
            return
        now = time.perf_counter()
        values = {f"train/{k}": logs[k] for k in ("loss", "lr", "grad_norm", "data_wait_fraction") if k in logs}
        values["train/samples_per_s"] = self.samples / max(now - self.t_last, 1e-9)
        values.update(process_memory_mb())
        self.monitor.log_scalars(values, trainer.step, trainer.epoch)
        self.t_last, self.samples = now, 0

    def on_validation_end(self, trainer, metrics):
        self.monitor.log_scalars(metrics, trainer.step, trainer.epoch)
        if self.images_every and (trainer.epoch + 1) % self.images_every == 0 and self.panel_batch is not None:
            self._log_panels(trainer)
        self.monitor.flush()

    @torch.no_grad()
    def _log_panels(self, trainer, max_tiles: int = 4):
        task = trainer.task
        max_tiles = 2 * max_tiles if task.name == "classification" else max_tiles   # a tile is a small image
        batch = {k: v[:max_tiles].to(trainer.device) if torch.is_tensor(v) else v
                 for k, v in self.panel_batch.items()}
        model = trainer.ema.module if trainer.ema else trainer.raw_model
        model.eval()
        if task.name == "classification":
            self._log_class_panel(trainer, model, batch)
            trainer.model.train()
            return
        x, t, target, t_idx = task.eval_inputs(batch)
        scores, masks, _ = task.gap_logits(task.output(model(x, t).float()), target, t_idx, batch)
        prob = torch.sigmoid(scores)  # (tiles * K, 1, H, W), row = tile * K + threshold
        k = len(task.thresholds_m)
        from lib.gaps.masks import threshold_tag
        for row in range(prob.shape[0]):
            tile, ti = divmod(row, k)
            tag = threshold_tag(task.thresholds_m[ti])
            panel = prediction_panel(batch["dsm"][tile, 0], masks[row, 0], prob[row, 0])
            self.monitor.log_image(f"val_panel/tile{tile}_{tag}", panel, trainer.step)
        for name, amap in (getattr(model, "attention_maps", None) or {}).items():
            self.monitor.log_image(f"attention/{name}", _unit_range(amap[0, :1].float().cpu()).expand(3, -1, -1),
                                   trainer.step)
        trainer.model.train()

    def _log_class_panel(self, trainer, model, batch: dict) -> None:
        """The tiles framed by right/wrong, and their true and predicted classes as text (evaluate.py logs
        the confusion matrix of whole splits)."""
        x, t, target, _ = trainer.task.eval_inputs(batch)
        prob = torch.softmax(model(x, t).float(), dim=1)                   # (N, classes)
        confidence, pred = prob.max(1)
        names = trainer.task.class_names
        self.monitor.log_image("val_panel/tiles", class_panel(batch["image"], pred == target), trainer.step)
        lines = [f"tile {i}: true {names[a]}, predicted {names[b]} ({p:.2f})"
                 for i, (a, b, p) in enumerate(zip(target.tolist(), pred.tolist(), confidence.tolist()))]
        self.monitor.log_text("val_panel/classes", "\n".join(lines), trainer.step)

    def on_train_end(self, trainer):
        hp = {"model": trainer.cfg.model.name, "lr": trainer.cfg.optim.lr,
              "batch_size": trainer.cfg.train.batch_size, "optimizer": trainer.cfg.optim.name}
        final = {k: v for k, v in trainer.last_metrics.items()
                 if k.endswith("_mean") or k in ("val/loss", "val/accuracy", "val/macro_f1")}
        self.monitor.log_hparams(hp, final)
        self.monitor.close()
