"""lib/data/tiling.py: tile grids and valid fractions against per-tile brute force."""
import numpy as np
import pytest

from lib.data.tiling import assign_tiles_by_block, block_split_map, fit_block_split, tile_origins, valid_fractions


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


def _blocks_under(origin, tile_px, pixels, buffer_px):
    """Labels under one tile grown by the buffer, pixel by pixel (clipped to the block grid)."""
    r, c = np.maximum(origin - buffer_px, 0)
    return set(np.unique(pixels[r:origin[0] + tile_px + buffer_px, c:origin[1] + tile_px + buffer_px]).tolist())


@pytest.mark.parametrize("shape,tile_px,stride_px,block_px,buffer_px", [
    ((300, 410), 64, 64, 128, 1), ((250, 250), 32, 16, 96, 16), ((200, 330), 50, 50, 90, 3)])
def test_tiles_by_block_take_a_split_only_when_every_block_under_them_has_it(shape, tile_px, stride_px,
                                                                              block_px, buffer_px):
    origins = tile_origins(*shape, tile_px, stride_px)
    for seed in range(3):
        blocks = block_split_map(*shape, block_px, [0.7, 0.15, 0.15], seed)
        pixels = blocks.repeat(block_px, 0).repeat(block_px, 1)           # split of every pixel
        split = assign_tiles_by_block(origins, tile_px, blocks, block_px, buffer_px)
        for origin, s in zip(origins, split):
            under = _blocks_under(origin, tile_px, pixels, buffer_px)
            assert s == (under.pop() if len(under) == 1 else -1)


def _assert_buffered(origins, split, tile_px, buffer_px):
    """Tiles of different splits are at least 2 * buffer_px apart (no overlap, no touch)."""
    for i, j in zip(*np.nonzero(split[:, None] != split[None, :])):
        if split[i] >= 0 and split[j] >= 0:
            gap = np.abs(origins[i] - origins[j]) - tile_px
            assert gap.max() >= 2 * buffer_px


@pytest.mark.parametrize("shape,tile_px", [((898, 1078), 64), ((898, 1078), 256), ((195, 278), 64)])
def test_fit_block_split_lowers_the_block_side_of_a_small_site(shape, tile_px):
    origins = tile_origins(*shape, tile_px, tile_px)
    fit = fit_block_split(origins, shape, tile_px, 1024, 1, [0.7, 0.15, 0.15], seed=1)
    assert fit["block_px"] < 1024
    counts = np.bincount(fit["split"][fit["split"] >= 0], minlength=3)
    assert counts.min() > 0 and counts[0] == counts.max()
    _assert_buffered(origins, fit["split"], tile_px, 1)
    again = fit_block_split(origins, shape, tile_px, 1024, 1, [0.7, 0.15, 0.15], seed=1)
    np.testing.assert_array_equal(again["split"], fit["split"])          # deterministic


def test_fit_block_split_keeps_a_block_side_that_works_and_refuses_what_cannot_split():
    shape, origins = (2048, 2048), tile_origins(2048, 2048, 64, 64)
    fit = fit_block_split(origins, shape, 64, 512, 1, [0.7, 0.15, 0.15], seed=0)
    expected = assign_tiles_by_block(origins, 64, block_split_map(*shape, 512, [0.7, 0.15, 0.15], 0), 512, 1)
    assert fit["block_px"] == 512 and fit["draw"] == 0
    np.testing.assert_array_equal(fit["split"], expected)
    tiny = tile_origins(130, 130, 64, 64)                              # 2 x 3 tiles: no buffered 3-way split
    assert fit_block_split(tiny, (130, 130), 64, 1024, 1, [0.7, 0.15, 0.15], seed=0) is None
    plot = tile_origins(898, 1078, 64, 64)
    no_test = fit_block_split(plot, (898, 1078), 64, 1024, 1, [0.8, 0.2, 0.0], seed=0)
    assert (no_test["split"] != 2).all() and (no_test["split"] == 1).any()
