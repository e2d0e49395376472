"""TIFF segment codecs: vectorised LZW and PackBits decoders, deflate, LZMA, and the TIFF predictors.

tifffile alone cannot decode LZW (it needs imagecodecs, which is not a dependency), so this
module decodes it with numpy. imagecodecs is used instead when it happens to be installed.
Errors are ValueError; lib/geoio/geotiff_read.py turns them into RasterError naming the file.
"""
import lzma
import zlib

import numpy as np

try:  # optional: a C decoder, 7-15x faster here (benchmarks/bench_lzw.py); never required
    from imagecodecs import lzw_decode as _lzw_decode_c
except ImportError:
    _lzw_decode_c = None

COMPRESSIONS = {1: "none", 5: "LZW", 8: "deflate", 32946: "deflate", 32773: "PackBits",
                34925: "LZMA"}  # TIFF code -> name
USES_PREDICTOR = (5, 8, 32946, 34925)  # libtiff ignores the Predictor tag of the others
_REVERSED = np.array([int(f"{i:08b}"[::-1], 2) for i in range(256)], np.uint8)  # FillOrder 2

_CLEAR, _EOI = 256, 257
# TIFF LZW "early change": after a clear, 254 codes are 9 bits wide, 512 are 10, 1024 are 11,
# the rest 12. A segment holds at most 4096 - 258 + 1 codes before the table is full.
# Old-style LZW (libtiff < 5, "compat") widens one code later and packs codes LSB-first.
_WIDTHS = np.repeat(np.array([9, 10, 11, 12], np.int32), [254, 512, 1024, 4096 - 1790])
_COMPAT_WIDTHS = np.repeat(np.array([9, 10, 11, 12], np.int32), [255, 512, 1024, 4096 - 1791])
_REVERSED_12 = np.array([int(f"{i:012b}"[::-1], 2) for i in range(4096)], np.int32)
_GROUP_BYTES = 2**16  # compressed bytes of small streams parsed together
_CHUNK_CODES = 2**15  # codes expanded together (whole segments)
_SHORT = 8  # strings up to this long resolve vectorised; longer ones by one slice copy each


def is_old_style_lzw(stream: bytes) -> bool:
    """libtiff's test for a pre-5.0 LZW stream: an LSB-first clear code (first byte 0, then bit 0)."""
    return len(stream) >= 2 and stream[0] == 0 and bool(stream[1] & 1)


def _parse_codes(streams: list[bytes], compat: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (K,) of all streams, start index of every clear-delimited segment, and each
    stream's number of codes. One pass per segment (the code widths restart at a clear) over
    ~4096 codes: small arrays that stay in cache, which measured faster than all at once.

    Old-style (compat) streams read LSB-first: with every byte's bits reversed, an MSB-first
    read gives each code with its own bits reversed.
    """
    widths = _COMPAT_WIDTHS if compat else _WIDTHS
    starts, masks = (np.cumsum(widths) - widths).astype(np.int64), (1 << widths) - 1
    data = b"".join(streams)
    if compat:
        data = reverse_bits(data)
    buf = np.frombuffer(data + b"\0\0\0", dtype=np.uint8).astype(np.int32)
    window = (buf[:-2] << 16) | (buf[1:-1] << 8) | buf[2:]  # 24 bits from every byte, (N+1,)
    pieces, per_stream, begin = [], [], 0
    for stream in streams:
        bit, nbits, n_codes = 8 * begin, 8 * (begin + len(stream)), 0
        begin += len(stream)
        while True:
            pos = bit + starts
            n_avail = int(np.searchsorted(pos + widths, nbits, side="right"))
            pos, width = pos[:n_avail], widths[:n_avail]
            seg = (window[pos >> 3] >> (24 - (pos & 7) - width)) & masks[:n_avail]
            if compat:
                seg = _REVERSED_12[seg] >> (12 - width)
            stops = np.flatnonzero(seg >= _CLEAR)  # cheap prefilter: table codes are >= 258
            stops = stops[seg[stops] <= _EOI]
            end = int(stops[0]) if len(stops) else n_avail
            if not len(stops) and n_avail == len(widths):
                raise ValueError("corrupt LZW stream: the code table overflows without a clear")
            pieces.append(seg[:end])
            n_codes += end
            if end == n_avail or seg[end] == _EOI:  # EOI, or a stream cut short
                break
            bit = int(pos[end] + width[end])
        per_stream.append(n_codes)
    sizes = np.array([len(p) for p in pieces], np.int64)
    starts = (np.cumsum(sizes) - sizes)[sizes > 0]
    codes = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return codes, starts.astype(np.int32), np.array(per_stream, np.int64)


def _code_tree(codes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """parent (K,): index of the code whose output prefixes this code's output; -1 for literals.

    Code k of a segment (k >= 1) adds table entry 257 + k = output(k-1) + first byte of output(k),
    so a code c >= 258 repeats output(c - 258) of its segment plus the first byte of c - 257.
    """
    start = np.repeat(starts, np.diff(np.append(starts, len(codes))))  # (K,) segment start
    literal = codes < _CLEAR
    bad = ~literal & (codes - 257 > np.arange(len(codes), dtype=np.int32) - start)
    if bad.any():
        code = int(codes[np.argmax(bad)])
        raise ValueError(f"corrupt LZW stream: code {code} used before it is defined")
    return np.where(literal, np.int32(-1), start + codes - 258)


def _lengths_and_roots(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output length (K,) and root literal index (K,) of every code, by pointer jumping."""
    nxt = np.where(parent < 0, np.arange(len(parent), dtype=np.int32), parent)
    dist = (parent >= 0).astype(np.int32)  # hops from k to nxt[k]
    active = np.flatnonzero(parent >= 0)
    active = active[nxt[nxt[active]] != nxt[active]]
    while len(active):  # log2(longest string) rounds
        dist[active] += dist[nxt[active]]
        nxt[active] = nxt[nxt[active]]
        active = active[nxt[nxt[active]] != nxt[active]]
    return dist + 1, nxt


def _middle_bytes(resolve, parent, length, last) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code, t, value) (M,) of the bytes 0 < t < length - 1 of the codes in `resolve`.

    Byte t of a code is byte t of its parent: either the parent's last byte (known) or again a
    middle byte. Pointer jumping along that chain takes log2(length) rounds.
    """
    n_mid = np.where(resolve, length - 2, 0)
    start = np.cumsum(n_mid) - n_mid  # compact index of (code, 1)
    code = np.repeat(np.arange(len(length), dtype=np.int32), n_mid)
    t = np.arange(1, len(code) + 1, dtype=np.int32) - start[code]
    up = parent[code]
    done = t == length[up] - 1
    vals = np.zeros(len(code), np.uint8)
    vals[done] = last[up[done]]
    nxt = start[up] + t - 1  # compact index of (parent, t), meaningful where not done
    active = np.flatnonzero(~done)
    while len(active):
        j = nxt[active]
        ready = done[j]
        vals[active[ready]] = vals[j[ready]]
        done[active[ready]] = True
        active, j = active[~ready], j[~ready]
        nxt[active] = nxt[j]
    return code, t, vals


def _expand(codes: np.ndarray, starts: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Output bytes of whole segments of codes (K,), and each code's output length (K,)."""
    parent = _code_tree(codes, starts)
    length, root = _lengths_and_roots(parent)
    first = codes[root].astype(np.uint8)  # first byte of each code's output
    last = codes.astype(np.uint8)  # literals end with themselves, others with first[parent + 1]
    copied = np.flatnonzero(parent >= 0)
    last[copied] = first[parent[copied] + 1]
    off = np.zeros(len(codes) + 1, np.int64)  # (K+1,) output offsets
    np.cumsum(length, out=off[1:])
    out = bytearray(int(off[-1]))  # bytearray: its slice copies are 2x cheaper than numpy's
    view = np.frombuffer(out, np.uint8)
    view[off[1:] - 1] = last  # the last byte of every code is known directly
    view[off[:-1]] = first  # and so is the first

    # Middle bytes of short strings are resolved together; long strings (runs, nodata areas)
    # are one slice copy each from their parent's output, parents before children.
    code, t, vals = _middle_bytes((length > 2) & (length <= _SHORT), parent, length, last)
    view[off[code] + t] = vals
    long = np.flatnonzero(length > _SHORT)
    for src, dst, n in zip(off[parent[long]].tolist(), off[long].tolist(),
                           (length[long] - 1).tolist()):
        out[dst : dst + n] = out[src : src + n]
    return bytes(out), length


def _decode_group(streams: list[bytes], compat: bool, max_bytes: float) -> list[bytes]:
    """Decode streams parsed together; expansion runs ~_CHUNK_CODES codes at a time, and stops
    past `max_bytes` of output (a chunk expands to at most ~128 MiB before that check)."""
    codes, starts, per_stream = _parse_codes(streams, compat)
    chunk = starts // _CHUNK_CODES  # expand whole segments, ~_CHUNK_CODES at a time
    bounds = np.append(starts[np.diff(chunk, prepend=-1) > 0], len(codes)).tolist()
    pieces, lengths = [], [np.zeros(1, np.int64)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        data, length = _expand(codes[a:b], starts[(starts >= a) & (starts < b)] - a)
        max_bytes -= len(data)
        if max_bytes < 0:
            raise ValueError("corrupt LZW stream: it decodes to far more bytes than its block holds")
        pieces.append(data)
        lengths.append(length)
    out, off = b"".join(pieces), np.cumsum(np.concatenate(lengths))  # (K+1,) output offsets
    ends = off[np.cumsum(per_stream)].tolist()
    return [out[a:b] for a, b in zip([0] + ends[:-1], ends)]


def lzw_decode_many(streams: list[bytes], max_bytes: float = float("inf")) -> list[bytes]:
    """Decode TIFF LZW streams (MSB-first codes, early change, clear 256, EOI 257) with numpy;
    old-style streams (LSB-first, late change) as libtiff detects and decodes them.

    Small streams (strips) are decoded together, large ones a few segments at a time: work
    arrays of ~_CHUNK_CODES codes stay in cache, which measured ~2x faster than one big pass.
    Output beyond `max_bytes` in all is refused (an LZW bomb) before it is allocated.
    """
    out = [b""] * len(streams)
    for compat in (False, True):  # each style in groups of ~_GROUP_BYTES compressed bytes
        groups, size = [[]], 0
        for k, stream in enumerate(streams):
            if is_old_style_lzw(stream) != compat:
                continue
            if groups[-1] and size + len(stream) > _GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += len(stream)
        for group in filter(None, groups):
            decoded = _decode_group([bytes(streams[k]) for k in group], compat, max_bytes)
            max_bytes -= sum(map(len, decoded))
            for k, data in zip(group, decoded):
                out[k] = data
    return out


def lzw_decode(data: bytes) -> bytes:
    """Decode one TIFF LZW stream; see lzw_decode_many."""
    return lzw_decode_many([data])[0]


def _unpredict_float(raw: np.ndarray, shape: tuple, itemsize: int) -> np.ndarray:
    """Undo predictor 3: bytes differenced along each row, then MSB planes -> big-endian values."""
    rows, width, spp = shape
    b = raw.reshape(rows, width * itemsize, spp)
    np.cumsum(b, axis=1, dtype=np.uint8, out=b)
    planes = b.reshape(rows, itemsize, width * spp)  # byte plane 0 holds the most significant
    return np.ascontiguousarray(planes.transpose(0, 2, 1)).view(f">f{itemsize}")


def predict_float(values: np.ndarray) -> np.ndarray:
    """Apply predictor 3 to (rows, width) floats: the uint8 (rows, width * itemsize) to compress."""
    rows, width = values.shape
    big = values.astype(values.dtype.newbyteorder(">"), copy=False)
    planes = big.view(np.uint8).reshape(rows, width, -1).transpose(0, 2, 1).reshape(rows, -1)
    out = planes.copy()
    out[:, 1:] -= planes[:, :-1]
    return out


def predict_horizontal(values: np.ndarray) -> np.ndarray:
    """Apply predictor 2 to (rows, width) integers: differences along rows, wrapping."""
    out = values.copy()
    out[:, 1:] -= values[:, :-1]
    return out


def predictor_for(dtype: np.dtype) -> int:
    """The predictor our writer uses: 3 (floating point) for floats, 2 (horizontal) otherwise."""
    return 3 if dtype.kind == "f" else 2


def encode_tiles(tiles: np.ndarray, compress: bool) -> list[bytes]:
    """(n, rows, width) little-endian tiles -> segment bytes; deflate after predictor_for."""
    if not compress:
        return [tile.tobytes() for tile in tiles]
    n, rows, width = tiles.shape
    flat = tiles.reshape(n * rows, width)  # the predictors work row by row
    coded = predict_float(flat) if predictor_for(tiles.dtype) == 3 else predict_horizontal(flat)
    return [zlib.compress(tile.tobytes(), 6) for tile in coded.reshape(n, -1)]


def _lzw_c(data: bytes) -> bytes:
    try:
        return _lzw_decode_c(data)
    except Exception as exc:  # imagecodecs raises its own ImcdError
        raise ValueError(f"corrupt LZW stream ({exc})") from None


def packbits_decode(data: bytes) -> bytes:
    """Decode one PackBits segment: header n < 128 copies the next n + 1 bytes, n > 128 repeats the
    next byte 257 - n times, 128 is a no-op. The headers are found by pointer doubling from byte 0
    (log2(#runs) numpy passes) instead of a Python loop over runs."""
    buf = np.frombuffer(data, np.uint8).astype(np.int32)  # segments are far below 2 GiB
    size = len(buf)
    step = np.where(buf < 128, buf + 2, np.where(buf > 128, 2, 1))  # to the next header, if a header
    jump = np.append(np.minimum(np.arange(size, dtype=np.int32) + step, size), np.int32(size))
    heads = np.zeros(min(size, 1), np.int32)  # jump: (size + 1,), the end maps to itself
    while True:  # heads = first 2^k headers; jump = 2^k steps
        more = jump[heads]
        more = more[more < size]
        if not len(more):
            break
        heads = np.concatenate([heads, more])
        jump = jump[jump]
    n = buf[heads]
    literal = n < 128
    length = np.where(literal, n + 1, np.where(n > 128, 257 - n, 0))
    run = np.repeat(np.arange(len(heads)), length)  # (out,) the run of every output byte
    offset = np.arange(len(run)) - (np.cumsum(length) - length)[run]
    src = heads[run] + 1 + np.where(literal[run], offset, 0)
    if len(src) and src[-1] >= size:
        raise ValueError("corrupt PackBits data: the last run passes the end of the segment")
    return buf[src].astype(np.uint8).tobytes()


def reverse_bits(data: bytes) -> bytes:
    """Every byte with its bit order reversed (FillOrder 2, and old-style LZW's LSB-first codes)."""
    return _REVERSED[np.frombuffer(data, np.uint8)].tobytes()


def _decompress(data: bytes, compression: int, size: int) -> bytes:
    """A block's `size` bytes. LZMA stops there, as libtiff does. Deflate must end as a complete
    stream (its checksum verified) within 2 * size + 1 MiB, as libdeflate (GDAL's) requires: a
    corrupt stream is refused and a deflate bomb stays bounded."""
    try:
        if compression == 34925:
            return lzma.LZMADecompressor().decompress(data, max_length=size)
        inflate = zlib.decompressobj()
        out = inflate.decompress(data, 2 * size + 2**20)
    except (zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"corrupt {COMPRESSIONS[compression]} data ({exc})") from None
    if not inflate.eof:
        raise ValueError(f"corrupt deflate data: the stream {'is cut short' if len(out) < 2 * size else 'goes on'}"
                         f" after {len(out)} bytes (the block holds {size})")
    return out[:size]


def _unpredict(raw: bytes, predictor: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Decompressed bytes -> native-order array of `shape` (rows, width, samples)."""
    size = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < size:
        raise ValueError(f"decoded {len(raw)} bytes, expected {size}")
    raw = np.frombuffer(raw, np.uint8, count=size)
    if predictor == 3 and dtype.kind != "f":
        raise ValueError(f"floating point predictor on {dtype.name} samples")
    if predictor == 3:
        arr = _unpredict_float(raw.copy(), shape, dtype.itemsize)
    else:
        arr = raw.view(dtype)
    arr = arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    if predictor == 2:  # integer differencing of the bit patterns, as libtiff does
        bits = arr.view(f"u{dtype.itemsize}")
        np.cumsum(bits, axis=1, dtype=bits.dtype, out=bits)
    elif predictor not in (1, 3):
        raise ValueError(f"unsupported predictor {predictor}")
    return arr


def decode_segments(segments: list[bytes], compression: int, predictor: int, shapes: list,
                    dtype: np.dtype, fill_order: int = 1) -> list[np.ndarray]:
    """Decode strips/tiles to native-order arrays of their shapes (rows, width, samples)."""
    if fill_order == 2:  # libtiff reverses the raw bytes of every codec used here
        segments = [reverse_bits(s) for s in segments]
    if compression == 5:
        c_decodes = _lzw_decode_c is not None and not any(map(is_old_style_lzw, segments))
        expected = sum(int(np.prod(shape)) for shape in shapes) * dtype.itemsize
        raws = ([_lzw_c(s) for s in segments] if c_decodes  # libtiff ignores codes past a block's end:
                else lzw_decode_many(segments, 2 * expected + 2**20))  # allow some, not a bomb
    elif compression in (8, 32946, 34925):
        raws = [_decompress(s, compression, int(np.prod(shape)) * dtype.itemsize)
                for s, shape in zip(segments, shapes)]
    elif compression == 32773:
        raws = [packbits_decode(s) for s in segments]
    elif compression == 1:
        raws = segments
    else:
        raise ValueError(f"unsupported compression {compression}")
    return [_unpredict(raw, predictor, shape, dtype) for raw, shape in zip(raws, shapes)]
