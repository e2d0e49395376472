"""Evaluate a tile classifier on val and test beside the baselines it must beat: per-class report,
confusion matrix (text, PNG, TensorBoard image).

The model comes from lib.infer.loading.load_model (band normaliser + model + softmax; a checkpoint or an
exported file). Baselines: "majority" always predicts the train split's most frequent class; "random"
draws a uniform class per tile (seeded). Every method is scored with lib.train.metrics.ClassificationMetrics
on the same tiles.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.data.dataset import ShardDataset, build_loader
from lib.core.errors import DataError
from lib.train.metrics import ClassificationMetrics
from lib.data.shards import read_manifest
from lib.train.tasks import topk_of

METHODS = ("model", "majority", "random")
CELL_PX = 24  # side of one confusion-matrix cell in the image


@torch.no_grad()
def score_split(net, cfg, split: str, class_names: list[str], majority: int, device) -> dict:
    """{method: ClassificationMetrics} of the model and the two baselines on one split. net maps raw band
    values (B, C, H, W) to class scores (B, classes) on `device`; only their ranking counts."""
    dataset = ShardDataset(cfg.data.root, split, shuffle=False, equal_counts=False, arrays=("image",),
                           meta_keys=("label",))
    loader = build_loader(dataset, cfg.eval.batch_size, 0)
    c = len(class_names)
    scores = {m: ClassificationMetrics(c, class_names, topk=(1, topk_of(c)), device=device) for m in METHODS}
    gen = torch.Generator().manual_seed(cfg.run.seed)
    for batch in loader:
        x = batch["image"].to(device)                                      # (B, C, H, W) raw bands
        target = batch["label"].long().to(device)                          # (B,)
        b = target.shape[0]
        scores["model"].update(net(x).float(), target)                     # (B, classes)
        # a constant ranking with the majority class on top (its top-k is a fixed guess too)
        scores["majority"].update(F.one_hot(torch.full((b,), majority), c).float(), target)
        scores["random"].update(torch.rand(b, c, generator=gen).to(device), target)
    return scores


def majority_class(manifest: dict) -> int:
    """Index of the train split's most frequent class (lowest index on ties)."""
    counts = manifest["summary"]["train"]["per_class"]
    return int(np.argmax([counts[name] for name in manifest["class_names"]]))


def confusion_image(confusion: np.ndarray) -> np.ndarray:
    """(C, C) counts (rows true, columns predicted) -> (3, C*CELL_PX, C*CELL_PX) float in [0, 1]:
    white to blue by the row-normalised fraction (recall on the diagonal)."""
    rows = confusion.sum(1, keepdims=True)
    frac = confusion / np.maximum(rows, 1)                                  # (C, C)
    cells = np.kron(frac, np.ones((CELL_PX, CELL_PX)))                      # (C*px, C*px)
    cells[::CELL_PX], cells[:, ::CELL_PX] = 0.5, 0.5                        # grid lines
    white_to_blue = np.array([0.1, 0.3, 0.8])[:, None, None]
    return 1.0 - cells[None] * (1.0 - white_to_blue)


def split_report(scores: dict) -> dict:
    """JSON-ready metrics of each method, and the model's confusion matrix."""
    out = {m: s.compute() for m, s in scores.items()}
    out["confusion"] = scores["model"].confusion.cpu().tolist()
    out["tiles"] = int(scores["model"].confusion.sum())
    return out


def evaluate_classifier(path, loaded, cfg, device, splits=("val", "test")) -> dict:
    """Report of the model and the baselines on each split: {"class_names", "splits": {split: ...}}.

    loaded: lib.infer.loading.load_model(path) of a classifier, its net on `device`; cfg: its config with the
    command line's overrides (data.root, eval.batch_size, ...)."""
    manifest = read_manifest(cfg.data.root)
    names, trained = manifest.get("class_names"), len(loaded.class_names)
    if not names or trained != len(names):
        raise DataError(f"{cfg.data.root}: dataset lists classes {names}, the model {path} was trained on "
                        f"{trained} classes {loaded.class_names}", hint="pass the dataset it was trained on "
                        "with --data.root=...")
    majority = majority_class(manifest)
    report = {"checkpoint": str(path), "data_root": cfg.data.root, "class_names": names,
              "majority_class": names[majority], "step": loaded.meta.get("step"), "splits": {}}
    for split in splits:
        report["splits"][split] = split_report(score_split(loaded.net, cfg, split, names, majority, device))
    return report


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report_markdown(report: dict) -> str:
    """Per split: model vs baselines, per-class precision/recall/F1, and the confusion matrix."""
    names, lines = report["class_names"], [f"# Classification report: {report['checkpoint']}"]
    for split, r in report["splits"].items():
        k = topk_of(len(names))
        lines += [f"\n## {split} ({r['tiles']} tiles)\n", _row(["method", "accuracy", "macro F1", f"top-{k}"]),
                  _row(["---"] * 4)]
        lines += [_row([m, f"{r[m]['accuracy']:.4f}", f"{r[m]['macro_f1']:.4f}",
                        f"{r[m].get(f'top{k}_accuracy', float('nan')):.4f}"]) for m in METHODS]
        lines += ["", _row(["class", "precision", "recall", "F1", "tiles"]), _row(["---"] * 5)]
        lines += [_row([n, *(f"{r['model'][f'{k}_{n}']:.3f}" for k in ("precision", "recall", "f1")),
                        sum(r["confusion"][i])]) for i, n in enumerate(names)]
        lines += ["\nconfusion (rows true, columns predicted):\n", _row(["true \\ pred", *names]),
                  _row(["---"] * (len(names) + 1))]
        lines += [_row([n, *row]) for n, row in zip(names, r["confusion"])]
    return "\n".join(lines) + "\n"


def log_tensorboard(monitor, report: dict, step: int) -> None:
    """Scalars eval_<split>/<method>/<metric> and the confusion image of each split."""
    for split, r in report["splits"].items():
        monitor.log_scalars({f"eval_{split}/{m}/{k}": v for m in METHODS for k, v in r[m].items()
                             if k == "accuracy" or k == "macro_f1" or k.startswith("top")}, step)
        image = torch.from_numpy(confusion_image(np.array(r["confusion"], np.float64))).float()
        monitor.log_image(f"eval_{split}/confusion", image, step)


def write_reports(report: dict, out, tensorboard: bool = True) -> str:
    """report.json, report.md, confusion_<split>.png and TensorBoard events (eval_classification/tb) in out;
    returns the markdown text."""
    from lib.core.atomic import write_json, write_text
    from lib.train.monitor import MonitoringSystem
    from lib.geoio.png import write_png
    out = Path(out)
    text = report_markdown(report)
    write_json(out / "report.json", report)
    write_text(out / "report.md", text)
    for split, r in report["splits"].items():
        image = confusion_image(np.array(r["confusion"], np.float64))      # (3, H, W) in [0, 1]
        write_png(out / f"confusion_{split}.png", (image.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    monitor = MonitoringSystem(out / "eval_classification", tensorboard)
    log_tensorboard(monitor, report, int(report.get("step") or 0))
    monitor.close()
    return text


def main(checkpoint, loaded, cfg, device, split: str | None, out) -> int:
    """evaluate.py for classifiers (checkpoint or exported): the model and the baselines on val and test (and
    `split`). loaded, cfg, device: as evaluate_classifier takes them."""
    splits = ["val", "test"] + ([split] if split not in (None, "val", "test") else [])
    report = evaluate_classifier(checkpoint, loaded, cfg, device, splits)
    out = Path(out) if out else Path(checkpoint).parent
    print(write_reports(report, out))
    print(f"report.json, report.md and {', '.join(f'confusion_{s}.png' for s in splits)} in {out}")
    return 0
