"""Hyper-parameter search over dotted config keys: the full grid or random trials, crash-safe and resumable.

A grid maps dotted keys to value lists, {"optim.lr": [1e-3, 3e-4], "model.name": ["unet_film", "unet"]}.
A *point* is one combination of values; it runs once per fold (k-fold over sites) or once, and each of
those runs is a *trial*: a normal train.py run directory `<run.output_root>/<search>/<trial id>/`.

A trial's id is the hash of its full-budget config (run name, output root and device left out), so the
same trial always lands in the same folder. `results.jsonl` gets one record per finished (trial, rung),
appended atomically; `--resume` runs only what has no record, and a trial killed mid-run continues from
its last checkpoint. Successive halving: rung r trains the points still in the race to epochs * growth**r
epochs, each continuing its own last checkpoint under a schedule whose horizon is the final budget (so a
trial that reaches the last rung is exactly the run it would have been uninterrupted), then keeps the best
keep_fraction of them (at least one) for the next rung.
"""
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.core.atomic import append_jsonl, read_jsonl, write_json
from lib.core.config import build_config, config_hash, config_to_dict
from lib.core.errors import ConfigError
from lib.data.shards import read_manifest
from lib.train.trainer import steps_per_epoch

# Keys a grid may not set: the search owns where trials run and what data each fold reads.
RESERVED = ("run.name", "run.output_root", "run.device", "data.root")


def check_grid(grid: dict) -> None:
    """A grid is a non-empty mapping of dotted keys to non-empty lists; reserved keys are refused."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"the grid must map dotted config keys to lists of values, found {grid!r}",
                          hint='e.g. {"optim.lr": [0.001, 0.0003], "model.name": ["unet_film", "unet"]}')
    for key, values in grid.items():
        if key in RESERVED or key.startswith("search."):
            raise ConfigError(f"grid key {key!r} is set by the search itself and cannot be searched",
                              hint=f"reserved: {', '.join(RESERVED)} and search.*")
        if "." not in key or not isinstance(values, list) or not values:
            raise ConfigError(f"grid key {key!r}: expected a dotted key with a non-empty list of values, "
                              f"found {values!r}")


def expand_grid(grid: dict) -> list[dict]:
    """Every combination, the last key varying fastest (itertools.product order)."""
    check_grid(grid)
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]


def sample_grid(grid: dict, n: int, seed: int) -> list[dict]:
    """n distinct combinations drawn with `seed` (all of them when n is 0 or covers the grid), in grid order."""
    check_grid(grid)
    sizes = [len(v) for v in grid.values()]
    total = math.prod(sizes)
    if n == 0 or n >= total:
        return expand_grid(grid)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    digits = np.stack(np.unravel_index(picks, sizes), axis=1)         # (n, keys): mixed-radix decode
    return [{key: grid[key][int(d)] for key, d in zip(grid, row)} for row in digits]


def point_id(params: dict) -> str:
    """Short stable hash of a point's values."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def trial_id(cfg) -> str:
    """Hash of a trial's config without what does not change its result: the run's name, output root
    and device, and the search section (how many workers ran it, which search drew it)."""
    data = config_to_dict(cfg)
    data["run"].update(name="", output_root="", device="")
    data.pop("search")
    return config_hash(build_config(data))


def with_values(base: dict, values: dict, source: str = "grid"):
    """A validated Config: `base` (a config dict) with dotted keys set to `values`."""
    return build_config(base, [f"{key}={json.dumps(value)}" for key, value in values.items()], source=source)


def rung_epochs(search, rung: int) -> int:
    """Epochs a trial has trained by the end of `rung`: epochs * round(1 / keep_fraction) ** rung."""
    return search.epochs * max(2, round(1 / search.keep_fraction)) ** rung


@dataclass
class Trial:
    """One run: a grid point on one fold, at one rung's budget (`cfg` is what train.py runs)."""
    id: str
    point: str
    params: dict
    fold: int | None
    rung: int
    cfg: object

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_root) / self.cfg.run.name


class Plan:
    """Every trial of a search: points x folds, and each trial's config at every rung."""

    def __init__(self, base_cfg, points: list[dict], search_dir: Path, fold_roots: list[str] | None = None):
        self.base, self.search = config_to_dict(base_cfg), base_cfg.search
        self.base.pop("search")                         # trials run plain train.py configs
        self.points, self.dir = points, Path(search_dir)
        self.fold_roots = fold_roots or [None]
        self.rungs = 1 + self.search.halving_rungs
        self.monitor, self.mode = base_cfg.train.monitor, base_cfg.train.monitor_mode
        if self.rungs > 1 and base_cfg.train.max_steps:
            raise ConfigError(f"train.max_steps={base_cfg.train.max_steps} cannot be combined with successive "
                              f"halving, which sets it to the final budget", hint="drop train.max_steps")
        self.full = {point_id(p): [self._full_config(p, root) for root in self.fold_roots] for p in points}
        seen = {}
        for p in points:
            for cfg in self.full[point_id(p)]:
                other = seen.setdefault(trial_id(cfg), p)
                if other is not p:
                    raise ConfigError(f"grid points {params_text(other)} and {params_text(p)} give the same config",
                                      hint="drop duplicate values from the grid")

    def _full_config(self, params: dict, root: str | None):
        """The point's config at the final rung's budget (for halving, the LR schedule's horizon)."""
        values = {**params, "train.epochs": rung_epochs(self.search, self.rungs - 1)}
        if root:
            values["data.root"] = root
        cfg = with_values(self.base, values)
        if self.rungs == 1:
            return cfg
        n_train = read_manifest(cfg.data.root)["splits"]["train"]["samples"]
        per_epoch = steps_per_epoch(n_train, cfg.train.batch_size, cfg.optim.accumulate_steps)
        return with_values(config_to_dict(cfg), {"train.max_steps": cfg.train.epochs * per_epoch})

    def trials(self, params: dict, rung: int) -> list[Trial]:
        pid, folds = point_id(params), len(self.fold_roots)
        out = []
        for fold, full in enumerate(self.full[pid]):
            tid = trial_id(full)
            cfg = with_values(config_to_dict(full), {"train.epochs": rung_epochs(self.search, rung),
                                                     "run.name": tid, "run.output_root": str(self.dir)})
            out.append(Trial(tid, pid, params, fold if folds > 1 else None, rung, cfg))
        return out

    def signature(self) -> dict:
        """What must match for --resume to continue this search rather than mix two."""
        return {"points": {point_id(p): [trial_id(c) for c in self.full[point_id(p)]] for p in self.points},
                "rungs": self.rungs, "keep_fraction": self.search.keep_fraction, "epochs": self.search.epochs}


class Results:
    """The append-only results.jsonl: one record per finished (trial, rung), never two."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = read_jsonl(self.path)

    def done(self, trial: Trial) -> bool:
        return any(r["trial"] == trial.id and r["rung"] == trial.rung for r in self.records)

    def add(self, record: dict) -> None:
        append_jsonl(self.path, record)
        self.records.append(record)

    def at_rung(self, rung: int) -> list[dict]:
        return [r for r in self.records if r["rung"] == rung]


def point_scores(records: list[dict], mode: str) -> dict[str, float]:
    """point -> mean monitored value over its folds; a failed or missing fold makes it the worst."""
    worst = -math.inf if mode == "max" else math.inf
    by_point: dict[str, list[float]] = {}
    for r in records:
        value = r.get("value")
        ok = r["status"] == "ok" and value is not None and math.isfinite(value)
        by_point.setdefault(r["point"], []).append(value if ok else worst)
    return {p: float(np.mean(v)) if all(math.isfinite(x) for x in v) else worst for p, v in by_point.items()}


def survivors(points: list[dict], records: list[dict], keep_fraction: float, mode: str) -> list[dict]:
    """The best floor(n * keep_fraction) points (at least one) by their score; ties go to the lower id."""
    scores = point_scores(records, mode)
    worst = -math.inf if mode == "max" else math.inf
    sign = -1 if mode == "max" else 1
    ranked = sorted(points, key=lambda p: (sign * scores.get(point_id(p), worst), point_id(p)))
    return ranked[:max(1, math.floor(len(points) * keep_fraction + 1e-9))]


def open_search(plan: Plan, resume: bool) -> Results:
    """results.jsonl of the search folder; refuses to mix searches or to restart one without --resume."""
    results = Results(plan.dir / "results.jsonl")
    spec = plan.dir / "search.json"
    if results.records and not resume:
        raise ConfigError(f"{plan.dir} already holds a search with {len(results.records)} finished trial(s)",
                          hint="add --resume to run only what is missing, or pick another --search.name")
    if resume and spec.exists():
        old = json.loads(spec.read_text())
        if old.get("signature") != plan.signature():
            raise ConfigError(f"{spec}: the grid, the base config or the budgets differ from the search "
                              f"being resumed", hint="resume with the same arguments, or pick another "
                                                     "--search.name")
    write_json(spec, {"signature": plan.signature(), "grid": plan.search.grid,
                      "points": {point_id(p): p for p in plan.points}, "folds": plan.fold_roots})
    return results


def run_search(plan: Plan, results: Results, execute, say=print) -> None:
    """Run every missing trial rung by rung; `execute(trials)` yields one record per finished trial."""
    points = plan.points
    for rung in range(plan.rungs):
        if rung:
            points = survivors(points, [r for r in results.at_rung(rung - 1) if r["point"] in
                                        {point_id(p) for p in points}], plan.search.keep_fraction, plan.mode)
        trials = [t for p in points for t in plan.trials(p, rung)]
        todo = [t for t in trials if not results.done(t)]
        say(f"rung {rung + 1}/{plan.rungs}: {len(points)} point(s), {len(trials)} trial(s) of "
            f"{rung_epochs(plan.search, rung)} epoch(s); {len(trials) - len(todo)} already done, {len(todo)} to run")
        for record in execute(todo):
            results.add(record)
            value = "failed: " + str(record["error"])[:120] if record["status"] != "ok" else \
                f"{record['monitor']} {record['value']:.4f}"
            fold = "" if record["fold"] is None else f" fold {record['fold']}"
            say(f"  {record['trial']} {params_text(record['params'])}{fold}: {value} ({record['seconds']:.0f} s)")


def params_text(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
