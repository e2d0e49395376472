"""What a stored TIFF sample means: every tag that changes it, checked in one place before decoding.

The reader honours a tag value only where it then returns exactly GDAL's pixels (GDAL 3.6, libtiff
4.5); any other value is a RasterError naming the file, the tag and its value, with a gdal_translate
command that makes a file this reader accepts. The layout (dimensions, blocks, offsets, byte counts)
is checked against the file size and a memory budget before anything is allocated or looped over.
"""
import os
from dataclasses import dataclass

import numpy as np

from lib.core.errors import RasterError
from lib.geoio import georef
from lib.geoio.tiff_codecs import COMPRESSIONS, USES_PREDICTOR

_TRANSLATE = "gdal_translate -ot Float32 -co COMPRESS=DEFLATE in.tif out.tif"  # a file we read

# tag -> (name, default when absent, {accepted value: how it is read, always as GDAL does}).
# Any value not listed is refused. Orientation and MinIsWhite change no sample: GDAL returns the
# stored order and values (and applies its georeferencing to the stored order), so do we.
SAMPLE_TAGS = {
    259: ("Compression", 1, {code: f"{name}, decoded here" for code, name in COMPRESSIONS.items()}),
    262: ("Photometric", 1, {0: "MinIsWhite: values as stored (GDAL marks MINISWHITE=YES)",
                             1: "MinIsBlack: values as stored", 2: "RGB: each sample is a band",
                             3: "Palette: the colour indices, as GDAL's band"}),
    266: ("FillOrder", 1, {1: "most significant bit first", 2: "bits of every byte reversed before decoding"}),
    274: ("Orientation", 1, {v: "stored row order (GDAL ignores the tag)" for v in range(1, 9)}),
    277: ("SamplesPerPixel", 1, {"1..65535": "bands; one block of them within the memory budget"}),
    284: ("PlanarConfiguration", 1, {1: "samples interleaved", 2: "one plane of blocks per sample"}),
    317: ("Predictor", 1, {1: "none", 2: "horizontal differences of the bit patterns",
                           3: "floating point byte planes (float samples only)"}),
    338: ("ExtraSamples", 0, {0: "unspecified: a band as stored", 1: "associated alpha: as stored",
                              2: "unassociated alpha: as stored"}),
}
_REFUSED_HINTS = {  # what to run for refused values that GDAL converts while reading
    (262, 5): "GDAL converts CMYK to RGBA: gdal_translate in.tif out.tif writes that reading",
    (262, 6): "GDAL converts YCbCr to RGB: gdal_translate -co PHOTOMETRIC=RGB in.tif out.tif",
    (262, 8): "GDAL converts CIELab to RGBA: gdal_translate in.tif out.tif writes that reading",
}
# (SampleFormat, BitsPerSample) -> dtype; other pairs (1-15 or 24 bits, void, complex) are refused
DTYPES = {(1, 8): "u1", (1, 16): "u2", (1, 32): "u4", (1, 64): "u8", (2, 8): "i1", (2, 16): "i2",
          (2, 32): "i4", (2, 64): "i8", (3, 16): "f2", (3, 32): "f4", (3, 64): "f8"}


USED_TAGS = {256, 257, 258, 273, 278, 279, 322, 323, 324, 325, 339, 32997, *SAMPLE_TAGS, georef.PIXEL_SCALE,
             georef.TIEPOINT, georef.TRANSFORM, georef.GEOKEYS, georef.GEODOUBLE, georef.GEOASCII,
             georef.GDAL_NODATA}  # every tag that changes a pixel or the grid


def check_directory(codes_in_file: list, tags: dict, path) -> None:
    """RasterError for a used tag that is in the image directory twice (libtiff keeps the first,
    tifffile the last) or that tifffile could not parse (a bad type, count or value offset: it
    drops such tags, libtiff refuses the file)."""
    twice = sorted({code for code in codes_in_file if codes_in_file.count(code) > 1} & USED_TAGS)
    if twice:
        raise RasterError(f"{path}: TIFF tag {twice[0]} appears more than once in the image directory",
                          hint="the file is damaged; re-export it from its source")
    dropped = sorted((set(codes_in_file) & USED_TAGS) - set(tags))
    if dropped:
        raise RasterError(f"{path}: TIFF tag {dropped[0]} cannot be read (a wrong type, count or value"
                          f" offset)", hint="the file is damaged; re-export it from its source")


def memory_budget() -> int:
    """Bytes one read may allocate: the machine's physical memory (16 GiB where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**34


@dataclass(frozen=True)
class Layout:
    """A checked first page: samples, codec and block grid; offsets/counts hold exactly `n_blocks`."""

    height: int
    width: int
    samples: int  # SamplesPerPixel
    dtype: np.dtype  # in the file's byte order
    compression: int
    predictor: int  # 1 where the codec ignores the tag (none, PackBits), as libtiff does
    fill_order: int
    tiled: bool
    block: tuple[int, int]  # (rows, cols) of a strip or tile
    grid: tuple[int, int]  # blocks down, across (one plane)
    separate: bool  # PlanarConfiguration 2 with several samples
    offsets: np.ndarray  # (n_blocks,) int64
    counts: np.ndarray  # (n_blocks,) int64


def _error(path, name, code, value, why, hint=_TRANSLATE) -> RasterError:
    return RasterError(f"{path}: TIFF tag {name} ({code}) = {value!r} {why}", hint=hint)


_INTEGER_TYPES = {1, 3, 4, 6, 8, 9, 16, 17}  # BYTE, SHORT, LONG, their signed kinds, LONG8, SLONG8


def _values(tags, code, name, path) -> tuple[int, ...] | None:
    """The tag's values as a tuple of non-negative ints (maybe empty); None when absent.

    As libtiff: an integer TIFF type whatever the tag's nominal one, values in range.
    """
    if code not in tags:
        return None
    tag = tags[code]
    value = tag.value
    values = value if isinstance(value, (tuple, list, np.ndarray)) else (value,)
    if int(tag.dtype) not in _INTEGER_TYPES or not all(
            isinstance(v, (int, np.integer)) and 0 <= v < 2**32 for v in values):
        raise _error(path, name, code, value, f"(TIFF type {int(tag.dtype)}) is not a list of"
                     f" non-negative integers")
    return tuple(int(v) for v in values)


def _scalar(tags, code, name, path, default=None, samples=0) -> int:
    """One int from a tag that holds exactly one, or, for a per-sample tag (samples > 0), one
    value or at least `samples` values whose first `samples` are equal (libtiff's rule)."""
    values = _values(tags, code, name, path)
    if values is None:
        if default is None:
            raise RasterError(f"{path}: TIFF tag {name} ({code}) is missing", hint=_TRANSLATE)
        return default
    n = len(values)
    if not (n == 1 or (samples and n >= samples and len(set(values[:samples])) == 1)):
        raise _error(path, name, code, values, f"must hold one value{' per sample' if samples else ''}")
    return values[0]


def _checked(tags, code, path) -> int:
    """Value of a SAMPLE_TAGS tag, refused unless the table honours it."""
    name, default, accepted = SAMPLE_TAGS[code]
    value = _scalar(tags, code, name, path, default)
    if value not in accepted:
        known = getattr(tags[code].value, "name", None)  # tifffile's enum name, e.g. JPEG
        hint = _REFUSED_HINTS.get((code, value), _TRANSLATE)
        raise _error(path, name, code, value, f"{f'({known}) ' if known else ''}is not read here;"
                     f" read: {sorted(accepted)}", hint)
    return value


def _dtype(tags, samples, path, byteorder) -> np.dtype:
    fmt = _scalar(tags, 339, "SampleFormat", path, 1, samples)
    bits = _scalar(tags, 258, "BitsPerSample", path, 1, samples)
    if (fmt, bits) not in DTYPES:
        kind = {1: "unsigned", 2: "signed", 3: "float", 4: "void", 5: "complex int", 6: "complex float"}
        raise _error(path, "BitsPerSample", 258, bits, f"with SampleFormat {fmt}"
                     f" ({kind.get(fmt, 'unknown')}) is not read here; read: 8/16/32/64-bit"
                     f" integers, 16/32/64-bit floats")
    return np.dtype(DTYPES[fmt, bits]).newbyteorder(byteorder)


def _predictor(tags, compression, dtype, path) -> int:
    if compression not in USES_PREDICTOR:  # libtiff ignores the tag for these codecs
        return 1
    predictor = _checked(tags, 317, path)
    if predictor == 3 and dtype.kind != "f":
        raise _error(path, "Predictor", 317, 3, f"(floating point) on {dtype.name} samples")
    return predictor


def _blocks(tags, height, width, path) -> tuple[bool, tuple[int, int], int, int]:
    """(tiled, (rows, cols) of a block, offsets tag, byte counts tag) of the image's block grid."""
    if 322 in tags or 323 in tags:
        block = (_scalar(tags, 323, "TileLength", path), _scalar(tags, 322, "TileWidth", path))
        if not all(block):
            raise _error(path, "TileLength/TileWidth", "323/322", block, "has a zero")
        offsets, counts = (324, 325) if 324 in tags else (273, 279)
        return True, block, offsets, counts
    rows = _scalar(tags, 278, "RowsPerStrip", path, height)
    if not rows:
        raise _error(path, "RowsPerStrip", 278, 0, "is zero")
    return False, (min(rows, height), width), 273, 279


def _positions(tags, code, n_blocks, path) -> np.ndarray:
    """The first n_blocks values of an offsets/byte-counts tag as int64, refused if fewer."""
    name = {273: "StripOffsets", 279: "StripByteCounts", 324: "TileOffsets", 325: "TileByteCounts"}[code]
    if code not in tags:
        raise RasterError(f"{path}: TIFF tag {name} ({code}) is missing", hint=_TRANSLATE)
    values = np.atleast_1d(np.asarray(tags[code].value))
    if int(tags[code].dtype) not in (3, 4, 16) or values.dtype.kind not in "ui" or values.ndim != 1 \
            or (values < 0).any():  # SHORT, LONG, LONG8: the types libtiff reads here
        raise _error(path, name, code, tags[code].value, f"(TIFF type {int(tags[code].dtype)}) is not a"
                     f" list of SHORT/LONG/LONG8 integers")
    if len(values) < n_blocks:
        raise RasterError(f"{path}: TIFF tag {name} ({code}) has {len(values)} values, but the block grid"
                          f" has {n_blocks} blocks", hint="the file is damaged; re-export it from its source")
    return values[:n_blocks]


def _check_ranges(offsets, counts, header: int, file_size: int, path) -> None:
    """Every stored block (byte count > 0) lies after the header and inside the file."""
    stored = counts > 0
    bad = stored & ((offsets < header) | (offsets > file_size) | (counts > file_size))
    ends = np.where(stored & ~bad, offsets + np.minimum(counts, file_size), 0)
    bad |= ends > file_size
    if bad.any():
        k = int(np.argmax(bad))
        offset, count = int(offsets[k]), int(counts[k])
        where = (f"starts at byte {offset}, inside the {header}-byte header" if offset < header else
                 f"ends at byte {offset + count}, the file has {file_size} bytes")
        raise RasterError(f"{path}: truncated or damaged: block {k} {where}",
                          hint="copy or re-export the file from its source")


def read_layout(tags: dict, byteorder: str, bigtiff: bool, file_size: int, path) -> Layout:
    """Check the tags {code: tifffile.TiffTag} of a first page and return its Layout."""
    height = _scalar(tags, 257, "ImageLength", path)
    width = _scalar(tags, 256, "ImageWidth", path)
    if not height or not width:
        raise _error(path, "ImageLength/ImageWidth", "257/256", (height, width), "has a zero")
    if _scalar(tags, 32997, "ImageDepth", path, 1) != 1:
        raise _error(path, "ImageDepth", 32997, tags[32997].value, "is a volume, not an image")
    samples = _scalar(tags, 277, "SamplesPerPixel", path, 1)
    if not 1 <= samples < 2**16:
        raise _error(path, "SamplesPerPixel", 277, samples, "is not in 1..65535")
    compression = _checked(tags, 259, path)
    dtype = _dtype(tags, samples, path, byteorder)
    photometric = _checked(tags, 262, path)
    if photometric == 3 and (samples != 1 or dtype.kind != "u"):
        raise _error(path, "Photometric", 262, 3, f"(palette) with {samples} {dtype.name} samples")
    extra = _values(tags, 338, "ExtraSamples", path) or ()
    if len(extra) > samples or any(v not in SAMPLE_TAGS[338][2] for v in extra):
        raise _error(path, "ExtraSamples", 338, extra, f"does not fit {samples} samples; read: 0, 1, 2")
    _checked(tags, 274, path)
    separate = _checked(tags, 284, path) == 2 and samples > 1
    tiled, block, off_tag, count_tag = _blocks(tags, height, width, path)
    block_bytes = block[0] * block[1] * (1 if separate else samples) * dtype.itemsize
    if block_bytes > memory_budget():
        raise RasterError(f"{path}: one {block[0]}x{block[1]} block of {samples} samples needs"
                          f" {block_bytes / 2**30:.1f} GiB, over this machine's memory", hint=_TRANSLATE)
    grid = (-(-height // block[0]), -(-width // block[1]))
    n_blocks = grid[0] * grid[1] * (samples if separate else 1)  # exact ints: no list is built
    offsets = _positions(tags, off_tag, n_blocks, path)
    counts = _positions(tags, count_tag, n_blocks, path)
    _check_ranges(offsets, counts, 16 if bigtiff else 8, file_size, path)
    if n_blocks == 1 and not tiled and offsets[0] and not counts[0]:  # libtiff guesses this count
        raise _error(path, "StripByteCounts", 279, 0, f"for the only strip (at byte {int(offsets[0])}) is"
                     f" bogus", hint="the file is damaged; re-export it from its source")
    return Layout(height, width, samples, dtype, compression, _predictor(tags, compression, dtype, path),
                  _checked(tags, 266, path), tiled, block, grid, separate,
                  offsets.astype(np.int64), counts.astype(np.int64))


def tag_table() -> str:
    """SAMPLE_TAGS as the markdown table of docs/rasters.md (tests keep the two the same)."""
    rows = ["| tag | code | absent means | read (as GDAL reads it) |", "|---|---|---|---|"]
    for code, (name, default, accepted) in SAMPLE_TAGS.items():
        by_meaning = {}
        for value, meaning in (accepted or {}).items():
            by_meaning.setdefault(meaning, []).append(str(value))
        read = "; ".join(f"{', '.join(values)}: {meaning}" for meaning, values in by_meaning.items())
        rows.append(f"| {name} | {code} | {default} | {read} |")
    dtypes = "; ".join(f"{fmt}/{bits}: {dtype}" for (fmt, bits), dtype in DTYPES.items())
    rows.append(f"| SampleFormat/BitsPerSample | 339/258 | 1/1 | {dtypes} (float16 read as float32) |")
    return "\n".join(rows) + "\n"
