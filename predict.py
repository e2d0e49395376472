"""Map canopy gaps on whole GeoTIFF scenes with a trained model (the shipped one when --checkpoint is left out).

    python predict.py --dsm scene_DSM.tif --thresholds 2 5 10 15 --out out            # weights/gaps_dsm_v5.pt
    python predict.py --checkpoint runs/a/last.ckpt runs/b/last.ckpt --dsm scene_DSM.tif --out out   # their mean
    python predict.py --checkpoint runs/exp1/best.ckpt --dsm site_DSM.tif --chm site_CHM.tif --write-prob --out out
    torchrun --nproc_per_node=4 predict.py --checkpoint model.ts --dsm-list tiles.txt --out region   # resumable
"""
import argparse
import json
import logging
import sys
import time
from datetime import timedelta

from lib.core.cli import handle_errors

log = logging.getLogger("predict")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs per threshold T: gaps_<T>m.tif (uint8 1 gap / 0 / 255 nodata), gaps_<T>m.csv (one row per gap: "
               "area, centroid, DSM stats; same area filter as the training labels), prob_<T>m.tif with "
               "--write-prob, on the input's grid (a DSM of another pixel size is resampled to the model's and "
               "back). Many scenes (--dsm-list, or --dsm FOLDER): one folder per scene, finished scenes skipped "
               "when run again, a scene that fails is reported and the others mapped, gaps_all_<T>m.csv over the "
               "finished scenes; under torchrun each process maps its share. "
               "Defaults come from the checkpoint's config (predict section); any key can be overridden as "
               "--section.key=value.")
    parser.add_argument("--checkpoint", nargs="+", help="checkpoint (.ckpt/.pt) or exported model (.ts/.pt2); "
                                                        "several checkpoints: the mean of their probabilities "
                                                        "(an ensemble, e.g. seeds of one recipe); default: the "
                                                        "shipped weights/gaps_dsm_v5.pt (sha256 checked)")
    scenes = parser.add_mutually_exclusive_group(required=True)
    scenes.add_argument("--dsm", help="DSM GeoTIFF of the scene (metres; nodata passes through), or a folder of them")
    scenes.add_argument("--dsm-list", help="text file of DSM paths, one per line (relative to the file's folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                        help="CHM thresholds in metres (default: those of training; any value for a model "
                             "trained with continuous thresholds)")
    parser.add_argument("--window", type=int, help="window side in pixels (predict.window_px)")
    parser.add_argument("--overlap", type=float, help="fraction of a window shared with each neighbour")
    parser.add_argument("--batch-size", type=int, help="windows per forward pass (a threshold-conditioned model runs them once per threshold)")
    parser.add_argument("--tta", action="store_true", default=None, help="average the 8 D4 transforms")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--write-prob", action="store_true", default=None, help="also write prob_<T>m.tif")
    parser.add_argument("--nested", action=argparse.BooleanOptionalAction, default=None,
                        help="make the maps nest over thresholds (predict.nested, default on)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default run.device)")
    parser.add_argument("--resample", action=argparse.BooleanOptionalAction, default=True,
                        help="resample a DSM of another pixel size to the model's and the maps back "
                             "(--no-resample: refuse it)")
    parser.add_argument("--filter", action=argparse.BooleanOptionalAction, default=True,
                        help="apply the area filter and write gaps_<T>m.csv (holds one whole uint8 mask in memory)")
    parser.add_argument("--quicklook", action=argparse.BooleanOptionalAction, default=True,
                        help="write quicklook.png: hillshade with the gap outlines (reads the scene whole)")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--chm", help="reference CHM on the same grid: writes ref_gaps_<T>m.tif and scores.json")
    ref.add_argument("--dtm", help="reference DTM (CHM = DSM - DTM), same as --chm otherwise")
    return parser.parse_known_args(argv)


def flag_overrides(args) -> list[str]:
    """The command-line flags as predict.* overrides, so the schema checks them like any config key."""
    pairs = (("window", "window_px"), ("overlap", "overlap"), ("batch_size", "batch_size"), ("tta", "tta"),
             ("compile", "compile"), ("write_prob", "write_prob"), ("nested", "nested"))
    return [f"--predict.{key}={json.dumps(getattr(args, flag))}" for flag, key in pairs
            if getattr(args, flag) is not None]


def progress_printer(total_mp: float | None = None):
    """progress(height, width) -> progress_scene(rows_done): per scene, then over all scenes of a region
    (total_mp of them): percentage, megapixels per second and time left, in place on a terminal."""
    start, tty = time.perf_counter(), sys.stderr.isatty()
    region = {"done_mp": 0.0}

    def progress(height: int, width: int):
        scene_start, last = time.perf_counter(), [0.0]

        def progress_scene(rows: int) -> None:
            now = time.perf_counter()
            if not tty and rows < height and now - last[0] < 10:
                return
            last[0] = now
            line = _progress_line("scene", rows * width / 1e6, height * width / 1e6, now - scene_start)
            if total_mp:
                line += "  |  " + _progress_line("region", region["done_mp"] + rows * width / 1e6, total_mp,
                                                 now - start)
            print("\r" + line if tty else line, end="" if tty and rows < height else "\n", file=sys.stderr,
                  flush=True)
            if rows >= height:
                region["done_mp"] += height * width / 1e6
        return progress_scene
    return progress


def _progress_line(what: str, done_mp: float, total_mp: float, seconds: float) -> str:
    """'scene  42.0 %  0.35 MP/s  ETA 0:01:12'."""
    rate = done_mp / max(seconds, 1e-9)
    left = (total_mp - done_mp) / rate if rate > 0 else float("inf")
    eta = str(timedelta(seconds=round(left))) if left != float("inf") else "?"
    return f"{what} {100 * done_mp / max(total_mp, 1e-9):5.1f} %  {rate:6.3f} MP/s  ETA {eta}"


def build_settings(args, overrides):
    """Load the model (default: the shipped weights) and resolve config, device and thresholds into MapSettings."""
    import torch

    from lib.core.config import build_config, config_to_dict
    from lib.core.env import distributed_info, select_device
    from lib.infer.loading import (EnsembleModel, InferenceModel, check_thresholds, describe_version, load_models,
                                   resolve_checkpoint)
    from lib.infer.mapping import MapSettings
    from lib.infer.weights import file_sha256

    paths = [resolve_checkpoint(p) for p in args.checkpoint or [None]]
    checkpoint = " + ".join(map(str, paths))
    loaded = load_models(paths, "cpu")
    if distributed_info()[0] == 0:
        print(describe_version(loaded))
    if loaded.task == "classification":
        from lib.core.errors import ConfigError
        raise ConfigError(f"{checkpoint} is a tile classifier (data.task 'classification', classes "
                          f"{', '.join(loaded.class_names)}): predict.py maps gaps on DSM scenes",
                          hint="score labelled tiles with evaluate.py --checkpoint ...; classify your own tiles with "
                               "lib.infer.loading.load_model(path).net(image) -> (B, classes) probabilities")
    base = config_to_dict(loaded.config) if loaded.config else loaded.meta.get("config") or {}
    cfg = build_config(base, overrides + flag_overrides(args), source=f"{checkpoint} (embedded config) + options")
    thresholds = check_thresholds(args.thresholds, loaded.thresholds_m, cfg.train, loaded.task)
    device = select_device(args.device or cfg.run.device)
    if device.type == "cuda" and device.index is None:  # under torchrun: one GPU per process
        device = torch.device("cuda", distributed_info()[1])
    net = loaded.net.to(device)
    if cfg.predict.compile:
        if isinstance(net, (InferenceModel, EnsembleModel)):
            net.compile()  # in place: forward_thresholds runs the compiled normaliser and model
        else:
            net = torch.compile(net)
    return MapSettings(net, cfg, thresholds, loaded.pixel_size_m, loaded.stride, device, checkpoint,
                       " + ".join(file_sha256(p) for p in paths), args.resample, args.filter, args.quicklook)


def region_megapixels(paths, rank: int, world: int, settings, out) -> float:
    """Megapixels of the scenes this rank will map (for the region's progress): not those finished before,
    and unreadable ones count 0."""
    from pathlib import Path

    from lib.core.errors import ForestGapsError
    from lib.geoio.geotiff_read import read_info
    from lib.infer.mapping import is_finished

    total = 0.0
    for path in paths[rank::world]:
        if is_finished(Path(out) / Path(path).stem, settings):
            continue
        try:
            info = read_info(path)
        except ForestGapsError:
            continue
        total += info.height * info.width / 1e6
    return total


def scene_paths(args):
    """[the one DSM] or the DSMs of a region run (--dsm-list, or --dsm FOLDER); and whether it is a region."""
    from pathlib import Path

    from lib.infer.mapping import list_scenes

    if args.dsm_list or Path(args.dsm).is_dir():
        return list_scenes(args.dsm, args.dsm_list), True
    return [Path(args.dsm)], False


@handle_errors
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    import torch

    from lib.core.cli import setup_logging
    from lib.train.distributed import cleanup_distributed, init_distributed
    from lib.core.env import distributed_info
    from lib.core.errors import ConfigError, DataError
    from lib.infer.mapping import map_region, map_scene

    paths, region = scene_paths(args)
    if distributed_info()[2] > 1 and not region:
        raise ConfigError("torchrun splits the scenes of a region across processes: give --dsm-list FILE or "
                          "--dsm FOLDER, or run one scene without torchrun")
    if region and (args.chm or args.dtm):
        raise ConfigError("--chm/--dtm score one scene: give a single --dsm file with them")
    setup_logging(rank=distributed_info()[0])
    settings = build_settings(args, overrides)
    if not region:
        summary = map_scene(settings, paths[0], args.out, args.chm, args.dtm, progress_printer(), echo=print)
        rate = summary["nesting"]["before_nesting"]["rate"]  # NaN with one threshold
        print(f"nesting violations before nesting: {'n/a' if rate != rate else f'{100 * rate:.3f} %'}; "
              f"{summary['megapixels_per_s']:.2f} MP/s; outputs in {args.out}")
        return 0
    rank, world = init_distributed(torch.device("cpu"))  # gloo: only a barrier crosses processes
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    start = time.perf_counter()
    try:
        progress = progress_printer(region_megapixels(paths, rank, world, settings, args.out))
        status = map_region(settings, paths, args.out, rank, world, progress,
                            echo=lambda line: print(prefix + line, flush=True))
    finally:
        cleanup_distributed()
    counts = {key: list(status.values()).count(key) for key in ("mapped", "skipped", "failed")}
    print(f"{prefix}{counts['mapped']} scenes mapped, {counts['skipped']} skipped, {counts['failed']} failed in "
          f"{time.perf_counter() - start:.1f} s; outputs in {args.out}")
    failed = [name for name, state in status.items() if state == "failed"]
    if failed:
        raise DataError(f"{len(failed)} scene(s) failed: {', '.join(failed)} (each error is in "
                        f"{args.out}/<scene>/failed.json and in predict.json); the others are mapped",
                        hint="fix or remove the failed DSMs and run the command again: finished scenes are skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
