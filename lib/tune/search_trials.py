"""Running search trials: in this process one after another, or as a pool of train.py processes (one GPU
each when there are GPUs). Either way a trial is an ordinary run directory, resumed from its last
checkpoint when one exists, and its result is read back from the run's own metrics.jsonl.
"""
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
import traceback

from lib.core.atomic import read_jsonl
from lib.core.cli import setup_logging
from lib.core.config import save_config


def trial_record(trial, error: str | None, seconds: float) -> dict:
    """The record of a finished (trial, rung): its best validation by train.monitor (what best.ckpt holds)."""
    key, mode = trial.cfg.train.monitor, trial.cfg.train.monitor_mode
    path = trial.run_dir / "metrics.jsonl"
    vals = [r for r in read_jsonl(path) if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    best = (max if mode == "max" else min)(vals, key=lambda r: r[key]) if vals else None
    if error is None and best is None:
        error = f"no finite {key} in {path}"
    return {"trial": trial.id, "point": trial.point, "params": trial.params, "fold": trial.fold,
            "rung": trial.rung, "epochs": trial.cfg.train.epochs, "status": "failed" if error else "ok",
            "monitor": key, "value": best[key] if best else None, "best_epoch": best.get("epoch") if best else None,
            "metrics": {k: v for k, v in (best or {}).items() if k.startswith("val/")}, "error": error,
            "seconds": round(seconds, 2), "run_dir": trial.run_dir.name, "time": round(time.time(), 3)}


def run_in_process(trials):
    """Each trial in this process, one after another; its output goes to <run>/stdout.log and train.log."""
    from lib.train.runner import train_model
    for trial in trials:
        trial.run_dir.mkdir(parents=True, exist_ok=True)
        start, error = time.perf_counter(), None
        try:
            with open(trial.run_dir / "stdout.log", "a", encoding="utf-8") as out, \
                    contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                setup_logging(trial.run_dir / "train.log")
                try:
                    train_model(trial.cfg, resume="auto")
                except Exception as exc:  # a failed trial is a result; the search goes on (Ctrl-C still stops it)
                    traceback.print_exc()
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            setup_logging()                               # the console again
        yield trial_record(trial, error, time.perf_counter() - start)


def visible_gpus() -> list[str]:
    """CUDA device ids a worker may be pinned to ([] without CUDA)."""
    import torch
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in listed.split(",") if d.strip()] if listed else \
        [str(i) for i in range(torch.cuda.device_count())]


def _stop_with_parent() -> None:
    """Runs in the child before exec (Linux): SIGTERM when the search process dies, even by SIGKILL, so
    no orphan trial keeps writing into a run directory that a resumed search will reuse."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)                 # 1 = PR_SET_PDEATHSIG


def _launch(trial, slot: int, command: list[str], gpus: list[str], workers: int):
    """Start `command --config <run>/config.json --resume auto` for one trial; (process, its log file)."""
    save_config(trial.cfg, trial.run_dir / "config.json")
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    # N processes on a few cores: without this each spawns a thread per core and they thrash
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    log = open(trial.run_dir / "stdout.log", "a", encoding="utf-8")
    proc = subprocess.Popen([*command, "--config", str(trial.run_dir / "config.json"), "--resume", "auto"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stop_with_parent)
    return proc, log


def _tail(path, lines: int = 3) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:])


def run_in_pool(trials, workers: int, command: list[str], poll_s: float = 0.5):
    """Up to `workers` trials at once, each `command` (e.g. [python, train.py]) in its own process.

    Records come back in the order trials finish. If the search stops (Ctrl-C, an error), the trials
    still running are terminated; their last checkpoints let --resume continue them.
    """
    gpus = visible_gpus()
    pending, running, free = list(trials), {}, list(range(workers))
    try:
        while pending or running:
            while pending and free:
                slot, trial = free.pop(0), pending.pop(0)
                running[slot] = (trial, *_launch(trial, slot, command, gpus, workers), time.perf_counter())
            time.sleep(poll_s)
            for slot, (trial, proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                free.append(slot)
                error = None if proc.returncode == 0 else \
                    f"train.py exited with status {proc.returncode}: {_tail(trial.run_dir / 'stdout.log')}"
                yield trial_record(trial, error, time.perf_counter() - start)
    finally:
        for trial, proc, log, _ in running.values():
            proc.terminate()
        for trial, proc, log, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
