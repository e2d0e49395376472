"""Sanity checks before a long run: baselines, initial loss, batch shapes, gradients, overfitting, batch size.

    python sanity_check.py --config configs/quick.json
    python sanity_check.py --config configs/config.json --tiles 8 --steps 200
    python sanity_check.py --config configs/config.json --max-batch 512 --run.device=cuda
    python sanity_check.py --config configs/quick.json --write-config configs/quick_batch.json

Exit status 0 when nothing failed (warnings allowed), 1 when a check failed, 2 on a config or data error.
"""
import argparse
import json
import sys
from pathlib import Path

from lib.core.cli import handle_errors, number, setup_logging
from lib.core.config import add_config_args, config_from_args


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Outputs in --out (default runs/<run.name>/sanity/): report.json "
                                            "and tb/ (overfit curve, baseline scores, the report).")
    add_config_args(parser, default="configs/config.json")
    parser.add_argument("--tiles", type=number(int, 1), default=4, help="tiles the model must overfit (default 4)")
    parser.add_argument("--steps", type=number(int, 1), default=100, help="most optimiser steps to overfit them (default 100)")
    parser.add_argument("--target", type=number(float, 0, 1, low_open=True), default=0.5,
                        help="overfitting passes when the loss falls to this fraction of its start (default 0.5)")
    parser.add_argument("--max-batch", type=number(int, 1),
                        help="largest batch the batch-size finder tries (default 4096 on CUDA; on CPU, where it "
                             "only measures, 16 x train.batch_size)")
    parser.add_argument("--write-config", metavar="FILE",
                        help="write the config with train.batch_size set to the largest batch that fits "
                             "(on CPU: the estimate)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/<run.name>/sanity)")
    return parser.parse_known_args(argv)


@handle_errors
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    cfg = config_from_args(args, extra)
    from lib.tune import sanity
    from lib.core.atomic import write_json
    from lib.core.env import select_device
    from lib.train.runner import run_dir_of

    setup_logging()
    device = select_device(cfg.run.device)
    print(f"sanity checks of {cfg.model.name} on {cfg.data.root} ({device}) ...")
    checks = sanity.run_sanity(cfg, device, args.tiles, args.steps, args.target, args.max_batch)
    text = sanity.report(checks)
    out = Path(args.out) if args.out else run_dir_of(cfg) / "sanity"
    write_json(out / "report.json", [{"name": c.name, "status": c.status, "message": c.message,
                                      "details": json.loads(json.dumps(c.details, default=str))} for c in checks])
    sanity.log_tensorboard(out / "tb", checks, text)
    curve = next(c.details["curve"] for c in checks if c.name == "overfit")
    print(text)
    print("overfit loss curve (step: loss): " + ", ".join(f"{s}: {loss:.3f}" for s, loss, _ in curve))
    print(f"wrote {out}/report.json and {out}/tb")
    if args.write_config:
        write_batch_config(cfg, next(c for c in checks if c.name == "batch size"), args.write_config)
    return 1 if any(c.status == "fail" for c in checks) else 0


def write_batch_config(cfg, check, path) -> None:
    """The config with train.batch_size = the batch-size finder's largest fitting batch, as lr_finder.py does
    with its LR."""
    from lib.core.config import build_config, config_to_dict, save_config
    from lib.core.errors import TrainingError
    largest = check.details.get("largest", 0)
    if not largest:
        raise TrainingError(f"no batch size to write: {check.message}",
                            hint="run on the GPU the training will use, or set train.batch_size by hand")
    save_config(build_config(config_to_dict(cfg), [f"train.batch_size={largest}"]), path)
    print(f"wrote {path} with train.batch_size={largest}")


if __name__ == "__main__":
    sys.exit(main())
