"""PNG panels of prepared tiles, so a user checks the pipeline by eye before training.

A train panel shows tiles AFTER the batch augmentation the trainer applies; a val panel shows them as
stored. Each row: the DSM hillshade with every threshold's gap outlines, then one mask per threshold
(white gap, black not gap, red nodata).
"""
from pathlib import Path

import numpy as np
import torch

from lib.data.augment import build_augment
from lib.data.dataset import ShardDataset
from lib.geoio.png import hillshade_quicklook, write_png

RED = np.array([200, 40, 40], np.uint8)


def _mask_rgb(mask: np.ndarray, side: int) -> np.ndarray:
    """(H, W) uint8 0/1/255 -> (side, side, 3) uint8, nearest-enlarged to the hillshade's size."""
    rgb = np.where(mask[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, axis=2)
    rgb[mask == 255] = RED
    zoom = max(1, side // mask.shape[0])
    return rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)


def tile_row(dsm: np.ndarray, masks: np.ndarray, pixel_size: float) -> np.ndarray:
    """One sample -> (h, (K+1) * w, 3): hillshade with outlines, then each threshold's mask."""
    shade = hillshade_quicklook(dsm, masks, pixel_size=pixel_size, min_side=4 * dsm.shape[0])
    side = shade.shape[0]
    panels = [shade] + [_mask_rgb(m, side)[:side, :shade.shape[1]] for m in masks]
    gap = np.full((side, 4, 3), 255, np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)


def _first_samples(dataset: ShardDataset, n: int) -> dict:
    """Stack the first n samples of a split into a batch dict of tensors."""
    samples = [s for _, s in zip(range(n), iter(dataset))]
    return {k: torch.stack([s[k] for s in samples]) for k in ("dsm", "chm", "masks")}


def write_previews(cfg, root: str | Path, out: str | Path, n: int = 4) -> list[Path]:
    """Write train (augmented) and val preview PNGs of up to n tiles each; returns their paths."""
    out = Path(out)
    paths = []
    for split, augmented in (("train", True), ("val", False)):
        dataset = ShardDataset(root, split, seed=cfg.run.seed, shuffle=False, meta_keys=())
        if len(dataset) == 0:
            continue
        batch = _first_samples(dataset, n)
        augment = build_augment(cfg.augment, cfg.data.task, seed=cfg.run.seed) if augmented else None
        if augment is not None:
            batch = augment(batch)
        rows = [tile_row(batch["dsm"][i, 0].numpy(), batch["masks"][i].numpy(), cfg.data.pixel_size_m)
                for i in range(batch["dsm"].shape[0])]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        path = out / f"preview_{split}{'_augmented' if augmented else ''}.png"
        write_png(path, np.concatenate(rows, axis=0))
        paths.append(path)
    return paths
