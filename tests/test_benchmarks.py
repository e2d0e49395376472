"""benchmarks/run_all.py cannot pass silently: a missing peer library is named with its rows and fails the
run unless --allow-missing-peers; every bench script but the two being rewritten parses no arguments."""
import ast
import importlib.util
import subprocess
import sys

import pytest

from benchmarks import run_all
from conftest import REPO

ROWS = [("flip", "1.0", "n/a", "n/a", ""), ("crop", "2.0", "n/a", "n/a", "")]


def test_missing_peers_names_each_script_and_library():
    installed = {"scipy"}.__contains__
    missing = run_all.missing_peers(["bench_augment", "bench_prepare", "bench_components", "bench_synthetic"],
                                    installed)
    assert missing == {"bench_augment": ["kornia"], "bench_prepare": ["webdataset"]}
    assert run_all.missing_peers(["bench_shards"], lambda name: True) == {}


def test_missing_peer_report_lists_the_rows_without_a_peer():
    results = [("bench_augment", "ok", 1.0, ROWS), ("bench_lzw", "ok", 1.0, [("dsm", "1", "2", "0.5", "")]),
               ("bench_synthetic", "ok", 1.0, ROWS)]
    report = run_all.missing_peer_report(results, {"bench_augment": ["kornia"], "bench_lzw": ["imagecodecs"]})
    assert report[0] == "MISSING PEER bench_augment: kornia not installed; rows without a peer: flip, crop"
    assert report[1].startswith("MISSING PEER bench_lzw: imagecodecs") and "stand-in" in report[1]
    assert "--allow-missing-peers" in report[-1] and len(report) == 3
    assert run_all.missing_peer_report(results, {}) == []
    own_check = [("bench_quality", run_all.MISSING_PEER_STATUS, 9.0, [])]   # a script that exits 3 itself
    assert run_all.missing_peer_report(own_check, {})[0].startswith("MISSING PEER bench_quality: the script names")


def test_run_all_exits_non_zero_naming_a_missing_peer():
    """bench_lzw takes a second at run_all's small size; its peer is imagecodecs."""
    command = [sys.executable, "benchmarks/run_all.py", "--only", "lzw"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("imagecodecs") is None:
        assert done.returncode == 1 and "!! MISSING PEER bench_lzw: imagecodecs not installed" in done.stderr
        allowed = subprocess.run(command + ["--allow-missing-peers"], cwd=REPO, capture_output=True, text=True,
                                 timeout=300)
        assert allowed.returncode == 0 and "MISSING PEER bench_lzw" in allowed.stderr
    else:
        assert done.returncode == 0 and "MISSING PEER" not in done.stderr, done.stderr


REWRITTEN_ELSEWHERE = {"bench_quality", "bench_predict"}


@pytest.mark.parametrize("script", sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py")
                                          if p.stem not in REWRITTEN_ELSEWHERE))
def test_bench_scripts_need_no_arguments(script):
    """No argument is required: each runs on its defaults with no argument given."""
    tree = ast.parse((REPO / "benchmarks" / f"{script}.py").read_text())
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument":
            names = [a.value for a in call.args if isinstance(a, ast.Constant)]
            required = any(k.arg == "required" and getattr(k.value, "value", False) for k in call.keywords)
            assert not required and all(n.startswith("-") for n in names), (script, names)
