"""LR range test: raise the learning rate exponentially over a short training, see where the loss falls fastest.

    python lr_finder.py --config configs/quick.json
    python lr_finder.py --config configs/config.json --lr-min 1e-6 --lr-max 1 --steps 200
    python lr_finder.py --config configs/quick.json --write-config configs/quick_lr.json --use valley
"""
import argparse
import sys
from pathlib import Path

from lib.core.cli import handle_errors, number, setup_logging
from lib.core.config import add_config_args, config_from_args


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Outputs in --out (default runs/<run.name>/lr_finder/): lr_finder.csv "
                                            "(lr, loss, ema_loss, smoothed_loss), lr_finder.json, tb/. Model, "
                                            "optimiser and RNG states are restored after the sweep.")
    add_config_args(parser, default="configs/config.json")
    parser.add_argument("--lr-min", type=number(float, 0, low_open=True), default=1e-6, help="first LR of the sweep (default 1e-6)")
    parser.add_argument("--lr-max", type=number(float, 0, low_open=True), default=1.0, help="last LR of the sweep (default 1)")
    parser.add_argument("--steps", type=number(int, 2), default=200, help="optimiser steps from lr-min to lr-max (default 200)")
    parser.add_argument("--beta", type=number(float, 0, 1), default=0.9, help="EMA smoothing of the loss (default 0.9)")
    parser.add_argument("--diverge", type=number(float, 1, low_open=True), default=4.0,
                        help="stop once the smoothed loss exceeds this many times its best (default 4)")
    parser.add_argument("--use", choices=("valley", "steepest", "minimum"), default="valley",
                        help="suggestion written by --write-config (default valley)")
    parser.add_argument("--write-config", metavar="FILE", help="write the config with optim.lr set to the suggestion")
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/<run.name>/lr_finder)")
    return parser.parse_known_args(argv)


@handle_errors
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    cfg = config_from_args(args, extra)
    from lib.tune import lr_finder as lrf
    from lib.core.atomic import write_json, write_text
    from lib.train.checkpoint import seed_everything
    from lib.core.config import build_config, config_to_dict, save_config
    from lib.core.env import select_device
    from lib.core.errors import TrainingError
    from lib.train.runner import build_trainer, run_dir_of

    setup_logging()
    seed_everything(cfg.run.seed)
    trainer = build_trainer(cfg, select_device(cfg.run.device), callbacks=[])
    print(f"sweeping the LR from {args.lr_min:g} to {args.lr_max:g} over {args.steps} steps "
          f"(batch {cfg.train.batch_size}, {cfg.model.name}, loss {cfg.loss.name}) ...")
    result = lrf.lr_range_test(trainer, args.lr_min, args.lr_max, args.steps, args.beta, args.diverge)
    found = lrf.analyse(result, args.use)
    smoothed, summary = found["smoothed"], found["summary"]
    chart = lrf.chart(result, smoothed, found["suggestions"])
    out = Path(args.out) if args.out else run_dir_of(cfg) / "lr_finder"
    write_text(out / "lr_finder.csv", lrf.to_csv(result, smoothed))
    write_json(out / "lr_finder.json", {"suggestions": found["suggestions"], "warnings": found["warnings"],
                                        "stop": result["stop"], "summary": summary,
                                        "settings": {k: result[k] for k in ("lr_min", "lr_max", "steps", "beta")}})
    lrf.log_tensorboard(out / "tb", result, smoothed, f"```\n{chart}\n```\n{summary}")
    print(f"{chart}\nstopped: {result['stop']}\n{summary}\nwrote {out}/lr_finder.csv and {out}/tb")
    if args.write_config:
        if found["lr"] is None:
            raise TrainingError("no LR suggestion to write: the loss never fell during the sweep",
                                hint="run sanity_check.py, or widen --lr-min/--lr-max")
        lr = float(f"{found['lr']:.3g}")
        save_config(build_config(config_to_dict(cfg), [f"optim.lr={lr!r}"]), args.write_config)
        print(f"wrote {args.write_config} with optim.lr={lr:g} ({found['chosen']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
