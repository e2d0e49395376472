"""Resample a raster onto a grid of another pixel size with the same origin, streamed strip by strip.

Area average when coarsening, bilinear when refining, nearest for 0/1/255 maps. Separable: along each
axis an output pixel is a weighted sum of a few source pixels ("taps"). NaN-aware: nodata pixels drop
out and the weights of the valid ones are renormalised, so an output is NaN only where every source
pixel with a positive weight is nodata. Bilinear follows torch's `interpolate(align_corners=False)`
(pixel centres aligned, edges replicated). numpy only.
"""
import math
from dataclasses import replace

import numpy as np

from lib.core.errors import RasterError
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import iter_strips, read_info
from lib.geoio.geotiff_write import RasterWriter

METHODS = ("area", "bilinear", "nearest")
SAME_SIZE = 0.01   # pixel sizes closer than 1 % are the same grid: no resampling
_MIN_WEIGHT = 1e-9  # overlaps below this are float noise of non-integer ratios


def needs_resampling(info: GeoInfo, pixel_size_m: float) -> bool:
    """Whether the raster's pixels differ from pixel_size_m by more than SAME_SIZE on either axis."""
    return any(abs(s - pixel_size_m) > SAME_SIZE * pixel_size_m for s in info.pixel_size)


def resampled_grid(info: GeoInfo, pixel_size_m: float) -> GeoInfo:
    """Same origin and CRS, square pixels of pixel_size_m, as many as cover the whole extent."""
    def cells(n, size):
        return max(1, math.ceil(n * size / pixel_size_m - 1e-6))  # 1e-6: 100 x 0.3 / 0.1 is 300, not 301
    return replace(info, height=cells(info.height, info.pixel_size[1]),
                   width=cells(info.width, info.pixel_size[0]), pixel_size=(pixel_size_m, pixel_size_m))


def dsm_methods(info: GeoInfo, pixel_size_m: float) -> tuple[str, str]:
    """(rows, cols) method for heights: area average along an axis that gets coarser, bilinear otherwise."""
    return tuple("area" if pixel_size_m > s else "bilinear" for s in (info.pixel_size[1], info.pixel_size[0]))


def axis_taps(n_out: int, n_in: int, scale: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, T) source indices in [0, n_in) and float64 weights along one axis; scale = out / in pixel size."""
    j = np.arange(n_out, dtype=np.float64)[:, None]                        # (n_out, 1)
    if method == "area":                     # output pixel j covers [j * scale, (j + 1) * scale) source pixels
        lo, hi = j * scale, (j + 1) * scale
        idx = np.floor(lo).astype(np.int64) + np.arange(math.ceil(scale) + 1)
        w = np.clip(np.minimum(idx + 1, hi) - np.maximum(idx, lo), 0.0, None)
        w[idx >= n_in] = 0.0                  # past the source's edge: nothing there
    elif method in ("bilinear", "nearest"):
        centre = (j + 0.5) * scale - 0.5                                   # in source pixel coordinates
        if method == "nearest":
            idx, w = np.floor(centre + 0.5).astype(np.int64), np.ones((n_out, 1))
        else:
            i0 = np.floor(centre)
            idx = i0.astype(np.int64) + np.arange(2)
            w = np.concatenate([1 - (centre - i0), centre - i0], axis=1)
    else:
        raise RasterError(f"unknown resampling method {method!r}; valid methods: {', '.join(METHODS)}")
    w[w < _MIN_WEIGHT] = 0.0
    return np.clip(idx, 0, n_in - 1), w                                    # clipping replicates the edges


def grid_taps(src: GeoInfo, dst: GeoInfo, methods) -> tuple[tuple, tuple]:
    """Row and column taps from src's grid to dst's; methods is one name or (rows, cols)."""
    if not np.allclose(src.origin, dst.origin, rtol=0, atol=1e-6 * max(*src.pixel_size, *dst.pixel_size)):
        raise RasterError(f"resampling needs grids with one origin, found {src.origin} and {dst.origin}")
    rows_method, cols_method = (methods, methods) if isinstance(methods, str) else methods
    rows = axis_taps(dst.height, src.height, dst.pixel_size[1] / src.pixel_size[1], rows_method)
    cols = axis_taps(dst.width, src.width, dst.pixel_size[0] / src.pixel_size[0], cols_method)
    return rows, cols


def _weighted(x: np.ndarray, taps, axis: int) -> np.ndarray:
    """Sum over taps of w * x gathered along axis (0 rows, 1 cols) of a 2-D array: one pass per tap."""
    idx, w = taps
    out = 0.0
    for t in range(idx.shape[1]):
        out = out + (x[idx[:, t]] * w[:, t, None] if axis == 0 else x[:, idx[:, t]] * w[:, t])
    return out


def resample_block(x: np.ndarray, rows, cols) -> np.ndarray:
    """x (h, w) float with NaN nodata -> (len(rows), len(cols)) float32 through the taps (grid_taps)."""
    valid = np.isfinite(x)
    num = _weighted(_weighted(np.where(valid, x, 0.0).astype(np.float64), cols, 1), rows, 0)
    den = _weighted(_weighted(valid.astype(np.float64), cols, 1), rows, 0)
    out = np.full(den.shape, np.nan, np.float32)
    np.divide(num, den, out=out, where=den > 0, casting="unsafe")
    return out


def resample(x: np.ndarray, src: GeoInfo, dst: GeoInfo, methods) -> np.ndarray:
    """Whole array x (src.height, src.width), NaN nodata -> float32 (dst.height, dst.width)."""
    if np.shape(x) != (src.height, src.width):
        raise RasterError(f"array of shape {np.shape(x)} is not on the {src.height}x{src.width} source grid")
    return resample_block(np.asarray(x), *grid_taps(src, dst, methods))


def _cast(values: np.ndarray, dtype, nodata) -> np.ndarray:
    """float32 values (NaN nodata) -> dtype, NaN as nodata for integer rasters."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return values.astype(dtype)
    return np.where(np.isnan(values), nodata, np.rint(values)).astype(dtype)


class _RowReader:
    """Rows [lo, hi) of a GeoTIFF for increasing lo and hi, each block of the file decoded once (iter_strips)."""

    def __init__(self, path, width: int, strip_rows: int = 256):
        self._strips = iter_strips(path, strip_rows)
        self._start, self._rows = 0, np.empty((0, width), np.float32)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        while self._start + len(self._rows) < hi:
            self._rows = np.concatenate([self._rows, next(self._strips)[1]])
        self._rows, self._start = self._rows[lo - self._start:], lo        # rows above lo are never asked again
        return self._rows[:hi - lo]


def resample_raster(src_path, dst_path, dst: GeoInfo, methods, dtype=np.float32, nodata=float("nan"),
                    nodata_like=None, strip_rows: int = 64, compress: bool = True) -> None:
    """Stream the GeoTIFF src_path onto dst's grid into dst_path (written atomically; compress=False for
    temporary files: deflate is most of the cost).

    Pixels that are NaN in nodata_like (a raster on dst's grid, e.g. the input DSM) become nodata too.
    Memory: one strip of output rows, the source rows its taps reach and one source strip of blocks.
    """
    src = read_info(src_path)
    (row_idx, row_w), cols = grid_taps(src, dst, methods)
    like = read_info(nodata_like) if nodata_like is not None else None
    if like is not None and (like.height, like.width) != (dst.height, dst.width):
        raise RasterError(f"{nodata_like} is {like.height}x{like.width}, not on the {dst.height}x{dst.width} "
                          f"output grid of {dst_path}")
    source = _RowReader(src_path, src.width)
    mask = _RowReader(nodata_like, dst.width) if like is not None else None
    with RasterWriter(dst_path, dst, dtype, nodata=nodata, compress=compress) as out:
        for r0 in range(0, dst.height, strip_rows):
            idx, w = row_idx[r0:r0 + strip_rows], row_w[r0:r0 + strip_rows]
            lo = int(idx.min())
            values = resample_block(source.rows(lo, int(idx.max()) + 1), (idx - lo, w), cols)  # (n, dst.width)
            if mask is not None:
                values[np.isnan(mask.rows(r0, r0 + len(idx)))] = np.nan
            out.write(r0, _cast(values, dtype, nodata))
