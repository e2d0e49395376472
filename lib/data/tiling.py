"""Tile windows over a site and spatial train/val/test splits (by site or by blocks with a buffer).

Tiles from one place are spatially correlated: a random tile split would leak, so every rule here is
spatial, and the rule used is recorded in the manifest.
"""
import numpy as np

from lib.core.errors import DataError

SPLITS = ("train", "val", "test")


def tile_origins(height: int, width: int, tile_px: int, stride_px: int) -> np.ndarray:
    """(N, 2) top-left (row, col) of every full tile on the grid; the last row/column is flush with the edge."""
    def starts(size):
        if size < tile_px:
            return np.zeros(0, dtype=np.int64)
        s = np.arange(0, size - tile_px + 1, stride_px, dtype=np.int64)
        return s if s[-1] == size - tile_px else np.append(s, size - tile_px)
    rows, cols = starts(height), starts(width)
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2)


def valid_fractions(valid: np.ndarray, origins: np.ndarray, tile_px: int) -> np.ndarray:
    """Fraction of valid pixels in each tile, (N,), from the integral image at the tile edge rows only.

    A full (H + 1, W + 1) int64 integral image costs 0.5 GB and ~3 s for an 8192² site; the rows
    between consecutive tile edges are summed band by band instead (one pass, loop over bands only).
    """
    if len(origins) == 0:
        return np.zeros(0)
    r, c = origins[:, 0], origins[:, 1]
    edges = np.union1d(0, np.concatenate([r, r + tile_px]))          # (E,) rows where tiles start or end
    band_sums = [np.count_nonzero(valid[a:b], axis=0) for a, b in zip(edges[:-1], edges[1:])]
    integral = np.zeros((len(edges), valid.shape[1] + 1), np.int64)  # valid[:edge, :col].sum()
    integral[1:, 1:] = np.cumsum(np.cumsum(band_sums, axis=0), axis=1)
    top, bottom = np.searchsorted(edges, r), np.searchsorted(edges, r + tile_px)
    total = (integral[bottom, c + tile_px] - integral[top, c + tile_px]
             - integral[bottom, c] + integral[top, c])
    return total / float(tile_px * tile_px)


def split_counts(n: int, fractions: list[float]) -> list[int]:
    """Items per split: rounded fractions, at least one val and one test item when n >= 3."""
    counts = [int(round(f * n)) for f in fractions]
    if n >= 3:
        for i in (1, 2):
            if fractions[i] > 0 and counts[i] == 0:
                counts[i] = 1
    counts[0] = n - counts[1] - counts[2]
    if counts[0] <= 0:
        raise DataError(f"cannot split {n} items into train/val/test with fractions {fractions}")
    return counts


def assign_sites(names: list[str], fractions: list[float], seed: int,
                 test_sites: list[str] = ()) -> dict[str, str]:
    """site -> split; named test sites go to test, the others are shuffled (seeded) and cut by fractions."""
    unknown = sorted(set(test_sites) - set(names))
    if unknown:
        raise DataError(f"data.test_sites names unknown sites {unknown}", hint=f"sites are {sorted(names)}")
    rest = sorted(n for n in names if n not in test_sites)
    order = np.random.default_rng(seed).permutation(len(rest))
    rest = [rest[i] for i in order]
    if test_sites:
        val_n = max(1, int(round(fractions[1] / max(fractions[0] + fractions[1], 1e-9) * len(rest))))
        if len(rest) < 2:
            raise DataError("need at least two non-test sites for train and val")
        counts = [len(rest) - val_n, val_n, 0]
    else:
        counts = split_counts(len(rest), fractions)
    out = {name: "test" for name in test_sites}
    bounds = np.cumsum([0] + counts)
    for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        out.update({name: split for name in rest[lo:hi]})
    return out


def block_split_map(height: int, width: int, block_px: int, fractions: list[float], seed: int) -> np.ndarray:
    """(BH, BW) array of split indices 0/1/2: blocks shuffled (seeded) and cut by fractions."""
    bh, bw = -(-height // block_px), -(-width // block_px)
    n = bh * bw
    if n < 3:
        raise DataError(f"a {height}x{width} site holds only {n} blocks of {block_px} px: too few for a "
                        "block split", hint="lower data.block_px or add sites")
    labels = np.repeat(np.arange(3), split_counts(n, fractions))
    return np.random.default_rng(seed).permutation(labels).reshape(bh, bw)


BLOCK_DRAWS = 20  # seeded block draws tried per side when data.block_px does not fit a site


def fit_block_split(origins: np.ndarray, shape: tuple[int, int], tile_px: int, block_px: int, buffer_px: int,
                    fractions: list[float], seed: int) -> dict | None:
    """{block_px, draw, split}: a seeded block split that gives every split with a positive fraction at
    least one tile (split: index per tile, -1 in a buffer); None when none does (too small to split).

    block_px with the site's own draw when that works (large sites). Otherwise every side from the site's
    longer side down to one tile plus its buffers (steps of half a tile) and BLOCK_DRAWS draws each: the
    one with the lowest (distance of the tile shares from `fractions`, L1) + (share of tiles lost to
    buffers), the larger side on a tie. Only the geometry of valid tiles is looked at, never a label, so
    the choice cannot favour a split's scores.
    """
    best, best_score = None, np.inf
    sides = range(max(shape), tile_px + 2 * buffer_px - 1, -max(1, tile_px // 2))
    for side, draw in [(block_px, 0)] + [(s, d) for s in sides for d in range(BLOCK_DRAWS)]:
        if -(-shape[0] // side) * -(-shape[1] // side) < 3:
            continue
        blocks = block_split_map(*shape, side, fractions, seed + 7919 * draw)
        split = assign_tiles_by_block(origins, tile_px, blocks, side, buffer_px)
        counts = np.bincount(split[split >= 0], minlength=3)
        if not all(c > 0 for c, f in zip(counts, fractions) if f > 0):
            continue
        if side == block_px and draw == 0:
            return {"block_px": side, "draw": draw, "split": split}
        score = np.abs(counts / counts.sum() - np.asarray(fractions)).sum() + 1 - counts.sum() / len(split)
        if score < best_score - 1e-9:
            best, best_score = {"block_px": side, "draw": draw, "split": split}, score
    return best


def assign_tiles_by_block(origins: np.ndarray, tile_px: int, blocks: np.ndarray, block_px: int,
                          buffer_px: int) -> np.ndarray:
    """Split index per tile, or -1 for tiles whose extent grown by buffer_px meets another split's block.

    So no train tile overlaps or touches a val/test tile: between splits there is at least
    2 * buffer_px of unused ground. A tile takes split s when every block under it is s (summed-area
    table of each split's blocks).
    """
    bh, bw = blocks.shape
    lo = np.clip((origins - buffer_px) // block_px, 0, [bh - 1, bw - 1])
    hi = np.clip((origins + tile_px - 1 + buffer_px) // block_px, 0, [bh - 1, bw - 1]) + 1
    covered = (hi[:, 0] - lo[:, 0]) * (hi[:, 1] - lo[:, 1])
    out = np.full(len(origins), -1, dtype=np.int64)
    for s in np.unique(blocks):
        table = np.zeros((bh + 1, bw + 1), np.int64)
        table[1:, 1:] = np.cumsum(np.cumsum(blocks == s, axis=0), axis=1)
        inside = table[hi[:, 0], hi[:, 1]] - table[lo[:, 0], hi[:, 1]] - table[hi[:, 0], lo[:, 1]] \
            + table[lo[:, 0], lo[:, 1]]
        out[inside == covered] = s
    return out
