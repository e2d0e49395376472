"""Wire a training run from a config: data, normalisation, task, model, loss, optimiser, schedule,
callbacks, monitoring, resume and DDP. `train_model(cfg) -> run_dir` is the notebook entry point.
"""
import json
import logging
import os
from pathlib import Path

import torch

from lib.train.callbacks import EarlyStopping, GradientMonitor, ModelCheckpoint, NonFiniteGuard, Profiler, ProgressBar
from lib.train.checkpoint import load_checkpoint, resume_trainer, seed_everything
from lib.core.config import build_config, config_to_dict, save_config
from lib.data.dataset import ShardDataset, build_loader, calibrate_loader
from lib.train.distributed import cleanup_distributed, init_distributed
from lib.train.ema import ModelEMA
from lib.core.env import default_workers, select_device
from lib.core.errors import ConfigError, DataError, ModelError, TrainingError
from lib.train.losses import build_loss
from lib.models import build_model, model_summary
from lib.data.normalize import relative_height_channels
from lib.train.monitor import MonitorCallback, MonitoringSystem
from lib.data.bands import normalizer_from_stats
from lib.train.optimizers import build_optimizer
from lib.train.regularization import AdaptiveRegularization, build_regularization
from lib.train.schedulers import ReduceOnPlateau, build_schedule
from lib.data.shards import manifest_digest, read_manifest
from lib.train.tasks import build_task
from lib.train.trainer import Trainer

log = logging.getLogger(__name__)


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.output_root) / cfg.run.name


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """'auto' -> the run's last.ckpt when it exists (else a fresh start); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        last = run_dir / "last.ckpt"
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise ModelError(f"--resume {resume}: no such checkpoint")
    return path


def build_data(cfg, manifest_dir: Path, device, arrays=("dsm", "chm", "mask_*"), meta_keys=("site",)):
    """(train loader factory, val loader, train batches per epoch) for the run's dataset (the task's arrays).

    Under DDP the train set already holds this rank's share, so the batch count is per rank: the one figure
    the schedule's length is computed from (dividing it by the world size again would halve the schedule).
    """
    workers = default_workers(cfg.data.workers)
    pin = device.type == "cuda"
    train_set = ShardDataset(manifest_dir, "train", seed=cfg.run.seed, shuffle=True, arrays=arrays,
                             meta_keys=meta_keys, buffer_size=cfg.data.shuffle_buffer, cache=cfg.data.cache)
    if len(train_set) < cfg.train.batch_size:  # drop_last: not one step would run, and nothing would say so
        raise DataError(f"{manifest_dir}: the train split has {len(train_set)} tile(s) per process, fewer than "
                        f"one batch (train.batch_size {cfg.train.batch_size}): no training step would run",
                        hint=f"--train.batch_size={max(1, len(train_set))}, or more tiles (smaller "
                             "data.tile_px and data.stride_px, more sites)")
    val_set = ShardDataset(manifest_dir, "val", seed=cfg.run.seed, shuffle=False, cache=cfg.data.cache,
                           arrays=arrays, meta_keys=meta_keys, equal_counts=False)
    prefetch = None
    if cfg.data.calibrate:
        best = calibrate_loader(train_set, cfg.train.batch_size, max_workers=default_workers(-1))
        workers, prefetch = best["workers"], best["prefetch_factor"]
        log.info("loader calibration chose %s (samples/s: %s); set data.workers and data.calibrate=false to "
                 "skip it", _loader_setting(workers, prefetch), ", ".join(
                     f"{_loader_setting(t['workers'], t['prefetch_factor'])} {t['samples_per_s']:.0f}"
                     for t in best["trials"]))
    train_loader = build_loader(train_set, cfg.train.batch_size, workers, pin_memory=pin, drop_last=True,
                                prefetch_factor=prefetch)
    val_loader = build_loader(val_set, cfg.eval.batch_size, workers, pin_memory=pin)

    def train_loader_fn(epoch: int):
        train_set.set_epoch(epoch)
        return train_loader
    return train_loader_fn, val_loader, len(train_loader)


def _loader_setting(workers: int, prefetch) -> str:
    return f"{workers} workers, prefetch {prefetch}" if workers else "0 workers (the main process loads)"


def build_callbacks(cfg, run_dir: Path, monitor, is_main: bool, regularization=None) -> list:
    t = cfg.train
    callbacks = [NonFiniteGuard(), EarlyStopping(t.monitor, t.monitor_mode, t.early_stopping_patience),
                 ModelCheckpoint(run_dir, t.monitor, t.monitor_mode, every_steps=t.checkpoint_every_steps)]
    if t.adaptive_regularization and regularization is not None:
        callbacks.append(AdaptiveRegularization(regularization, t.regularization_factor))
    if is_main:
        callbacks.append(ProgressBar(cfg.log.progress_every_steps))
    if is_main and t.profile_steps:
        callbacks.append(Profiler(run_dir / "profile", t.profile_steps))
    if monitor is not None:
        callbacks.append(MonitorCallback(monitor, cfg.log.progress_every_steps, cfg.log.images_every_epochs))
    if monitor is not None and cfg.log.grad_norms_every_steps:
        callbacks.append(GradientMonitor(cfg.log.grad_norms_every_steps, cfg.log.grad_vanishing_norm,
                                         cfg.log.grad_exploding_norm))
    return callbacks


def train_model(cfg, resume: str | None = None, init_from: str | None = None) -> Path:
    """Train from a validated Config; returns the run directory (best.ckpt, last.ckpt, metrics.jsonl, tb/)."""
    device = select_device(cfg.run.device)
    rank, world = init_distributed(device)
    try:
        return _train(cfg, device, rank, world, resume, init_from)
    finally:
        cleanup_distributed()


def _train(cfg, device, rank, world, resume, init_from) -> Path:
    run_dir = run_dir_of(cfg)
    seed_everything(cfg.run.seed)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before its first use
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    trainer = build_trainer(cfg, device, rank, world, init_from)
    cfg = trainer.cfg  # with the dataset's thresholds, tile size and pixel size
    if rank == 0:
        log.info(describe_model(trainer.raw_model, cfg))
    checkpoint = resolve_resume(resume, run_dir)
    if checkpoint:
        resume_trainer(trainer, checkpoint, map_location=device)
        log.info("resumed from %s at epoch %d, step %d", checkpoint, trainer.epoch, trainer.step)
    if rank == 0:
        save_config(cfg, run_dir / "config.json")
    try:
        trainer.fit()
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not out_of_memory(exc):
            raise
        raise oom_error(cfg, device, trainer.step) from None
    return run_dir


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocator failure on another device (MPS, CPU)."""
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def oom_error(cfg, device, step: int) -> TrainingError:
    """What to do about an out-of-memory: the batch sizes in play and the batch-size finder."""
    return TrainingError(
        f"out of memory on {device} at step {step} with train.batch_size={cfg.train.batch_size} "
        f"(eval.batch_size={cfg.eval.batch_size} in validation); the checkpoints on disk are unchanged",
        hint="lower --train.batch_size (raise --optim.accumulate_steps to keep the effective batch), or find the "
             "largest batch that fits with the batch-size finder: python sanity_check.py --config <this config>")


def build_trainer(cfg, device, rank: int = 0, world: int = 1, init_from: str | None = None,
                  callbacks: list | None = None) -> Trainer:
    """The one wiring path: data, task, model, loss, optimiser, schedule -> a Trainer, not fitted.

    callbacks=None gives the run's standard callbacks and monitoring (which write into the run
    directory); a list (e.g. [] for the LR finder and sanity checks) replaces them and writes nothing.
    """
    run_dir = run_dir_of(cfg)
    is_main = rank == 0
    manifest = read_manifest(cfg.data.root)
    cfg = with_dataset_values(cfg, manifest, log.warning if is_main else None)
    normalizer = normalizer_from_stats(manifest["normalization"], cfg.data).to(device)
    task = build_task(cfg, normalizer, manifest, rank)
    train_loader_fn, val_loader, batches = build_data(cfg, Path(cfg.data.root), device, task.arrays, task.meta_keys)
    num_classes = len(manifest.get("class_names", [])) or None
    raw_model = build_model(cfg.model, task=cfg.data.task, in_channels=normalizer.out_channels,
                            num_classes=num_classes, batch_size=cfg.train.batch_size,
                            prior_channels=relative_height_channels(cfg.data.input_features)).to(device)
    if init_from:
        _init_from(raw_model, init_from)
    if cfg.train.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    if cfg.train.sync_batchnorm and world > 1:
        if device.type != "cuda":
            raise ConfigError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU "
                              "kernel)", hint="set --train.sync_batchnorm=false for CPU/gloo runs")
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    criterion = build_loss(cfg.loss, task=cfg.data.task, num_thresholds=len(task.thresholds_m),
                           num_classes=num_classes).to(device)
    optimizer = build_optimizer(cfg.optim, raw_model, extra_params=criterion.parameters())
    regularization = build_regularization(cfg, raw_model, optimizer)
    total = cfg.train.max_steps or cfg.train.epochs * max(1, batches // cfg.optim.accumulate_steps)
    schedule = build_schedule(cfg.schedule, cfg.optim.lr, total, monitor_mode=cfg.train.monitor_mode)
    plateau = schedule if isinstance(schedule, ReduceOnPlateau) else None
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = MonitoringSystem(run_dir, cfg.log.tensorboard) if is_main and callbacks is None else None
    if callbacks is None:
        callbacks = build_callbacks(cfg, run_dir, monitor, is_main, regularization)
        if is_main:
            log.info(regularization.describe())
    from lib.data.augment import build_augment
    augment = build_augment(cfg.augment, cfg.data.task, seed=cfg.run.seed + rank, device=device)
    ema = ModelEMA(raw_model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    return Trainer(cfg, raw_model, model, task, criterion, optimizer, schedule, train_loader_fn, val_loader,
                   device, run_dir, callbacks, monitor, augment, ema, plateau,
                   version={"dataset_manifest": manifest_digest(manifest)})


def with_dataset_values(cfg, manifest: dict, warn=None):
    """cfg with the dataset's thresholds, tile size and pixel size: the run records what it trains on, and
    predict.py maps a checkpoint's thresholds, with windows of its tile size, at its pixel size."""
    changed = {key: manifest[key] for key in ("thresholds_m", "tile_px", "pixel_size_m")
               if key in manifest and manifest[key] != getattr(cfg.data, key)}
    if not changed:
        return cfg
    if warn:
        warn("the dataset in %s was prepared with %s; the config says %s: the dataset's values are used and "
             "recorded", cfg.data.root, ", ".join(f"data.{k}={v}" for k, v in changed.items()),
             ", ".join(f"{k}={getattr(cfg.data, k)}" for k in changed))
    return build_config(config_to_dict(cfg), [f"data.{k}={json.dumps(v)}" for k, v in changed.items()],
                        source=f"{cfg.data.root}/manifest.json")


def describe_model(model, cfg) -> str:
    """Parameters and forward FLOPs of one tile, for the start of a run."""
    px = cfg.data.tile_px
    info = model_summary(model, (px, px))
    return (f"model {cfg.model.name}: {info['params'] / 1e6:.3f} M parameters ({info['trainable'] / 1e6:.3f} M "
            f"trainable), {info['flops'] / 1e9:.3f} GFLOP per {px}x{px} tile forward (about 3x that to train)")


def _init_from(model: torch.nn.Module, path: str) -> None:
    """Transfer learning: copy matching weights from another run's checkpoint; report what did not fit."""
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if torch.is_tensor(v) and k in own and own[k].shape == v.shape}
    if not fit:
        raise ModelError(f"--init-from {path}: no weight matches this model ({len(state)} tensors in the file)")
    model.load_state_dict(fit, strict=False)
    log.info("initialised %d/%d tensors from %s", len(fit), len(own), path)
