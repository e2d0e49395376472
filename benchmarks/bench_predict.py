"""predict.py end to end, this tree against a pinned copy of today's main (commit 6e6e615), side by side.

    python benchmarks/bench_predict.py                        # each tree's shipped model, NZ DSM mirrored to 1078 x 898
    python benchmarks/bench_predict.py --checkpoint weights/gaps_dsm_v5.pt   # one model through both paths
    python benchmarks/bench_predict.py --repeats 3 --thresholds 2 5 10 15
    python benchmarks/bench_predict.py --rss-size 10000       # + peak RSS of a 10,000 x 10,000 px scene

Both trees run `predict.main` on the same scene and thresholds, each in its own process (interleaved, best of
--repeats: other work on the machine slows whole runs), timed from the call (model load, prediction, area
filter, tables, quick-look; not the interpreter's start). Prints `case  new  main  ratio`: megapixels per
second, peak RSS, and the IoU of the two maps per threshold. --rss-size maps a synthetic scene of that side
(Wellington's DSM mirrored) with this tree only and prints its peak RSS; the network there is a per-pixel
stand-in (--rss-model shipped for the real one): the pipeline's memory is what grows with a scene, the
network's is one window batch, measured by the first run.
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PINNED = "6e6e615"  # main before issue 24
REAL = ROOT.parent / "shared" / "data" / "real" / "wellington_DSM.tif"
WORKER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import predict
start = time.perf_counter()
assert predict.main(sys.argv[2:]) == 0
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def mirrored_dsm(path: Path, height: int, width: int, rows: int = 512) -> None:
    """Wellington's DSM tiled with alternate flips (no seams) to height x width, written strip by strip."""
    from lib.geoio.geotiff_read import read_raster
    from lib.geoio.geotiff_write import RasterWriter

    dsm, info = read_raster(REAL)
    h, w = dsm.shape
    col = np.arange(width)
    col_src = np.where((col // w) % 2, w - 1 - col % w, col % w)
    with RasterWriter(path, replace(info, height=height, width=width), np.float32, float("nan")) as out:
        for row0 in range(0, height, rows):
            row = np.arange(row0, min(row0 + rows, height))
            row_src = np.where((row // h) % 2, h - 1 - row % h, row % h)
            out.write(row0, dsm[row_src][:, col_src])


def pinned_tree(folder: Path) -> Path:
    """Today's main as files (git archive of PINNED) in folder/main."""
    tree = folder / "main"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PINNED], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run(tree: Path, argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, str(tree), *argv], cwd=tree, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"predict.py in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def iou(a_path: Path, b_path: Path) -> float:
    from lib.geoio.geotiff_read import read_raster

    a, b = read_raster(a_path)[0] == 1, read_raster(b_path)[0] == 1
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def compare(args, folder: Path) -> None:
    """The new tree against the pinned main on the same scene: MP/s, peak RSS, IoU per threshold."""
    from lib.gaps.masks import threshold_tag
    from lib.geoio.geotiff_read import read_info

    dsm = folder / "scene.tif"
    mirrored_dsm(dsm, args.height, args.width)
    trees = {"new": ROOT, "main": pinned_tree(folder)}
    best = {}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            checkpoint = args.checkpoint if name == "new" else args.main_checkpoint or args.checkpoint
            argv = ["--dsm", str(dsm), "--out", str(folder / name), "--thresholds", *map(str, args.thresholds),
                    *(["--checkpoint", str(Path(checkpoint).resolve())] if checkpoint else [])]
            result = run(tree, argv)
            old = best.setdefault(name, result)
            old.update(seconds=min(old["seconds"], result["seconds"]),
                       peak_rss_mb=max(old["peak_rss_mb"], result["peak_rss_mb"]))
    info = read_info(dsm)
    mp = info.height * info.width / 1e6
    models = {"new": args.checkpoint or "the shipped model", "main": args.main_checkpoint or args.checkpoint
              or "weights/gaps_dsm_v5.pt (shipped then)"}
    print(f"# {info.width} x {info.height} px ({mp:.3f} MP), thresholds {args.thresholds}; best of {args.repeats}; "
          f"main = {PINNED}; models: new {models['new']}, main {models['main']}")
    if models["new"] != models["main"]:
        print("# two different models: the IoU rows compare their maps, not one model through two paths")
    print(f"{'case':34} {'new':>10} {'main':>10} {'ratio':>7}")
    new, main = mp / best["new"]["seconds"], mp / best["main"]["seconds"]
    print(f"{'MP/s, predict.py end to end':34} {new:10.4f} {main:10.4f} {new / main:7.2f}")
    print(f"{'seconds':34} {best['new']['seconds']:10.2f} {best['main']['seconds']:10.2f} "
          f"{best['new']['seconds'] / best['main']['seconds']:7.2f}")
    print(f"{'peak RSS MB':34} {best['new']['peak_rss_mb']:10.0f} {best['main']['peak_rss_mb']:10.0f} "
          f"{best['new']['peak_rss_mb'] / best['main']['peak_rss_mb']:7.2f}")
    for t in args.thresholds:
        tag = threshold_tag(t)
        print(f"{'IoU new vs main, ' + tag:34} {iou(folder / 'new' / f'gaps_{tag}.tif', folder / 'main' / f'gaps_{tag}.tif'):10.6f}")


def rss_run(args, folder: Path) -> None:
    """Peak RSS of this tree's predict.py on a synthetic --rss-size square scene (all outputs on)."""
    dsm = folder / "big.tif"
    mirrored_dsm(dsm, args.rss_size, args.rss_size)
    argv = ["--dsm", str(dsm), "--out", str(folder / "big"), "--thresholds", *map(str, args.thresholds)]
    if args.rss_model == "stand-in":
        ckpt = folder / "stand_in.pt"
        torch.jit.save(torch.jit.script(StandIn()), str(ckpt.with_suffix(".ts")))
        card = {"thresholds_m": args.thresholds, "pixel_size_m": 1.0, "tile_px": 128, "stride": 1}
        ckpt.with_suffix(".json").write_text(json.dumps(card))
        argv += ["--checkpoint", str(ckpt.with_suffix(".ts")), "--window", "128", "--overlap", "0.25"]
    start = time.perf_counter()
    result = run(ROOT, argv)
    mp = args.rss_size ** 2 / 1e6
    print(f"# {args.rss_size} x {args.rss_size} px ({mp:.0f} MP), thresholds {args.thresholds}, network: "
          f"{args.rss_model}; every output (COGs, tables, gaps.gpkg, quick-look)")
    print(f"{'peak RSS MB, new':34} {result['peak_rss_mb']:10.0f}   (limit 2048)")
    print(f"{'seconds, new':34} {result['seconds']:10.1f}   ({mp / result['seconds']:.3f} MP/s; "
          f"{time.perf_counter() - start:.0f} s with start-up)")


class StandIn(torch.nn.Module):
    """Gap where the DSM is within T of its window's lowest valid pixel: a per-window rule, nearly free."""

    def forward(self, dsm: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        low = torch.nan_to_num(dsm, nan=1e9).amin(dim=(2, 3), keepdim=True)
        return torch.sigmoid(thresholds.view(-1, 1, 1, 1) - torch.nan_to_num(dsm - low, nan=0.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model of this tree (default: its shipped model) and, without "
                        "--main-checkpoint, of the pinned main too")
    parser.add_argument("--main-checkpoint", help="model of the pinned main (default: --checkpoint, else the "
                        "model it shipped, weights/gaps_dsm_v5.pt)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 5.0, 10.0, 15.0])
    parser.add_argument("--height", type=int, default=898)
    parser.add_argument("--width", type=int, default=1078)
    parser.add_argument("--repeats", type=int, default=2, help="runs per tree; the fastest is kept")
    parser.add_argument("--rss-size", type=int, help="also map a synthetic square scene of this side (px)")
    parser.add_argument("--rss-model", choices=("stand-in", "shipped"), default="stand-in")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="only the --rss-size run")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.compare:
            compare(args, Path(tmp))
        if args.rss_size:
            rss_run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
