"""Map canopy gaps on a whole GeoTIFF scene of any size with a trained model.

    python predict.py --checkpoint runs/quick/best.ckpt --dsm scene_DSM.tif --out gaps_out
    python predict.py --checkpoint runs/exp1/best.ckpt --dsm scene_DSM.tif --thresholds 2 5 10 15 --tta --write-prob --out out
    python predict.py --checkpoint model.ts --dsm site_DSM.tif --chm site_CHM.tif --out out   # also scores.json
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lib.cli import handle_errors

log = logging.getLogger("predict")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs per threshold T: gaps_T.tif (uint8 1 gap / 0 / 255 nodata), gaps_T.csv (one row per gap: "
               "area, centroid, DSM stats; same area filter as the training labels), prob_T.tif with "
               "--write-prob. Defaults come from the checkpoint's config (predict section); any key can be "
               "overridden as --section.key=value.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.ckpt) or exported TorchScript (.ts)")
    parser.add_argument("--dsm", required=True, help="DSM GeoTIFF of the scene (metres; nodata passes through)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                        help="CHM thresholds in metres (default: those seen in training)")
    parser.add_argument("--window", type=int, help="window side in pixels (predict.window_px)")
    parser.add_argument("--overlap", type=float, help="fraction of a window shared with each neighbour")
    parser.add_argument("--batch-size", type=int, help="windows per forward pass (each at every threshold)")
    parser.add_argument("--tta", action="store_true", default=None, help="average the 8 D4 transforms")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--write-prob", action="store_true", default=None, help="also write prob_T.tif")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default run.device)")
    parser.add_argument("--filter", action=argparse.BooleanOptionalAction, default=True,
                        help="apply the area filter and write gaps_T.csv (holds one whole uint8 mask in memory)")
    parser.add_argument("--quicklook", action=argparse.BooleanOptionalAction, default=True,
                        help="write quicklook.png: hillshade with the gap outlines (reads the scene whole)")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--chm", help="reference CHM on the same grid: writes ref_gaps_T.tif and scores.json")
    ref.add_argument("--dtm", help="reference DTM (CHM = DSM - DTM), same as --chm otherwise")
    return parser.parse_known_args(argv)


def flag_overrides(args) -> list[str]:
    """The command-line flags as predict.* overrides, so the schema checks them like any config key."""
    pairs = (("window", "window_px"), ("overlap", "overlap"), ("batch_size", "batch_size"), ("tta", "tta"),
             ("compile", "compile"), ("write_prob", "write_prob"))
    return [f"--predict.{key}={json.dumps(getattr(args, flag))}" for flag, key in pairs
            if getattr(args, flag) is not None]


def check_pixel_size(info, loaded, dsm_path, checkpoint) -> None:
    from lib.errors import RasterError

    expected = loaded.pixel_size_m
    if any(abs(s - expected) > 0.01 * expected for s in info.pixel_size):
        raise RasterError(f"{dsm_path} has {info.pixel_size[0]:g} x {info.pixel_size[1]:g} m pixels but the model "
                          f"({checkpoint}) was trained on {expected:g} m pixels (more than 1 % apart)",
                          hint=f"resample the DSM, e.g. gdalwarp -tr {expected:g} {expected:g} -r bilinear in.tif out.tif")


def progress_printer(height: int, width: int):
    """progress(rows_done): rows done and megapixels per second, in place on a terminal."""
    start, tty, last = time.perf_counter(), sys.stderr.isatty(), [0.0]

    def progress(rows: int) -> None:
        seconds = time.perf_counter() - start
        if not tty and rows < height and seconds - last[0] < 10:
            return
        last[0] = seconds
        rate = rows * width / 1e6 / max(seconds, 1e-9)
        line = f"rows {rows}/{height} ({100 * rows / height:5.1f} %)  {rate:6.2f} MP/s"
        print("\r" + line if tty else line, end="" if tty and rows < height else "\n", file=sys.stderr, flush=True)
    return progress


def check_inputs(args, loaded):
    """GeoInfo of the DSM after the pixel-size and reference-grid checks; the thresholds to map."""
    from lib.raster import check_same_grid, read_info

    info = read_info(args.dsm)
    check_pixel_size(info, loaded, args.dsm, args.checkpoint)
    if args.chm or args.dtm:
        check_same_grid({args.dsm: info, args.chm or args.dtm: read_info(args.chm or args.dtm)})
    thresholds = args.thresholds or loaded.thresholds_m
    outside = [t for t in thresholds if not min(loaded.thresholds_m) <= t <= max(loaded.thresholds_m)]
    if outside:
        log.warning("thresholds %s are outside the trained range %s: the model extrapolates", outside,
                    loaded.thresholds_m)
    return info, list(thresholds)


def finish(args, cfg, out: Path, thresholds: list[float], paths: dict) -> dict:
    """After the strip pass: area filter + gap tables, quick-look, reference scores. Returns gap counts."""
    from lib.evaluation import write_json
    from lib.scene import filter_gaps, score_scene, write_quicklook

    counts = {}
    for tag, path in paths.items() if args.filter else ():
        counts[tag] = filter_gaps(path, args.dsm, cfg.data.min_area_m2, cfg.data.max_area_m2)
        print(f"{tag:>6}: {counts[tag]:6d} gaps  -> {path}, {path.with_suffix('.csv').name}")
    if args.quicklook:
        write_quicklook(out / "quicklook.png", args.dsm, list(paths.values()))
    if args.chm or args.dtm:
        scores = score_scene(out, args.dsm, thresholds, cfg.data.min_area_m2, cfg.data.max_area_m2,
                             chm_path=args.chm, dtm_path=args.dtm, classical_window_m=cfg.eval.classical_window_m)
        write_json(out / "scores.json", scores)
        for tag, model in scores["model"].items():
            print(f"{tag:>6}: IoU {model['iou']:.4f}  F1 {model['f1']:.4f}  "
                  f"(classical IoU {scores['classical'][tag]['iou']:.4f})")
    return counts


@handle_errors
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from lib.cli import setup_logging
    from lib.config import build_config, config_to_dict
    from lib.env import select_device
    from lib.evaluation import write_json
    from lib.inference import load_model
    from lib.scene import plan_scene, write_scene

    setup_logging()
    loaded = load_model(args.checkpoint, "cpu")
    base = config_to_dict(loaded.config) if loaded.config else loaded.meta.get("config") or {}
    cfg = build_config(base, overrides + flag_overrides(args), source=f"{args.checkpoint} (embedded config) + options")
    opts = cfg.predict
    device = select_device(args.device or cfg.run.device)
    info, thresholds = check_inputs(args, loaded)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = loaded.net.to(device)
    if opts.compile:
        import torch
        net = torch.compile(net)
    plan = plan_scene(info.height, info.width, opts.window_px, opts.overlap, loaded.stride)
    start = time.perf_counter()
    paths = write_scene(net, args.dsm, out, plan, thresholds, opts.batch_size, opts.tta, device, opts.write_prob,
                        opts.prob_threshold, pad_batches=opts.compile,
                        progress=progress_printer(info.height, info.width))
    seconds = time.perf_counter() - start
    summary = {"checkpoint": str(args.checkpoint), "dsm": str(args.dsm), "thresholds_m": thresholds,
               "predict": config_to_dict(opts), "device": str(device), "seconds": round(seconds, 3),
               "megapixels_per_s": round(info.height * info.width / 1e6 / seconds, 3),
               "gaps": finish(args, cfg, out, thresholds, paths)}
    write_json(out / "predict.json", summary)
    print(f"{info.height}x{info.width} px in {seconds:.1f} s ({summary['megapixels_per_s']:.2f} MP/s); outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
