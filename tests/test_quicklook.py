"""lib/gaps/quicklook.py: filled classes by threshold with a legend and a scale bar, from streamed rows."""
import numpy as np

from lib.gaps.masks import IGNORE
from lib.gaps.quicklook import CLASS_COLOURS, NODATA_COLOUR, PANEL_PX, QuickLook


def maps(h=120, w=200):
    """Nested masks at 2, 5, 10 m: a small gap inside a larger one inside a larger one; a nodata corner."""
    masks = np.zeros((3, h, w), np.uint8)
    masks[2, 20:80, 20:120] = 1
    masks[1, 30:60, 30:90] = 1
    masks[0, 40:50, 40:60] = 1
    masks[:, :10, -10:] = IGNORE
    dsm = np.full((h, w), 300.0, np.float32)
    dsm[:10, -10:] = np.nan
    return dsm, masks


def test_quicklook_colours_known_gaps_by_their_lowest_threshold_and_draws_a_legend():
    dsm, masks = maps()
    look = QuickLook(120, 200, [10.0, 2.0, 5.0], pixel_size_m=1.0, min_side=0)   # thresholds in any order
    order = [2, 0, 1]                                     # masks given as 10, 2, 5 m
    for row0 in range(0, 120, 37):                        # streamed in uneven blocks
        look.add(row0, dsm[row0:row0 + 37], masks[order][:, row0:row0 + 37])
    image = look.image()
    assert image.shape[0] >= 120 and image.shape[1:] == (200 + PANEL_PX, 3)   # the legend may be taller
    assert tuple(image[45, 50]) == CLASS_COLOURS[0]       # gap already at 2 m
    assert tuple(image[35, 35]) == CLASS_COLOURS[1]       # gap from 5 m
    assert tuple(image[25, 25]) == CLASS_COLOURS[2]       # gap from 10 m only
    assert tuple(image[100, 150]) not in CLASS_COLOURS    # canopy: hillshade grey
    assert tuple(image[5, 195]) == NODATA_COLOUR
    panel = image[:, 200:]
    for colour in CLASS_COLOURS[:3]:                      # one swatch per threshold in the legend
        assert (panel == colour).all(axis=2).sum() >= 16 * 24
    assert (panel == 0).all(axis=2).sum() > 100           # legend text and the scale bar


def test_large_scenes_are_subsampled_and_any_gap_marks_its_block():
    h, w = 3000, 5000
    look = QuickLook(h, w, [5.0], pixel_size_m=0.5, max_side=1000)
    dsm = np.full((100, w), 300.0, np.float32)
    for row0 in range(0, h, 100):
        mask = np.zeros((1, 100, w), np.uint8)
        if row0 == 1200:
            mask[0, 51, 2502] = 1                         # one gap pixel in block (1251 // 5, 2502 // 5)
        look.add(row0, dsm, mask)
    image = look.image()
    assert image.shape[:2] == (600, 1000 + PANEL_PX)
    assert tuple(image[1251 // 5, 2502 // 5]) == CLASS_COLOURS[0]
    assert (image[:600, :1000] == CLASS_COLOURS[0]).all(axis=2).sum() == 1
