"""Hyper-parameter search and architecture benchmark: short runs over a grid of config values, ranked.

    python grid_search.py --config configs/quick.json --grid configs/grid.json
    python grid_search.py --config configs/config.json --grid configs/grid.json --workers 2 --search.halving_rungs=1
    python grid_search.py --config configs/config.json --grid configs/grid.json --name arch --folds 3 --resume

The grid file maps dotted config keys to lists: {"optim.lr": [0.003, 0.001], "model.name": ["unet_film", "unet"]}.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

from lib.core.cli import handle_errors, number, setup_logging
from lib.core.config import add_config_args, config_from_args, read_config_file

ALIASES = {"name": "search.name", "trials": "search.trials", "workers": "search.workers", "folds": "search.folds"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Outputs in <run.output_root>/<search.name>/: one train.py run directory per "
                                            "trial, results.jsonl, summary.md, best_config.json, hparams/ "
                                            "(TensorBoard HParams), folds/ (k-fold datasets).")
    add_config_args(parser, default="configs/config.json")
    parser.add_argument("--grid", metavar="FILE", help="JSON or YAML-lite file of dotted keys -> value lists "
                                                       "(replaces search.grid)")
    parser.add_argument("--name", help="search name, the output folder (search.name)")
    parser.add_argument("--trials", type=number(int, 0), help="random points drawn from the grid; 0 = all (search.trials)")
    parser.add_argument("--workers", type=number(int, 1), help="trials at once, one process (and GPU) each (search.workers)")
    parser.add_argument("--folds", type=number(int, 0), help="k-fold over the train+val sites, k >= 2 (search.folds)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed search: run only the trials without a result")
    return parser.parse_known_args(argv)


@handle_errors
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    extra = [*extra, *(f"--{key}={getattr(args, flag)}" for flag, key in ALIASES.items()
                       if getattr(args, flag) is not None)]
    if args.grid:
        extra.append(f"--search.grid={json.dumps(read_config_file(args.grid))}")
    cfg = config_from_args(args, extra)
    from lib.tune import search
    from lib.tune import search_report
    from lib.tune import search_trials
    from lib.core.env import select_device
    from lib.data.folds import prepare_folds

    setup_logging()
    s = cfg.search
    points = search.sample_grid(s.grid, s.trials, s.seed)
    search_dir = Path(cfg.run.output_root) / s.name
    folds = prepare_folds(cfg.data.root, search_dir / "folds", s.folds, cfg.run.seed) if s.folds else None
    plan = search.Plan(cfg, points, search_dir, folds)
    results = search.open_search(plan, args.resume)
    print(f"search {s.name!r}: {len(points)} point(s) of the grid x {len(plan.fold_roots)} fold(s), "
          f"{plan.rungs} rung(s), {s.workers} worker(s) -> {search_dir}")
    train_py = [sys.executable, str(Path(__file__).with_name("train.py"))]
    execute = search_trials.run_in_process if s.workers == 1 else \
        functools.partial(search_trials.run_in_pool, workers=s.workers, command=train_py)
    search.run_search(plan, results, execute)
    rows = search_report.summarise(plan, results.records)
    print("measuring parameters, FLOPs and training speed of each model ...")
    costs = search_report.model_costs(plan, rows, select_device(cfg.run.device))
    print(search_report.write_summary(plan, rows, costs, cfg))
    print(f"wrote {search_dir}/summary.md, results.jsonl and hparams/ (tensorboard --logdir {search_dir}/hparams)")
    return 0 if any(not r["failed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
