"""Wire a training run from a config: data, normalisation, task, model, loss, optimiser, schedule,
callbacks, monitoring, resume and DDP. `train_model(cfg) -> run_dir` is the notebook entry point.
"""
import logging
from pathlib import Path

import torch

from lib.callbacks import EarlyStopping, GradientMonitor, ModelCheckpoint, NonFiniteGuard, ProgressBar
from lib.checkpoint import load_checkpoint, seed_everything
from lib.config import save_config
from lib.data import ShardDataset, build_loader
from lib.distributed import cleanup_distributed, init_distributed
from lib.ema import ModelEMA
from lib.env import default_workers, select_device
from lib.errors import ModelError
from lib.losses import build_loss
from lib.models import build_model
from lib.monitor import MonitorCallback, MonitoringSystem
from lib.normalize import Normalizer
from lib.optimizers import build_optimizer
from lib.schedulers import ReduceOnPlateau, build_schedule
from lib.shards import read_manifest
from lib.tasks import build_task
from lib.trainer import Trainer, steps_per_epoch

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


def build_data(cfg, manifest_dir: Path, device):
    """(train loader factory, val loader, train sample count) for the run's dataset."""
    workers = default_workers(cfg.data.workers)
    pin = device.type == "cuda"
    train_set = ShardDataset(manifest_dir, "train", seed=cfg.run.seed, shuffle=True,
                             buffer_size=cfg.data.shuffle_buffer, cache=cfg.data.cache)
    val_set = ShardDataset(manifest_dir, "val", seed=cfg.run.seed, shuffle=False, cache=cfg.data.cache,
                           equal_counts=False)
    train_loader = build_loader(train_set, cfg.train.batch_size, workers, pin_memory=pin, drop_last=True)
    val_loader = build_loader(val_set, cfg.eval.batch_size, workers, pin_memory=pin)

    def train_loader_fn(epoch: int):
        train_set.set_epoch(epoch)
        return train_loader
    return train_loader_fn, val_loader, len(train_set)


def build_callbacks(cfg, run_dir: Path, monitor, is_main: bool) -> list:
    t = cfg.train
    callbacks = [NonFiniteGuard(), EarlyStopping(t.monitor, t.monitor_mode, t.early_stopping_patience),
                 ModelCheckpoint(run_dir, t.monitor, t.monitor_mode, every_steps=t.checkpoint_every_steps)]
    if is_main:
        callbacks.append(ProgressBar(cfg.log.progress_every_steps))
    if monitor is not None:
        callbacks += [MonitorCallback(monitor, cfg.log.progress_every_steps, cfg.log.images_every_epochs),
                      GradientMonitor(every_steps=max(cfg.log.progress_every_steps, 50))]
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
    is_main = rank == 0
    seed_everything(cfg.run.seed)
    if cfg.run.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    manifest = read_manifest(cfg.data.root)
    normalizer = Normalizer.from_stats(manifest["normalization"]).to(device)
    task = build_task(cfg, normalizer, manifest)
    train_loader_fn, val_loader, n_train = build_data(cfg, Path(cfg.data.root), device)
    raw_model = build_model(cfg.model, task=cfg.data.task, in_channels=normalizer.out_channels,
                            batch_size=cfg.train.batch_size).to(device)
    if init_from:
        _init_from(raw_model, init_from)
    if cfg.train.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    criterion = build_loss(cfg.loss, task=cfg.data.task, num_thresholds=len(task.thresholds_m)).to(device)
    optimizer = build_optimizer(cfg.optim, raw_model, extra_params=criterion.parameters())
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(
        n_train // world, cfg.train.batch_size, cfg.optim.accumulate_steps)
    schedule = build_schedule(cfg.schedule, cfg.optim.lr, total, monitor_mode=cfg.train.monitor_mode)
    plateau = schedule if isinstance(schedule, ReduceOnPlateau) else None
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = MonitoringSystem(run_dir, cfg.log.tensorboard) if is_main else None
    from lib.augment import build_augment
    augment = build_augment(cfg.augment, cfg.data.task, seed=cfg.run.seed + rank, device=device)
    ema = ModelEMA(raw_model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    trainer = Trainer(cfg, raw_model, model, task, criterion, optimizer, schedule, train_loader_fn, val_loader,
                      device, run_dir, build_callbacks(cfg, run_dir, monitor, is_main), monitor, augment, ema,
                      plateau, version={"dataset_manifest": manifest.get("sha256", "")})
    checkpoint = resolve_resume(resume, run_dir)
    if checkpoint:
        trainer.load_state_dict(load_checkpoint(checkpoint, map_location=device))
        log.info("resumed from %s at epoch %d, step %d", checkpoint, trainer.epoch, trainer.step)
    if is_main:
        save_config(cfg, run_dir / "config.json")
    trainer.fit()
    return run_dir


def _init_from(model: torch.nn.Module, path: str) -> None:
    """Transfer learning: copy matching weights from another run's checkpoint; report what did not fit."""
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if torch.is_tensor(v) and k in own and own[k].shape == v.shape}
    if not fit:
        raise ModelError(f"--init-from {path}: no weight matches this model ({len(state)} tensors in the file)")
    model.load_state_dict(fit, strict=False)
    log.info("initialised %d/%d tensors from %s", len(fit), len(own), path)
