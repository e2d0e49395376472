"""kill -9 of train.py, prepare_data.py and grid_search.py at many points; resume loses nothing.

Each kill is a real SIGKILL of a subprocess. tests/fault_hooks.py stops the child at an exact point (a
marker file says it got there) so the kill lands where the test says, deterministically; one more test
kills plain `python train.py` at seeded random moments. After every kill each checkpoint on disk must
load, and `--resume auto` must end bitwise where an uninterrupted run ends. Full disks and unwritable
folders: test_faults_disk.py; NaN/Inf, exploding LR and OOM: test_faults_numeric.py.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from lib.train.checkpoint import load_checkpoint

HOOKS = REPO / "tests" / "fault_hooks.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: same sums every run
SKIP = {"config", "version", "digest"}  # paths and wall-clock time differ between run folders (so the digest)


# ------------------------------------------------------------------------------------------- helpers
def write_config(tmp_path: Path, data_root: Path, name: str, **train) -> Path:
    """The tiny config as a JSON file for the scripts: 3 epochs of 9 steps, last.ckpt every 3 steps."""
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(data_root)
    cfg["run"].update(name=name, output_root=str(tmp_path / "runs"))
    cfg["train"].update({"epochs": 3, "checkpoint_every_steps": 3, **train})
    cfg["log"].update(tensorboard=False, progress_every_steps=1)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_script(script: str, *argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / f"{script}.py"), *map(str, argv)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def kill_at(point: str, script: str, *argv, log: Path, timeout: float = 300) -> None:
    """Start `script` with the fault point armed, wait until it is reached, SIGKILL the process."""
    marker = log.with_suffix(".reached")
    marker.unlink(missing_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(HOOKS), point, str(marker), script, *map(str, argv)],
                                cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{point} never reached (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert marker.read_text() == point


def checkpoints_readable(run_dir: Path) -> dict:
    """Loads every *.ckpt (weights_only, as resume does): {name: (epoch, step)}."""
    return {p.name: (c["epoch"], c["step"]) for p in sorted(run_dir.glob("*.ckpt"))
            for c in [load_checkpoint(p)]}


def differences(a, b, path="") -> list[str]:
    """Paths where two checkpoint trees differ; tensors compared bitwise (dtype, shape and bytes)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a if k not in SKIP for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))
        return [] if same else [path]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: NaN equals NaN, -0.0 differs from 0.0."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def logged(run_dir: Path) -> list[tuple]:
    """metrics.jsonl without the wall-clock and memory columns: (step, epoch, sorted items) per line."""
    keep = ("val/", "train/loss", "train/lr", "train/grad_norm")
    return [(r["step"], r.get("epoch"), sorted((k, v) for k, v in r.items() if k.startswith(keep)))
            for line in (run_dir / "metrics.jsonl").read_text().splitlines() for r in [json.loads(line)]]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    for name in ("last.ckpt", "best.ckpt"):
        diff = differences(load_checkpoint(run_dir / name), load_checkpoint(reference / name))
        assert not diff, f"{name} differs from the uninterrupted run at {diff[:5]}"
    assert logged(run_dir) == logged(reference)
    assert not sorted(run_dir.glob("*.tmp")), "temporary files left behind"  # pathlib globs dot files too


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted `python train.py` run: (its folder, the data root)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp, tiny_dataset / "data", "ref")
    done = run_script("train", "--config", config)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "runs" / "ref", tiny_dataset / "data"


# ------------------------------------------------------------------------------ train.py kill -9
# (fault point, {checkpoint: (epoch, step)} on disk after the kill). 9 steps per epoch, last.ckpt every
# 3 steps and at epoch ends; step 9 saves last.ckpt twice (mid-epoch, then at the epoch end).
KILLS = [
    ("step:2", {}),                                                 # before any checkpoint
    ("ckpt_partial:last:3", {}),                                    # first checkpoint half-written
    ("ckpt_written:last:3", {}),                                    # complete temp file, not renamed
    ("ckpt_renamed:last:3", {"last.ckpt": (0, 3)}),                 # renamed, folder not fsynced
    ("after_step:5", {"last.ckpt": (0, 3)}),                        # between checkpoints
    ("ckpt_partial:last:6", {"last.ckpt": (0, 3)}),                 # the previous last.ckpt survives
    ("validate:0", {"last.ckpt": (0, 9)}),                          # during validation
    ("ckpt_partial:best:9", {"last.ckpt": (0, 9)}),                 # first best.ckpt half-written
    ("replace:last.ckpt:1", {"best.ckpt": (0, 9), "last.ckpt": (0, 9)}),  # epoch-end save not renamed
    ("step:13", {"best.ckpt": (0, 9), "last.ckpt": (1, 12)}),
    ("replace:config.json:1", {"best.ckpt": (0, 9), "last.ckpt": (1, 12)}),  # writing config.json
    ("ckpt_written:last:18", {"best.ckpt": (0, 9), "last.ckpt": (1, 15)}),
    ("startup", {"best.ckpt": (0, 9), "last.ckpt": (1, 15)}),     # resumed, not stepped yet
    ("ckpt_renamed:last:24", {"last.ckpt": (2, 24)}),
    ("train_end", {"last.ckpt": (3, 27)}),                          # final checkpoint written
]


def test_train_killed_at_15_points_resumes_bitwise(reference, tmp_path):
    ref_dir, data_root = reference
    config = write_config(tmp_path, data_root, "killed")
    run_dir = tmp_path / "runs" / "killed"
    for i, (point, expected) in enumerate(KILLS):
        kill_at(point, "train", "--config", config, "--resume", "auto", log=tmp_path / f"kill{i}.log")
        found = checkpoints_readable(run_dir) if run_dir.exists() else {}
        for name, where in expected.items():
            assert found.get(name) == where, f"after kill at {point}: {found}"
        assert "last.ckpt" in expected or "last.ckpt" not in found, f"after kill at {point}: {found}"
    done = run_script("train", "--config", config, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run_dir, ref_dir)


def test_train_killed_at_random_moments_resumes_bitwise(reference, tmp_path):
    """Plain `python train.py`, SIGKILLed at seeded random moments: just after a random step's progress line."""
    ref_dir, data_root = reference
    config = write_config(tmp_path, data_root, "random")
    run_dir, rng = tmp_path / "runs" / "random", random.Random(9)
    targets = sorted(rng.sample(range(2, 22), 3))  # of 27 steps; a resumed run logs the target again
    for attempt, target in enumerate(targets):
        log = tmp_path / f"random{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "train.py", "--config", str(config), "--resume", "auto"],
                                    cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while f" step {target} " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, log.read_text()[-3000:]  # 5+ steps were left: still running
        checkpoints_readable(run_dir)
    done = run_script("train", "--config", config, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run_dir, ref_dir)


# ------------------------------------------------------------------------ prepare_data.py kill -9
def dataset_state(folder: Path) -> dict | None:
    """What a reader sees: None without a manifest, else the manifest, after checking every listed shard."""
    from lib.data.shards import read_manifest, verify_shard
    if not (folder / "manifest.json").exists():
        return None
    manifest = read_manifest(folder)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            verify_shard(folder / entry["file"], entry["sha256"])
    return manifest


def prepare_config(tmp_path: Path, root: Path, name: str, **data) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update(root=str(root), **data)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_prepare_killed_mid_way_never_exposes_a_partial_dataset(tiny_dataset, tmp_path, capsys):
    """Kill a first build, then rebuilds over a finished (larger) dataset at each stage; rerun completes."""
    import train
    from lib.data.build_segmentation import build_dataset
    from lib.core.config import load_config
    from lib.data.site_sources import sources_from_config
    root = tmp_path / "data"
    old = prepare_config(tmp_path, root, "old", synthetic_size_px=160)  # 2 train shards
    kill_at("shard_partial:train:0", "prepare_data", "--config", old, log=tmp_path / "first.log")
    assert dataset_state(root) is None
    assert train.main(["--config", str(old), f"--run.output_root={tmp_path / 'runs'}"]) == 2
    assert f"cannot read manifest {root / 'manifest.json'}" in capsys.readouterr().err

    cfg = load_config(old)
    before = build_dataset(cfg, sources_from_config(cfg.data, cfg.run.seed), root)
    assert len(before["splits"]["train"]["shards"]) == 2
    new = prepare_config(tmp_path, root, "new")
    # Renames: 3 tars and the manifest into .staging; the old manifest goes; 3 tars and the manifest move in.
    for i, (point, seen) in enumerate([("shard_partial:train:0", before), ("replaced:*.tar:2", before),
                                       ("replace:manifest.json:1", before), ("replaced:*.tar:4", None),
                                       ("replace:manifest.json:2", None)]):
        kill_at(point, "prepare_data", "--config", new, log=tmp_path / f"kill{i}.log")
        assert dataset_state(root) == seen, point

    done = run_script("prepare_data", "--config", new)
    assert done.returncode == 0, done.stderr[-3000:]
    assert dataset_state(root) == json.loads((tiny_dataset / "data" / "manifest.json").read_text())
    assert sorted(p.name for p in root.iterdir()) == [
        "config.json", "manifest.json", "test-000000.tar", "train-000000.tar", "val-000000.tar"]


# ------------------------------------------------------------------------- grid_search.py kill -9
def search_argv(tmp_path: Path, data_root: Path, name: str) -> list:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"optim.lr": [0.003, 0.001]}))
    return ["--config", write_config(tmp_path, data_root, name), "--grid", grid, "--name", name,
            "--search.epochs=1", "--resume"]


def test_grid_search_killed_resumes_without_duplicate_trials(reference, tmp_path):
    from lib.core.atomic import read_jsonl
    _, data_root = reference
    done = run_script("grid_search", *search_argv(tmp_path, data_root, "whole"))
    assert done.returncode == 0, done.stderr[-3000:]
    argv = search_argv(tmp_path, data_root, "killed")
    # trial 1 mid-run; its record not yet renamed into results.jsonl; trial 2 mid-checkpoint
    for i, point in enumerate(["step:5", "replace:results.jsonl:1", "ckpt_partial:last:6"]):
        kill_at(point, "grid_search", *argv, log=tmp_path / f"search{i}.log")
        assert len(read_jsonl(tmp_path / "runs" / "killed" / "results.jsonl")) == (i == 2)
    done = run_script("grid_search", *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    whole, killed = (read_jsonl(tmp_path / "runs" / name / "results.jsonl") for name in ("whole", "killed"))
    assert sorted(r["trial"] for r in killed) == sorted(r["trial"] for r in whole)  # each trial once
    same = ("trial", "params", "status", "value", "metrics")
    assert sorted([r[k] for k in same] for r in killed) == sorted([r[k] for k in same] for r in whole)
    for record in whole:
        assert_same_run(*(tmp_path / "runs" / name / record["run_dir"] for name in ("killed", "whole")))
    assert not list((tmp_path / "runs" / "killed").glob("*.tmp"))


def test_reliability_doc_names_tests_that_exist():
    import re
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?:::|`)(test_\w+)`", doc))  # `tests/x.py::test_a`, `::test_b`, `test_c`
    code = "".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py"))
    assert len(named) >= 20
    assert not [name for name in named if f"def {name}(" not in code]
