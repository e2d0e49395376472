"""Tile classification: folder-of-classes import, stratified split, band normalisation, the task, the
initial loss, and prepare -> train -> evaluate on a shrunken classify_quick config."""
import json
import math

import numpy as np
import pytest
import tifffile
import torch

from lib.data.bands import BandNormalizer, band_stats, normalizer_from_stats
from lib.data.build_classification import build_class_dataset, stratified_split
from lib.core.config import build_config, load_config
from lib.data.dataset import ShardDataset
from lib.core.errors import ConfigError, DataError
from lib.train.metrics import ClassificationMetrics
from lib.train.tasks import ClassificationTask, build_task

CLASSES = ("forest", "meadow", "water")


def write_class_folder(root, per_class=(10, 6, 4), bands=4, px=16):
    """Multi-band GeoTIFFs (uint16, band-interleaved and pixel-interleaved) and .npy tiles per class;
    returns {relative path: (label, (C, H, W) float32)}."""
    rng = np.random.default_rng(0)
    tiles = {}
    for label, (name, n) in enumerate(zip(CLASSES, per_class)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 4000, (bands, px, px)).astype(np.uint16) + 1000 * label
            rel = f"{name}/tile_{i}.{'npy' if i % 3 == 2 else 'tif'}"
            if i % 3 == 0:
                tifffile.imwrite(root / rel, image, planarconfig="separate", photometric="minisblack")
            elif i % 3 == 1:
                tifffile.imwrite(root / rel, image.transpose(1, 2, 0), planarconfig="contig", photometric="minisblack")
            else:
                np.save(root / rel, image)
            tiles[rel] = (label, image.astype(np.float32))
    return tiles


def class_config(tmp_path, **data):
    return build_config({"run": {"seed": 0, "output_root": str(tmp_path / "runs")},
                         "data": {"task": "classification", "root": str(tmp_path / "data"), "tile_px": 16,
                                  "shard_mb": 1, "workers": 0, **data},
                         "model": {"name": "cnn_dilated", "base_channels": 4, "blocks_per_stage": 1, "norm": "batch"},
                         "loss": {"name": "cross_entropy"}, "train": {"batch_size": 4, "monitor": "val/accuracy"},
                         "log": {"images_every_epochs": 0}})


def read_split(root, split):
    return list(ShardDataset(root, split, shuffle=False, equal_counts=False, arrays=("image",),
                             meta_keys=("label", "class_name", "file")))


def test_folder_of_classes_round_trips_every_tile_with_label_and_train_statistics(tmp_path):
    tiles = write_class_folder(tmp_path / "tiles")
    cfg = class_config(tmp_path, class_folder=str(tmp_path / "tiles"))
    manifest = build_class_dataset(cfg, cfg.data.root)
    assert manifest["class_names"] == list(CLASSES) and manifest["bands"] == 4
    seen = {}
    for split in ("train", "val", "test"):
        for sample in read_split(cfg.data.root, split):
            seen[sample["file"]] = split
            label, image = tiles[sample["file"]]
            assert sample["label"] == label and sample["class_name"] == CLASSES[label]
            assert torch.equal(sample["image"], torch.from_numpy(image))        # (C, H, W) exact
    assert sorted(seen) == sorted(tiles)                                        # every tile, once
    train = np.stack([tiles[f][1] for f, s in seen.items() if s == "train"]).astype(np.float64)  # (N, C, H, W)
    stats = manifest["normalization"]
    np.testing.assert_allclose(stats["mean"], train.mean((0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], train.std((0, 2, 3)), rtol=1e-6)


def test_split_files_are_honoured_and_checked(tmp_path):
    tiles = write_class_folder(tmp_path / "tiles", per_class=(3, 3, 3))
    files = sorted(tiles)
    (tmp_path / "tiles" / "train.txt").write_text("\n".join(files[:5]) + "\n")
    (tmp_path / "tiles" / "val.txt").write_text("\n".join(files[5:7]))
    (tmp_path / "tiles" / "test.txt").write_text("\n".join(files[7:]))
    cfg = class_config(tmp_path, class_folder=str(tmp_path / "tiles"))
    manifest = build_class_dataset(cfg, cfg.data.root)
    assert manifest["split_rule"]["rule"] == "files"
    assert sorted(s["file"] for s in read_split(cfg.data.root, "val")) == files[5:7]
    (tmp_path / "tiles" / "test.txt").write_text("forest/missing.tif\n")
    with pytest.raises(DataError, match="test.txt.*missing.tif"):
        build_class_dataset(cfg, cfg.data.root)


def test_folder_errors_name_the_file(tmp_path):
    write_class_folder(tmp_path / "tiles", per_class=(3, 3, 3))
    np.save(tmp_path / "tiles" / "water" / "odd.npy", np.zeros((4, 8, 8), np.float32))
    cfg = class_config(tmp_path, class_folder=str(tmp_path / "tiles"))
    with pytest.raises(DataError, match="odd.npy.*shape"):
        build_class_dataset(cfg, cfg.data.root)
    with pytest.raises(DataError, match="not a folder"):
        build_class_dataset(class_config(tmp_path, class_folder=str(tmp_path / "nope")), cfg.data.root)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_split_keeps_class_ratios(seed):
    labels = np.repeat([0, 1, 2, 3], [100, 40, 20, 7])
    fractions = [0.7, 0.15, 0.15]
    split = stratified_split(labels, fractions, seed)
    for c, n in zip(range(4), (100, 40, 20, 7)):
        counts = np.bincount(split[labels == c], minlength=3)
        assert counts.sum() == n and np.all(np.abs(counts - np.array(fractions) * n) <= 1)
    assert np.array_equal(split, stratified_split(labels, fractions, seed))      # seeded
    assert not np.array_equal(split, stratified_split(labels, fractions, seed + 10))


def test_band_normalizer_standardises_and_round_trips():
    rng = np.random.default_rng(1)
    tiles = [rng.normal([[[5.0]], [[-300.0]]], [[[2.0]], [[40.0]]], (2, 8, 8)).astype(np.float32) for _ in range(20)]
    norm = normalizer_from_stats(band_stats(tiles))
    assert isinstance(norm, BandNormalizer) and norm.out_channels == 2
    x = norm(torch.from_numpy(np.stack(tiles)))                                 # (20, 2, 8, 8)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(2), atol=1e-4, rtol=0)
    image = torch.from_numpy(np.stack(tiles[:2])).clone()
    image[0, 1, 3, 3] = float("nan")
    out = BandNormalizer.from_stats(norm.stats())(image)
    assert out[0, 1, 3, 3] == 0 and torch.isfinite(out).all()
    with pytest.raises(DataError, match="constant"):
        band_stats([np.ones((1, 4, 4), np.float32)])


def test_classification_task_and_metrics_by_hand(tmp_path):
    task = build_task(class_config(tmp_path), BandNormalizer([1.0], [2.0]), {"class_names": list(CLASSES)})
    assert isinstance(task, ClassificationTask) and task.arrays == ("image",)
    batch = {"image": torch.full((4, 1, 8, 8), 5.0), "label": torch.tensor([0, 0, 1, 2])}
    x, t, target, t_idx = task.train_inputs(batch)
    assert torch.equal(x, torch.full((4, 1, 8, 8), 2.0)) and torch.equal(t, torch.zeros(4)) and t_idx is None
    logits = torch.tensor([[3.0, 0, 0], [0, 2, 1], [0, 2, 0], [1, 0, 0]])     # argmax 0, 1, 1, 0
    metrics = task.metrics("cpu")
    task.update_metrics(metrics, logits, target, None, batch)
    out = metrics.compute()
    # confusion rows true: [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert out["accuracy"] == pytest.approx(2 / 4)
    assert (out["precision_forest"], out["recall_forest"]) == pytest.approx((1 / 2, 1 / 2))
    assert (out["precision_meadow"], out["recall_meadow"], out["f1_meadow"]) == pytest.approx((1 / 2, 1, 2 / 3))
    assert out["f1_water"] == 0 and out["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    with pytest.raises(ConfigError, match="class_names"):
        build_task(class_config(tmp_path), BandNormalizer([1.0], [2.0]), {"task": "segmentation"})


def test_merged_metrics_equal_one_pass():
    logits, target = torch.randn(50, 6), torch.randint(0, 6, (50,))
    whole, a, b = (ClassificationMetrics(6, topk=(1, 3)) for _ in range(3))
    whole.update(logits, target)
    a.update(logits[:20], target[:20])
    b.update(logits[20:], target[20:])
    a.merge(b)
    assert a.compute() == whole.compute()


def test_initial_loss_is_log_classes(tmp_path):
    """An untrained classifier on real prepared tiles: cross-entropy ~ ln C (the sanity check's premise)."""
    from lib.train.losses import expected_initial_loss
    from lib.train.runner import build_trainer
    write_class_folder(tmp_path / "tiles", per_class=(12, 12, 12))
    cfg = class_config(tmp_path, class_folder=str(tmp_path / "tiles"))
    build_class_dataset(cfg, cfg.data.root)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, torch.device("cpu"), callbacks=[])
    trainer.raw_model.eval()
    losses = []
    with torch.no_grad():
        for batch in trainer.val_loader:
            x, t, target, t_idx = trainer.task.eval_inputs(batch)
            losses.append(float(trainer.criterion(trainer.raw_model(x, t), target, t_idx)))
    expected = expected_initial_loss(cfg.loss, "classification", num_classes=len(CLASSES))
    assert expected == pytest.approx(math.log(3))
    assert np.mean(losses) == pytest.approx(expected, abs=0.25)


def test_prepare_train_evaluate_beats_the_baselines(tmp_path, monkeypatch):
    """configs/classify_quick.json end to end, shrunk (fewer tiles and epochs) to stay fast on CPU."""
    import evaluate
    import prepare_data
    import train
    from lib.core.config import config_to_dict
    base = config_to_dict(load_config("configs/classify_quick.json"))
    base["data"].update(root=str(tmp_path / "data"), synthetic_sites=60)
    base["run"]["output_root"] = str(tmp_path / "runs")
    base["train"]["epochs"] = 10
    config = tmp_path / "classify.json"
    config.write_text(json.dumps(base))
    assert prepare_data.main(["--config", str(config)]) == 0
    assert train.main(["--config", str(config)]) == 0
    ckpt = tmp_path / "runs" / base["run"]["name"] / "best.ckpt"
    assert evaluate.main(["--checkpoint", str(ckpt)]) == 0
    report = json.loads((ckpt.parent / "report.json").read_text())
    assert (ckpt.parent / "confusion_test.png").is_file()
    for split in ("val", "test"):
        r = report["splits"][split]
        assert r["tiles"] == 45 and sum(map(sum, r["confusion"])) == 45
        assert r["majority"]["accuracy"] == pytest.approx(0.2)                  # balanced classes
        assert r["model"]["accuracy"] > r["majority"]["accuracy"] + 0.2
        assert r["model"]["macro_f1"] > r["random"]["macro_f1"] + 0.2
