"""DSM-only gap maps side by side: the shipped model, the project's classical paths and the ground filters
users already have, on the same scenes (benchmarks/dsm_only_scenes.py).

    python benchmarks/bench_quality.py                      # shipped model, every scene, every peer
    python benchmarks/bench_quality.py --checkpoint runs/x/best.ckpt --json quality.json
    python benchmarks/bench_quality.py --no-model --scenes validation

Methods (pixel IoU against CHM <= T, no area filter, nodata excluded):
- model: `predict.py --dsm SCENE` with the checkpoint (resampled to its pixel size as predict.py does);
- opening: DSM minus a grey opening (lib/gaps/baselines.py), windows 31/51/71/101 m;
- filter: the project's ground filter (lib/gaps/ground_filter.py) at its defaults, and over a small grid;
- saga / whitebox / csf: the peers (benchmarks/ground_peers.py), each over its grid of settings.
For every grid: "best per scene" (the setting that suits each scene best, an upper bound a user tuning the
knob by eye could reach) and "best single" (the one setting with the best mean IoU over the validation
scenes). A missing peer is named and the run exits 3 unless --allow-missing-peers is given.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsm_only_scenes import AMAZON  # noqa: E402 - after the path set-up

FILTER_GRID = [dict(radius_m=r, slope=s, lowest_floor=low) for r in (20.0, 40.0, 80.0) for s in (0.02, 0.1, 0.3)
               for low in (False, True)]
OPENING_WINDOWS_M = (31.0, 51.0, 71.0, 101.0)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model to score (default: the shipped weights)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 5.0, 10.0, 15.0])
    parser.add_argument("--scenes", choices=("validation", "development", "all"), default="all")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True, help="score the model")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="run the peers")
    parser.add_argument("--classical", action=argparse.BooleanOptionalAction, default=True,
                        help="the opening and the filter's settings grid (the filter's defaults always run)")
    parser.add_argument("--allow-missing-peers", action="store_true", help="exit 0 even when a peer is absent")
    parser.add_argument("--json", help="also write every figure here")
    return parser.parse_args(argv)


def gaps_from_height(rel: np.ndarray, thresholds_m) -> np.ndarray:
    """(H, W) estimated CHM -> (K, H, W) bool, NaN never gap."""
    t = np.asarray(thresholds_m, np.float32).reshape(-1, 1, 1)
    return np.isfinite(rel)[None] & (np.nan_to_num(rel, nan=np.inf)[None] <= t)


def model_gaps(checkpoint, dsm: np.ndarray, pixel_size_m: float, thresholds_m) -> np.ndarray:
    """The raw gap maps predict.py writes for this DSM (no area filter)."""
    from lib.gaps.masks import threshold_tag
    from lib.geoio.georef import GeoInfo
    from lib.geoio.geotiff_read import read_raster
    from lib.geoio.geotiff_write import write_raster
    with tempfile.TemporaryDirectory() as tmp:
        h, w = dsm.shape
        info = GeoInfo(height=h, width=w, pixel_size=(pixel_size_m, pixel_size_m),
                       origin=(500000.0, 5e6 + h * pixel_size_m))
        write_raster(Path(tmp) / "dsm.tif", dsm.astype(np.float32), info, nodata=float("nan"))
        command = [sys.executable, str(Path(__file__).resolve().parents[1] / "predict.py"), "--dsm",
                   str(Path(tmp) / "dsm.tif"), "--out", str(Path(tmp) / "out"), "--no-filter", "--no-quicklook",
                   "--thresholds", *map(str, thresholds_m)] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
        subprocess.run(command, check=True, capture_output=True, text=True)
        return np.stack([read_raster(Path(tmp) / "out" / f"gaps_{threshold_tag(t)}.tif")[0] == 1
                         for t in thresholds_m])


def grid_scores(scenes, thresholds_m, ground_of, settings) -> np.ndarray:
    """IoU (settings, scenes, K) of `ground_of(dsm, pixel, **setting)` over every scene."""
    from lib.infer.quality import ious, reference_gaps
    out = np.full((len(settings), len(scenes), len(thresholds_m)), np.nan)
    for j, (_, _, dsm, chm, px) in enumerate(scenes):
        ref = reference_gaps(chm, dsm, thresholds_m)
        for i, setting in enumerate(settings):
            out[i, j] = ious(gaps_from_height(dsm - ground_of(dsm, px, **setting), thresholds_m), ref)
    return out


def summarize(table: np.ndarray, validation: np.ndarray) -> dict:
    """best per scene (settings, scenes, K) -> (scenes, K) and the best single setting chosen on validation."""
    per_scene = np.nanmax(np.nan_to_num(table, nan=-1.0), axis=0)
    single = int(np.nanargmax(np.nanmean(table[:, validation], axis=(1, 2)))) if validation.any() else 0
    return {"best_per_scene": per_scene, "best_single": table[single], "single_index": single}


def _ground_functions():
    import torch
    from lib.gaps.baselines import ground_estimate
    from lib.data.scene_ground import site_ground
    from lib.gaps.ground_filter import GroundFilter

    def as_tensor(dsm):
        return torch.from_numpy(np.ascontiguousarray(dsm, np.float32))[None, None]

    def opening(dsm, px, window_m):
        return ground_estimate(as_tensor(dsm), int(round(window_m / px)))[0, 0].numpy()

    def ground_filter(dsm, px, **setting):
        return site_ground(dsm, px, GroundFilter(**setting))
    return opening, ground_filter


def score_methods(scenes, validation, args) -> tuple[dict, list[str]]:
    """{method: {"best_per_scene", "best_single", ...}} and the peers that are missing."""
    import ground_peers
    opening, ground_filter = _ground_functions()
    t = args.thresholds
    methods = {"filter (defaults)": summarize(grid_scores(scenes, t, ground_filter, [{}]), validation)}
    if args.classical:
        methods["opening"] = summarize(grid_scores(scenes, t, opening, [dict(window_m=w) for w in OPENING_WINDOWS_M]),
                                       validation)
        methods["filter"] = summarize(grid_scores(scenes, t, ground_filter, FILTER_GRID), validation)
    absent = ground_peers.missing() if args.peers else []
    for name, fn in ground_peers.PEERS.items() if args.peers else ():
        if any(a.startswith(name) for a in absent):
            continue
        start = time.perf_counter()
        methods[name] = summarize(grid_scores(scenes, t, fn, ground_peers.SETTINGS[name]), validation)
        print(f"  {name}: {len(ground_peers.SETTINGS[name])} settings in {time.perf_counter() - start:.0f} s",
              flush=True)
    if args.model:
        from lib.infer.quality import ious, reference_gaps
        per = np.array([ious(model_gaps(args.checkpoint, dsm, px, t), reference_gaps(chm, dsm, t))
                        for _, _, dsm, chm, px in scenes])
        methods["model"] = {"best_per_scene": per, "best_single": per, "single_index": 0}
    return methods, absent


def print_tables(scenes, methods, thresholds_m) -> None:
    fmt = lambda row: " ".join(f"{v:5.3f}" for v in row)   # noqa: E731
    for key in ("best_per_scene", "best_single"):
        print(f"\n== IoU at {' / '.join(f'{t:g}' for t in thresholds_m)} m, {key.replace('_', ' ')}")
        for j, (name, regime, dsm, _, px) in enumerate(scenes):
            print(f"{name}  [{regime}; {dsm.shape[0]}x{dsm.shape[1]} px at {px:g} m]")
            peers = [m for m in methods if m not in ("model", "opening", "filter", "filter (defaults)")]
            strongest = max([m for m in peers + ["opening"] if m in methods],
                            key=lambda m: np.nanmean(methods[m][key][j]), default=None)
            for m, r in methods.items():
                mark = "  <- strongest peer/opening" if m == strongest else ""
                print(f"  {m:18s} {fmt(r[key][j])}{mark}")


def print_summary(scenes, methods, validation: np.ndarray, thresholds_m) -> None:
    """Means over the validation scenes (all; and those whose canopy no model trained on), and where a model
    ran, its margin per scene over the strongest peer or opening at its best setting for that scene."""
    unseen = validation & np.array([not name.startswith(AMAZON) for name, *_ in scenes])
    fmt = lambda row: " ".join(f"{v:6.3f}" for v in row)   # noqa: E731
    print(f"\n== mean IoU at {' / '.join(f'{t:g}' for t in thresholds_m)} m (best single setting), validation "
          f"scenes: all {int(validation.sum())} | {int(unseen.sum())} whose canopy is not in the training data")
    for m, r in methods.items():
        table = r["best_single"]
        print(f"  {m:18s} {fmt(np.nanmean(table[validation], 0))} ({np.nanmean(table[validation]):.3f}) | "
              f"{fmt(np.nanmean(table[unseen], 0))} ({np.nanmean(table[unseen]):.3f})")
    peers = [m for m in methods if m not in ("model", "filter", "filter (defaults)")]
    if "model" not in methods or not peers:
        return
    strongest = np.nanmax(np.stack([methods[m]["best_per_scene"] for m in peers]), 0)        # (scenes, K)
    margin = methods["model"]["best_per_scene"] - strongest
    print("\n== model minus the strongest of the peers and the opening, each at its best setting per scene")
    for j, (name, *_) in enumerate(scenes):
        print(f"  {name:34s} {fmt(margin[j])}")
    won = (margin[validation] >= 0.01) | (methods["model"]["best_per_scene"][validation] >= 0.99)
    print(f"  validation scene-thresholds won by >= 0.01 (or IoU >= 0.99): {int(won.sum())} of {won.size}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import dsm_only_scenes
    val = dsm_only_scenes.validation_scenes() if args.scenes in ("validation", "all") else []
    dev = dsm_only_scenes.development_scenes() if args.scenes in ("development", "all") else []
    scenes = val + dev
    if not scenes:
        print("error: no scenes (../shared/data/real/ is missing and no synthetic scene was asked for)")
        return 2
    validation = np.array([True] * len(val) + [False] * len(dev))
    print(f"{len(val)} validation and {len(dev)} development scene(s); thresholds {args.thresholds}", flush=True)
    methods, absent = score_methods(scenes, validation, args)
    print_tables(scenes, methods, args.thresholds)
    print_summary(scenes, methods, validation, args.thresholds)
    if args.json:
        from lib.core.atomic import write_json
        write_json(args.json, {"scenes": [s[:2] + (s[4],) for s in scenes], "thresholds_m": args.thresholds,
                               "validation": validation, "methods": methods, "missing_peers": absent})
    if absent:
        print(f"\nMISSING PEERS (their rows are absent): {'; '.join(absent)}")
        return 0 if args.allow_missing_peers else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
