"""Train a threshold-conditioned gap segmentation model (or, with --data.task=regression --loss.name=huber,
a canopy-height regression model) on prepared shards.

    python train.py --config configs/quick.json
    python train.py --config configs/config.json --run.name=exp1 --optim.lr=3e-4 --resume auto
    torchrun --nproc_per_node=2 train.py --config configs/config.json      # DDP: NCCL on GPUs, gloo on CPU
    python train.py --config configs/quick.json --init-from runs/quick/best.ckpt --train.freeze_encoder_epochs=2
"""
import argparse
import sys

from lib.core.cli import handle_errors, number, setup_logging
from lib.core.config import add_config_args, config_from_args
from lib.core.env import distributed_info


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Outputs: runs/<run.name>/ with best.ckpt, last.ckpt, config.json, "
                                            "metrics.jsonl, train.log and TensorBoard events (tb/).")
    add_config_args(parser, default="configs/config.json")
    parser.add_argument("--resume", metavar="CKPT|auto",
                        help="continue a run exactly: a checkpoint path, or 'auto' for the run's last.ckpt "
                             "when it exists (a fresh start otherwise)")
    parser.add_argument("--init-from", metavar="CKPT",
                        help="start from another run's weights (transfer learning); see train.freeze_encoder_epochs "
                             "and optim.encoder_lr_scale")
    parser.add_argument("--profile", type=number(int, 0), metavar="N",
                        help="PyTorch profiler over the first N optimiser steps (same as --train.profile_steps=N); "
                             "trace in runs/<name>/profile/")
    return parser.parse_known_args(argv)


@handle_errors
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    if args.profile is not None:
        extra = [*extra, f"--train.profile_steps={args.profile}"]
    cfg = config_from_args(args, extra)
    from lib.train.runner import run_dir_of, train_model

    rank = distributed_info()[0]
    setup_logging(run_dir_of(cfg) / "train.log", rank=rank)
    run_dir = train_model(cfg, resume=args.resume, init_from=args.init_from)
    if rank == 0:
        print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
