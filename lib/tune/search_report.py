"""What a search found: points ranked (terminal and summary.md) with mean +- std over folds, what each
model costs (parameters, FLOPs per tile, training samples/s), best_config.json ready for train.py, and a
TensorBoard HParams view of every point. Everything here is rebuilt from results.jsonl.
"""
import json
import math
import shutil
import time

import numpy as np

from lib.core.atomic import write_text
from lib.core.config import config_to_dict, save_config
from lib.tune.search import params_text, point_id, with_values

SHOWN = ("val/f1_mean", "val/macro_f1", "val/loss")  # shown beside the monitored metric, those the task has


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarise(plan, records: list[dict]) -> list[dict]:
    """One row per point at the furthest rung it reached, mean and std of each val metric over its folds;
    ranked: furthest rung first, then by the monitored metric (failed points last)."""
    rows = []
    for params in plan.points:
        mine = [r for r in records if r["point"] == point_id(params)]
        if not mine:
            continue
        rung = max(r["rung"] for r in mine)
        at = [r for r in mine if r["rung"] == rung]
        ok = [r for r in at if r["status"] == "ok"]
        keys = sorted({k for r in ok for k in r["metrics"]})
        metrics = {k: _mean_std([r["metrics"][k] for r in ok if k in r["metrics"]]) for k in keys}
        value = _mean_std([r["value"] for r in ok]) if ok and len(ok) == len(at) else (math.nan, math.nan)
        rows.append({"point": point_id(params), "params": params, "rung": rung, "epochs": at[0]["epochs"],
                     "folds": len(at), "failed": len(at) - len(ok), "value": value, "metrics": metrics,
                     "seconds": sum(r["seconds"] for r in mine), "trials": sorted({r["trial"] for r in at}),
                     "error": next((r["error"] for r in at if r["status"] != "ok"), None)})
    sign = -1 if plan.mode == "max" else 1
    return sorted(rows, key=lambda r: (-r["rung"], math.isnan(r["value"][0]),
                                       sign * r["value"][0] if not math.isnan(r["value"][0]) else 0, r["point"]))


def model_cost(cfg, device, steps: int = 5) -> dict:
    """Parameters, forward GFLOP per tile, and training samples/s from the median of `steps` real
    optimiser steps on one batch after a warm-up (the median shrugs off a busy machine's hiccups)."""
    import torch
    from lib.train.checkpoint import seed_everything
    from lib.models import model_summary
    from lib.train.runner import build_trainer
    from lib.tune.batch_finder import batch_count
    from lib.tune.sanity import first_batch
    seed_everything(cfg.run.seed)
    trainer = build_trainer(cfg, device, callbacks=[])
    info = model_summary(trainer.raw_model, (cfg.data.tile_px, cfg.data.tile_px))
    batch = first_batch(trainer)
    times = []
    for _ in range(steps + 1):                           # the first is a warm-up: allocator, cudnn autotuning
        trainer.batch_in_epoch = trainer.accumulate - 1  # every timed step is a full optimiser step
        start = time.perf_counter()
        trainer.train_step(batch)                        # returns float(loss): the step ends synchronised
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    rate = batch_count(batch) / float(np.median(times[1:]))
    return {"params": info["params"], "gflops": info["flops"] / 1e9, "samples_per_s": rate}


def model_costs(plan, rows: list[dict], device) -> dict[str, dict]:
    """point -> model_cost for the points that trained, measured once per distinct model/data/train setting."""
    cache, out = {}, {}
    for row in rows:
        if row["failed"]:
            continue
        cfg = plan.trials(row["params"], 0)[0].cfg
        key = json.dumps([config_to_dict(cfg)[s] for s in ("model", "data", "train")], sort_keys=True)
        if key not in cache:
            cache[key] = model_cost(cfg, device)
        out[row["point"]] = cache[key]
    return out


def _cell(mean_std: tuple[float, float], folds: int) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if folds > 1 else f"{mean:.4f}"


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def table(rows: list[dict], grid_keys: list[str], monitor: str, costs: dict) -> str:
    """Markdown table, best first."""
    shown = [k for k in SHOWN if any(k in r["metrics"] for r in rows)]
    header = ["rank", *grid_keys, monitor, *shown, "epochs", "folds", "params (M)", "GFLOP/tile", "samples/s",
              "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows, start=1):
        cost = costs.get(row["point"], {})
        status = "ok" if not row["failed"] else f"{row['failed']} failed"
        cells = [str(i), *(_value(row["params"][k]) for k in grid_keys), _cell(row["value"], row["folds"]),
                 *(_cell(row["metrics"].get(k, (math.nan, math.nan)), row["folds"]) for k in shown),
                 str(row["epochs"]), str(row["folds"]),
                 f"{cost['params'] / 1e6:.3f}" if cost else "-", f"{cost['gflops']:.3f}" if cost else "-",
                 f"{cost['samples_per_s']:.1f}" if cost else "-", status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_table(rows: list[dict]) -> str:
    """Every threshold-averaged (or, for classes, overall) validation metric per point (mean ± std over folds)."""
    keys = sorted({k for r in rows for k in r["metrics"] if k.endswith(("_mean", "accuracy", "macro_f1"))})
    keys.append("val/loss")
    lines = ["| rank | point | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for i, row in enumerate(rows, start=1):
        cells = [_cell(row["metrics"].get(k, (math.nan, math.nan)), row["folds"]) for k in keys]
        lines.append(f"| {i} | {params_text(row['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict], monitor: str) -> str:
    """Plain words: the winner, and whether the runner-up is separable from it."""
    ranked = [r for r in rows if not math.isnan(r["value"][0])]
    if not ranked:
        return f"every point failed; first error: {rows[0]['error'] if rows else 'no trial ran'}"
    best = ranked[0]
    folds = f"mean ± std over {best['folds']} folds" if best["folds"] > 1 else "one run"
    text = (f"Best: {params_text(best['params'])} with {monitor} {_cell(best['value'], best['folds'])} "
            f"({folds}, {best['epochs']} epochs).")
    if len(ranked) > 1:
        second = ranked[1]
        gap = abs(best["value"][0] - second["value"][0])
        noise = max(best["value"][1], second["value"][1])
        text += f" Runner-up: {params_text(second['params'])} at {_cell(second['value'], second['folds'])}; "
        if best["folds"] > 1:
            text += ("the gap is within one std: these folds do not separate them." if gap <= noise else
                     f"the gap ({gap:.4f}) exceeds one std ({noise:.4f}).")
        else:
            text += f"a gap of {gap:.4f} from single short runs; use --folds for error bars before trusting it."
    return text


def log_hparams(folder, rows: list[dict], monitor: str) -> None:
    """TensorBoard HParams: one run per point (rewritten from the results each time, never appended)."""
    from torch.utils.tensorboard import SummaryWriter
    shutil.rmtree(folder, ignore_errors=True)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for row in rows:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                       for k, v in row["params"].items()}
            keys = [k for k in (monitor, *SHOWN) if k in row["metrics"]]
            writer.add_hparams(hparams, {f"hparam/{k}": row["metrics"][k][0] for k in keys}, run_name=row["point"])


def write_summary(plan, rows: list[dict], costs: dict, base_cfg) -> str:
    """summary.md, best_config.json and the HParams logs in the search folder; returns the summary text."""
    grid_keys = list(plan.search.grid) or sorted({k for r in rows for k in r["params"]})
    text = f"{table(rows, grid_keys, plan.monitor, costs)}\n\n{verdict(rows, plan.monitor)}"
    ranked = [r for r in rows if not math.isnan(r["value"][0])]
    if ranked:
        best = with_values({k: v for k, v in config_to_dict(base_cfg).items() if k != "search"},
                           {**ranked[0]["params"], "run.name": f"{plan.search.name}_best"})
        save_config(best, plan.dir / "best_config.json")
        text += (f"\nFull run with the best values (the base config's own epochs): "
                 f"python train.py --config {plan.dir / 'best_config.json'}")
    header = (f"# Search `{plan.search.name}`\n\n{len(plan.points)} point(s), {len(plan.fold_roots)} fold(s), "
              f"{plan.rungs} rung(s); ranked by {plan.monitor} ({plan.mode}), best validation of each trial. "
              f"Cost columns: parameters, forward GFLOP per {base_cfg.data.tile_px} px tile, training samples/s "
              f"(median of 5 steps, one model after another in one process).")
    sections = [header, text, "## Every metric (best validation of each trial)", metric_table(rows)]
    failures = [f"- {params_text(r['params'])}: {r['error']}" for r in rows if r["failed"]]
    if failures:
        sections += ["## Failures", "\n".join(failures)]
    write_text(plan.dir / "summary.md", "\n\n".join(sections) + "\n")
    log_hparams(plan.dir / "hparams", rows, plan.monitor)
    return text
