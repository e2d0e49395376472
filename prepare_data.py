"""Cut sites into tiles with gap masks per threshold, split them spatially, and write tar shards.

    python prepare_data.py --config configs/quick.json
    python prepare_data.py --config configs/config.json --dsm site_DSM.tif --chm site_CHM.tif
    python prepare_data.py --config configs/config.json --data.raster_folder=rasters/ --data.root=data/real
    python prepare_data.py --config configs/quick.json --export-scene scenes/   # a synthetic test scene
    python prepare_data.py --config configs/quick.json --preview                # + PNG panels of tiles
"""
import argparse
import logging
import sys
import time

from lib.core.cli import handle_errors, number, setup_logging
from lib.core.config import add_config_args, config_from_args, save_config
from lib.core.errors import DataError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sites: synthetic by default; real ones from data.sites, data.raster_folder, or --dsm with "
               "--chm/--dtm. Splits are spatial (by site or by blocks); the rule goes into manifest.json.")
    add_config_args(parser, default="configs/config.json")
    parser.add_argument("--dsm", help="one real site: its DSM GeoTIFF")
    parser.add_argument("--chm", help="its canopy height model (same grid)")
    parser.add_argument("--dtm", help="or its terrain model (CHM = DSM - DTM)")
    parser.add_argument("--name", help="site name for --dsm (default: the file name)")
    parser.add_argument("--out", help="dataset folder (default: data.root from the config)")
    parser.add_argument("--export-scene", metavar="DIR",
                        help="only write one synthetic scene as <name>_DSM/_DTM/_CHM.tif GeoTIFFs into DIR "
                             "(to try gaps.py / predict.py without data), then exit")
    parser.add_argument("--scene-size", type=number(int, 16, 16384), default=512, help="side in pixels of --export-scene")
    parser.add_argument("--preview", action="store_true",
                        help="also write preview_train_augmented.png and preview_val.png (tiles with their "
                             "gap masks, train ones after augmentation) into the dataset folder")
    return parser.parse_known_args(argv)


def print_summary(manifest: dict, out, seconds: float) -> None:
    """The class balance and nodata per split: what a user must know before training."""
    rule = manifest["split_rule"]
    how = rule["rule"]
    if how == "block":
        sides = sorted({site.get("block_px", rule["block_px"]) for site in manifest["sites"].values()})
        how = f"blocks of {'/'.join(map(str, sides))} px with a {rule['buffer_px']} px buffer"
    print(f"\ndataset: {out}  ({seconds:.1f} s, split by {how})")
    tags = [m.replace("mask_", "") for m in manifest["mask_members"]]
    print(f"{'split':6} {'sites':>5} {'tiles':>6} {'nodata':>7}  " + "  ".join(f"gap@{t:>5}" for t in tags))
    for split, s in manifest["summary"].items():
        gaps = "  ".join(f"{100 * s['gap_fraction'][t]:8.2f}%" for t in tags)
        print(f"{split:6} {len(s['sites']):5d} {s['tiles']:6d} {100 * s['nodata_fraction']:6.2f}%  {gaps}")
    shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    print(f"{shards} shard(s) and manifest.json in {out}")


@handle_errors
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    cfg = config_from_args(args, extra)
    from lib.data.build_segmentation import build_dataset
    from lib.data.site_sources import raster_source, sources_from_config

    setup_logging()
    if args.export_scene:
        from lib.data.site_sources import write_synthetic_scene
        paths = write_synthetic_scene(args.export_scene, 999, args.scene_size, cfg.data.pixel_size_m, cfg.run.seed)
        print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
        return 0
    out = args.out or cfg.data.root
    if cfg.data.task == "classification":  # labelled tiles, not sites: lib/data/build_classification.py
        from lib.data.build_classification import build_class_dataset, print_class_summary
        return print_class_summary(build_class_dataset(cfg, out), out)
    if args.dsm:
        if not (args.chm or args.dtm):
            raise DataError("--dsm needs --chm or --dtm")
        from pathlib import Path
        sources = [raster_source(args.name or Path(args.dsm).stem, args.dsm, args.chm, args.dtm)]
    else:
        sources = sources_from_config(cfg.data, cfg.run.seed)
    logging.getLogger(__name__).info("preparing %d site(s) into %s", len(sources), out)
    start = time.time()
    manifest = build_dataset(cfg, sources, out)
    save_config(cfg, f"{out}/config.json")
    print_summary(manifest, out, time.time() - start)
    if args.preview:
        from lib.data.preview import write_previews
        for path in write_previews(cfg, out, out):
            print(f"preview: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
