"""Nested gap maps: the cumulative max over thresholds against a brute-force reference, violation counts."""
import itertools

import numpy as np
import pytest

from lib.core.errors import DataError
from lib.gaps.nesting import nest_probabilities, nesting_violations


def test_nested_probabilities_match_brute_force_in_any_threshold_order():
    rng = np.random.default_rng(0)
    thresholds = [10.0, 2.0, 15.0, 5.0]                        # deliberately unsorted
    probs = rng.random((4, 9, 7)).astype(np.float32)
    probs[:, 2, 3] = np.nan                                    # nodata at every threshold
    nested = nest_probabilities(probs, thresholds)
    for k, t in enumerate(thresholds):
        lower = [j for j, u in enumerate(thresholds) if u <= t]
        want = np.max(probs[lower], axis=0)                     # brute force: max over T' <= T
        assert np.array_equal(nested[k], want, equal_nan=True)
    assert nested.dtype == np.float32 and np.isnan(nested[:, 2, 3]).all()
    for (i, ti), (j, tj) in itertools.permutations(enumerate(thresholds), 2):
        if ti < tj:                                            # the masks nest at any probability cut
            for cut in (0.2, 0.5, 0.9):
                assert not ((nested[i] > cut) & ~(nested[j] > cut)).any()


def test_nesting_leaves_consistent_maps_unchanged():
    rng = np.random.default_rng(1)
    probs = np.sort(rng.random((3, 5, 5)), axis=0)             # already increasing with the threshold
    assert np.array_equal(nest_probabilities(probs, [1.0, 2.0, 3.0]), probs)


def test_violations_are_counted_per_pair():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 0, :4] = True                                     # 4 gap pixels at 2 m
    masks[1, 0, :2] = True                                     # 2 of them stay gap at 5 m: 2 violations
    masks[2] = True                                            # 15 m: everything
    report = nesting_violations(masks[[2, 0, 1]], [15.0, 2.0, 5.0])
    assert [(p["lower_m"], p["upper_m"], p["gap_pixels"], p["violations"]) for p in report["pairs"]] == \
        [(2.0, 5.0, 4, 2), (5.0, 15.0, 2, 0)]
    assert report["rate"] == pytest.approx(2 / 6)
    assert np.isnan(nesting_violations(np.zeros((2, 3, 3), bool), [1, 2])["rate"])


@pytest.mark.parametrize("thresholds", [[2.0, 2.0], [2.0], [1.0, 2.0, 3.0]])
def test_thresholds_must_match_the_maps(thresholds):
    with pytest.raises(DataError, match="distinct"):
        nest_probabilities(np.zeros((2, 3, 3)), thresholds)
