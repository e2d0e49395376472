"""Run every benchmarks/bench_*.py with small sizes, keep going past failures, print one combined table.

    python benchmarks/run_all.py                      # minutes on a laptop CPU; GPU cases skip without CUDA
    python benchmarks/run_all.py --only shards prepare --timeout 900
    python benchmarks/run_all.py --full               # each script's default (issue-sized) figures
    python benchmarks/run_all.py --allow-missing-peers   # exit 0 even without benchmarks/requirements.txt

Each script's own output streams through as it runs; the table at the end gathers every
`case  ours  peer  ratio` row (units differ per script: see its header lines). A ratio needs its peer
library (benchmarks/requirements.txt): a missing one is named with the rows it leaves without a peer,
and the run exits 1 unless --allow-missing-peers (a script that checks its own peers and exits 3 counts
as a missing peer). Exits 1 when a script failed or timed out too.
"""
import argparse
import importlib.util
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
    "bench_quality": ["--checkpoint", "weights/gaps_dsm_v5.pt"],
    "bench_shards": ["--tiles", "64", "--repeats", "1"],
    "bench_synthetic": ["--sizes", "256", "512", "--repeats", "1", "--crown-size", "256"],
    "bench_train_step": ["--cases", "eager,channels_last", "--reps", "1"],
    "bench_transfer": ["--repeats", "5"],
}
PEERS = {  # script stem -> the libraries of its peer column (benchmarks/requirements.txt)
    "bench_augment": ["kornia"],
    "bench_components": ["scipy"],
    "bench_lzw": ["imagecodecs"],    # without it the peer is a stand-in: tifffile reading uncompressed bytes
    "bench_prepare": ["scipy", "webdataset"],
    "bench_shards": ["webdataset"],
}
MISSING_PEER_EXIT = 3  # a script that checks its own peers (bench_quality.py) exits 3 when one is missing
MISSING_PEER_STATUS = "ran; a peer is missing"
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
    status = (f"timed out after {timeout:.0f} s" if timed_out else "ok" if proc.returncode == 0 else
              MISSING_PEER_STATUS if proc.returncode == MISSING_PEER_EXIT else f"failed (exit {proc.returncode})")
    return status, "".join(lines), time.perf_counter() - start


def missing_peers(stems, installed=lambda name: importlib.util.find_spec(name) is not None) -> dict:
    """script stem -> its peer libraries that are not installed (scripts with all of them left out)."""
    missing = {stem: [name for name in PEERS.get(stem, []) if not installed(name)] for stem in stems}
    return {stem: names for stem, names in missing.items() if names}


def missing_peer_report(results, missing: dict) -> list[str]:
    """Loud lines naming each missing peer library and the rows it leaves without a peer figure."""
    lines = []
    for name, status, _, rows in results:
        if status == MISSING_PEER_STATUS:
            lines.append(f"MISSING PEER {name}: the script names it above (it exited {MISSING_PEER_EXIT})")
        elif name in missing:
            no_peer = [case for case, _, peer, _, _ in rows if peer == "n/a"]
            what = (f"rows without a peer: {', '.join(no_peer)}" if no_peer else
                    "its peer column is a stand-in, not the library")
            lines.append(f"MISSING PEER {name}: {', '.join(missing[name])} not installed; {what}")
    if lines:
        lines.append("install them with `pip install -r benchmarks/requirements.txt`, or accept the gaps "
                     "with --allow-missing-peers")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="script names without 'bench_' (e.g. shards)")
    parser.add_argument("--full", action="store_true", help="run each script with its own defaults")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per script")
    parser.add_argument("--allow-missing-peers", action="store_true",
                        help="exit 0 when peer libraries are missing (their rows are still named)")
    args = parser.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{name.removeprefix('bench_')}" for name in args.only}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            parser.error(f"no such benchmark(s) {sorted(unknown)}; found {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem in wanted]
    print(f"# {describe()}")
    missing = missing_peers([s.stem for s in scripts])
    results = []
    for script in scripts:
        status, out, seconds = run(script, [] if args.full else SMALL.get(script.stem, []), args.timeout)
        results.append((script.stem, status, seconds, parse_rows(out)))

    print(f"\n{'script':18s} {'case':30s} {'ours':>10s} {'peer':>10s} {'ratio':>7s}  note")
    for name, status, seconds, rows in results:
        for case, ours, peer, ratio, note in rows:
            print(f"{name:18s} {case[:30]:30s} {ours:>10s} {peer:>10s} {ratio:>7s}  {note}")
    print()
    for name, status, seconds, rows in results:
        print(f"{name:18s} {status:24s} {seconds:7.1f} s  {len(rows)} row(s)")
    report = missing_peer_report(results, missing)
    if report:
        print("\n" + "\n".join(f"!! {line}" for line in report), file=sys.stderr)
    failed = any(status not in ("ok", MISSING_PEER_STATUS) for _, status, _, _ in results)
    return 1 if failed or (report and not args.allow_missing_peers) else 0


if __name__ == "__main__":
    sys.exit(main())
