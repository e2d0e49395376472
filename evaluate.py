"""Evaluate a checkpoint on a dataset split, every tile at every threshold, beside the baselines.

    python evaluate.py --checkpoint runs/quick/best.ckpt
    python evaluate.py --checkpoint runs/exp1/best.ckpt --split val --tta --out reports/exp1
    python evaluate.py --checkpoint runs/exp1/best.ckpt --data.root=data/real --eval.batch_size=32
    python evaluate.py --checkpoint runs/seed0/last.ckpt runs/seed1/last.ckpt --split test     # their mean
"""
import argparse
import sys
import time
from pathlib import Path

from lib.core.cli import handle_errors


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The dataset and eval settings come from the checkpoint's config; override any key as "
               "--section.key=value. Writes report.json, report.md and TensorBoard events (eval_<split>/tb) "
               "beside the checkpoint, or into --out.")
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="checkpoint (.ckpt) or exported model (.ts); several checkpoints: their ensemble "
                             "(the mean of their probabilities), with the first one's config")
    parser.add_argument("--split", choices=("train", "val", "test"), help="split to evaluate (default eval.split)")
    parser.add_argument("--tta", action="store_true", default=None, help="average the 8 D4 transforms")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default run.device)")
    parser.add_argument("--out", help="report folder (default: the checkpoint's folder)")
    return parser.parse_known_args(argv)


@handle_errors
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from lib.core.atomic import write_json, write_text
    from lib.core.config import build_config, config_to_dict
    from lib.data.dataset import ShardDataset, build_loader
    from lib.core.env import default_workers, select_device
    from lib.infer.evaluate_gaps import Evaluator, report_markdown, train_gap_rates
    from lib.infer.loading import describe_version, load_models
    from lib.train.monitor import MonitoringSystem
    from lib.data.shards import read_manifest

    loaded = load_models(args.checkpoint, "cpu")
    checkpoint = " + ".join(args.checkpoint)
    print(describe_version(loaded))
    base = config_to_dict(loaded.config) if loaded.config else loaded.meta.get("config", {})
    cfg = build_config(base, overrides, source=f"{args.checkpoint[0]} (embedded config) + overrides")
    device = select_device(args.device or cfg.run.device)
    loaded.net.to(device)
    if loaded.task == "classification":                                   # tile classes vs the baselines
        from lib.infer import evaluate_classes
        return evaluate_classes.main(args.checkpoint[0], loaded, cfg, device, args.split, args.out)
    split = args.split or cfg.eval.split
    if args.tta:
        cfg.eval.tta = True
    manifest = read_manifest(cfg.data.root)
    thresholds = manifest.get("thresholds_m", cfg.data.thresholds_m)
    arrays = ("dsm", "chm", "mask_*") + (("ground",) if getattr(loaded.net, "needs_ground", False) else ())
    dataset = ShardDataset(cfg.data.root, split, shuffle=False, equal_counts=False, arrays=arrays, meta_keys=("site",))
    if not len(dataset):
        from lib.core.errors import DataError
        counts = {name: entry.get("samples") for name, entry in manifest.get("splits", {}).items()}
        raise DataError(f"{cfg.data.root}: the {split!r} split has no tiles (tiles per split: {counts})",
                        hint="evaluate another split (--split val), or prepare the data with smaller blocks "
                             "(--data.block_px) or more sites so every split gets some")
    loader = build_loader(dataset, cfg.eval.batch_size, default_workers(cfg.data.workers))
    evaluator = Evaluator(loaded.net, thresholds, manifest.get("pixel_size_m", cfg.data.pixel_size_m),
                          train_gap_rates(manifest, thresholds), cfg.eval, device, cfg.run.seed)
    start = time.perf_counter()
    for batch in loader:
        evaluator.update(batch)
    report = {"checkpoint": checkpoint, "split": split, "data_root": cfg.data.root,
              "seconds": round(time.perf_counter() - start, 2), **evaluator.report()}
    out = Path(args.out) if args.out else Path(args.checkpoint[0]).parent
    text = report_markdown(report)
    write_json(out / "report.json", report)
    write_text(out / "report.md", text)
    monitor = MonitoringSystem(out / f"eval_{split}", cfg.log.tensorboard)
    evaluator.log_tensorboard(monitor, report, f"eval_{split}", step=int(loaded.meta.get("step") or 0))
    monitor.close()
    print(text)
    print(f"{report['tiles']} tiles in {report['seconds']:.1f} s; report.json and report.md in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
