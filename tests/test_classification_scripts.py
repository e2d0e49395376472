"""Every script on a classification run (data.task: classification): train with the monitor's tile panels,
sanity_check, export (TorchScript and ExportedProgram match eager), evaluate (checkpoint and exported
model), predict's refusal, lr_finder and grid_search (and its refusal of k-fold by site). One tiny
class-folder dataset and one trained checkpoint are shared by the whole module."""
import json
import math

import numpy as np
import pytest
import torch

import evaluate
import export
import grid_search
import lr_finder
import predict
import sanity_check
import train
from lib.train.checkpoint import load_checkpoint
from lib.data.build_classification import build_class_dataset
from lib.core.config import config_to_dict
from lib.data.dataset import ShardDataset
from lib.infer.export import FORMATS
from lib.infer.loading import load_model
from lib.train.monitor import class_panel
from lib.data.shards import read_manifest
from tests.test_classification import CLASSES, class_config, write_class_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config file, best.ckpt) of a 2-epoch run on 3 separable classes of 4-band 16 px tiles, panels on."""
    root = tmp_path_factory.mktemp("cls")
    write_class_folder(root / "tiles", per_class=(12, 12, 12))
    cfg = class_config(root, class_folder=str(root / "tiles"))
    build_class_dataset(cfg, cfg.data.root)
    raw = config_to_dict(cfg)
    raw["run"]["name"] = "cls"
    raw["train"].update(epochs=2, early_stopping_patience=0)
    raw["schedule"]["warmup_steps"] = 2
    raw["log"].update(images_every_epochs=1, progress_every_steps=2)
    config = root / "cls.json"
    config.write_text(json.dumps(raw))
    assert train.main(["--config", str(config)]) == 0
    return config, root / "runs" / "cls" / "best.ckpt"


def val_images(config) -> tuple[torch.Tensor, torch.Tensor]:
    """All validation tiles (N, 4, 16, 16) raw band values, and their labels (N,)."""
    root = json.loads(config.read_text())["data"]["root"]
    samples = list(ShardDataset(root, "val", shuffle=False, equal_counts=False, arrays=("image",),
                                meta_keys=("label",)))
    return torch.stack([s["image"] for s in samples]), torch.tensor([s["label"] for s in samples])


def test_checkpoint_carries_class_names_and_monitor_logs_tile_panels(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config, ckpt = run
    assert load_checkpoint(ckpt)["task"]["class_names"] == list(CLASSES)
    events = EventAccumulator(str(ckpt.parent / "tb"), size_guidance={"images": 0})
    events.Reload()
    panels = events.Images("val_panel/tiles")
    tiles = min(8, len(val_images(config)[1]))                                          # at most 8 per panel
    assert len(panels) == 2 and (panels[-1].width, panels[-1].height) == (tiles * 16, 16)  # one per epoch


def test_class_panel_frames_right_green_and_wrong_red():
    images = torch.rand(3, 2, 8, 8)
    panel = class_panel(images, torch.tensor([True, False, True]))                        # (3, 8, 24)
    assert panel.shape == (3, 8, 24)
    assert panel[:, 0, 0].tolist() == pytest.approx([0.0, 0.8, 0.0])
    assert panel[:, 0, 8].tolist() == pytest.approx([0.9, 0.0, 0.0])
    inside = images[2, 0, 2:-2, 2:-2]
    stretched = (inside - images[2, 0].min()) / (images[2, 0].max() - images[2, 0].min())
    assert torch.allclose(panel[1, 2:-2, 18:22], stretched, atol=1e-6)                    # band 0, grey


def test_sanity_check_on_classification(run, tmp_path):
    config, _ = run
    assert sanity_check.main(["--config", str(config), "--steps", "60", "--out", str(tmp_path)]) == 0
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())}
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert checks["initial loss"]["details"]["expected"] == pytest.approx(math.log(len(CLASSES)))
    assert checks["initial loss"]["details"]["initial"] == pytest.approx(math.log(len(CLASSES)), abs=0.25)
    manifest = read_manifest(json.loads(config.read_text())["data"]["root"])
    train_counts = [manifest["summary"]["train"]["per_class"][c] for c in CLASSES]
    val_counts = [manifest["summary"]["val"]["per_class"][c] for c in CLASSES]
    majority = int(np.argmax(train_counts))
    assert checks["baselines"]["details"]["majority"]["val/accuracy"] == pytest.approx(
        val_counts[majority] / sum(val_counts))
    curve = checks["overfit"]["details"]["curve"]
    assert checks["overfit"]["details"]["score"] == "accuracy" and curve[-1][1] <= 0.5 * curve[0][1]


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_exported_classifier_matches_eager(run, tmp_path, fmt):
    config, ckpt = run
    out = tmp_path / f"cls{FORMATS[fmt]}"
    assert export.main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    eager, exported = load_model(ckpt), load_model(out)
    assert exported.task == eager.task == "classification" and exported.class_names == list(CLASSES)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["class_names"] == list(CLASSES) and card["normalization"]["kind"] == "bands"
    images, labels = val_images(config)
    images[0, :, :3, :3] = float("nan")                                                  # nodata passes
    for batch in (images, images[:5]):                                                   # dynamic batch
        with torch.no_grad():
            a, b = eager.net(batch), exported.net(batch)
        assert a.shape == (len(batch), len(CLASSES)) and torch.isfinite(a).all()
        assert torch.allclose(a.sum(1), torch.ones(len(batch)), atol=1e-5)              # softmax, not sigmoid
        assert torch.allclose(a, b, atol=1e-5)


def test_predict_refuses_a_classifier_naming_the_task(run, tmp_path, capsys):
    _, ckpt = run
    code = predict.main(["--checkpoint", str(ckpt), "--dsm", str(tmp_path / "scene.tif"), "--out", str(tmp_path)])
    assert code != 0
    err = capsys.readouterr().err
    assert "classification" in err and "forest" in err


def test_lr_finder_on_classification(run, tmp_path):
    config, _ = run
    assert lr_finder.main(["--config", str(config), "--steps", "20", "--lr-min", "1e-4", "--lr-max", "1",
                           "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "lr_finder.csv").read_text().splitlines()[1:]
    lrs = [float(r.split(",")[0]) for r in rows]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(rows) >= 5 and lrs == sorted(lrs) and all(math.isfinite(v) for v in losses[:5])
    assert "suggestions" in json.loads((tmp_path / "lr_finder.json").read_text())


def test_grid_search_over_cnn_dilated(run, tmp_path):
    config, _ = run
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"model.blocks_per_stage": [1, 2], "model.dilation_stage3": [1, 2]}))
    assert grid_search.main(["--config", str(config), "--grid", str(grid), "--name", "g",
                             f"--run.output_root={tmp_path}", "--search.epochs=1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "g" / "results.jsonl").read_text().splitlines()]
    trials = [r for r in records if "point" in r]
    assert len({r["point"] for r in trials}) == 4 and all(r["status"] == "ok" for r in trials)
    summary = (tmp_path / "g" / "summary.md").read_text()
    assert "val/accuracy" in summary and "val/macro_f1" in summary
    best = json.loads((tmp_path / "g" / "best_config.json").read_text())
    assert best["model"]["blocks_per_stage"] in (1, 2) and best["data"]["task"] == "classification"


def test_grid_search_refuses_site_folds_on_classification_saying_what_to_do(run, tmp_path, capsys):
    config, _ = run
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"optim.lr": [0.01, 0.001]}))
    code = grid_search.main(["--config", str(config), "--grid", str(grid), "--name", "f", "--folds", "2",
                             f"--run.output_root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "classification dataset" in err and "segmentation" in err, err
    assert "search.folds=0" in err and "--run.seed" in err                              # what to do instead
    assert not (tmp_path / "f" / "folds").exists()                                      # nothing built


def test_evaluate_scores_checkpoint_and_exported_classifier_like_brute_force(run, tmp_path):
    config, ckpt = run
    exported = tmp_path / "cls.ts"
    assert export.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(exported)]) == 0
    images, labels = val_images(config)
    with torch.no_grad():
        predicted = load_model(ckpt).net(images).argmax(1)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)                         # rows true
    manifest = read_manifest(json.loads(config.read_text())["data"]["root"])
    train_counts = [manifest["summary"]["train"]["per_class"][c] for c in CLASSES]
    majority_hits = int((labels == int(np.argmax(train_counts))).sum())
    reports = []
    for model in (ckpt, exported):
        out = tmp_path / model.suffix[1:]
        assert evaluate.main(["--checkpoint", str(model), "--out", str(out)]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
        val = reports[-1]["splits"]["val"]
        assert val["confusion"] == confusion.tolist()
        trained = load_checkpoint(ckpt)["metrics"]                                     # the trainer's own figures
        assert val["model"]["accuracy"] == pytest.approx(trained["val/accuracy"], abs=1e-6)
        assert val["model"]["macro_f1"] == pytest.approx(trained["val/macro_f1"], abs=1e-6)
        assert val["model"]["accuracy"] == pytest.approx(np.trace(confusion) / len(labels))
        assert val["majority"]["accuracy"] == pytest.approx(majority_hits / len(labels))
        assert (out / "confusion_test.png").is_file() and "| majority |" in (out / "report.md").read_text()
    for split in ("val", "test"):                                                        # seeded random too
        assert reports[0]["splits"][split] == reports[1]["splits"][split]
