"""The gap-analysis figures render whether or not there are gaps and fits."""
import math

import numpy as np

from lib.gaps import figures


def test_figures_render_with_and_without_gaps():
    sizes, counts = np.arange(1, 6, dtype=float), np.array([9, 4, 0, 1, 1])
    assert figures.size_frequency_plot(sizes, counts, 1.7, 2.0).shape == (480, 640, 3)
    assert figures.size_frequency_plot([], [], math.nan, math.nan).shape == (480, 640, 3)
    r = np.linspace(0, 10, 20)
    envelope = {"r": r, "l": r * 1.1, "l_theo": r, "l_lo": r * 0.9, "l_hi": r * 1.2}
    assert figures.ripley_plot(envelope).shape == (480, 640, 3)
    nan = np.full_like(r, np.nan)
    assert figures.ripley_plot({"r": r, "l": nan, "l_theo": r, "l_lo": nan, "l_hi": nan}).shape == (480, 640, 3)
