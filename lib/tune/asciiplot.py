"""A curve drawn in characters, so a terminal user sees it without opening TensorBoard."""
import math

import numpy as np


def _fmt(v: float, log: bool) -> str:
    return f"{10 ** v:.0e}" if log else f"{v:.3g}"


def _cells(v: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Values -> cell indices 0..n-1 (lo -> 0, hi -> n-1)."""
    return np.clip(np.round((v - lo) / max(hi - lo, 1e-12) * (n - 1)), 0, n - 1).astype(int)


def plot(x, y, width: int = 64, height: int = 14, logx: bool = False, marks: dict | None = None,
         ylim: tuple[float, float] | None = None, xlabel: str = "", ylabel: str = "") -> str:
    """Points (x, y) as '*' in a width x height grid with axes; non-finite points are dropped.

    marks: {char: x} draws a vertical line of that char at x (e.g. a suggested LR). ylim clips the y range
    (points outside are drawn on the edge). Returns the lines joined by newlines.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) if logx else True)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return "(nothing to plot: no finite point)"
    xs = np.log10(x) if logx else x
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = ylim if ylim is not None else (float(y.min()), float(y.max()))
    grid = np.full((height, width), " ", dtype="<U1")
    for char, at in (marks or {}).items():
        v = math.log10(at) if logx else at
        if x_lo <= v <= x_hi:
            grid[:, _cells(np.array([v]), x_lo, x_hi, width)[0]] = char
    rows = height - 1 - _cells(y, y_lo, y_hi, height)      # row 0 is the top
    grid[rows, _cells(xs, x_lo, x_hi, width)] = "*"
    labels = {0: f"{y_hi:.3g}", height // 2: f"{(y_lo + y_hi) / 2:.3g}", height - 1: f"{y_lo:.3g}"}
    pad = max(len(s) for s in labels.values())
    lines = [f"{ylabel}"] if ylabel else []
    lines += [f"{labels.get(r, ''):>{pad}} |{''.join(grid[r])}" for r in range(height)]
    lines.append(" " * pad + " +" + "-" * width)
    left, mid, right = _fmt(x_lo, logx), _fmt((x_lo + x_hi) / 2, logx), _fmt(x_hi, logx)
    gap = max(1, (width - len(left) - len(mid) - len(right)) // 2)
    lines.append(" " * (pad + 2) + left + " " * gap + mid + " " * gap + right + (f"  {xlabel}" if xlabel else ""))
    return "\n".join(lines)
