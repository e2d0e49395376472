"""Find ForestGapR-style canopy gaps in a CHM (or a predicted gap map) and analyse them.

    python gaps.py --chm ../shared/data/real/ALS_CHM_DUC.tif --thresholds 10 --min-area 1 --max-area 10000 --out runs/gaps_duc --analysis
    python gaps.py --chm ../shared/data/real/ALS_CHM_CAU_2012.tif --chm-later ../shared/data/real/ALS_CHM_CAU_2014.tif --thresholds 10 --out runs/gaps_cau
    python gaps.py --gap-map runs/pred/gaps_10m.tif --out runs/pred_analysis --analysis
    python gaps.py --dsm scene_DSM.tif --thresholds 2 5 10 --out runs/classical
    python gaps.py --dsm scene_DSM.tif --ground-window 101 --thresholds 2 5 10 --out runs/opening
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from lib.core.cli import handle_errors, number
from lib.core.errors import ConfigError, DataError
from lib.gaps.masks import gap_labels, gap_stats, threshold_tag, write_gap_table
from lib.geoio.georef import check_same_grid
from lib.geoio.geotiff_read import check_heights, read_info, read_pair, read_raster
from lib.geoio.geotiff_write import write_raster


CORRECTION_NOTE = {"none": "no edge correction, as ForestGapR; Donnelly {clark_evans_r_donnelly:.3f}",
                   "Donnelly": "Donnelly edge correction; {clark_evans_r_none:.3f} uncorrected as ForestGapR"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A gap is an 8-connected patch where CHM <= threshold whose area (m²) lies within "
                    "[--min-area, --max-area], as in ForestGapR's getForestGaps. Writes "
                    "OUT/gaps_<T>m.tif (int32 gap ids, 0 = no gap, georeferenced like the input) and "
                    "OUT/gaps_<T>m.csv (one row per gap: area, CHM max/min/mean/sd/gini/range, centroid). "
                    "--analysis adds polygons (.gpkg, .geojson), analysis_<T>m.json (gap count, power-law "
                    "lambda, Clark-Evans R), size-frequency and Ripley tables and plots; --chm-later adds "
                    "change_<T>m.tif/.json/.csv between the two surveys.",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--chm", type=Path, help="canopy height model GeoTIFF (m)")
    source.add_argument("--dsm", type=Path,
                        help="digital surface model GeoTIFF; with --dtm, CHM = DSM - DTM; without a terrain "
                             "model, the ground comes from the DSM alone: the project's ground filter "
                             "(lib/gaps/ground_filter.py), or the grey opening with --ground-window")
    source.add_argument("--gap-map", type=Path,
                        help="gap map of predict.py (uint8: 1 gap, 0 not, 255 nodata); outputs are named "
                             "after it (gaps_10m.tif -> analysis_10m.json)")
    terrain = parser.add_mutually_exclusive_group()
    terrain.add_argument("--dtm", type=Path, help="digital terrain model GeoTIFF on the DSM's grid")
    terrain.add_argument("--ground-window", type=number(float, 0, low_open=True), metavar="M",
                         help="no DTM: estimate the ground as the DSM's grey opening over M metres, smoothed "
                              "(the older DSM-only method, e.g. 51-101; the default ground filter is better "
                              "on slopes and on average, see docs/quality.md)")
    parser.add_argument("--chm-later", type=Path, help="CHM of a later survey on the same grid: gap change")
    parser.add_argument("--thresholds", type=number(float, 0, low_open=True), nargs="+", metavar="M",
                        help="canopy height thresholds in m, e.g. 5 10 15 (not with --gap-map)")
    parser.add_argument("--min-area", type=number(float, 0), default=1.0, metavar="M2",
                        help="smallest gap kept, m² inclusive (default 1, as ForestGapR)")
    parser.add_argument("--max-area", type=number(float, 0), default=10_000.0, metavar="M2",
                        help="largest gap kept, m² inclusive (default 10000 = 1 ha, as ForestGapR)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--analysis", action="store_true",
                        help="also write polygons, size-frequency, spatial-pattern outputs and a quick-look")
    parser.add_argument("--simulations", type=number(int, 0, 9999), default=99,
                        help="CSR simulations of the Ripley envelope (default 99, as ForestGapR); the cost "
                             "grows with gaps x simulations, 0 skips the envelope")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seed of the CSR simulations")
    parser.add_argument("--clark-evans-correction", choices=("none", "donnelly"), default="none",
                        help="edge correction of the headline Clark-Evans R and p: none (default, what "
                             "ForestGapR reports: spatstat's clarkevans.test default) or donnelly "
                             "(Donnelly 1978, for a rectangle); analysis_<T>m.json holds both by name")
    args = parser.parse_args(argv)
    if args.dsm is None and (args.dtm is not None or args.ground_window is not None):
        parser.error("--dtm and --ground-window need --dsm")
    if (args.gap_map is None) == (args.thresholds is None):
        parser.error("--thresholds is needed with --chm or --dsm, and not allowed with --gap-map")
    if args.chm_later is not None and args.chm is None:
        parser.error("--chm-later compares two CHMs: give the first survey as --chm")
    return args


def read_inputs(args):
    """(surface for the quick-look or None, heights to threshold, GeoInfo).

    A predicted gap map becomes a pseudo-CHM thresholded at 0.5: 0 gap, 1 not, NaN nodata.
    """
    if args.chm is not None:
        chm, info = read_raster(args.chm)
        check_heights(chm, args.chm)
        return chm, chm, info
    if args.dtm is not None:
        return read_pair(args.dsm, dtm=args.dtm)
    if args.dsm is not None:
        return estimated_heights(args.dsm, args.ground_window)
    mask, info = read_raster(args.gap_map)
    odd = ~np.isnan(mask) & (mask != 0) & (mask != 1) & (mask != 255)
    if odd.any():  # a DSM or CHM given as --gap-map would be thresholded at 1 m by accident
        raise DataError(f"{args.gap_map}: not a gap map: {np.count_nonzero(odd)} pixel(s) hold values other than "
                        f"0, 1 and 255 (e.g. {float(mask[odd][0]):g})",
                        hint="--gap-map takes predict.py's gaps_<T>m.tif; give heights as --chm or --dsm")
    pseudo = np.where(mask == 1, 0.0, 1.0).astype(np.float32)
    pseudo[np.isnan(mask) | (mask == 255)] = np.nan
    return None, pseudo, info


def estimated_heights(dsm_path: Path, window_m: float | None):
    """(dsm, DSM minus its ground estimate, GeoInfo): a CHM estimate without a terrain model, from the
    ground filter, or from the grey opening over window_m metres when given."""
    import torch

    from lib.gaps.baselines import classical_relative_height
    from lib.gaps.ground_filter import filtered_relative_height

    dsm, info = read_raster(dsm_path)
    if np.isnan(dsm).all():
        raise DataError(f"{dsm_path}: every pixel is nodata", hint="check the file and its nodata value")
    pixel = abs(float(info.pixel_size[0]))
    x = torch.from_numpy(dsm)[None, None]
    if window_m is None:
        with torch.no_grad():
            return dsm, filtered_relative_height(x, pixel)[0, 0].numpy(), info
    if window_m < 3 * pixel:
        raise ConfigError(f"--ground-window {window_m:g} m is under 3 pixels of {dsm_path} ({pixel:g} m)",
                          hint="the opening must be wider than the largest crown: 51-101 m is typical")
    with torch.no_grad():
        height = classical_relative_height(x, window_m, pixel)[0, 0].numpy()
    return dsm, height, info


def write_polygons(stem: Path, tag: str, polygons, stats: dict, info) -> None:
    """gaps_<T>.gpkg and .geojson: one MultiPolygon per gap with its statistics."""
    from lib.geoio.geojson import write_geojson
    from lib.geoio.geopackage import write_gpkg

    columns = {"gap_id": stats["gap_id"], "gap_area": polygons.area, "perimeter": polygons.perimeter,
               "x": polygons.centroid[:, 0], "y": polygons.centroid[:, 1],
               "label_x": polygons.label_point[:, 0], "label_y": polygons.label_point[:, 1],
               **{k: v for k, v in stats.items() if k.startswith("chm_")}}
    crs_name = (info.geo_ascii or "").split("|")[0] or None         # GeoTIFF citation: "name|datum|"
    write_gpkg(stem.with_name(f"gaps_{tag}.gpkg"), polygons, columns, info.epsg, crs_name)
    write_geojson(stem.with_name(f"gaps_{tag}.geojson"), polygons, columns, info.epsg)


def write_analysis(out: Path, tag: str, labels, n: int, stats: dict, surface, info, args) -> dict:
    """Polygons, analysis_<T>.json, size-frequency and Ripley CSV + PNG, quick-look PNG -> the summary."""
    from lib.gaps import analysis
    from lib.core.atomic import write_json
    from lib.gaps.figures import ripley_plot, size_frequency_plot
    from lib.geoio.png import hillshade_quicklook, write_png
    from lib.gaps.polygons import gap_polygons

    polygons = gap_polygons(labels, n, info)
    write_polygons(out / f"gaps_{tag}", tag, polygons, stats, info)
    window = analysis.window_of(info)
    correction = args.clark_evans_correction
    summary = analysis.gap_summary(polygons.area, polygons.label_point, window, correction)
    summary["clark_evans_r_centroid"] = analysis.clark_evans(polygons.centroid, window, correction)["r"]
    sizes, counts = analysis.size_frequency(polygons.area)
    write_gap_table(out / f"size_freq_{tag}.csv", {"gap_size_m2": sizes, "frequency": counts})
    write_png(out / f"size_freq_{tag}.png",
              size_frequency_plot(sizes, counts, summary["lambda_asner"], summary["lambda_hanel"]))
    envelope = analysis.ripley_envelope(polygons.label_point, window, args.simulations, args.seed)
    write_gap_table(out / f"ripley_{tag}.csv", envelope)
    write_png(out / f"ripley_{tag}.png", ripley_plot(envelope))
    if surface is not None:
        write_png(out / f"quicklook_{tag}.png", hillshade_quicklook(surface, labels > 0, info.pixel_size[0]))
    summary.update(points="label points (centroid of each gap's largest outer ring), as ForestGapR",
                   window=dict(zip(("xmin", "xmax", "ymin", "ymax"), window)), epsg=info.epsg,
                   min_area_m2=args.min_area, max_area_m2=args.max_area,
                   ripley={"simulations": args.simulations, "seed": args.seed, "r_max_m": envelope["r"][-1]})
    write_json(out / f"analysis_{tag}.json", summary)
    return summary


def write_change(out: Path, tag: str, labels, n: int, later, threshold: float, args, info) -> dict:
    """change_<T>.tif (pixel classes), .json (areas per class) and .csv (class of each gap)."""
    from lib.gaps import analysis
    from lib.core.atomic import write_json

    labels2, n2 = gap_labels(later, threshold, args.min_area, args.max_area, info.pixel_area)
    change = analysis.gap_change(labels, n, labels2, n2)
    px = info.pixel_area
    area1 = np.bincount(labels.ravel(), minlength=n + 1)[1:] * px
    area2 = np.bincount(labels2.ravel(), minlength=n2 + 1)[1:] * px
    summary = analysis.change_summary(change, area1, area2, px)
    summary["pixel_classes"] = analysis.PIXEL_CLASSES
    write_raster(out / f"change_{tag}.tif", change["pixels"], info, nodata=0)
    write_json(out / f"change_{tag}.json", summary)
    write_gap_table(out / f"change_{tag}.csv", analysis.change_table(change, area1, area2, px))
    return summary


@handle_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    surface, height, info = read_inputs(args)
    later = None
    if args.chm_later is not None:
        check_same_grid({str(args.chm): info, str(args.chm_later): read_info(args.chm_later)})
        later, _ = read_raster(args.chm_later)
    from_map = args.gap_map is not None
    stat_heights = np.full_like(height, np.nan) if from_map else height    # a gap map has no heights
    valid_m2 = np.count_nonzero(~np.isnan(height)) * info.pixel_area
    args.out.mkdir(parents=True, exist_ok=True)
    for threshold in [0.5] if from_map else dict.fromkeys(args.thresholds):   # unique, in order
        tag = args.gap_map.stem.removeprefix("gaps_") if from_map else threshold_tag(threshold)
        stem = args.out / f"gaps_{tag}"                             # not with_suffix: "2.5m" has a dot
        if from_map and Path(f"{stem}.tif").resolve() == args.gap_map.resolve():
            raise ConfigError(f"--out {args.out} would overwrite the input {args.gap_map}",
                              hint="write the analysis into another folder")
        labels, n = gap_labels(height, threshold, args.min_area, args.max_area, info.pixel_area)
        stats = gap_stats(labels, n, stat_heights, info)
        write_raster(f"{stem}.tif", labels, info, nodata=0)
        write_gap_table(f"{stem}.csv", stats)
        gap_m2 = float(stats["gap_area"].sum())
        fraction = gap_m2 / valid_m2 if valid_m2 else float("nan")
        print(f"{tag:>6}: {n} gaps, {gap_m2:.1f} m² of gap = {fraction:.2%} of the valid area "
              f"-> {stem}.tif, .csv")
        if args.analysis:
            s = write_analysis(args.out, tag, labels, n, stats, surface, info, args)
            print(f"{'':>6}  lambda {s['lambda_asner']:.4f} (Asner 2013), {s['lambda_hanel']:.4f} "
                  f"(Hanel 2017); Clark-Evans R {s['clark_evans_r']:.3f} (p = {s['clark_evans_p']:.2g}, "
                  f"{CORRECTION_NOTE[s['clark_evans_correction']].format(**s)}) -> analysis_{tag}.json")
        if later is not None:
            c = write_change(args.out, tag, labels, n, later, threshold, args, info)
            print(f"{'':>6}  {c['new_gap_pixels']} new-gap pixels; gaps: {c['gaps']['new']['count']} new, "
                  f"{c['gaps']['expanded']['count']} expanded, {c['gaps']['closed']['count']} closed "
                  f"-> change_{tag}.tif, .json, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
