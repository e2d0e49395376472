"""PNG images without a plotting library: a zlib PNG writer, a tiny plot renderer and a quick-look.

Plots (the gap figures of lib/gaps/figures.py) are drawn into numpy RGB arrays:
axes with tick marks, a 3 x 5 pixel font for labels, lines, points and shaded bands. Enough to read
a figure in a report, not a replacement for matplotlib.
"""
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from lib.core.atomic import write_bytes

BLACK, GREY, RED, BLUE, GREEN = (0, 0, 0), (190, 190, 190), (200, 30, 30), (30, 70, 200), (34, 139, 34)
OUTLINE_COLOURS = ((255, 40, 40), (255, 220, 0), (0, 220, 255), (255, 0, 255), (80, 255, 80))
# 3 x 5 glyphs, one octal digit per row (bit 4 = left column)
_FONT = dict(zip("0123456789.-()=,/:ABCDEFGHIJKLMNOPQRSTUVWXYZ <", (
    "75557 26227 71747 71717 55711 74717 74757 71111 75757 75717 00002 00700 24442 21112 07070 00024 "
    "11244 02020 25755 65656 34443 65556 74647 74644 34553 55755 72227 11152 55655 44447 57755 65555 "
    "25552 65644 25563 65655 34216 72222 55557 55552 55775 55255 55222 71247 00000 12421").split()))


# ----------------------------------------------------------------------------- encoding
def encode_png(image: np.ndarray) -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 -> PNG bytes (8-bit, "Up" filter, zlib level 6)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"PNG needs (H, W) or (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    height, width = image.shape[:2]
    rows = image.reshape(height, -1)
    up = rows.copy()
    up[1:] -= rows[:-1]                                  # wraps mod 256, as the filter expects
    raw = np.hstack([np.full((height, 1), 2, np.uint8), up])   # filter type 2 (Up) on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if image.ndim == 2 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_png(path, image: np.ndarray) -> None:
    """Write an image as PNG, atomically (temp file + os.replace)."""
    path = Path(path)
    data = encode_png(image)
    write_bytes(path, data)


# ----------------------------------------------------------------------------- drawing
def text_bitmap(text: str, scale: int = 2) -> np.ndarray:
    """(5 scale, 4 scale len - scale) bool bitmap of `text` (upper-cased; unknown characters as blanks)."""
    glyphs = [np.array([[int(row) >> (2 - c) & 1 for c in range(3)] for row in _FONT.get(ch, "00000")], bool)
              for ch in text.upper()]
    gap = np.zeros((5, 1), bool)
    bitmap = np.hstack([part for g in glyphs for part in (g, gap)][:-1]) if glyphs else np.zeros((5, 0), bool)
    return np.kron(bitmap, np.ones((scale, scale), bool))


def draw_text(canvas, x: int, y: int, text: str, colour=BLACK, scale: int = 2, anchor: str = "left",
              vertical: bool = False) -> None:
    """Paint text with its top-left corner (or centre / right end, by anchor) at pixel (x, y)."""
    bitmap = text_bitmap(text, scale)
    if vertical:
        bitmap = np.rot90(bitmap)
    h, w = bitmap.shape
    x -= {"left": 0, "centre": w // 2, "right": w}[anchor] if not vertical else 0
    y -= h // 2 if vertical else 0
    rows, cols = np.nonzero(bitmap)
    _paint(canvas, rows + y, cols + x, colour)


def _paint(canvas, rows, cols, colour) -> None:
    ok = (rows >= 0) & (rows < canvas.shape[0]) & (cols >= 0) & (cols < canvas.shape[1])
    canvas[rows[ok], cols[ok]] = colour


def _segments(px, py, dashed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pixels along the polyline through (px, py), about one sample per pixel (dashes: 6 on, 6 off)."""
    keep = np.isfinite(px) & np.isfinite(py)
    px, py = px[keep], py[keep]
    if len(px) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    steps = np.maximum(np.ceil(np.maximum(abs(np.diff(px)), abs(np.diff(py)))), 1).astype(int)
    seg = np.repeat(np.arange(len(steps)), steps)
    t = (np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(steps, steps)
    xs, ys = px[seg] + t * np.diff(px)[seg], py[seg] + t * np.diff(py)[seg]
    if dashed:
        on = (np.arange(len(xs)) // 6) % 2 == 0
        xs, ys = xs[on], ys[on]
    return np.rint(ys).astype(int), np.rint(xs).astype(int)


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Decades on a log axis, 1-2-5 steps on a linear one, all within [lo, hi] (axis units)."""
    if log:
        return [float(k) for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    raw = (hi - lo) / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _label(value: float, log: bool) -> str:
    if log:
        return f"{10 ** value:g}".upper().replace("+", "")
    return f"{value:.6g}"


def plot(series: list[dict], x_label: str, y_label: str, title: str = "", log_x: bool = False,
         log_y: bool = False, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """Render series into an (H, W, 3) uint8 chart.

    Each series: x, y, style ("line", "dashed", "points" or "band" with y_hi), colour, optional label.
    """
    width, height = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 78, width - 16, 34, height - 52

    def axis(values, log):
        values = np.asarray(values, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(values > 0, np.log10(values), np.nan) if log else values

    xs = np.concatenate([np.zeros(0)] + [axis(s["x"], log_x) for s in series])
    ys = np.concatenate([np.zeros(0)] + [axis(s[k], log_y) for s in series for k in ("y", "y_hi") if k in s])
    x0, x1 = _limits(xs, log_x)
    y0, y1 = _limits(ys, log_y)

    def to_px(x, y):
        return (left + (axis(x, log_x) - x0) / (x1 - x0) * (right - left),
                bottom - (axis(y, log_y) - y0) / (y1 - y0) * (bottom - top))

    for s in series:
        _draw_series(canvas, s, to_px, (left, right, top, bottom))
    _draw_axes(canvas, (left, right, top, bottom), (x0, x1, y0, y1), (log_x, log_y), x_label, y_label)
    draw_text(canvas, (left + right) // 2, 8, title, anchor="centre")
    labelled = [s for s in series if s.get("label")]
    for k, s in enumerate(labelled):
        y = top + 8 + 16 * k
        canvas[y + 3:y + 7, right - 200:right - 184] = s.get("colour", BLACK)
        draw_text(canvas, right - 178, y, s["label"])
    return canvas


def _limits(values: np.ndarray, log: bool) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if log:
        return math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return min(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad


def _draw_series(canvas, s: dict, to_px, box) -> None:
    left, right, top, bottom = box
    colour, style = s.get("colour", BLACK), s.get("style", "line")
    if style == "band":
        px, lo = to_px(s["x"], s["y"])
        _, hi = to_px(s["x"], s["y_hi"])
        ok = np.isfinite(px) & np.isfinite(lo) & np.isfinite(hi)
        if ok.sum() < 2:
            return
        cols = np.arange(max(left, int(px[ok].min())), min(right, int(px[ok].max())) + 1)
        y_lo, y_hi = np.interp(cols, px[ok], lo[ok]), np.interp(cols, px[ok], hi[ok])
        rows = np.arange(top, bottom + 1)[:, None]
        inside = (rows >= np.minimum(y_lo, y_hi)) & (rows <= np.maximum(y_lo, y_hi))   # (rows, cols)
        r, c = np.nonzero(inside)
        _paint(canvas, r + top, cols[c], colour)
    elif style == "points":
        px, py = to_px(s["x"], s["y"])
        ok = np.isfinite(px) & np.isfinite(py)
        dr, dc = np.mgrid[-2:3, -2:3].reshape(2, -1)
        _paint(canvas, (np.rint(py[ok])[:, None] + dr).ravel().astype(int),
               (np.rint(px[ok])[:, None] + dc).ravel().astype(int), colour)
    else:
        rows, cols = _segments(*to_px(s["x"], s["y"]), dashed=style == "dashed")
        inside = (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
        for dr in (0, 1):                                # 2 px wide
            _paint(canvas, rows[inside] + dr, cols[inside], colour)


def _draw_axes(canvas, box, limits, logs, x_label: str, y_label: str) -> None:
    left, right, top, bottom = box
    x0, x1, y0, y1 = limits
    canvas[bottom, left:right + 1] = BLACK
    canvas[top:bottom + 1, left] = BLACK
    for t in _ticks(x0, x1, logs[0]):
        col = int(round(left + (t - x0) / (x1 - x0) * (right - left)))
        canvas[bottom + 1:bottom + 6, col] = BLACK
        draw_text(canvas, col, bottom + 9, _label(t, logs[0]), anchor="centre")
    for t in _ticks(y0, y1, logs[1]):
        row = int(round(bottom - (t - y0) / (y1 - y0) * (bottom - top)))
        canvas[row, left - 5:left] = BLACK
        draw_text(canvas, left - 8, row - 5, _label(t, logs[1]), anchor="right")
    draw_text(canvas, (left + right) // 2, bottom + 30, x_label, anchor="centre")
    draw_text(canvas, 8, (top + bottom) // 2, y_label, vertical=True)


def hillshade_quicklook(dsm: np.ndarray, masks, pixel_size: float = 1.0, max_side: int = 2048,
                        min_side: int = 600) -> np.ndarray:
    """(H, W) DSM (NaN nodata) + (K, H, W) or (H, W) gap masks -> (h, w, 3) uint8 hillshade with outlines.

    Sun from the north-west at 45 degrees; mask k is outlined in OUTLINE_COLOURS[k]. Scenes larger than
    max_side are subsampled (any gap pixel in a block marks the block), small ones enlarged towards
    min_side so that outlines stay thin. uint8 masks: 1 gap, 255 nodata.
    """
    dsm = np.asarray(dsm, np.float32)
    masks = np.asarray(masks)
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.shape[1:] != dsm.shape:
        raise ValueError(f"masks of shape {masks.shape} do not match the DSM's {dsm.shape}")
    step = max(1, math.ceil(max(dsm.shape) / max_side))
    zoom = max(1, min(min_side, max_side) // max(dsm.shape)) if step == 1 else 1
    z = dsm[::step, ::step]
    grey = hillshade(z, pixel_size * step)
    image = np.repeat(enlarge(grey, zoom)[:, :, None], 3, axis=2)
    gap = (masks == 1) if masks.dtype == np.uint8 else masks > 0
    for k, mask in enumerate(gap):
        block = enlarge(_any_pool(mask, step)[:z.shape[0], :z.shape[1]], zoom)
        ring = np.pad(block, 1)
        inner = block & ring[:-2, 1:-1] & ring[2:, 1:-1] & ring[1:-1, :-2] & ring[1:-1, 2:]
        image[block & ~inner] = OUTLINE_COLOURS[k % len(OUTLINE_COLOURS)]
    return image


def hillshade(z: np.ndarray, pixel_size: float) -> np.ndarray:
    """(H, W) heights (NaN nodata) -> uint8 grey shading, sun from the north-west at 45 degrees; nodata black."""
    filled = np.nan_to_num(z, nan=float(np.nanmean(z)) if np.isfinite(z).any() else 0.0)
    dz_drow, dz_dx = np.gradient(filled, pixel_size) if min(z.shape) > 1 else (np.zeros_like(filled),) * 2
    sun = np.array([-1.0, 1.0, math.sqrt(2)]) / 2          # (east, north, up): azimuth 315, altitude 45
    shade = (-dz_dx * sun[0] + dz_drow * sun[1] + sun[2]) / np.sqrt(1 + dz_dx ** 2 + dz_drow ** 2)
    return np.where(np.isnan(z), 0, np.clip(shade, 0, 1) * 215 + 40).astype(np.uint8)


def enlarge(image: np.ndarray, zoom: int) -> np.ndarray:
    """Each pixel as a zoom x zoom block."""
    return np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1) if zoom > 1 else image


def _any_pool(mask: np.ndarray, step: int) -> np.ndarray:
    """Block-wise any over step x step blocks (the last ones padded)."""
    if step == 1:
        return mask
    h, w = -(-mask.shape[0] // step), -(-mask.shape[1] // step)
    padded = np.zeros((h * step, w * step), bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    return padded.reshape(h, step, w, step).any(axis=(1, 3))
