"""GeoTIFF reading on numpy + tifffile: windowed reads, strips, DSM/CHM pairs (the grid: lib/geoio/georef.py).

tifffile parses the tags; strips and tiles are read and decoded here (lib/geoio/tiff_codecs.py), so LZW files
read without imagecodecs and a window touches only the blocks it needs. Writing: lib/geoio/geotiff_write.py.
"""
import logging
import math
import struct
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from lib.core.errors import RasterError
from lib.geoio import tiff_codecs
from lib.geoio.georef import GeoInfo, check_same_grid, parse_geoinfo
from lib.geoio.tiff_layout import Layout, check_directory, memory_budget, read_layout

_FILL_VALUES = 9999.0  # +-9999 without a nodata tag is almost always an undeclared fill value
_LOWEST_CHM_M = -1.0  # canopy heights below this are not interpolation noise but a DSM/DTM mismatch
_TALLEST_MEDIAN_M = 120.0  # no forest's median canopy is this tall: the heights are not metres


# ----------------------------------------------------------------------------- reading
# tifffile complains that GDAL_NODATA does not fit the sample type for GDAL's float32 nodata
# -3.4028234663852886e+38 (a float64 string); geoinfo parses the tag itself, so drop that noise.
logging.getLogger("tifffile").addFilter(lambda record: "GDAL_NODATA" not in record.getMessage())


def _open(path) -> tifffile.TiffFile:
    if not Path(path).is_file():
        raise RasterError(f"{path}: no such file")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many kinds on a damaged header or IFD
        raise RasterError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if not len(tif.pages):  # the header points past the end: tifffile only warns
        tif.close()
        raise RasterError(f"{path}: truncated TIFF: no image directory in its {Path(path).stat().st_size} bytes")
    return tif


def _codes_in_ifd(tif, offset: int) -> list[int]:
    """Tag codes of the image directory at `offset`, as stored (tifffile drops tags it cannot parse
    and keeps one of duplicated ones)."""
    big, e = tif.is_bigtiff, tif.byteorder
    fh = tif.filehandle
    fh.seek(offset)
    n = struct.unpack(e + ("Q" if big else "H"), fh.read(8 if big else 2))[0]
    size = 20 if big else 12
    table = np.frombuffer(fh.read(min(n, 2**16) * size), np.uint8).reshape(-1, size)
    return table[:, :2].copy().view(e + "u2").ravel().tolist()


def _first_page(tif, path) -> tuple[Layout, GeoInfo]:
    """Checked layout and grid of the first image: nothing is decoded or allocated before this."""
    try:
        page = tif.pages[0]
        tags = {tag.code: tag for tag in page.tags.values()}
        codes = _codes_in_ifd(tif, page.offset)
    except Exception as exc:  # tifffile parses pages lazily and raises many kinds
        raise RasterError(f"{path}: not a readable TIFF image directory ({type(exc).__name__}: {exc})") from None
    check_directory(codes, tags, path)
    layout = read_layout(tags, tif.byteorder, tif.is_bigtiff, tif.filehandle.size, path)
    info = parse_geoinfo({code: tag.value for code, tag in tags.items()}, layout.height, layout.width, path)
    return layout, info


def read_info(path) -> GeoInfo:
    """Grid and georeferencing of a GeoTIFF without reading its pixels (its layout is checked)."""
    with _open(path) as tif:
        return _first_page(tif, path)[1]


class _Blocks:
    """One band of a TIFF's first page: decodes only the strips/tiles a window touches."""

    def __init__(self, path, band: int | None = None):
        self.path = str(path)
        self._tif = _open(path)
        try:
            self._setup(band)
        except Exception:
            self._tif.close()
            raise

    def _setup(self, band):
        self.layout, self.info = _first_page(self._tif, self.path)
        spp = self.layout.samples
        if band is None and spp != 1:
            raise RasterError(f"{self.path}: expected one band, found {spp}",
                              hint=f"extract the height band: gdal_translate -b 1 in.tif out.tif"
                                   f" (in Python: band=1..{spp})")
        if band is not None and not 1 <= band <= spp:
            raise RasterError(f"{self.path}: band {band} requested, the file has bands 1..{spp}")
        self.dtype = self.layout.dtype
        self.out_dtype = np.dtype("f4" if self.dtype.str[1:] == "f2" else self.dtype.str[1:])  # as GDAL's band
        rows, cols = self.layout.grid
        self._first = ((band or 1) - 1) * rows * cols if self.layout.separate else 0  # plane start
        self._spp, self._sample = (1, 0) if self.layout.separate else (spp, (band or 1) - 1)
        self._cache = {}
        self._fill = self._sparse_fill()

    def _sparse_fill(self) -> float:
        """What fills the blocks a sparse file leaves out, as GDAL does: the nodata value, else 0.

        GDAL rounds (half away from zero) and clamps a nodata value that integer samples cannot hold;
        it parses it as an integer prefix for 64-bit samples, and clamps to Byte for int8 before GDAL
        3.7: those are refused, not imitated.
        """
        nodata, dtype = self.info.nodata, self.dtype
        if nodata is None or (np.isnan(nodata) and dtype.kind != "f"):
            return 0
        if dtype.kind == "f" or (nodata.is_integer() and np.iinfo(dtype).min <= nodata <= np.iinfo(dtype).max):
            return nodata
        if dtype.itemsize < 8 and dtype != np.int8:
            rounded = np.sign(nodata) * np.floor(abs(nodata) + 0.5)
            return float(np.clip(rounded, np.iinfo(dtype).min, np.iinfo(dtype).max))
        if (self.layout.counts == 0).any():
            raise RasterError(f"{self.path}: the file leaves blocks out (sparse) and its nodata value"
                              f" {nodata:g} does not fit its {dtype.name} samples (GDAL's fill for it"
                              f" depends on its version)", hint="gdal_translate -a_nodata <a value that fits> in.tif out.tif")
        return 0

    def _raw(self, index: int) -> bytes:
        offset, count = int(self.layout.offsets[index]), int(self.layout.counts[index])
        self._tif.filehandle.seek(offset)  # inside the file: checked by read_layout
        return self._tif.filehandle.read(count)

    def _decode(self, keys: list) -> list[np.ndarray]:
        """Decode blocks (row, col) of the block grid together: [(rows, width)], native order.

        A block with no bytes (a sparse file: GDAL's SPARSE_OK leaves all-nodata blocks out) is
        the nodata value, or 0 without one.
        """
        layout, (th, tw) = self.layout, self.layout.block
        shapes = [(th if layout.tiled else min(th, layout.height - r * th), tw, self._spp)
                  for r, _ in keys]  # the last strip is short; edge tiles are padded
        index = [self._first + r * layout.grid[1] + c for r, c in keys]
        stored = [k for k, i in enumerate(index) if layout.counts[i]]
        try:
            blocks = tiff_codecs.decode_segments([self._raw(index[k]) for k in stored], layout.compression,
                                                 layout.predictor, [shapes[k] for k in stored], self.dtype,
                                                 layout.fill_order)
        except ValueError as exc:
            if len(stored) > 1:  # find the broken one to name it
                for k in stored:
                    self._decode([keys[k]])
            raise RasterError(f"{self.path}: cannot decode block {index[stored[0]]}: {exc}") from None
        decoded = dict(zip(stored, blocks))
        with np.errstate(over="ignore"):  # a float nodata beyond float32 fills with inf, as GDAL's
            return [decoded[k][:, :, self._sample].astype(self.out_dtype, copy=False) if k in decoded
                    else np.full(shapes[k][:2], self._fill, self.out_dtype) for k in range(len(keys))]

    def read(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """(height, width) samples in the file's dtype (float16 as float32, as GDAL reads it); keeps the
        blocks it used for the next call."""
        (th, tw), itemsize = self.layout.block, self.dtype.itemsize
        need = (height * width + len(self._cache) * th * tw * self._spp) * itemsize
        if need > memory_budget():
            raise RasterError(f"{self.path}: reading a {height}x{width} window needs {need / 2**30:.1f} GiB,"
                              f" over this machine's memory", hint="read it in windows or strips (iter_strips)")
        keys = [(br, bc) for br in range(row0 // th, (row0 + height - 1) // th + 1)
                for bc in range(col0 // tw, (col0 + width - 1) // tw + 1)]
        missing = [key for key in keys if key not in self._cache]
        self._cache = {key: self._cache.get(key) for key in keys if key in self._cache}
        self._cache.update(zip(missing, self._decode(missing)))  # one window's blocks: bounded
        out = np.empty((height, width), self.out_dtype)
        for (br, bc), block in self._cache.items():
            r0, r1 = max(row0, br * th), min(row0 + height, (br + 1) * th)
            c0, c1 = max(col0, bc * tw), min(col0 + width, (bc + 1) * tw)
            out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = \
                block[r0 - br * th : r1 - br * th, c0 - bc * tw : c1 - bc * tw]
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tif.close()


def _to_float32(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """float32 copy with the nodata value and non-finite values as NaN."""
    with np.errstate(over="ignore"):  # float64 beyond float32 range -> inf -> NaN below
        out = raw.astype(np.float32)
    if nodata is not None and not math.isnan(nodata):
        if raw.dtype.kind == "f":
            out[raw == raw.dtype.type(nodata)] = np.nan
        elif nodata.is_integer() and np.iinfo(raw.dtype).min <= nodata <= np.iinfo(raw.dtype).max:
            out[raw == int(nodata)] = np.nan
    out[np.isinf(out)] = np.nan
    return out


def _warn_fill(path, n_fill: int, n_total: int) -> None:
    if n_fill:
        warnings.warn(f"{path}: {n_fill / n_total:.2%} of pixels are +-9999 and the file has no"
                      f" nodata tag; values kept (set GDAL_NODATA if they are fill values)",
                      stacklevel=3)


def _window(window, info: GeoInfo, path) -> tuple[int, int, int, int]:
    row0, col0, h, w = (0, 0, info.height, info.width) if window is None else map(int, window)
    if h <= 0 or w <= 0 or row0 < 0 or col0 < 0 or row0 + h > info.height or col0 + w > info.width:
        raise RasterError(f"{path}: window (row0, col0, h, w) = {tuple(window)} is not inside the"
                          f" {info.height}x{info.width} raster")
    return row0, col0, h, w


def read_raster(path, window=None, band: int | None = None) -> tuple[np.ndarray, GeoInfo]:
    """float32 (H, W) with nodata as NaN, and its GeoInfo; window=(row0, col0, h, w) reads a part.

    band is 1-based (as in GDAL) and needed only for multi-band files.
    """
    with _Blocks(path, band) as blocks:
        row0, col0, h, w = _window(window, blocks.info, path)
        values = _to_float32(blocks.read(row0, col0, h, w), blocks.info.nodata)
    if blocks.info.nodata is None:
        _warn_fill(path, int(np.count_nonzero(np.abs(values) == _FILL_VALUES)), values.size)
    return values, blocks.info.window(row0, col0, h, w)


def read_bands(path) -> np.ndarray:
    """Every band of a (multi-band) GeoTIFF as float32 (C, H, W), nodata as NaN (EuroSAT-style tiles)."""
    with _open(path) as tif:
        bands = _first_page(tif, path)[0].samples
    return np.stack([read_raster(path, band=b)[0] for b in range(1, bands + 1)])


def iter_strips(path, rows: int, band: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row0, float32 (<=rows, W)) top to bottom; memory stays one strip of blocks."""
    if rows < 1:
        raise RasterError(f"{path}: iter_strips needs rows >= 1, got {rows}")
    with _Blocks(path, band) as blocks:
        info, n_fill = blocks.info, 0
        for row0 in range(0, info.height, rows):
            h = min(rows, info.height - row0)
            block = _to_float32(blocks.read(row0, 0, h, info.width), info.nodata)
            if info.nodata is None:
                n_fill += int(np.count_nonzero(np.abs(block) == _FILL_VALUES))
            yield row0, block
    _warn_fill(path, n_fill, info.height * info.width)


# ----------------------------------------------------------------------------- pairs
def read_pair(dsm, chm=None, dtm=None, window=None) -> tuple[np.ndarray, np.ndarray, GeoInfo]:
    """(dsm, chm, info) on one checked grid; chm = dsm - dtm when a DTM is given.

    A pixel that is nodata in either input is NaN in both outputs.
    """
    if (chm is None) == (dtm is None):
        raise RasterError(f"read_pair needs exactly one of chm= or dtm=, got chm={chm}, dtm={dtm}")
    other = chm if chm is not None else dtm
    check_same_grid({str(dsm): read_info(dsm), str(other): read_info(other)})
    surface, info = read_raster(dsm, window)
    second, _ = read_raster(other, window)
    height = second if chm is not None else surface - second
    invalid = np.isnan(surface) | np.isnan(height)
    surface[invalid] = np.nan
    height[invalid] = np.nan
    if window is None:
        check_heights(height, f"{dsm} with {other}")
    return surface, height, info


def check_heights(chm: np.ndarray, where) -> None:
    """RasterError when no pixel is valid; warnings for canopy heights below -1 m and for a median
    canopy too tall to be in metres (scaled integers: centimetres, decimetres)."""
    n_valid = int(np.count_nonzero(~np.isnan(chm)))
    if not n_valid:
        raise RasterError(f"{where}: every pixel is nodata",
                          hint="check the files and their nodata value (GDAL_NODATA tag)")
    n_low = int(np.count_nonzero(chm < _LOWEST_CHM_M))  # NaN compares False
    if n_low:
        warnings.warn(f"{where}: {n_low / n_valid:.2%} of the valid canopy heights are below {_LOWEST_CHM_M:g} m "
                      f"(lowest {np.nanmin(chm):.2f} m); check the DSM/DTM order, units and vertical datum",
                      stacklevel=2)
    median = float(np.nanmedian(chm.ravel()[:: max(1, chm.size // 2**20)]))  # a sample: ~1 M pixels
    if median > _TALLEST_MEDIAN_M:
        warnings.warn(f"{where}: the median canopy height is {median:g}, over {_TALLEST_MEDIAN_M:g} m: not a"
                      f" CHM in metres (a DSM given as CHM? centimetres or other scaled integers must be"
                      f" converted to metres first)", stacklevel=2)
