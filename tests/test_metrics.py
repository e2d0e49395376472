"""Metrics vs brute-force counts and textbook formulas; empty tiles, ignore, mixed thresholds, merge, DDP."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib.train.metrics import (EMPTY_TILE_POLICY, ClassificationMetrics, RegressionMetrics, SegmentationMetrics,
                         ThresholdMetrics)

THRESHOLDS = [2.0, 5.0, 10.0, 15.0]


def seg_batch(b=6, h=7, w=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, h, w, generator=g)
    target = (torch.rand(b, 1, h, w, generator=g) < 0.3).to(torch.uint8)
    target[torch.rand(b, 1, h, w, generator=g) < 0.2] = 255
    return logits, target, torch.randint(0, len(THRESHOLDS), (b,), generator=g)


def brute_counts(batches, k=len(THRESHOLDS)):
    """(K, 4) tp, fp, fn, tn by looping over samples and pixels in numpy."""
    counts = np.zeros((k, 4), np.int64)
    for logits, target, t_idx in batches:
        for x, t, i in zip(logits.numpy(), target.numpy(), t_idx.tolist()):
            for xv, tv in zip(x.ravel(), t.ravel()):
                if tv == 255:
                    continue
                pred, gap = xv > 0, tv == 1
                counts[i] += [pred and gap, pred and not gap, gap and not pred, not pred and not gap]
    return counts


def test_counts_match_brute_force_with_ignore_and_mixed_thresholds():
    batches = [seg_batch(seed=s) for s in range(3)]
    metrics = SegmentationMetrics(THRESHOLDS)
    for batch in batches:
        metrics.update(*batch)
    np.testing.assert_array_equal(metrics.counts().numpy(), brute_counts(batches))


def test_each_sample_counts_at_its_own_threshold():
    logits, target, _ = seg_batch(b=2, seed=1)
    metrics = SegmentationMetrics(THRESHOLDS)
    metrics.update(logits, target, torch.tensor([3, 1]))
    counts = metrics.counts()
    assert counts[0].sum() == 0 and counts[2].sum() == 0
    assert counts[3].sum() == int((target[0] != 255).sum()) and counts[1].sum() == int((target[1] != 255).sum())


def test_metric_formulas_from_counts():
    batches = [seg_batch(seed=s) for s in range(2)]
    metrics = SegmentationMetrics(THRESHOLDS)
    for batch in batches:
        metrics.update(*batch)
    out = metrics.compute()
    for i, tag in enumerate(["2m", "5m", "10m", "15m"]):
        tp, fp, fn, tn = (float(c) for c in brute_counts(batches)[i])
        n = tp + fp + fn + tn
        po = (tp + tn) / n
        pe = ((tp + fp) / n) * ((tp + fn) / n) + ((fn + tn) / n) * ((fp + tn) / n)
        assert out[f"iou_{tag}"] == pytest.approx(tp / (tp + fp + fn))
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        assert out[f"f1_{tag}"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert out[f"precision_{tag}"] == pytest.approx(precision)
        assert out[f"recall_{tag}"] == pytest.approx(recall)
        assert out[f"accuracy_{tag}"] == pytest.approx(po)
        assert out[f"balanced_accuracy_{tag}"] == pytest.approx((recall + tn / (tn + fp)) / 2)
        assert out[f"kappa_{tag}"] == pytest.approx((po - pe) / (1 - pe))
    assert out["iou_mean"] == pytest.approx(np.mean([out[f"iou_{t}"] for t in ("2m", "5m", "10m", "15m")]))


def test_empty_tile_policy_and_per_tile_average():
    target = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    logits = torch.full((4, 1, 2, 2), -5.0)
    logits[1, 0, 0, 0] = 5.0                     # tile 1: no gap, one predicted -> 0
    target[2, 0, 0, :] = 1                       # tile 2: gaps (2 px) with one found -> IoU 1/2, F1 2/3
    logits[2, 0, 0, 0] = 5.0
    target[3] = 255                              # tile 3: nothing valid -> excluded
    logits[3] = 5.0                              # tile 0: no gap, none predicted -> 1
    metrics = SegmentationMetrics([5.0])
    metrics.update(logits, target, torch.zeros(4, dtype=torch.long))
    out = metrics.compute()
    assert out["tile_iou_5m"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["tile_f1_5m"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert out["iou_5m"] == pytest.approx(1 / 3)               # micro: tp 1, fp 1, fn 1
    assert "excluded" in EMPTY_TILE_POLICY and "scores 1" in EMPTY_TILE_POLICY


def test_undefined_ratios_are_nan_and_means_skip_them():
    metrics = SegmentationMetrics([2.5, 10.0])
    target = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    metrics.update(torch.full((1, 1, 3, 3), -1.0), target, torch.tensor([0]))   # no gap, none predicted
    out = metrics.compute()
    assert math.isnan(out["iou_2.5m"]) and math.isnan(out["precision_2.5m"]) and math.isnan(out["kappa_2.5m"])
    assert out["accuracy_2.5m"] == 1.0 and out["tile_iou_2.5m"] == 1.0
    assert all(math.isnan(out[f"{m}_10m"]) for m in ("iou", "accuracy", "tile_iou"))   # never seen
    assert out["accuracy_mean"] == 1.0 and math.isnan(out["iou_mean"])


def test_ignored_pixels_change_nothing_and_probabilities_match_logits():
    logits, target, t_idx = seg_batch(seed=2)
    a, b, c = (SegmentationMetrics(THRESHOLDS) for _ in range(3))
    a.update(logits, target, t_idx)
    b.update(torch.where(target == 255, torch.randn_like(logits) * 100, logits), target, t_idx)
    c.update(torch.sigmoid(logits.double()), target, t_idx, from_logits=False)
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)
    assert torch.equal(a.counts(), c.counts())
    d = SegmentationMetrics(THRESHOLDS)
    d.update(logits, target, t_idx, prob_threshold=0.8)
    assert d.counts()[:, 0].sum() < a.counts()[:, 0].sum()


def test_merge_equals_one_object_over_all_data():
    batches = [seg_batch(seed=s) for s in range(4)]
    whole, first, second = (ThresholdMetrics(THRESHOLDS) for _ in range(3))
    for i, batch in enumerate(batches):
        whole.update(*batch)
        (first if i % 2 else second).update(*batch)
    first.merge(second)
    assert torch.equal(first.counts(), whole.counts())
    assert first.compute() == pytest.approx(whole.compute(), nan_ok=True)
    first.reset()
    assert first.counts().sum() == 0 and first.tile_sums.sum() == 0


def test_threshold_table_and_confusion_matrices():
    metrics = ThresholdMetrics(THRESHOLDS)
    batch = seg_batch(seed=3)
    metrics.update(*batch)
    cm = metrics.confusion_matrices()
    tp, fp, fn, tn = brute_counts([batch])[1]
    assert cm[1].tolist() == [[tn, fp], [fn, tp]]
    table = metrics.table()
    assert len(table.splitlines()) == 5 and "10m" in table and "tile_iou" in table


def _ddp_worker(rank, world, port, batches, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metrics = SegmentationMetrics(THRESHOLDS)
    for batch in batches[rank::world]:
        metrics.update(*batch)
    metrics.all_reduce()
    if rank == 0:     # plain lists: a tensor sent through the queue dies with this process
        queue.put((metrics.counts().tolist(), metrics.tile_sums.tolist()))
    dist.destroy_process_group()


def test_all_reduce_over_two_ranks_equals_single_process():
    batches = [seg_batch(seed=s) for s in range(4)]
    single = SegmentationMetrics(THRESHOLDS)
    for batch in batches:
        single.update(*batch)
    single.all_reduce()                                      # not distributed here: a no-op
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported torch (spawn re-imports it: seconds per rank)
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, batches, queue), nprocs=2, start_method="fork")
    counts, tile_sums = queue.get()
    assert counts == single.counts().tolist()
    assert torch.allclose(torch.tensor(tile_sums, dtype=torch.float64), single.tile_sums, rtol=0, atol=1e-12)


def test_regression_metrics_match_numpy():
    g = torch.Generator().manual_seed(4)
    preds = [torch.rand(2, 1, 6, 6, generator=g) * 30 for _ in range(2)]
    targets = [torch.rand(2, 1, 6, 6, generator=g) * 30 for _ in range(2)]
    for t in targets:
        t[torch.rand(t.shape, generator=g) < 0.25] = float("nan")
    metrics, other = RegressionMetrics(), RegressionMetrics()
    metrics.update(preds[0], targets[0])
    other.update(preds[1], targets[1])
    metrics.merge(other)
    p = torch.cat([x.flatten() for x in preds]).double().numpy()
    y = torch.cat([x.flatten() for x in targets]).double().numpy()
    keep = ~np.isnan(y)
    e = p[keep] - y[keep]
    out = metrics.compute()
    assert out["mae_m"] == pytest.approx(np.abs(e).mean())
    assert out["rmse_m"] == pytest.approx(np.sqrt((e ** 2).mean()))
    assert out["bias_m"] == pytest.approx(e.mean())
    assert out["r2"] == pytest.approx(1 - (e ** 2).sum() / ((y[keep] - y[keep].mean()) ** 2).sum())
    assert math.isnan(RegressionMetrics().compute()["mae_m"])


def test_classification_metrics_match_brute_force():
    g = torch.Generator().manual_seed(5)
    logits, target = torch.randn(40, 6, generator=g), torch.randint(0, 6, (40,), generator=g)
    target[:3] = -100                                          # ignored
    names = list("abcdef")
    metrics = ClassificationMetrics(6, names, topk=(1, 3, 5, 10))
    metrics.update(logits[:20], target[:20])
    metrics.update(logits[20:], target[20:])
    out = metrics.compute()
    keep = target >= 0
    lg, tg = logits[keep].numpy(), target[keep].numpy()
    pred = lg.argmax(1)
    cm = np.zeros((6, 6), np.int64)
    for t, p in zip(tg, pred):
        cm[t, p] += 1
    np.testing.assert_array_equal(metrics.confusion.numpy(), cm)
    assert out["accuracy"] == pytest.approx((pred == tg).mean())
    for k in (3, 5):
        ranks = np.argsort(-lg, 1)[:, :k]
        assert out[f"top{k}_accuracy"] == pytest.approx(np.mean([t in r for t, r in zip(tg, ranks)]))
    assert "top10_accuracy" not in out and "top1_accuracy" not in out
    f1 = []
    for c, name in enumerate(names):
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
        assert out[f"recall_{name}"] == pytest.approx(tp / (tp + fn))
        f1.append(2 * tp / (2 * tp + fp + fn))
        assert out[f"f1_{name}"] == pytest.approx(f1[-1])
    assert out["macro_f1"] == pytest.approx(np.mean(f1))
