"""lib/data/tiling.py: tile grids and valid fractions against per-tile brute force."""
import numpy as np
import pytest

from lib.data.tiling import tile_origins, valid_fractions


@pytest.mark.parametrize("shape,tile_px,stride_px", [
    ((100, 130), 32, 32), ((100, 130), 32, 7), ((64, 64), 64, 64), ((70, 90), 16, 50), ((33, 40), 33, 5)])
def test_valid_fractions_equal_per_tile_means(shape, tile_px, stride_px):
    valid = np.random.default_rng(sum(shape)).random(shape) < 0.7
    origins = tile_origins(*shape, tile_px, stride_px)
    expected = [valid[r:r + tile_px, c:c + tile_px].mean() for r, c in origins]
    np.testing.assert_array_equal(valid_fractions(valid, origins, tile_px), expected)
    shuffled = origins[::-1]  # any order and subset of origins, not only the grid's
    np.testing.assert_array_equal(valid_fractions(valid, shuffled[::2], tile_px), expected[::-1][::2])


def test_tile_origins_cover_the_edges_and_no_tiles_means_no_fractions():
    origins = tile_origins(100, 130, 32, 32)
    assert origins[:, 0].max() == 100 - 32 and origins[:, 1].max() == 130 - 32  # flush with the edge
    assert len(tile_origins(20, 130, 32, 32)) == 0
    assert valid_fractions(np.ones((20, 130), bool), tile_origins(20, 130, 32, 32), 32).shape == (0,)
