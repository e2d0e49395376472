"""The area filter, gap table and gap polygons of a mapped scene, streamed in bands of rows.

Why bands: a gap may span many strips, and its area, statistics and outline need all of it. Strips of
BAND_ROWS rows are read into a buffer; after each one, the gaps that cannot go on below (they do not
touch its last row) and start before every gap that can are decided: area filter, ids in the scene's scan
order, their table rows (lib.gaps.masks.gap_stats) and polygons (lib.gaps.polygons.gap_polygons) from the
buffer, which holds them whole. Rows above the first undecided gap pixel are final and leave for the COG.
So every output equals the whole-scene computation, and memory is the buffer: about BAND_ROWS plus the
tallest gap's height in rows of the scene's width, whatever the scene's height (a gap as tall as the
scene would make it the scene).
"""
import contextlib
from pathlib import Path

import numpy as np

from lib.core.atomic import replacing
from lib.gaps.components import label_components
from lib.gaps.masks import IGNORE, STAT_COLUMNS, gap_labels, gap_stats, gap_table_rows
from lib.gaps.polygons import gap_polygons
from lib.gaps.quicklook import QuickLook
from lib.geoio.cog import CogWriter
from lib.geoio.geopackage import GpkgWriter
from lib.geoio.geotiff_read import iter_strips, read_info
from lib.geoio.png import write_png

BAND_ROWS = 256
TABLE_COLUMNS = [name.replace("chm_", "dsm_") for name in STAT_COLUMNS]


def mask_labels(gap: np.ndarray, min_area_m2: float, max_area_m2: float, pixel_area_m2: float):
    """(gap ids (H, W) int32, n) of a bool gap map after the training labels' [min, max] area filter.

    Labelled as a 2-byte pseudo-CHM, 0 in gaps, so lib.gaps.masks applies exactly the training labels' rule.
    """
    return gap_labels((~gap).astype(np.float16), 0.5, min_area_m2, max_area_m2, pixel_area_m2)


def _decidable(final: np.ndarray, more: bool) -> tuple[np.ndarray, int, int]:
    """Labels (n, W) of the undecided gap pixels (final == -1), their count, and how many of them (1..m, scan
    order) can be decided now: gaps that cannot go on below (not touching the last row, or no rows follow) and
    whose first pixel comes before that of every gap that can, so the ids stay in the scene's scan order."""
    labels, n = label_components(final == -1, connectivity=8)
    touching = np.unique(labels[-1]) if more and n else np.zeros(0, np.int32)
    touching = touching[touching > 0]
    return labels, n, int(touching.min()) - 1 if len(touching) else n   # labels follow their first pixel


def filter_bands(mask_path, dsm_strips, area_m2, rows: int = BAND_ROWS):
    """Yield (row0, ids (n, W) int32 of the gaps decided now, numbered 1..k in scan order, k, dsm (n, W), the
    finished rows from row0 as uint8 1 gap / 0 / IGNORE) per strip; the area filter sees whole gaps only.
    dsm_strips: the DSM's (row0, strip) by `rows` rows (iter_strips), one pulled per strip read and yield."""
    info = read_info(mask_path)
    nodata, dsm = np.zeros((0, info.width), bool), np.zeros((0, info.width), np.float32)
    final, row0 = np.zeros((0, info.width), np.int8), 0        # -1: gap pixel not decided yet; else 0 / 1
    for (r, m), (_, d) in zip(iter_strips(mask_path, rows), dsm_strips):
        nodata, dsm = np.concatenate([nodata, np.isnan(m)]), np.concatenate([dsm, d])
        final = np.concatenate([final, -(m == 1).view(np.int8)])
        labels, n, m_ready = _decidable(final, more=r + len(m) < info.height)
        keep = np.zeros(n + 1, bool)                                                # keep[0]: background
        keep[1:m_ready + 1] = True
        most_m2 = np.count_nonzero(labels) * info.pixel_area                        # a gap: 1 pixel to all of them
        if not (area_m2[0] <= info.pixel_area and most_m2 <= area_m2[1]):          # sizes only if a bound can fail
            size = np.bincount(labels.ravel(), minlength=m_ready + 1)[1:m_ready + 1] * info.pixel_area
            keep[1:m_ready + 1] = (size >= area_m2[0]) & (size <= area_m2[1])
        ids = np.where(keep, np.cumsum(keep, dtype=np.int32), 0)[labels]            # kept gaps 1..k in scan order
        ready = (labels > 0) & (labels <= m_ready)
        final[ready] = keep[labels[ready]]
        undecided = np.flatnonzero((final == -1).any(axis=1))
        done = int(undecided[0]) if len(undecided) else len(final)
        out = final[:done].astype(np.uint8)
        out[nodata[:done]] = IGNORE
        yield row0, ids, int(keep.sum()), dsm, out
        nodata, dsm, final, row0 = nodata[done:], dsm[done:], final[done:], row0 + done


def filter_gaps(gaps_path, dsm_path, min_area_m2: float, max_area_m2: float, gpkg: GpkgWriter | None = None,
                layer: str = "gaps", compress: bool = True, raw_path=None) -> int:
    """The training labels' [min, max] area filter on a gap map (raw_path, or gaps_path itself), written to
    gaps_path as a COG; its CSV (gap id, area m², centroid x/y in the CRS, DSM stats) beside it, and its
    polygons as `layer` of `gpkg`. Returns the number of gaps. Streamed by bands (see the module doc)."""
    return filter_maps([(gaps_path, raw_path, layer)], dsm_path, min_area_m2, max_area_m2, gpkg, compress)[0]


def filter_maps(maps, dsm_path, min_area_m2: float, max_area_m2: float, gpkg: GpkgWriter | None = None,
                compress: bool = True) -> list[int]:
    """filter_gaps on several maps of the DSM's grid, maps = [(gaps_path, raw_path or None, layer)], in one
    pass that decodes the DSM once for all of them; the number of gaps of each."""
    targets, sources = [Path(gaps_path) for gaps_path, _, _ in maps], []
    try:
        for target, (_, raw_path, _) in zip(targets, maps):
            if raw_path is None:  # rewriting in place: read a copy's bands while the COG is assembled
                target.replace(target.with_name(f".{target.name}.raw"))
                sources.append(target.with_name(f".{target.name}.raw"))
            else:
                sources.append(Path(raw_path))
        totals = _filter(targets, sources, [layer for _, _, layer in maps], dsm_path, (min_area_m2, max_area_m2),
                         gpkg, compress)
    except BaseException:
        for target, source, (_, raw_path, _) in zip(targets, sources, maps):
            if raw_path is None:
                source.replace(target)  # the map as it was
        raise
    for source, (_, raw_path, _) in zip(sources, maps):
        if raw_path is None:
            source.unlink()
    return totals


def _filter(targets, sources, layers, dsm_path, area_m2, gpkg, compress: bool) -> list[int]:
    """filter_maps' streamed pass: each DSM strip, read once, goes to every map's bands in turn; memory: one
    band buffer per map (itertools.tee would hold the strips in blocks of 57, a 10,000 px scene's whole DSM)."""
    with contextlib.ExitStack() as stack:
        outputs = [_MapOutputs(stack, target, read_info(source), gpkg, layer, compress)
                   for target, source, layer in zip(targets, sources, layers)]
        strip = [None]
        current = iter(lambda: strip[0], None)            # each pull: the DSM strip being filtered
        bands = [filter_bands(source, current, area_m2) for source in sources]
        for row0_dsm in iter_strips(dsm_path, BAND_ROWS):
            strip[0] = row0_dsm
            for output, band in zip(outputs, bands):
                output.add(*next(band))
        return [output.total for output in outputs]


class _MapOutputs:
    """One map's outputs fed band by band: its COG, CSV and GeoPackage layer; total: the gaps so far."""

    def __init__(self, stack: contextlib.ExitStack, gaps_path: Path, info, gpkg, layer: str, compress: bool):
        self.cog = stack.enter_context(CogWriter(gaps_path, info, np.uint8, IGNORE, compress))
        tmp = stack.enter_context(replacing(gaps_path.with_suffix(".csv")))
        self.csv = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        self.csv.write(gap_table_rows({name: [] for name in TABLE_COLUMNS}))
        self.info, self.gpkg, self.layer, self.total = info, gpkg, layer, 0

    def add(self, row0: int, ids: np.ndarray, k: int, dsm: np.ndarray, mask: np.ndarray) -> None:
        """One band of filter_bands: the new gaps' stats rows and polygons, then the finished rows."""
        if k:
            band = self.info.window(row0, 0, len(ids), self.info.width)
            stats = {name.replace("chm_", "dsm_"): col for name, col in gap_stats(ids, k, dsm, band).items()}
            stats["gap_id"] = stats["gap_id"] + self.total
            self.csv.write(gap_table_rows(stats, header=False))
            if self.gpkg is not None:
                polygons = gap_polygons(ids, k, band)
                self.gpkg.append(self.layer, polygons, polygon_columns(stats, polygons))
            self.total += k
        self.cog.write(row0, mask)


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
