"""GeoTIFF writing: tiled (256 x 256), deflate with a predictor, streamed by rows, one IFD at the end,
atomic via a temp file + os.replace, BigTIFF when the raster passes 4 GB.
"""
import os
import secrets
import struct
from pathlib import Path

import numpy as np

from lib.core.errors import RasterError
from lib.geoio import tiff_codecs
from lib.geoio.georef import GeoInfo, geotiff_tags

_TILE = 256
_BIGTIFF_BYTES = 2**32 - 2**26  # rasters larger than this get 64-bit offsets (BigTIFF)


_TYPES = {2: "s", 3: "H", 4: "I", 12: "d", 16: "Q"}  # TIFF field type -> struct code
_SAMPLE_FORMAT = {"u": 1, "i": 2, "f": 3}


def _ifd(tags: list, at: int, big: bool) -> bytes:
    """One IFD written at file offset `at`; values too long to sit inline follow it."""
    count_fmt, entry_fmt, slot = ("<Q", "<HHQ", 8) if big else ("<H", "<HHI", 4)
    size = struct.calcsize(count_fmt) + len(tags) * (struct.calcsize(entry_fmt) + slot) + slot
    entries, extra = [], b""
    for code, typ, values in sorted(tags):
        if typ == 2:
            data = values.encode("ascii") + b"\0"
        else:
            data = struct.pack(f"<{len(values)}{_TYPES[typ]}", *values)
        count = len(data) if typ == 2 else len(values)
        if len(data) <= slot:
            field = data.ljust(slot, b"\0")
        else:
            field = struct.pack("<Q" if big else "<I", at + size + len(extra))
            extra += data + b"\0" * (len(data) % 2)  # keep values word-aligned
        entries.append(struct.pack(entry_fmt, code, typ, count) + field)
    return struct.pack(count_fmt, len(tags)) + b"".join(entries) + bytes(slot) + extra


def _check_cast(block: np.ndarray, dtype: np.dtype, path) -> None:
    """Floats never go silently into integer rasters; integers must fit the target type."""
    fits = block.dtype.kind in "uib" and dtype.kind in "ui" and (block.size == 0 or (
        np.iinfo(dtype).min <= block.min() and block.max() <= np.iinfo(dtype).max))
    if not (fits or np.can_cast(block.dtype, dtype, "same_kind")):
        raise RasterError(f"{path}: cannot store {block.dtype} values as {dtype.name}")


def checked_dtype(path, dtype, nodata) -> np.dtype:
    """The little-endian dtype a raster of `dtype` is written as (bool as uint8); RasterError when it is no
    number type or nodata does not fit it."""
    dtype = np.dtype(np.uint8 if np.dtype(dtype) == bool else dtype)
    if dtype.kind not in _SAMPLE_FORMAT:
        raise RasterError(f"{path}: cannot write {dtype} rasters; expected integers or floats")
    if nodata is not None and dtype.kind in "ui" and not (
            float(nodata).is_integer() and np.iinfo(dtype).min <= nodata <= np.iinfo(dtype).max):
        raise RasterError(f"{path}: nodata {nodata} does not fit {dtype}")
    return dtype.newbyteorder("<")


class StreamedWriter:
    """A writer used as a context manager: close() on success, abort() (the destination untouched) on error."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


class RasterWriter(StreamedWriter):
    """Stream a GeoTIFF top to bottom in bounded memory (one row of 256 x 256 tiles).

    with RasterWriter(path, info, np.float32) as out:
        for row0, block in blocks: out.write(row0, block)   # renamed into place on success
    """

    def __init__(self, path, info: GeoInfo, dtype, nodata=None, compress: bool = True):
        self.path, self.info, self.compress = Path(path), info, compress
        self.dtype, self.nodata, self._row = checked_dtype(path, dtype, nodata), nodata, 0
        self._cols = -(-info.width // _TILE)  # tiles per row
        self._buf = np.zeros((_TILE, self._cols * _TILE), self.dtype)  # one tile row
        self._big = info.height * info.width * self.dtype.itemsize > _BIGTIFF_BYTES
        self._offsets, self._counts = [], []
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            self._fh = open(self._tmp, "xb")  # beside the target, so os.replace is atomic
        except OSError as exc:
            raise RasterError(f"{path}: cannot create the output ({exc})") from None
        self._fh.write(bytes(16 if self._big else 8))  # header, patched in close()

    def write(self, row0: int, block) -> None:
        """Append rows [row0, row0 + len(block)); blocks must come in order, top to bottom."""
        block = np.asarray(block)
        if row0 != self._row:
            raise RasterError(f"{self.path}: blocks must arrive top to bottom: expected row0="
                              f"{self._row}, got {row0}")
        if block.ndim != 2 or block.shape[1] != self.info.width or row0 + len(block) > self.info.height:
            raise RasterError(f"{self.path}: block {block.shape} at row {row0} does not fit the"
                              f" {self.info.height}x{self.info.width} raster")
        _check_cast(block, self.dtype, self.path)
        done = 0
        while done < len(block):  # fill the tile row; encode it when full
            fill = self._row % _TILE
            n = min(_TILE - fill, len(block) - done)
            self._buf[fill : fill + n, : self.info.width] = block[done : done + n]
            self._row, done = self._row + n, done + n
            if self._row % _TILE == 0:
                self._flush_tiles()

    def _flush_tiles(self) -> None:
        tiles = self._buf.reshape(_TILE, self._cols, _TILE).transpose(1, 0, 2)  # (cols, T, T)
        for data in tiff_codecs.encode_tiles(np.ascontiguousarray(tiles), self.compress):
            self._offsets.append(self._fh.tell())
            self._counts.append(len(data))
            self._fh.write(data)
        self._buf[:] = 0  # edge tiles are zero-padded

    def close(self) -> None:
        """Write the IFD and move the file into place; fails if rows are missing."""
        if self._row != self.info.height:
            raise RasterError(f"{self.path}: only {self._row} of {self.info.height} rows were written")
        if self._row % _TILE:
            self._flush_tiles()
        offset_type, kind = (16 if self._big else 4), self.dtype.kind
        tags = [(256, 4, (self.info.width,)), (257, 4, (self.info.height,)),
                (258, 3, (8 * self.dtype.itemsize,)), (259, 3, (8 if self.compress else 1,)),
                (262, 3, (1,)), (277, 3, (1,)), (284, 3, (1,)),
                (317, 3, (tiff_codecs.predictor_for(self.dtype) if self.compress else 1,)),
                (322, 3, (_TILE,)), (323, 3, (_TILE,)), (324, offset_type, self._offsets),
                (325, offset_type, self._counts), (339, 3, (_SAMPLE_FORMAT[kind],)),
                *geotiff_tags(self.info, self.nodata)]
        at = self._fh.seek(0, os.SEEK_END)
        at += self._fh.write(bytes(at % 2))  # IFDs start on a word boundary
        self._fh.write(_ifd(tags, at, self._big))
        self._fh.seek(0)
        self._fh.write(b"II+\0" + struct.pack("<HHQ", 8, 0, at) if self._big
                       else b"II*\0" + struct.pack("<I", at))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temp file; the destination is left untouched."""
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_raster(path, array, info: GeoInfo, nodata=None, compress: bool = True) -> None:
    """Write a 2-D array as a tiled GeoTIFF on `info`'s grid (info.nodata is ignored: NaN is NaN).

    nodata, when given, is written as GDAL_NODATA (e.g. 255 for a uint8 mask).
    """
    array = np.asarray(array)
    if array.shape != (info.height, info.width):
        raise RasterError(f"{path}: array shape {array.shape} does not match the grid"
                          f" {info.height}x{info.width}")
    with RasterWriter(path, info, array.dtype, nodata=nodata, compress=compress) as out:
        out.write(0, array)
