"""Figures of the gap analyses (gaps.py --analysis): size-frequency with its power-law fit, Ripley's L."""
import numpy as np

from lib.gaps.analysis import zeta
from lib.geoio import png


def size_frequency_plot(sizes, counts, lambda_asner: float, lambda_hanel: float) -> np.ndarray:
    """Log-log gap count per 1 m² class (as GapSizeFDist) with the zeta fit n x^-l / zeta(l)."""
    sizes, counts = np.asarray(sizes, np.float64), np.asarray(counts, np.float64)
    seen = counts > 0
    n = int(counts.sum())
    series = [{"x": sizes[seen], "y": counts[seen], "style": "points", "colour": png.GREEN,
               "label": f"GAPS N {n}"}]
    if np.isfinite(lambda_asner) and seen.any():
        fit = np.geomspace(sizes[seen].min(), sizes[seen].max(), 64)
        series.append({"x": fit, "y": n * fit ** -lambda_asner / float(zeta(lambda_asner)), "style": "dashed",
                       "colour": png.RED, "label": f"ASNER L {lambda_asner:.3f}"})
    if np.isfinite(lambda_hanel):
        series.append({"x": [], "y": [], "colour": png.BLUE, "label": f"HANEL L {lambda_hanel:.3f}"})
    return png.plot(series, "GAP SIZE (M2)", "FREQUENCY", "GAP SIZE FREQUENCY", log_x=True, log_y=True)


def ripley_plot(envelope: dict) -> np.ndarray:
    """Ripley's L(r) of the gaps, L under CSR (= r) and the min-max envelope of the simulations."""
    r = envelope["r"]
    return png.plot([{"x": r, "y": envelope["l_lo"], "y_hi": envelope["l_hi"], "style": "band",
                      "colour": png.GREY, "label": "CSR ENVELOPE"},
                     {"x": r, "y": envelope["l_theo"], "style": "dashed", "colour": png.RED, "label": "CSR"},
                     {"x": r, "y": envelope["l"], "style": "line", "colour": png.BLACK, "label": "GAPS"}],
                    "R (M)", "L(R) (M)", "RIPLEY L FUNCTION")
