"""ForestGapR-style canopy gaps: CHM <= threshold, 8-connected, kept when min <= area <= max (m²).

Semantics follow the R package ForestGapR (`getForestGaps`, `GapStats`): gaps are numbered 1..n in
raster-scan order of their first pixel after the area filter, gap_area = pixel count x pixel area,
chm_max/chm_min as is, chm_mean, chm_sd (n - 1), chm_gini (finite-sample) and chm_range rounded to 2
decimals with R's round(). Nodata (NaN) is never gap and never forest. One deliberate difference:
ForestGapR takes the pixel area as res_x², we take res_x * res_y (the same for square pixels).
numpy only: analysis without the training stack.
"""
import csv
import io
from pathlib import Path

import numpy as np

from lib.core.atomic import replacing
from lib.gaps.components import component_sizes, label_components
from lib.core.errors import ConfigError, DataError

IGNORE = 255  # label value of nodata pixels in gap masks: ignored by losses and metrics
STAT_COLUMNS = ("gap_id", "gap_area", "chm_max", "chm_min", "chm_mean", "chm_sd", "chm_gini",
                "chm_range", "x", "y")
ROUNDED_COLUMNS = ("chm_mean", "chm_sd", "chm_gini", "chm_range")  # GapStats rounds these to 2 decimals


def threshold_tag(threshold: float) -> str:
    """File-name tag of a height threshold: 10 -> "10m", 2.5 -> "2.5m" (shortest exact digits)."""
    return np.format_float_positional(float(threshold), trim="-") + "m"


def gap_labels(chm: np.ndarray, threshold: float, min_area_m2: float, max_area_m2: float,
               pixel_area_m2: float) -> tuple[np.ndarray, int]:
    """(H, W) CHM -> (int32 gap ids 1..n, 0 elsewhere including nodata), n."""
    chm = _check_chm(chm)
    _check_area(min_area_m2, max_area_m2, pixel_area_m2)
    labels, keep = _kept_components(_at_or_below(chm, threshold), min_area_m2, max_area_m2, pixel_area_m2)
    new_id = np.cumsum(keep, dtype=np.int32) * keep             # renumber survivors 1..k in order
    return new_id[labels], int(keep.sum())


def gap_masks(chm: np.ndarray, thresholds, min_area_m2: float, max_area_m2: float,
              pixel_area_m2: float) -> np.ndarray:
    """(H, W) CHM -> (K, H, W) uint8 training targets: 1 gap, 0 not gap, IGNORE (255) nodata."""
    chm = _check_chm(chm)
    _check_area(min_area_m2, max_area_m2, pixel_area_m2)
    nodata = np.isnan(chm)
    masks = np.empty((len(thresholds),) + chm.shape, np.uint8)
    for k, threshold in enumerate(thresholds):
        below = _at_or_below(chm, threshold)
        # Every component is >= 1 pixel and <= all of `below`: when both pass, labelling changes nothing.
        if min_area_m2 <= pixel_area_m2 and np.count_nonzero(below) * pixel_area_m2 <= max_area_m2:
            masks[k] = below
        else:
            labels, keep = _kept_components(below, min_area_m2, max_area_m2, pixel_area_m2)
            np.take(keep.view(np.uint8), labels, out=masks[k], mode="clip")  # labels index keep
        masks[k][nodata] = IGNORE
    return masks


def _kept_components(below: np.ndarray, min_area_m2: float, max_area_m2: float,
                     pixel_area_m2: float) -> tuple[np.ndarray, np.ndarray]:
    """8-connected labels (H, W) int32 of a mask, and keep (n + 1,) bool: label passes the area filter."""
    labels, n = label_components(below, connectivity=8)
    area = component_sizes(labels, n) * float(pixel_area_m2)   # (n,) m²
    keep = np.zeros(n + 1, bool)                                # keep[0]: background
    keep[1:] = (area >= min_area_m2) & (area <= max_area_m2)
    return labels, keep


def gap_stats(labels: np.ndarray, n: int, chm: np.ndarray, info) -> dict[str, np.ndarray]:
    """Per-gap statistics, each column shape (n,); x, y: centroid of the gap's pixel centres (CRS units).

    info is a lib.geoio.georef.GeoInfo (uses pixel_area and xy_of). Gaps without pixels get NaN. x, y equal
    GapSPDF's x, y (terra::centroids, area-weighted over all parts of a gap).
    """
    chm = _check_chm(chm)
    if labels.shape != chm.shape:
        raise DataError(f"gap labels have shape {labels.shape} but the CHM has shape {chm.shape}")
    flat = np.flatnonzero(labels)                               # (M,) gap pixels in scan order
    gap = labels.ravel()[flat].astype(np.intp)
    if len(gap) and (gap.min() < 1 or gap.max() > n):
        raise DataError(f"gap labels must lie in 0..{n}, found {gap.min()}..{gap.max()}")
    height = chm.ravel()[flat].astype(np.float64)
    order = np.lexsort((height, gap))                           # by gap, then height ascending
    gap, height = gap[order], height[order]
    count = np.bincount(gap, minlength=n + 1)[1:n + 1]
    first = np.cumsum(count) - count                            # (n,) start of each gap in `height`

    def per_gap(weights):
        return np.bincount(gap, weights, minlength=n + 1)[1:n + 1]

    rank = np.arange(len(gap)) - first[gap - 1] + 1             # 1..count within each gap
    rows, cols = np.divmod(flat[order], labels.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):           # one-pixel gaps: sd, gini 0/0 = NaN as R
        total = per_gap(height)
        mean = total / count
        sd = np.sqrt(per_gap((height - mean[gap - 1]) ** 2) / (count - 1))
        gini = (2 * per_gap(height * rank) / total - (count + 1)) / (count - 1)
        x, y = info.xy_of(per_gap(rows) / count, per_gap(cols) / count)
    low, high = np.full(n, np.nan), np.full(n, np.nan)
    has = count > 0
    low[has] = height[first[has]]
    high[has] = height[first[has] + count[has] - 1]
    stats = {"gap_id": np.arange(1, n + 1, dtype=np.int64), "gap_area": count * float(info.pixel_area),
             "chm_max": high, "chm_min": low, "chm_mean": mean, "chm_sd": sd, "chm_gini": gini,
             "chm_range": high - low, "x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64)}
    return {name: round_like_r(column, 2) if name in ROUNDED_COLUMNS else column for name, column in stats.items()}


def round_like_r(x, digits: int) -> np.ndarray:
    """R (>= 4.0) round(x, digits): the nearer of the two decimal neighbours, as doubles; ties to even.

    np.round scales by 10^digits first and so rounds 0.15 up to 0.2, where R gives 0.1 (0.15 is stored
    as 0.1499999...). Also NaN stays NaN, and values with more than 15 significant digits stay as is.
    """
    x = np.asarray(x, np.float64)
    size = np.abs(x)
    p10 = 10.0 ** digits
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        i10 = np.floor(size * p10)
        down, up = i10 / p10, np.ceil(size * p10) / p10
        du, dd = up - size, size - down
        rounded = np.where((du < dd) | ((du == dd) & (np.fmod(i10, 2) == 1)), up, down)
        too_fine = digits + (np.floor(np.log2(size)) + 0.5) * np.log10(2) > 15   # as R: logb
    return np.where(too_fine | ~np.isfinite(x) | (x == 0), x, np.copysign(rounded, x))


def write_gap_table(path, stats: dict[str, np.ndarray]) -> None:
    """Write the gap statistics as CSV (one row per gap, NaN as "NA"), atomically."""
    with replacing(Path(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        handle.write(gap_table_rows(stats))


def gap_table_rows(stats: dict[str, np.ndarray], header: bool = True) -> str:
    """CSV text of the gap statistics, the header row first when asked (a table written in parts)."""
    text = io.StringIO()
    writer = csv.writer(text)
    if header:
        writer.writerow(stats.keys())
    writer.writerows(zip(*[_format_column(np.asarray(values)) for values in stats.values()]))
    return text.getvalue()


def _format_column(values: np.ndarray) -> list[str]:
    """Integers and text as is; floats with up to 6 decimals (µm for metres), trailing zeros dropped; NaN -> NA."""
    if values.dtype.kind in "iubUS":
        return [str(v) for v in values.tolist()]
    text = []
    for v in values.tolist():
        s = "NA" if v != v else f"{v:.6f}".rstrip("0").rstrip(".")
        text.append("0" if s == "-0" else s)
    return text


def _at_or_below(chm: np.ndarray, threshold: float) -> np.ndarray:
    """chm <= threshold compared exactly as real numbers (as R does in double), NaN -> False.

    numpy would round the threshold to float32 for a float32 CHM: 10.1 becomes 10.1000004, and a
    pixel stored as float32(10.1) would count as <= 10.1. Using the largest float32 <= threshold
    instead gives the exact answer without a float64 copy of the raster.
    """
    threshold = float(threshold)
    if chm.dtype != np.float32:
        return chm <= threshold
    limit = np.float32(threshold)
    if float(limit) > threshold:                     # compare as float64, not as float32
        limit = np.nextafter(limit, np.float32(-np.inf))
    return chm <= limit


def _check_chm(chm) -> np.ndarray:
    """A 2-D floating-point CHM (nodata as NaN)."""
    chm = np.asarray(chm)
    if chm.ndim != 2 or chm.dtype.kind != "f":
        raise DataError(f"CHM must be a 2-D float array with NaN for nodata, "
                        f"got shape {chm.shape} dtype {chm.dtype}")
    return chm


def _check_area(min_area_m2: float, max_area_m2: float, pixel_area_m2: float) -> None:
    """Gap size bounds in m² must be ordered and the pixel area positive."""
    if not pixel_area_m2 > 0 or not np.isfinite(pixel_area_m2):
        raise DataError(f"pixel area must be a positive number of m², got {pixel_area_m2}")
    if not min_area_m2 <= max_area_m2:
        raise ConfigError(f"gap area bounds are reversed: min_area_m2={min_area_m2} > "
                          f"max_area_m2={max_area_m2}", hint="expected min_area_m2 <= max_area_m2")
