"""An independent TIFF writer for reader tests: every layout, codec, predictor and fill order by hand.

Built on struct, zlib, lzma and the plain-Python LZW encoder of tests/test_tiff_codecs.py; nothing from
lib/. The arrays it encodes are the ground truth the differential tests compare readers against.
"""
import lzma
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from tests.test_tiff_codecs import lzw_codes, lzw_encode

_TYPES = {"B": 1, "s": 2, "H": 3, "I": 4, "d": 12, "Q": 16}  # struct code -> TIFF type
_REVERSED = np.array([int(f"{i:08b}"[::-1], 2) for i in range(256)], np.uint8)


@dataclass
class Variant:
    """How to store a (samples, H, W) array; defaults give a plain striped little-endian TIFF."""

    byteorder: str = "<"
    bigtiff: bool = False
    tile: tuple | None = None  # (rows, cols); None: strips of `rows_per_strip`
    rows_per_strip: int = 7
    planar: int = 1
    compression: int = 1  # 1 none, 5 LZW, 8 deflate, 32773 PackBits, 34925 LZMA
    predictor: int = 1
    fill_order: int = 1
    old_lzw: bool = False  # pre-libtiff-5 LZW: LSB-first codes, late width change
    photometric: int = 1
    orientation: int = 1
    sparse: bool = False  # blocks whose samples all equal `fill` are written with no bytes (SPARSE_OK)
    fill: float = 0
    nodata: str | None = None  # GDAL_NODATA text
    tags: dict = field(default_factory=dict)  # code -> (struct code, values) added or replaced; None drops


def old_lzw_encode(data: bytes) -> bytes:
    """Old-style LZW: the codes of lzw_encode, packed LSB-first, each width one code later."""
    out, acc, n_bits, k = bytearray(), 0, 0, 0
    for code in lzw_codes(data):
        width = min((257 + k).bit_length(), 12)
        acc, n_bits, k = acc | (code << n_bits), n_bits + width, 0 if code == 256 else k + 1
        while n_bits >= 8:
            out.append(acc & 0xFF)
            acc, n_bits = acc >> 8, n_bits - 8
    return bytes(out + (bytes([acc]) if n_bits else b""))


def packbits_encode(data: bytes) -> bytes:
    """PackBits with literal runs only (up to 128 bytes each), plus one repeat run per 128 zeros."""
    out = bytearray()
    for i in range(0, len(data), 128):
        chunk = data[i : i + 128]
        out += bytes([256 - 127, 0]) if chunk == bytes(128) else bytes([len(chunk) - 1]) + chunk
    return bytes(out)


def _predict(block: np.ndarray, predictor: int) -> bytes:
    """(rows, cols, spp) samples in file byte order -> the bytes the predictor leaves."""
    rows, cols, spp = block.shape
    if predictor == 2:  # wrapping differences of the bit patterns, per sample along the row
        unsigned = np.dtype(block.dtype.str[0] + f"u{block.dtype.itemsize}")
        bits = block.view(unsigned).astype(np.uint64)
        diff = np.diff(bits, axis=1, prepend=np.zeros((rows, 1, spp), np.uint64))  # wraps mod 2^64
        return diff.astype(unsigned).tobytes()  # and mod 2^bits
    if predictor == 3:  # big-endian byte planes of the row's values, then differences with stride spp
        big = block.astype(block.dtype.newbyteorder(">")).reshape(rows, cols * spp)
        planes = big.view(np.uint8).reshape(rows, cols * spp, -1).transpose(0, 2, 1).reshape(rows, -1)
        diff = planes.copy()
        diff[:, spp:] -= planes[:, :-spp]  # libtiff's fpDiff: byte k minus byte k - spp, wrapping
        return diff.tobytes()
    return block.tobytes()


def _encode(block: np.ndarray, v: Variant) -> bytes:
    if v.sparse and (np.isnan(block).all() if np.isnan(v.fill) else (block == block.dtype.type(v.fill)).all()):
        return b""
    raw = _predict(block, v.predictor if v.compression in (5, 8, 34925) else 1)  # as libtiff
    if v.compression == 5:
        raw = old_lzw_encode(raw) if v.old_lzw else lzw_encode(raw)
    elif v.compression == 8:
        raw = zlib.compress(raw)
    elif v.compression == 32773:
        raw = packbits_encode(raw)
    elif v.compression == 34925:
        raw = lzma.compress(raw)
    return _REVERSED[np.frombuffer(raw, np.uint8)].tobytes() if v.fill_order == 2 else raw


def _blocks(samples: np.ndarray, v: Variant) -> list[np.ndarray]:
    """(samples, H, W) -> the (rows, cols, spp) blocks in file order; edge tiles padded with zeros."""
    spp, height, width = samples.shape
    planes = [samples[s : s + 1] for s in range(spp)] if v.planar == 2 else [samples]
    rows, cols = v.tile or (v.rows_per_strip, width)
    out = []
    for plane in planes:
        for r in range(0, height, rows):
            for c in range(0, width, cols):
                block = np.moveaxis(plane[:, r : r + rows, c : c + cols], 0, -1)
                if v.tile:
                    block = np.pad(block, ((0, rows - block.shape[0]), (0, cols - block.shape[1]), (0, 0)))
                out.append(block)
    return out


def tiff_file(samples: np.ndarray, v: Variant) -> bytes:
    """The bytes of a TIFF holding `samples` (H, W) or (spp, H, W) as `v` says."""
    samples = samples[None] if samples.ndim == 2 else samples
    spp, height, width = samples.shape
    stored = samples.astype(samples.dtype.newbyteorder(v.byteorder))
    blocks = [_encode(b, v) for b in _blocks(stored, v)]
    head = 16 if v.bigtiff else 8
    offsets, at = [], head
    for b in blocks:
        offsets.append(at if b else 0)
        at += len(b)
    fmt = {"u": 1, "i": 2, "f": 3}[samples.dtype.kind]
    long = "Q" if v.bigtiff else "I"
    tags = [(256, "I", [width]), (257, "I", [height]), (258, "H", [8 * samples.dtype.itemsize] * spp),
            (259, "H", [v.compression]), (262, "H", [v.photometric]), (274, "H", [v.orientation]),
            (277, "H", [spp]), (284, "H", [v.planar]), (339, "H", [fmt] * spp)]
    tags += [(266, "H", [v.fill_order])] if v.fill_order != 1 else []
    tags += [(317, "H", [v.predictor])] if v.predictor != 1 else []
    n_extra = spp - (3 if v.photometric == 2 else 1)
    tags += [(338, "H", [0] * n_extra)] if n_extra > 0 else []
    if v.photometric == 3:
        tags.append((320, "H", [i % 2**16 for i in range(3 * 2 ** (8 * samples.dtype.itemsize))]))
    if v.tile:
        tags += [(322, "I", [v.tile[1]]), (323, "I", [v.tile[0]]), (324, long, offsets),
                 (325, long, [len(b) for b in blocks])]
    else:
        tags += [(273, long, offsets), (278, "I", [v.rows_per_strip]), (279, long, [len(b) for b in blocks])]
    if v.nodata is not None:
        tags.append((42113, "s", v.nodata))
    tags = {code: (kind, values) for code, kind, values in tags} | v.tags
    tags = [(code, *tags[code]) for code in sorted(tags) if tags[code] is not None]
    return _layout(b"".join(blocks), head + len(b"".join(blocks)), tags, v)


def _layout(data: bytes, ifd_at: int, tags: list, v: Variant) -> bytes:
    """Header + data + one IFD (values that do not fit inline after it)."""
    e = v.byteorder
    ifd_at += ifd_at % 2
    n_size, entry, inline = (8, 20, 8) if v.bigtiff else (2, 12, 4)
    extra_at = ifd_at + n_size + entry * len(tags) + inline
    entries, extra = b"", b""
    for code, kind, values in tags:
        packed = (values.encode() + b"\0") if kind == "s" else struct.pack(f"{e}{len(values)}{kind}", *values)
        count = len(packed) if kind == "s" else len(values)
        if len(packed) <= inline:
            value = packed.ljust(inline, b"\0")
        else:
            value = struct.pack(e + ("Q" if v.bigtiff else "I"), extra_at + len(extra))
            extra += packed + bytes(len(packed) % 2)
        entries += struct.pack(e + ("HHQ" if v.bigtiff else "HHI"), code, _TYPES[kind], count) + value
    magic = (b"II" if e == "<" else b"MM") + struct.pack(e + "H", 43 if v.bigtiff else 42)
    header = magic + (struct.pack(e + "HHQ", 8, 0, ifd_at) if v.bigtiff else struct.pack(e + "I", ifd_at))
    return (header + data + bytes(ifd_at - len(header) - len(data))
            + struct.pack(e + ("Q" if v.bigtiff else "H"), len(tags)) + entries + bytes(inline) + extra)
