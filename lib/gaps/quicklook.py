"""A scene-scale quick-look of gap maps: filled classes by threshold over a hillshade, a legend, a scale bar.

Why filled classes: outlines of thousands of gaps at four thresholds are unreadable at scene scale. Each
pixel takes the colour of the lowest threshold at which it is a gap (the maps nest: a gap at T is a gap
at every higher T), so one image shows all thresholds. Rows arrive top to bottom (the maps and the DSM)
and are subsampled on the fly to at most max_side pixels (any gap in a block colours the block), so a
scene of any size costs one small image.
"""
import math

import numpy as np

from lib.gaps.masks import threshold_tag
from lib.geoio.png import BLACK, draw_text, enlarge, hillshade

CLASS_COLOURS = ((180, 0, 40), (240, 100, 20), (250, 210, 0), (60, 170, 230), (150, 60, 200), (40, 180, 90))
NODATA_COLOUR = (60, 60, 60)
PANEL_PX = 190  # legend panel width on the right


class QuickLook:
    """Accumulates a (h, w) subsampled DSM and gap class over streamed rows; image() draws the PNG array."""

    def __init__(self, height: int, width: int, thresholds_m, pixel_size_m: float, max_side: int = 2048,
                 min_side: int = 600):
        self.thresholds_m, self.pixel_size_m = list(thresholds_m), float(pixel_size_m)
        self.step = max(1, math.ceil(max(height, width) / max_side))
        self.zoom = max(1, min(min_side, max_side) // max(height, width)) if self.step == 1 else 1
        shape = (-(-height // self.step), -(-width // self.step))
        self.dsm = np.full(shape, np.nan, np.float32)
        self.cls = np.full(shape, len(self.thresholds_m), np.uint8)  # lowest gap threshold; K: none
        self.width = width

    def add(self, row0: int, dsm: np.ndarray, masks: np.ndarray) -> None:
        """dsm (n, W) float32 and masks (K, n, W) uint8 (1 gap, IGNORE nodata) of rows row0..row0 + n."""
        k, n = len(self.thresholds_m), len(dsm)
        order = np.argsort(self.thresholds_m)
        gap = masks[order] == 1                                              # (K, n, W), lowest T first
        cls = np.where(gap.any(0), gap.argmax(0), k).astype(np.uint8)        # (n, W)
        s = self.step
        pad = -self.width % s
        blocks = np.pad(cls, ((0, 0), (0, pad)), constant_values=k).reshape(n, -1, s).min(2)   # (n, w)
        rows = (row0 + np.arange(n)) // s
        for r in np.unique(rows):
            self.cls[r] = np.minimum(self.cls[r], blocks[rows == r].min(0))
        first = -row0 % s                                                    # rows kept: multiples of step
        self.dsm[(row0 + first) // s:(row0 + n + s - 1) // s] = dsm[first::s, ::s]

    def image(self) -> np.ndarray:
        """(h, w + PANEL_PX, 3) uint8: the map with the legend and scale bar in a panel on the right."""
        grey = hillshade(self.dsm, self.pixel_size_m * self.step)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        rgb[np.isnan(self.dsm)] = NODATA_COLOUR
        order = np.argsort(self.thresholds_m)
        for rank, k in enumerate(order):
            rgb[self.cls == rank] = CLASS_COLOURS[rank % len(CLASS_COLOURS)]
        rgb = enlarge(rgb, self.zoom)
        panel = np.full((max(rgb.shape[0], 40 + 26 * len(order) + 80), PANEL_PX, 3), 255, np.uint8)
        canvas = np.full((panel.shape[0], rgb.shape[1] + PANEL_PX, 3), 255, np.uint8)
        canvas[:rgb.shape[0], :rgb.shape[1]] = rgb
        self._legend(panel, [self.thresholds_m[k] for k in order])
        canvas[:, rgb.shape[1]:] = panel
        return canvas

    def _legend(self, panel: np.ndarray, thresholds) -> None:
        draw_text(panel, 10, 10, "GAPS: CHM <= T", scale=2)
        for rank, t in enumerate(thresholds):
            y = 40 + 26 * rank
            panel[y:y + 16, 10:34] = CLASS_COLOURS[rank % len(CLASS_COLOURS)]
            draw_text(panel, 42, y + 3, f"T = {threshold_tag(t)[:-1]} M", scale=2)
        y = 40 + 26 * len(thresholds) + 10
        metres_per_px = self.pixel_size_m * self.step / self.zoom
        length_m = _nice_length(0.6 * (PANEL_PX - 20) * metres_per_px)
        bar = max(1, round(length_m / metres_per_px))
        panel[y:y + 6, 10:10 + bar] = BLACK
        draw_text(panel, 10, y + 12, f"{length_m:g} M" if length_m < 1000 else f"{length_m / 1000:g} KM", scale=2)


def _nice_length(metres: float) -> float:
    """The largest 1, 2 or 5 x 10^k metres not above `metres`."""
    power = 10 ** math.floor(math.log10(max(metres, 1e-9)))
    return max(m * power for m in (1, 2, 5) if m * power <= metres)

