"""Tasks: per-sample thresholds (segmentation), CHM regression scored with the gap metrics, brute-force checked."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from lib.train import runner
from lib.train.checkpoint import load_checkpoint
from lib.core.errors import ConfigError
from lib.gaps.masks import IGNORE
from lib.data.normalize import Normalizer
from lib.train.tasks import RegressionTask, SegmentationTask, build_task

THRESHOLDS = [2.0, 5.0, 10.0]


def _batch(b=5, k=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    chm = torch.rand(b, 1, h, w, generator=g) * 15                       # metres
    chm[0, 0, :2] = float("nan")                                         # nodata
    masks = (chm <= torch.tensor(THRESHOLDS[:k]).view(1, k, 1, 1)).to(torch.uint8)  # (B, K, H, W)
    masks[torch.isnan(chm).expand_as(masks)] = IGNORE
    dsm = 300 + torch.nan_to_num(chm, nan=0.0)
    dsm[torch.isnan(chm)] = float("nan")
    return {"dsm": dsm, "chm": chm, "masks": masks}


def test_segmentation_each_sample_gets_its_own_threshold():
    task = SegmentationTask(THRESHOLDS, Normalizer(scale=4.0), seed=3)
    batch = _batch(b=16)
    x, t, target, t_idx = task.train_inputs(batch)
    assert len(set(t_idx.tolist())) > 1                                  # a mixed batch
    for b in range(16):
        assert torch.equal(target[b, 0], batch["masks"][b, t_idx[b]])
        assert t[b] == pytest.approx(THRESHOLDS[t_idx[b]] / 4.0)


def test_segmentation_eval_rows_are_every_tile_at_every_threshold():
    task = SegmentationTask(THRESHOLDS, Normalizer(scale=4.0))
    batch = _batch(b=2)
    x, t, target, t_idx = task.eval_inputs(batch)
    assert x.shape[0] == t.shape[0] == target.shape[0] == 6
    for row in range(6):
        b, k = divmod(row, 3)
        assert t_idx[row] == k and torch.equal(target[row, 0], batch["masks"][b, k])


def test_regression_metrics_match_brute_force():
    """Gap metrics of a CHM prediction: gap where predicted CHM < T, against the stored masks."""
    task = RegressionTask(THRESHOLDS, Normalizer(scale=4.0))
    batch = _batch()
    x, t, target, t_idx = task.eval_inputs(batch)
    assert torch.equal(t, torch.zeros(5)) and t_idx is None
    raw = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 2
    pred = task.output(raw)
    assert torch.allclose(pred, raw * 4.0)
    metrics = task.metrics("cpu")
    task.update_metrics(metrics, pred, target, t_idx, batch)
    metrics.all_reduce()
    out = metrics.compute()
    p, y, m = pred.double().numpy()[:, 0], batch["chm"].double().numpy()[:, 0], batch["masks"].numpy()
    valid = np.isfinite(y)
    err = (p - y)[valid]
    assert out["mae_m"] == pytest.approx(np.abs(err).mean(), rel=1e-9)
    assert out["rmse_m"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-9)
    assert out["r2"] == pytest.approx(1 - (err ** 2).sum() / ((y[valid] - y[valid].mean()) ** 2).sum(), rel=1e-9)
    for k, tag in enumerate(["2m", "5m", "10m"]):
        ok = m[:, k] != IGNORE
        pred_gap, gap = (p < THRESHOLDS[k]) & ok, (m[:, k] == 1)
        tp, fp, fn = (pred_gap & gap).sum(), (pred_gap & ~gap).sum(), (~pred_gap & gap & ok).sum()
        assert out[f"iou_{tag}"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)


def test_regression_perfect_prediction_scores_perfectly():
    task = RegressionTask(THRESHOLDS, Normalizer(scale=1.0))
    batch = _batch()
    metrics = task.metrics("cpu")
    # the masks mark CHM <= T; predicting a hair below the truth makes "< T" agree exactly
    task.update_metrics(metrics, batch["chm"] - 1e-4, batch["chm"], None, batch)
    out = metrics.compute()
    assert out["iou_mean"] == pytest.approx(1.0) and out["mae_m"] == pytest.approx(1e-4, rel=1e-3)


def test_classification_task_has_no_gap_maps(tmp_path):
    cfg = tiny_config(tmp_path, data={"task": "classification"})
    task = build_task(cfg, Normalizer(), {"class_names": ["a", "b", "c"]})
    assert task.name == "classification"
    with pytest.raises(ConfigError):
        task.gap_logits(None, None, None, None)


def test_regression_trains_and_reports_heights_and_gaps(tiny_dataset):
    """A regression run end to end; its validation metrics recomputed by brute force from best.ckpt."""
    cfg = tiny_config(tiny_dataset, run={"name": "regression"}, data={"task": "regression"},
                      loss={"name": "huber"}, train={"epochs": 1}, log={"images_every_epochs": 1})
    run_dir = runner.train_model(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in records if "val/mae_m" in r)
    assert {"val/rmse_m", "val/r2", "val/iou_2m", "val/iou_mean", "val/loss"} <= set(val)
    ckpt = load_checkpoint(run_dir / "best.ckpt")
    trainer = runner.build_trainer(cfg, torch.device("cpu"), callbacks=[])
    trainer.raw_model.load_state_dict(ckpt["model"])
    trainer.raw_model.eval()
    preds, chms, masks = [], [], []
    with torch.no_grad():
        for batch in trainer.val_loader:
            x = trainer.task.normalizer(batch["dsm"])
            preds.append((trainer.raw_model(x, torch.zeros(len(x))) * trainer.task.normalizer.scale).numpy())
            chms.append(batch["chm"].numpy())
            masks.append(batch["masks"].numpy())
    p, y, m = (np.concatenate(a) for a in (preds, chms, masks))
    valid = np.isfinite(y)
    assert ckpt["metrics"]["val/mae_m"] == pytest.approx(np.abs(p - y)[valid].mean(), rel=1e-5)
    ok = m[:, :1] != IGNORE
    pred_gap, gap = (p < 2.0) & ok, m[:, :1] == 1
    tp, fp, fn = (pred_gap & gap).sum(), (pred_gap & ~gap).sum(), (~pred_gap & gap).sum()
    assert ckpt["metrics"]["val/iou_2m"] == pytest.approx(tp / (tp + fp + fn), rel=1e-6)
