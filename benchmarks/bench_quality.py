"""Gap-map quality of a checkpoint on real and synthetic scenes, beside the classical DSM-only method.

    python benchmarks/bench_quality.py --checkpoint runs/pretrain/best.ckpt
    python benchmarks/bench_quality.py --checkpoint weights/gaps_dsm_v5.pt --json quality.json
    python benchmarks/bench_quality.py --checkpoint runs/x/best.ckpt --scene a_DSM.tif a_CHM.tif --no-flat

Scenes: Wellington (../shared/data/real, steep, New Zealand) and a synthetic flat closed-canopy temperate
LiDAR scene (the classical method's best case), plus any --scene DSM CHM pair. Pixel-wise IoU (gap =
CHM <= T, no area filter, nodata excluded). Prints `threshold  model  nested  classical  window  ratio`
(ratio = model / classical best-of-windows), the nesting violation rate of the raw masks, and a verdict.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.ckpt/.pt) or exported model (.ts)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 5.0, 10.0, 15.0])
    parser.add_argument("--window", type=int, help="prediction window, pixels (default: the training tile)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--tta", action="store_true", help="average the 8 D4 transforms")
    parser.add_argument("--scene", nargs=2, action="append", default=[], metavar=("DSM", "CHM"))
    parser.add_argument("--no-flat", dest="flat", action="store_false", help="skip the flat closed-canopy scene")
    parser.add_argument("--no-dense", dest="dense", action="store_false",
                        help="skip the nesting check over every whole metre of 1-30 m (30 more thresholds)")
    parser.add_argument("--json", help="also write the full report here")
    return parser.parse_args(argv)


def print_table(name: str, report: dict, seconds: float) -> bool:
    """The per-threshold table; returns whether the model beats the best classical window everywhere."""
    c = report["classical"]
    print(f"\n{name}  ({report['valid_pixels']} px, {seconds:.1f} s)")
    print(f"{'T':>5} {'gap%':>6} {'model':>7} {'nested':>7} {'classical':>9} {'window':>7} {'ratio':>6}")
    for i, t in enumerate(report["thresholds_m"]):
        ratio = report["model"][i] / c["best"][i] if c["best"][i] else float("nan")
        print(f"{t:>5g} {100 * report['gap_fraction'][i]:6.2f} {report['model'][i]:7.3f} "
              f"{report['model_nested'][i]:7.3f} {c['best'][i]:9.3f} {c['best_window_m'][i]:7g} {ratio:6.2f}")
    dense = report.get("nesting_dense", {}).get("rate", float("nan"))
    print(f"nesting violations: {100 * report['nesting']['rate']:.2f} % at these thresholds, "
          f"{100 * dense:.2f} % over 1-30 m (pixels gap at T but not at the next T')")
    return all(m > b for m, b in zip(report["model"], c["best"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    from lib.infer.loading import load_model
    from lib.infer.quality import DENSE_THRESHOLDS_M, score_flat_closed, score_scene

    loaded = load_model(args.checkpoint, "cpu")
    run = dict(window_px=args.window or loaded.tile_px, overlap=args.overlap, stride=loaded.stride, tta=args.tta,
               dense_thresholds_m=DENSE_THRESHOLDS_M if args.dense else ())
    print(f"checkpoint {args.checkpoint} (step {loaded.meta.get('step')}): window {run['window_px']} px, "
          f"overlap {args.overlap}, tta {args.tta}")
    scenes = [tuple(pair) for pair in args.scene]
    if (REAL / "wellington_DSM.tif").exists():
        scenes.insert(0, (REAL / "wellington_DSM.tif", REAL / "wellington_CHM.tif"))
    reports, beats = {}, {}
    for dsm, chm in scenes:
        start = time.perf_counter()
        name = Path(dsm).stem
        reports[name] = score_scene(loaded.net, dsm, chm, args.thresholds, **run)
        beats[name] = print_table(name, reports[name], time.perf_counter() - start)
    if args.flat:
        start = time.perf_counter()
        reports["flat_closed"] = score_flat_closed(loaded.net, args.thresholds, **run)
        beats["flat_closed"] = print_table("flat_closed (synthetic)", reports["flat_closed"],
                                           time.perf_counter() - start)
    print("\nbeats the classical best-of-windows at every threshold: "
          + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in beats.items()))
    if args.json:
        from lib.core.atomic import write_json
        write_json(args.json, {"checkpoint": str(args.checkpoint), **run, "scenes": reports, "beats": beats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
