"""Dataset evaluation: gap-size classes and PR curves against brute force, per-site sums, the baselines in
the report, and evaluate.py end to end on a tiny prepared dataset."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import prepare_data
from conftest import make_checkpoint
from lib.gaps.baselines import classical_relative_height
from lib.gaps.components import label_components
from lib.core.config import build_config
from lib.data.dataset import ShardDataset, build_loader
from lib.core.errors import DataError
from lib.core.atomic import write_json
from lib.infer.evaluate_gaps import METHODS, Evaluator, GapSizes, MethodScores, PRHistogram, train_gap_rates
from lib.gaps.masks import IGNORE
from lib.train.metrics import ThresholdMetrics
from lib.data.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiny"
    assert prepare_data.main(["--config", str(REPO / "configs/quick.json"), f"--data.root={root}",
                              "--data.synthetic_sites=3", "--data.synthetic_size_px=128", "--data.split=site",
                              "--data.tile_px=32", "--data.stride_px=32"]) == 0
    return root


def random_masks(rng, shape, gap=0.3, ignore=0.05) -> np.ndarray:
    u = rng.random(shape)
    return np.where(u < ignore, IGNORE, u < ignore + gap).astype(np.uint8)


def test_gap_sizes_match_per_tile_labelling():
    rng = np.random.default_rng(0)
    target = random_masks(rng, (5, 23, 31), gap=0.45)
    pred = rng.random(target.shape) < 0.5
    sizes = GapSizes(target, [3.0, 6.0], pixel_area_m2=0.5)       # classes: < 6 px, 6..12 px, > 12 px
    expected = np.zeros((3, 4), np.int64)
    for tile, hit in zip(target, pred):
        labels, n = label_components(tile == 1)
        for gap in range(1, n + 1):
            inside = labels == gap
            area, found = inside.sum() * 0.5, (inside & hit).sum()
            cls = 0 if area < 3.0 else (1 if area <= 6.0 else 2)
            expected[cls] += [inside.sum(), found, 1, found >= 0.5 * inside.sum()]
    assert np.array_equal(sizes.counts(pred), expected)
    assert expected[:, 2].min() > 0   # every class is exercised


def test_pr_histogram_matches_brute_force_counts_and_ap():
    rng = np.random.default_rng(1)
    bins = 20
    probs = (rng.integers(0, bins, (3, 2, 8, 8)) + 0.5) / bins          # bin centres: no edge ties
    masks = random_masks(rng, probs.shape)
    hist = PRHistogram(2, bins)
    hist.update(torch.from_numpy(probs).float(), torch.from_numpy(masks))
    curves = hist.curves()
    for k in range(2):
        p, m = probs[:, k], masks[:, k]
        valid, gap = m != IGNORE, m == 1
        precision, recall = [], []
        for j in range(bins):
            pred = (p >= j / bins) & valid
            tp = int((pred & gap).sum())
            assert (tp, int((pred & ~gap & valid).sum())) == (curves["tp"][k, j], curves["fp"][k, j])
            precision.append(tp / pred.sum() if pred.sum() else 1.0)
            recall.append(tp / gap.sum())
        recall.append(0.0)
        ap = sum((recall[j] - recall[j + 1]) * precision[j] for j in range(bins))
        assert hist.average_precision()[k] == pytest.approx(ap)


def test_per_site_counts_add_up_to_the_overall_counts():
    rng = np.random.default_rng(2)
    masks = torch.from_numpy(random_masks(rng, (6, 3, 16, 16)))
    probs = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sites = ["a", "b", "a", "c", "b", "a"]
    scores = MethodScores([2.0, 5.0, 10.0])
    scores.update(probs, masks, sites, [GapSizes(masks[:, k].numpy(), [25, 400], 1.0) for k in range(3)])
    total = sum(m.counts() for m in scores.sites.values())
    assert torch.equal(total, scores.overall.counts())
    only_a = ThresholdMetrics([2.0, 5.0, 10.0])
    rows = [0, 2, 5]
    only_a.update(probs[rows].reshape(9, 1, 16, 16), masks[rows].reshape(9, 1, 16, 16), torch.arange(3).repeat(3),
                  from_logits=False)
    assert torch.equal(scores.sites["a"].counts(), only_a.counts())


def test_train_gap_rates_and_strict_json(tmp_path):
    manifest = {"summary": {"train": {"gap_fraction": {"2m": 0.1, "5m": 0.2}}}}
    assert train_gap_rates(manifest, [2.0, 5.0]).tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(DataError, match=r"lacks thresholds \['10m'\]"):
        train_gap_rates(manifest, [2.0, 10.0])
    write_json(tmp_path / "r.json", {"a": math.nan, "b": [np.float32(1.5), np.int64(2)]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1.5, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


class ClassicalNet(torch.nn.Module):
    """The classical baseline dressed as a model (one threshold per sample)."""

    def forward(self, dsm, thresholds_m):
        rel = classical_relative_height(dsm, 51.0, 1.0)
        return (torch.isfinite(rel) & (rel <= thresholds_m.view(-1, 1, 1, 1))).float()


def test_model_equal_to_the_classical_baseline_scores_the_same(dataset):
    cfg = build_config({"eval": {"batch_size": 8}})
    manifest = read_manifest(dataset)
    thresholds = manifest["thresholds_m"]
    evaluator = Evaluator(ClassicalNet(), thresholds, 1.0, train_gap_rates(manifest, thresholds), cfg.eval)
    for batch in build_loader(ShardDataset(dataset, "test", shuffle=False, equal_counts=False), 8, 0):
        evaluator.update(batch)
    methods = evaluator.report()["methods"]
    assert methods["model"]["metrics"] == methods["classical"]["metrics"]
    assert methods["model"]["size_classes"] == methods["classical"]["size_classes"]


def test_evaluate_script_writes_reports_with_the_baselines(dataset, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", data={"root": str(dataset), "tile_px": 32})
    assert evaluate.main(["--checkpoint", ckpt, "--split", "test", "--eval.panels=1", "--tta"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert tuple(report["methods"]) == METHODS and report["tta"] is True and report["split"] == "test"
    masks = torch.cat([b["masks"] for b in build_loader(ShardDataset(dataset, "test", shuffle=False,
                                                                     equal_counts=False), 8, 0)])
    valid = (masks != IGNORE).sum(dim=(0, 2, 3)).tolist()                  # (K,) valid pixels per threshold
    gap_fraction = ((masks == 1).sum(dim=(0, 2, 3)) / torch.tensor(valid)).tolist()
    for name in METHODS:
        body = report["methods"][name]
        assert [np.sum(body["confusion"][tag]) for tag in ("2m", "5m", "10m", "15m")] == valid
    canopy, rand = report["methods"]["all_canopy"]["metrics"], report["methods"]["random"]["metrics"]
    assert canopy["recall_5m"] == 0 and canopy["precision_5m"] is None    # nothing predicted: undefined
    # random guessing: precision ~ the test gap fraction, recall ~ the train gap rate
    assert rand["precision_5m"] == pytest.approx(gap_fraction[1], abs=0.05)
    assert rand["recall_5m"] == pytest.approx(report["random_gap_rates"]["5m"], abs=0.05)
    text = (tmp_path / "report.md").read_text()
    assert "| classical | 5m |" in text and "## IoU per site" in text and "per-tile IoU and F1" in text
    site, scores = next(iter(report["methods"]["classical"]["per_site"].items()))
    cell = "{:.4f} ({:.4f} / {:.4f})".format(*(scores[f"{k}_2m"] for k in ("iou", "precision", "recall")))
    assert f"| {site} | classical | {cell} |" in text                      # over/under-prediction per site
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "eval_test" / "tb"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "eval_test/pr_5m" in events.Tags()["tensors"] and len(events.Tags()["images"]) == 4
    assert "eval_test/classical/iou_mean" in events.Tags()["scalars"]


def test_evaluate_scores_an_ensemble_like_its_member_with_itself(dataset, tmp_path):
    """Two copies of one checkpoint: the ensemble's mean is the model, so the metrics are the model's."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt", data={"root": str(dataset), "tile_px": 32})
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(Path(ckpt).read_bytes())
    reports = {}
    for name, checkpoints in (("one", [ckpt]), ("two", [ckpt, str(copy)])):
        assert evaluate.main(["--checkpoint", *checkpoints, "--split", "test", "--out", str(tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["two"]["checkpoint"] == f"{ckpt} + {copy}"
    one, two = reports["one"]["methods"]["model"]["metrics"], reports["two"]["methods"]["model"]["metrics"]
    assert one.keys() == two.keys()
    assert all(two[k] == pytest.approx(one[k], abs=1e-6) for k in one if one[k] is not None)
