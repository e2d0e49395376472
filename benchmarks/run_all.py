"""Run every benchmarks/bench_*.py with small sizes, keep going past failures, print one combined table.

    python benchmarks/run_all.py                      # minutes on a laptop CPU; GPU cases skip without CUDA
    python benchmarks/run_all.py --only shards prepare --timeout 900
    python benchmarks/run_all.py --full               # each script's default (issue-sized) figures

Each script's own output streams through as it runs; the table at the end gathers every
`case  ours  peer  ratio` row (units differ per script: see its header lines). Exits 1 when a script
failed or timed out, 0 otherwise.
"""
import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.machine import describe  # noqa: E402

SMALL = {  # script stem -> arguments for a quick run; scripts not listed run with their defaults
    "bench_augment": ["--reps", "2"],
    "bench_components": ["--size", "1024", "--repeats", "1"],
    "bench_lzw": ["--size-mb", "0.25", "--repeats", "1"],
    "bench_predict": ["--height", "300", "--width", "400", "--repeats", "1"],
    "bench_prepare": ["--size", "2048", "--repeats", "1"],
    "bench_shards": ["--tiles", "64", "--repeats", "1"],
    "bench_synthetic": ["--sizes", "256", "512", "--repeats", "1", "--crown-size", "256"],
    "bench_train_step": ["--cases", "eager,channels_last", "--reps", "1"],
    "bench_transfer": ["--repeats", "5"],
}
SKIP = {"bench_quality": "needs --checkpoint: a quality report of a trained model, not a speed benchmark"}
NUMBER = re.compile(r"^(n/a|-|[-+]?\d+(\.\d+)?([eE][-+]?\d+)?x?)$")


def parse_rows(text: str) -> list[tuple[str, str, str, str, str]]:
    """(case, ours, peer, ratio, note) of each output line with three numbers (or n/a) after a case name."""
    rows = []
    for line in text.splitlines():
        tokens = line.split()
        if not tokens or line.startswith("#"):
            continue
        for i in range(1, len(tokens) - 2):
            if all(NUMBER.match(t) for t in tokens[i:i + 3]):
                rows.append((" ".join(tokens[:i]), *tokens[i:i + 3], " ".join(tokens[i + 3:])))
                break
    return rows


def run(script: Path, args: list[str], timeout: float) -> tuple[str, str, float]:
    """(status, stdout, seconds) of one script; its output is echoed as it arrives."""
    print(f"\n=== {script.name} {' '.join(args)}", flush=True)
    start, lines = time.perf_counter(), []
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
    watchdog = threading.Timer(timeout, proc.kill)  # also ends a script that hangs without output
    watchdog.start()
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    proc.wait()
    timed_out = not watchdog.is_alive() and proc.returncode < 0
    watchdog.cancel()
    status = (f"timed out after {timeout:.0f} s" if timed_out else
              "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    return status, "".join(lines), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="script names without 'bench_' (e.g. shards)")
    parser.add_argument("--full", action="store_true", help="run each script with its own defaults")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per script")
    args = parser.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{name.removeprefix('bench_')}" for name in args.only}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            parser.error(f"no such benchmark(s) {sorted(unknown)}; found {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem in wanted]
    print(f"# {describe()}")
    results = []
    for script in scripts:
        if script.stem in SKIP:
            results.append((script.stem, "skipped", 0.0, []))
            print(f"\n=== {script.name} skipped: {SKIP[script.stem]}")
            continue
        status, out, seconds = run(script, [] if args.full else SMALL.get(script.stem, []), args.timeout)
        results.append((script.stem, status, seconds, parse_rows(out)))

    print(f"\n{'script':18s} {'case':30s} {'ours':>10s} {'peer':>10s} {'ratio':>7s}  note")
    for name, status, seconds, rows in results:
        for case, ours, peer, ratio, note in rows:
            print(f"{name:18s} {case[:30]:30s} {ours:>10s} {peer:>10s} {ratio:>7s}  {note}")
    print()
    for name, status, seconds, rows in results:
        print(f"{name:18s} {status:24s} {seconds:7.1f} s  {len(rows)} row(s)")
    return 0 if all(status in ("ok", "skipped") for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
