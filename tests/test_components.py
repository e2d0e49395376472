"""label_components against a brute-force flood fill; component_sizes against direct counts."""
from collections import deque

import numpy as np
import pytest

from lib.gaps.components import component_sizes, label_components

NEIGHBOURS = {
    4: [(-1, 0), (1, 0), (0, -1), (0, 1)],
    8: [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)],
}


def flood_fill_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Reference: BFS from each unlabelled pixel in raster-scan order, so labels follow first pixels."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, np.int32)
    n = 0
    for r in range(height):
        for c in range(width):
            if not mask[r, c] or labels[r, c]:
                continue
            n += 1
            labels[r, c] = n
            queue = deque([(r, c)])
            while queue:
                y, x = queue.popleft()
                for dy, dx in NEIGHBOURS[connectivity]:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < height and 0 <= xx < width and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
    return labels, n


def assert_same_as_reference(mask, connectivity):
    labels, n = label_components(mask, connectivity)
    expected, n_expected = flood_fill_labels(mask, connectivity)
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_random_masks_match_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(250):
        height, width = rng.integers(1, 24, size=2)
        mask = rng.random((height, width)) < rng.uniform(0.05, 0.95)
        assert_same_as_reference(mask, connectivity)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density", [0.45, 0.6])
def test_larger_masks_near_percolation_match_flood_fill(connectivity, density):
    """Long, branching components: many merges through later rows and deep union trees."""
    mask = np.random.default_rng(7).random((160, 190)) < density
    assert_same_as_reference(mask, connectivity)


def spiral(size: int) -> np.ndarray:
    """One-pixel-wide square spiral, rings one pixel apart: a single path of about size²/2 pixels."""
    mask = np.zeros((size, size), bool)
    r, c, dr, dc = 0, 0, 0, 1
    mask[r, c] = True

    def inside(y, x):
        return 0 <= y < size and 0 <= x < size

    for _ in range(size * size):
        for _turn in range(2):  # go straight if the path stays one pixel off itself, else turn right
            if (inside(r + dr, c + dc) and not mask[r + dr, c + dc]
                    and not (inside(r + 2 * dr, c + 2 * dc) and mask[r + 2 * dr, c + 2 * dc])):
                r, c = r + dr, c + dc
                mask[r, c] = True
                break
            dr, dc = dc, -dr
        else:
            return mask
    return mask


def comb(height: int, width: int) -> np.ndarray:
    """Teeth hanging from the bottom row: every tooth starts a component that merges at the end."""
    mask = np.zeros((height, width), bool)
    mask[:, ::2] = True
    mask[-1] = True
    return mask


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("mask", [spiral(41), comb(30, 41), comb(30, 41)[::-1], comb(30, 41).T,
                                  np.tril(np.ones((20, 20), bool)), np.triu(np.ones((20, 20), bool))],
                         ids=["spiral", "comb_up", "comb_down", "comb_side", "tril", "triu"])
def test_structured_masks_match_flood_fill(mask, connectivity):
    assert_same_as_reference(mask, connectivity)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_edge_cases(connectivity):
    assert label_components(np.zeros((5, 7), bool), connectivity)[1] == 0
    full, n = label_components(np.ones((5, 7), bool), connectivity)
    assert n == 1 and (full == 1).all()
    for shape in [(0, 0), (0, 4), (4, 0)]:
        labels, n = label_components(np.zeros(shape, bool), connectivity)
        assert n == 0 and labels.shape == shape
    single = np.zeros((4, 4), bool)
    single[3, 3] = True
    labels, n = label_components(single, connectivity)
    assert n == 1 and labels[3, 3] == 1 and labels.sum() == 1
    assert label_components(np.ones((1, 1), bool), connectivity)[1] == 1
    assert_same_as_reference(np.array([[1, 0, 1, 1, 0, 1]], bool), connectivity)
    assert_same_as_reference(np.array([[1], [0], [1], [1]], bool), connectivity)


def test_diagonals_join_only_with_8_connectivity():
    chain = np.eye(6, dtype=bool)
    anti = np.fliplr(chain)
    for diagonal in (chain, anti):
        assert label_components(diagonal, 8)[1] == 1
        labels, n = label_components(diagonal, 4)
        assert n == 6
        assert sorted(labels[diagonal]) == list(range(1, 7))
    checkerboard = np.indices((7, 9)).sum(axis=0) % 2 == 0
    assert label_components(checkerboard, 8)[1] == 1
    assert label_components(checkerboard, 4)[1] == checkerboard.sum()


def test_numbering_follows_first_pixel_in_scan_order():
    """A U merges at its bottom: both arms take the number of the left arm's first pixel."""
    mask = np.array([[0, 0, 0, 1, 0],
                     [1, 0, 0, 1, 0],
                     [1, 0, 0, 1, 0],
                     [1, 1, 1, 1, 0],
                     [0, 0, 0, 0, 1]], bool)
    labels, n = label_components(mask, 4)
    assert n == 2
    assert (labels[mask & (np.arange(5)[None, :] < 4)] == 1).all() and labels[4, 4] == 2
    assert label_components(mask, 8)[1] == 1


@pytest.mark.parametrize("connectivity", [4, 8])
def test_transpose_gives_the_same_partition(connectivity):
    mask = np.random.default_rng(3).random((60, 45)) < 0.5
    labels, n = label_components(mask, connectivity)
    labels_t, n_t = label_components(mask.T, connectivity)
    assert n == n_t
    # same partition: label pairs (ours, transposed-back) form a bijection
    pairs = np.unique(np.stack([labels.ravel(), labels_t.T.ravel()]), axis=1)
    assert pairs.shape[1] == n + 1


def test_accepts_integer_masks():
    mask = np.random.default_rng(4).integers(0, 2, (20, 20))
    np.testing.assert_array_equal(label_components(mask)[0], label_components(mask.astype(bool))[0])


def test_component_sizes_match_direct_counts():
    mask = np.random.default_rng(5).random((40, 50)) < 0.4
    labels, n = label_components(mask)
    sizes = component_sizes(labels, n)
    assert sizes.shape == (n,)
    assert sizes.sum() == mask.sum()
    np.testing.assert_array_equal(sizes, [(labels == k).sum() for k in range(1, n + 1)])
    assert component_sizes(np.zeros((3, 3), np.int32), 0).shape == (0,)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        label_components(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="connectivity"):
        label_components(np.zeros((3, 3), bool), connectivity=6)
