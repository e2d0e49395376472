"""The area filter, gap table and gap polygons of a mapped scene, streamed in bands of rows.

Why bands: a gap may span many strips, and its area, statistics and outline need all of it. A band ends
only at a row boundary that no gap crosses (no gap pixel 8-adjacent to one of the next row), so a band's
connected components are exactly the scene's, and the whole-raster functions (labelling and area filter,
lib.gaps.masks.gap_stats, lib.gaps.polygons.gap_polygons) give the whole-scene results band by band, gap
ids numbered in scene scan order. Memory: one band of at least BAND_ROWS rows, longer only where gaps
cross every boundary (a gap as tall as the scene makes the band the scene).
"""
from pathlib import Path

import numpy as np

from lib.core.atomic import replacing
from lib.gaps.masks import IGNORE, gap_labels, gap_stats, gap_table_rows
from lib.gaps.polygons import gap_polygons
from lib.gaps.quicklook import QuickLook
from lib.geoio.cog import CogWriter
from lib.geoio.geopackage import GpkgWriter
from lib.geoio.geotiff_read import iter_strips, read_info
from lib.geoio.png import write_png

BAND_ROWS = 256


def mask_labels(gap: np.ndarray, min_area_m2: float, max_area_m2: float, pixel_area_m2: float):
    """(gap ids (H, W) int32, n) of a bool gap map after the training labels' [min, max] area filter.

    Labelled as a 2-byte pseudo-CHM, 0 in gaps, so lib.gaps.masks applies exactly the training labels' rule.
    """
    return gap_labels((~gap).astype(np.float16), 0.5, min_area_m2, max_area_m2, pixel_area_m2)


def _crossed(gap: np.ndarray) -> np.ndarray:
    """(n - 1,) bool: whether a gap crosses the boundary below each row of gap (n, W) (8-connectivity)."""
    below = np.pad(gap[1:], ((0, 0), (1, 1)))
    return (gap[:-1] & (below[:, :-2] | below[:, 1:-1] | below[:, 2:])).any(axis=1)


def gap_bands(mask_path, dsm_path, rows: int = BAND_ROWS):
    """Yield (row0, gap (n, W) bool, nodata (n, W) bool, dsm (n, W) float32), bands that no gap crosses."""
    width = read_info(mask_path).width
    gap, nodata, dsm, row0 = np.zeros((0, width), bool), np.zeros((0, width), bool), np.zeros((0, width), np.float32), 0
    for (_, m), (_, d) in zip(iter_strips(mask_path, rows), iter_strips(dsm_path, rows)):
        gap, nodata, dsm = np.concatenate([gap, m == 1]), np.concatenate([nodata, np.isnan(m)]), np.concatenate([dsm, d])
        open_rows = np.flatnonzero(~_crossed(gap)[rows - 1:]) + rows     # band ends: boundaries after >= rows
        if len(open_rows):
            end = int(open_rows[-1])
            yield row0, gap[:end], nodata[:end], dsm[:end]
            gap, nodata, dsm, row0 = gap[end:], nodata[end:], dsm[end:], row0 + end
    if len(gap):
        yield row0, gap, nodata, dsm


def filter_gaps(gaps_path, dsm_path, min_area_m2: float, max_area_m2: float, gpkg: GpkgWriter | None = None,
                layer: str = "gaps", compress: bool = True, raw_path=None) -> int:
    """The training labels' [min, max] area filter on a gap map (raw_path, or gaps_path itself), written to
    gaps_path as a COG; its CSV (gap id, area m², centroid x/y in the CRS, DSM stats) beside it, and its
    polygons as `layer` of `gpkg`. Returns the number of gaps. Streamed by bands (see the module doc)."""
    gaps_path = Path(gaps_path)
    source = Path(raw_path) if raw_path else gaps_path
    info = read_info(source)
    if raw_path is None:  # rewriting in place: read a copy's bands while the COG is assembled
        source = gaps_path.with_name(f".{gaps_path.name}.raw")
        gaps_path.replace(source)
    try:
        total = _filter_bands(gaps_path, source, info, dsm_path, (min_area_m2, max_area_m2), gpkg, layer, compress)
    except BaseException:
        if raw_path is None:
            source.replace(gaps_path)  # the map as it was
        raise
    if raw_path is None:
        source.unlink()
    return total


def _filter_bands(gaps_path: Path, source: Path, info, dsm_path, area_m2, gpkg, layer: str, compress: bool) -> int:
    """filter_gaps' streamed pass: per band, label + area filter, stats rows, polygons, COG rows."""
    total = 0
    with CogWriter(gaps_path, info, np.uint8, IGNORE, compress) as out, \
            replacing(gaps_path.with_suffix(".csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8") as csv:
        for row0, gap, nodata, dsm in gap_bands(source, dsm_path):
            band = info.window(row0, 0, len(gap), info.width)
            labels, n = mask_labels(gap, *area_m2, info.pixel_area)
            stats = {name.replace("chm_", "dsm_"): col for name, col in gap_stats(labels, n, dsm, band).items()}
            stats["gap_id"] = stats["gap_id"] + total
            csv.write(gap_table_rows(stats, header=row0 == 0))
            if gpkg is not None and n:
                polygons = gap_polygons(labels, n, band)
                gpkg.append(layer, polygons, polygon_columns(stats, polygons))
            mask = (labels > 0).astype(np.uint8)
            mask[nodata] = IGNORE
            out.write(row0, mask)
            total += n
    return total


def polygon_columns(stats: dict, polygons) -> dict:
    """Attributes of each gap polygon: as gaps.py writes them, DSM statistics instead of CHM ones."""
    return {"gap_id": stats["gap_id"], "gap_area": polygons.area, "perimeter": polygons.perimeter,
            "x": polygons.centroid[:, 0], "y": polygons.centroid[:, 1],
            "label_x": polygons.label_point[:, 0], "label_y": polygons.label_point[:, 1],
            **{k: v for k, v in stats.items() if k.startswith("dsm_")}}


def write_quicklook(path, dsm_path, gaps_paths, thresholds_m, rows: int = 256) -> None:
    """quicklook.png of the written maps over the DSM's hillshade (lib.gaps.quicklook), streamed by strips."""
    info = read_info(dsm_path)
    look = QuickLook(info.height, info.width, thresholds_m, info.pixel_size[0])
    maps = [iter_strips(p, rows) for p in gaps_paths]
    for (row0, dsm), *blocks in zip(iter_strips(dsm_path, rows), *maps):
        masks = np.stack([np.where(np.isnan(b), IGNORE, b).astype(np.uint8) for _, b in blocks])
        look.add(row0, dsm, masks)
    write_png(path, look.image())
