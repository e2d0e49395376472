"""Search: grid expansion and sampling, trial ids, atomic results, resume after a kill runs only what is
missing, successive halving keeps the right points and continues runs exactly, k-fold datasets, the
process pool, and the summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_config
from lib.train import runner
from lib.tune import search
from lib.tune import search_report
from lib.tune import search_trials
from lib.core.atomic import append_jsonl, read_jsonl
from lib.train.callbacks import Callback
from lib.train.checkpoint import load_checkpoint
from lib.core.config import config_to_dict, load_config, save_config
from lib.core.errors import ConfigError, DataError
from lib.data.folds import prepare_folds, site_folds
from lib.data.shards import iter_shard, read_manifest

GRID = {"optim.lr": [0.003, 0.001], "model.name": ["unet_film", "unet_film_cbam"], "train.batch_size": [4, 8, 2]}
QUIET = {"log": {"tensorboard": False, "images_every_epochs": 0, "progress_every_steps": 1000}}


def _cfg(tiny_dataset, tmp_path, grid, **search_fields):
    sections = {**QUIET, "search": {"grid": grid, "epochs": 1, **search_fields}}
    cfg = tiny_config(tiny_dataset, **sections)
    data = config_to_dict(cfg)
    data["run"]["output_root"] = str(tmp_path / "runs")
    return search.with_values(data, {}, source="test")


def _plan(cfg, folds=None):
    points = search.sample_grid(cfg.search.grid, cfg.search.trials, cfg.search.seed)
    return search.Plan(cfg, points, Path(cfg.run.output_root) / cfg.search.name, folds)


def _fake(scores: dict, calls: list):
    """An executor that trains nothing: each trial scores scores[lr] (None = it fails)."""
    def execute(trials):
        for t in trials:
            calls.append((t.id, t.rung))
            value = scores[t.params["optim.lr"]]
            if isinstance(value, list):
                value = value[t.fold]
            yield {"trial": t.id, "point": t.point, "params": t.params, "fold": t.fold, "rung": t.rung,
                   "epochs": t.cfg.train.epochs, "status": "ok" if value is not None else "failed",
                   "monitor": "val/iou_mean", "value": value, "metrics": {"val/iou_mean": value} if value else {},
                   "error": None if value is not None else "boom", "seconds": 0.0}
    return execute


def test_expand_grid_is_the_full_product_in_order():
    points = search.expand_grid(GRID)
    assert len(points) == 2 * 2 * 3
    assert points[0] == {"optim.lr": 0.003, "model.name": "unet_film", "train.batch_size": 4}
    assert points[1]["train.batch_size"] == 8 and points[3]["model.name"] == "unet_film_cbam"  # last key fastest
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 12


def test_sample_grid_draws_distinct_points_reproducibly():
    full = [json.dumps(p, sort_keys=True) for p in search.expand_grid(GRID)]
    drawn = search.sample_grid(GRID, 5, seed=3)
    keys = [json.dumps(p, sort_keys=True) for p in drawn]
    assert len(set(keys)) == 5 and set(keys) <= set(full)
    assert keys == sorted(keys, key=full.index)                     # reported in grid order
    assert drawn == search.sample_grid(GRID, 5, seed=3)
    assert drawn != search.sample_grid(GRID, 5, seed=4)
    assert search.sample_grid(GRID, 0, 0) == search.sample_grid(GRID, 99, 0) == search.expand_grid(GRID)


@pytest.mark.parametrize("grid, match", [({}, "must map"), ({"optim.lr": []}, "non-empty list"),
                                         ({"run.name": ["a"]}, "set by the search"),
                                         ({"search.epochs": [1]}, "set by the search"),
                                         ({"optim.lrr": [0.1]}, "did you mean 'optim.lr'"),
                                         ({"optim.lr": [0.001, 0.001]}, "same config")])
def test_bad_grids_fail_before_anything_runs(tiny_dataset, tmp_path, grid, match):
    cfg = _cfg(tiny_dataset, tmp_path, {"optim.lr": [0.1]})
    with pytest.raises(ConfigError, match=match):
        search.Plan(cfg, search.sample_grid(grid, 0, 0), tmp_path / "search")


def test_trial_ids_hash_the_config_not_where_or_how_it_runs(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, {"optim.lr": [0.003]})
    same = search.with_values(config_to_dict(cfg), {"run.name": "other", "run.output_root": "/x",
                                                    "run.device": "cpu", "search.workers": 3})
    assert search.trial_id(cfg) == search.trial_id(same)
    assert search.trial_id(cfg) != search.trial_id(search.with_values(config_to_dict(cfg), {"optim.lr": 0.002}))
    assert search.trial_id(cfg) != search.trial_id(search.with_values(config_to_dict(cfg), {"run.seed": 1}))
    code = ("import sys, json; sys.path.insert(0, '.'); from lib.tune import search; from lib.core import config; "
            f"print(search.trial_id(config.build_config(json.loads({json.dumps(json.dumps(config_to_dict(cfg)))}))))")
    other_process = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == search.trial_id(cfg)     # stable across processes


def test_results_append_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"trial": "a"})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(DataError, match="cannot write .*results.jsonl"):
        append_jsonl(path, {"trial": "b"})
    monkeypatch.undo()
    assert read_jsonl(path) == [{"trial": "a"}] and sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_successive_halving_keeps_the_best_points_by_their_fold_mean(tiny_dataset, tmp_path):
    grid = {"optim.lr": [0.1, 0.2, 0.3, 0.4, 0.5]}
    scores = {0.1: [0.9, 0.1], 0.2: [0.6, 0.6], 0.3: [0.55, 0.55], 0.4: None, 0.5: [0.2, 0.2]}
    cfg = _cfg(tiny_dataset, tmp_path, grid, halving_rungs=2, keep_fraction=0.5)
    plan = _plan(cfg, prepare_folds(tiny_dataset / "data", tmp_path / "folds", 2, seed=0))
    calls = []
    search.run_search(plan, search.open_search(plan, resume=False), _fake(scores, calls), say=lambda s: None)
    lrs_at = {r: sorted({rec["params"]["optim.lr"] for rec in read_jsonl(plan.dir / "results.jsonl")
                         if rec["rung"] == r}) for r in range(3)}
    assert lrs_at == {0: [0.1, 0.2, 0.3, 0.4, 0.5], 1: [0.2, 0.3], 2: [0.2]}   # 5 -> 2 -> 1; mean, not max
    assert [search.rung_epochs(cfg.search, r) for r in range(3)] == [1, 2, 4]
    assert len(calls) == len(set(calls)) == 2 * (5 + 2 + 1)
    horizon = plan.trials({"optim.lr": 0.2}, 2)[0].cfg
    assert plan.trials({"optim.lr": 0.2}, 0)[0].cfg.train.max_steps == horizon.train.max_steps > 0


def test_survivors_break_ties_by_id_and_put_failures_last():
    points = [{"x": i} for i in range(4)]
    rec = [{"point": search.point_id(p), "status": "ok", "value": 0.5} for p in points[:3]]
    rec.append({"point": search.point_id(points[3]), "status": "failed", "value": None})
    kept = search.survivors(points, rec, 0.75, "max")
    assert points[3] not in kept and len(kept) == 3
    tied = search.survivors(points[:3], rec, 0.34, "max")
    assert tied == [min(points[:3], key=search.point_id)]
    low = search.survivors(points, [dict(r, value=i) for i, r in enumerate(rec[:3])] + rec[3:], 0.5, "min")
    assert low == points[:2]


class Kill(Callback):
    """A kill of the whole search in the middle of one trial (after a mid-epoch checkpoint)."""
    order = 99

    def __init__(self, lr, at):
        self.lr, self.at = lr, at

    def on_batch_end(self, trainer, logs):
        if logs.get("optimizer_step") and trainer.cfg.optim.lr == self.lr and trainer.step == self.at:
            raise KeyboardInterrupt("simulated kill")


def test_resume_after_a_kill_runs_only_what_is_missing(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path, {"optim.lr": [0.003, 0.002, 0.001]}, name="killed")
    cfg = search.with_values(config_to_dict(cfg), {"train.checkpoint_every_steps": 3})
    plan = _plan(cfg)
    build = runner.build_callbacks
    monkeypatch.setattr(runner, "build_callbacks", lambda *a, **k: build(*a, **k) + [Kill(0.002, 5)])
    ran = []

    def execute(trials):
        for record in search_trials.run_in_process(trials):
            ran.append(record["params"]["optim.lr"])
            yield record
    with pytest.raises(KeyboardInterrupt):
        search.run_search(plan, search.open_search(plan, resume=False), execute, say=lambda s: None)
    monkeypatch.undo()
    assert ran == [0.003] and len(read_jsonl(plan.dir / "results.jsonl")) == 1
    with pytest.raises(ConfigError, match="--resume"):
        search.open_search(plan, resume=False)
    search.run_search(plan, search.open_search(plan, resume=True), execute, say=lambda s: None)
    assert ran == [0.003, 0.002, 0.001]                             # the finished trial did not run again
    records = read_jsonl(plan.dir / "results.jsonl")
    assert sorted(r["trial"] for r in records) == sorted({r["trial"] for r in records})
    killed = next(r for r in records if r["params"]["optim.lr"] == 0.002)
    assert "resumed from" in (plan.dir / killed["trial"] / "train.log").read_text()   # continued, not restarted
    search.run_search(plan, search.open_search(plan, resume=True), execute, say=lambda s: None)
    assert len(ran) == 3                                            # nothing left: nothing runs
    changed = search.with_values(config_to_dict(cfg), {"search.grid": {"optim.lr": [0.003, 0.0005]}})
    with pytest.raises(ConfigError, match="differ"):
        search.open_search(_plan(changed), resume=True)

    rows = search_report.summarise(plan, records)
    assert [r["params"]["optim.lr"] for r in rows] == \
        [r["params"]["optim.lr"] for r in sorted(records, key=lambda r: -r["value"])]
    text = search_report.write_summary(plan, rows, {}, cfg)
    best = load_config(plan.dir / "best_config.json")
    assert best.optim.lr == rows[0]["params"]["optim.lr"] and best.train.epochs == cfg.train.epochs
    assert "Best: optim.lr=" in text and (plan.dir / "summary.md").read_text().count("| ") > 3
    assert len(list((plan.dir / "hparams").iterdir())) == 1 + 3     # the HParams summary and one run per point


def test_halving_continues_a_trial_exactly_as_one_uninterrupted_run(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, {"optim.lr": [0.003]}, halving_rungs=1, name="exact")
    plan = _plan(cfg)
    search.run_search(plan, search.open_search(plan, resume=False), search_trials.run_in_process, say=lambda s: None)
    last = plan.trials({"optim.lr": 0.003}, 1)[0]
    assert [r["epochs"] for r in read_jsonl(plan.dir / "results.jsonl")] == [1, 2]
    direct = search.with_values(config_to_dict(last.cfg), {"run.name": "direct"})
    a = load_checkpoint(runner.train_model(direct) / "last.ckpt")["model"]
    b = load_checkpoint(last.run_dir / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_site_folds_partition_the_train_and_val_sites(tiny_dataset):
    manifest = read_manifest(tiny_dataset / "data")
    groups = site_folds(manifest, 2, seed=0)
    pool = sorted(s for s, m in manifest["sites"].items() if m["split"] != "test")
    assert sorted(sum(groups, [])) == pool and abs(len(groups[0]) - len(groups[1])) <= 1
    assert groups == site_folds(manifest, 2, seed=0)
    with pytest.raises(DataError, match="k-fold"):
        site_folds(manifest, len(pool) + 1, seed=0)


def test_fold_datasets_hold_the_right_sites_and_their_own_statistics(tiny_dataset, tmp_path):
    source = read_manifest(tiny_dataset / "data")
    roots = prepare_folds(tiny_dataset / "data", tmp_path / "folds", 2, seed=0)
    total = source["splits"]["train"]["samples"] + source["splits"]["val"]["samples"]
    for root in roots:
        fold = read_manifest(root)
        val_sites = set(fold["split_rule"]["val_sites"])
        samples = {s: [x for shard in fold["splits"][s]["shards"] for x in iter_shard(f"{root}/{shard['file']}")]
                   for s in ("train", "val")}
        assert {x["json"]["site"] for x in samples["val"]} == val_sites
        assert not val_sites & {x["json"]["site"] for x in samples["train"]}
        assert len(samples["train"]) + len(samples["val"]) == total
        masks = np.stack([x["mask_2m.npy"] for x in samples["val"]])
        assert fold["summary"]["val"]["gap_fraction"]["2m"] == pytest.approx((masks == 1).sum() / (masks != 255).sum(),
                                                                             abs=1e-5)
        pixels = sum(int(np.isfinite(x["dsm.npy"]).sum()) for x in samples["train"])
        assert fold["normalization"]["dsm_rel"]["count"] == pixels      # train tiles of this fold only
    stamp = os.path.getmtime(f"{roots[0]}/manifest.json")
    assert prepare_folds(tiny_dataset / "data", tmp_path / "folds", 2, seed=0) == roots
    assert os.path.getmtime(f"{roots[0]}/manifest.json") == stamp    # reused, not rebuilt


FAKE_TRAIN = """
import json, os, sys, time
cfg = json.load(open(sys.argv[sys.argv.index("--config") + 1]))
run = os.path.join(cfg["run"]["output_root"], cfg["run"]["name"])
start = time.time()
time.sleep(0.5)
if cfg["model"]["name"] == "no_such_model":
    sys.exit("error: unknown model.name 'no_such_model'")
with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 1, "epoch": 0, "val/iou_mean": cfg["optim"]["lr"]}) + chr(10))
json.dump({"argv": sys.argv[1:], "threads": os.environ.get("OMP_NUM_THREADS"), "span": [start, time.time()]},
          open(os.path.join(run, "fake.json"), "w"))
"""


def test_process_pool_runs_trials_in_parallel_processes_and_records_failures(tiny_dataset, tmp_path):
    """The pool with a stand-in for train.py (no torch import: the pool, not training, is under test)."""
    cfg = _cfg(tiny_dataset, tmp_path, {"model.name": ["unet_film", "no_such_model"], "optim.lr": [0.003, 0.002]},
               workers=2, name="pool")
    plan = _plan(cfg)
    trials = [t for p in plan.points for t in plan.trials(p, 0)]
    records = list(search_trials.run_in_pool(trials, 2, [sys.executable, "-c", FAKE_TRAIN], poll_s=0.05))
    assert sorted(r["trial"] for r in records) == sorted(t.id for t in trials)
    ok = [r for r in records if r["params"]["model.name"] == "unet_film"]
    assert all(r["status"] == "ok" and r["value"] == r["params"]["optim.lr"] for r in ok) and len(ok) == 2
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 2 and all("status 1" in r["error"] and "no_such_model" in r["error"] for r in failed)
    runs = [json.loads((plan.dir / r["trial"] / "fake.json").read_text()) for r in ok]
    assert all(run["argv"][-2:] == ["--resume", "auto"] and run["threads"] for run in runs)
    assert load_config(plan.dir / ok[0]["trial"] / "config.json").run.name == ok[0]["trial"]
    spans = sorted(run["span"] for run in runs)                       # the first two trials start together
    assert spans[1][0] < spans[0][1]                                  # and overlap: two workers


def test_grid_search_script_end_to_end(tiny_dataset, tmp_path, capsys):
    import grid_search
    grid, config = tmp_path / "grid.json", tmp_path / "tiny.json"
    grid.write_text(json.dumps({"model.name": ["unet_film", "unet"]}))
    save_config(_cfg(tiny_dataset, tmp_path, {}), config)
    argv = ["--config", str(config), "--grid", str(grid), "--name", "cli"]
    assert grid_search.main(argv) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "cli"
    assert "| rank | model.name | val/iou_mean" in out and "Best: model.name=" in out
    assert load_config(folder / "best_config.json").model.name in ("unet_film", "unet")
    assert "## Every metric" in (folder / "summary.md").read_text()
    assert grid_search.main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert grid_search.main([*argv, "--resume"]) == 0 and "0 to run" in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_pool_children_die_with_a_killed_search():
    """A SIGKILLed search must not leave a trial running that a resumed search would start a second time."""
    import signal
    import time
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; from lib.tune.search_trials import _stop_with_parent; "
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_stop_with_parent); "
         "print(p.pid, flush=True); time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive() -> bool:          # a dead child whose new parent does not reap it stays a zombie ('Z')
        try:
            with open(f"/proc/{child}/status") as f:
                return "\tZ" not in next(line for line in f if line.startswith("State:"))
        except FileNotFoundError:
            return False
    deadline = time.time() + 5
    while alive() and time.time() < deadline:
        time.sleep(0.05)
    still = alive()
    if still:
        os.kill(child, signal.SIGKILL)
    assert not still
