"""Cloud-Optimized GeoTIFF writing, streamed by rows in bounded memory, in the layout of GDAL's COG driver.

Why: GIS users and tile servers open a COG at any zoom without reading the whole file (`gdalinfo` reports
LAYOUT=COG). Layout: header, GDAL's ghost area (the structural metadata below), every IFD (full resolution,
then the overviews, largest first), then the tile data, smallest overview first and the full resolution
last, each level's tiles row-major, each tile preceded by its size (uint32) and followed by its last 4
bytes repeated. Rows arrive top to bottom; each level's encoded tiles are spooled to a temporary file
beside the output, so memory stays one row of 256 x 256 tiles per level, whatever the raster's size.
Overviews take every 2nd pixel of the level above (nearest: gap classes stay classes) until the raster
fits one tile.
"""
import os
import secrets
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from lib.core.errors import RasterError
from lib.geoio import tiff_codecs
from lib.geoio.georef import GDAL_NODATA, GeoInfo, geotiff_tags
from lib.geoio.geotiff_read import iter_strips, read_info
from lib.geoio.geotiff_write import _BIGTIFF_BYTES, _SAMPLE_FORMAT, _TILE, StreamedWriter, _check_cast, _ifd, checked_dtype

GHOST = (b"GDAL_STRUCTURAL_METADATA_SIZE=000140 bytes\nLAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\n"
         b"BLOCK_LEADER=SIZE_AS_UINT4\nBLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n ")


def overview_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of every level, full resolution first, each half the one above (rounded up), until
    one tile holds the level."""
    shapes = [(height, width)]
    while max(shapes[-1]) > _TILE:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _chained(ifd: bytes, n_tags: int, big: bool, next_at: int) -> bytes:
    """The IFD with its next-IFD pointer set (the IFDs follow one another before the data)."""
    at = (8 + n_tags * 20) if big else (2 + n_tags * 12)
    return ifd[:at] + struct.pack("<Q" if big else "<I", next_at) + ifd[at + (8 if big else 4):]


class _Level:
    """One resolution: a buffer of one tile row and the encoded tiles spooled to a temporary file."""

    def __init__(self, height: int, width: int, dtype, compress: bool, folder: Path):
        self.height, self.width, self.compress, self.row = height, width, compress, 0
        self.cols = -(-width // _TILE)
        self.buf = np.zeros((_TILE, self.cols * _TILE), dtype)
        self.spool = tempfile.TemporaryFile(dir=folder, prefix=".cog.")
        self.offsets, self.counts = [], []     # of each tile's data within the spool

    def add(self, rows: np.ndarray) -> None:
        done = 0
        while done < len(rows):
            fill = self.row % _TILE
            n = min(_TILE - fill, len(rows) - done)
            self.buf[fill:fill + n, :self.width] = rows[done:done + n]
            self.row, done = self.row + n, done + n
            if self.row % _TILE == 0 or self.row == self.height:
                self._flush()

    def _flush(self) -> None:
        tiles = self.buf.reshape(_TILE, self.cols, _TILE).transpose(1, 0, 2)    # (cols, T, T)
        for data in tiff_codecs.encode_tiles(np.ascontiguousarray(tiles), self.compress):
            self.offsets.append(self.spool.tell() + 4)
            self.counts.append(len(data))
            self.spool.write(struct.pack("<I", len(data)) + data + data[-4:])  # GDAL's leader and trailer
        self.buf[:] = 0  # edge tiles are zero-padded

    def size(self) -> int:
        return self.spool.tell()


class CogWriter(StreamedWriter):
    """Stream a Cloud-Optimized GeoTIFF top to bottom; the same interface as RasterWriter.

    with CogWriter(path, info, np.uint8, nodata=255) as out:
        for row0, block in blocks: out.write(row0, block)   # assembled and renamed into place on success
    """

    def __init__(self, path, info: GeoInfo, dtype, nodata=None, compress: bool = True):
        self.path, self.info, self.nodata, self.compress = Path(path), info, nodata, compress
        self.dtype, self._row = checked_dtype(path, dtype, nodata), 0
        if not self.path.parent.is_dir():
            raise RasterError(f"{path}: cannot create the output (no folder {self.path.parent})")
        self._levels = [_Level(h, w, self.dtype, compress, self.path.parent)
                        for h, w in overview_shapes(info.height, info.width)]

    def write(self, row0: int, block) -> None:
        """Append rows [row0, row0 + len(block)); blocks must come in order, top to bottom."""
        block = np.asarray(block)
        if row0 != self._row:
            raise RasterError(f"{self.path}: blocks must arrive top to bottom: expected row0={self._row}, got {row0}")
        if block.ndim != 2 or block.shape[1] != self.info.width or row0 + len(block) > self.info.height:
            raise RasterError(f"{self.path}: block {block.shape} at row {row0} does not fit the"
                              f" {self.info.height}x{self.info.width} raster")
        _check_cast(block, self.dtype, self.path)
        for level, rows in enumerate(self._levels):
            step = 2 ** level                       # level l keeps rows and columns 0, 2^l, 2*2^l, ...
            first = -row0 % step
            rows.add(block[first::step, ::step])
        self._row += len(block)

    def _tags(self, level: int, offsets, counts, big: bool) -> list:
        rows = self._levels[level]
        offset_type = 16 if big else 4
        tags = [(256, 4, (rows.width,)), (257, 4, (rows.height,)), (258, 3, (8 * self.dtype.itemsize,)),
                (259, 3, (8 if self.compress else 1,)), (262, 3, (1,)), (277, 3, (1,)), (284, 3, (1,)),
                (317, 3, (tiff_codecs.predictor_for(self.dtype) if self.compress else 1,)),
                (322, 3, (_TILE,)), (323, 3, (_TILE,)), (324, offset_type, offsets), (325, offset_type, counts),
                (339, 3, (_SAMPLE_FORMAT[self.dtype.kind],))]
        extra = geotiff_tags(self.info, self.nodata)
        if level:  # an overview: reduced-resolution subfile; GDAL reads its grid from the full resolution
            return [(254, 4, (1,)), *tags, *[t for t in extra if t[0] == GDAL_NODATA]]
        return tags + extra

    def close(self) -> None:
        """Lay out header, ghost area, IFDs and tile data; move the file into place."""
        if self._row != self.info.height:
            raise RasterError(f"{self.path}: only {self._row} of {self.info.height} rows were written")
        big = sum(rows.size() for rows in self._levels) > _BIGTIFF_BYTES
        header = 16 if big else 8
        ifd_at = header + len(GHOST) + len(GHOST) % 2
        sizes = [len(_ifd(self._tags(i, rows.offsets, rows.counts, big), 0, big)) for i, rows in enumerate(self._levels)]
        ifd_offsets = [int(o) for o in np.cumsum([ifd_at] + [s + s % 2 for s in sizes])[:-1]]
        data_at, starts = ifd_at + sum(s + s % 2 for s in sizes), {}
        for i in reversed(range(len(self._levels))):                 # smallest overview's tiles first
            starts[i], data_at = data_at, data_at + self._levels[i].size()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as fh:
                fh.write(b"II+\0" + struct.pack("<HHQ", 8, 0, ifd_at) if big else b"II*\0" + struct.pack("<I", ifd_at))
                fh.write(GHOST + bytes(len(GHOST) % 2))
                for i, rows in enumerate(self._levels):
                    tags = self._tags(i, [starts[i] + o for o in rows.offsets], rows.counts, big)
                    next_at = ifd_offsets[i + 1] if i + 1 < len(self._levels) else 0
                    fh.write(_chained(_ifd(tags, ifd_offsets[i], big), len(tags), big, next_at))
                    fh.write(bytes(sizes[i] % 2))
                for i in reversed(range(len(self._levels))):
                    self._levels[i].spool.seek(0)
                    shutil.copyfileobj(self._levels[i].spool, fh, 2**20)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            self._release()

    def _release(self) -> None:
        for rows in self._levels:
            rows.spool.close()

    def abort(self) -> None:
        """Drop the spooled tiles; the destination is left untouched."""
        self._release()


def write_cog(path, array, info: GeoInfo, nodata=None, compress: bool = True) -> None:
    """Write a 2-D array as a COG on `info`'s grid (nodata written as GDAL_NODATA)."""
    array = np.asarray(array)
    if array.shape != (info.height, info.width):
        raise RasterError(f"{path}: array shape {array.shape} does not match the grid {info.height}x{info.width}")
    with CogWriter(path, info, array.dtype, nodata=nodata, compress=compress) as out:
        out.write(0, array)


def to_cog(path, dtype, nodata=None, strip_rows: int = 256) -> None:
    """Rewrite the GeoTIFF at `path` as a COG, streamed strip by strip (e.g. a map resampled back to the
    input grid); NaN is written as `nodata` for integer rasters."""
    path = Path(path)
    source = path.with_name(f".{path.name}.{os.getpid()}.src")
    path.replace(source)
    try:
        with CogWriter(path, read_info(source), dtype, nodata) as out:
            for row0, block in iter_strips(source, strip_rows):
                if np.dtype(dtype).kind in "ui":
                    block = np.where(np.isnan(block), nodata, block)
                out.write(row0, block.astype(dtype))
    except BaseException:
        source.replace(path)  # the file as it was
        raise
    source.unlink()
