"""Connected-component labelling of a 2-D mask in numpy (no scipy), numbered in raster-scan order.

How: the mask is cut into row runs; run b is linked to the runs of the row above that touch it.
Giving each run the *first* run above it as parent makes a forest whose roots resolve in one
vectorised step per row. The remaining links (two runs above joined through b) are contracted to
forest roots and merged by hooking + pointer jumping on that much smaller graph. A parent always has
a smaller index than its child, so each root is its component's first run in scan order, and ranking
the roots numbers components by their first pixel, as scipy.ndimage.label and terra::patches do.
"""
import numpy as np


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(H, W) bool -> (int32 labels 1..n in scan order of each component's first pixel, 0 = background), n."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"label_components needs a 2-D mask, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    height, width = mask.shape
    if mask.size == 0:
        return np.zeros(mask.shape, np.int32), 0
    changes, run_count = _runs(mask)                 # change positions, (H * (W + 1),) run counter
    parent = _root_runs(changes, run_count, height, width + 1, connectivity == 8)
    n_runs = len(parent)
    is_root = parent == np.arange(n_runs, dtype=parent.dtype)
    root_rank = np.cumsum(is_root, dtype=np.int32)   # label of each root: 1..n in scan order
    n = int(root_rank[-1]) if n_runs else 0
    # run_count is odd inside run k (== 2k + 1) and even between runs: one lookup paints the image
    table = np.zeros(2 * n_runs + 1, np.int32)
    table[1::2] = root_rank[parent]
    return table[run_count.reshape(height, width + 1)[:, :width]], n


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixel count of each label 1..n, shape (n,) int64."""
    return np.bincount(np.asarray(labels).ravel(), minlength=n + 1)[1:n + 1]


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row runs of a mask padded with one False column, so that no run crosses a row end.

    Returns the flat positions where the padded mask changes value (starts at even, exclusive ends at
    odd entries) and the running count of changes at each position.
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 1), bool)
    padded[:, :width] = mask
    flat = padded.ravel()
    changed = np.empty_like(flat)
    changed[0] = flat[0]
    np.not_equal(flat[1:], flat[:-1], out=changed[1:])
    dtype = np.int32 if flat.size < 2**31 else np.int64
    return np.flatnonzero(changed).astype(dtype), np.cumsum(changed, dtype=dtype)


def _root_runs(changes: np.ndarray, run_count: np.ndarray, height: int, stride: int,
            diagonal: bool) -> np.ndarray:
    """Root run of every run's component, shape (n_runs,): the smallest run index in the component."""
    starts, ends = changes[0::2], changes[1::2]
    n_runs = len(starts)
    # Runs above run b that touch it are the index range [lo, hi): with exclusive ends, a touches b
    # when a.end > b.start - diagonal and a.start < b.end + diagonal (one row up = stride back).
    reach = int(diagonal)
    before = starts - stride - reach                 # runs above ending here or earlier miss b
    lo = run_count[np.maximum(before, 0)] >> 1
    lo[before < 0] = 0
    hi = (run_count[np.maximum(ends - stride - 1 + reach, 0)] + 1) >> 1
    hi[starts < stride] = 0                          # row 0 has no row above
    touching = hi - lo
    parent = np.where(touching > 0, lo, np.arange(n_runs, dtype=lo.dtype))
    # Parents lie in the row above, so resolving rows top-down makes every run point at its root.
    row_end = (run_count[stride - 1::stride] >> 1).tolist()  # (H,) runs finished by each row's end
    for first, last in zip(row_end[:-1], row_end[1:]):
        if last > first:
            parent[first:last] = parent[parent[first:last]]
    # Consecutive runs a, a + 1 above the same b are joined through b: link their roots.
    many = touching > 1
    extra = touching[many] - 1
    offset = np.cumsum(extra) - extra
    a = np.repeat(lo[many] - offset, extra) + np.arange(int(extra.sum()), dtype=lo.dtype)
    _hook(parent, parent[a], parent[a + 1])
    return parent[parent]


def _hook(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the trees joined by root pairs (u, v) in place; afterwards roots point at final roots.

    Each round hangs every larger root under one smaller root it is linked to (any one: the rest of
    its links stay in the list), pointer-jumps only the nodes just hung, and contracts the links.
    """
    hung_per_round = []
    while len(u):
        small, large = np.minimum(u, v), np.maximum(u, v)
        keep = small != large
        small, large = small[keep], large[keep]
        parent[large] = small
        moving = large
        while len(moving):                           # path doubling until each points at a root
            up = parent[moving]
            up2 = parent[up]
            jumped = up2 != up
            moving = moving[jumped]
            parent[moving] = up2[jumped]
        hung_per_round.append(large)
        u, v = parent[small], parent[large]
    # Roots hung in round k may have been hung again later: resolve the rounds newest first.
    for hung in reversed(hung_per_round):
        parent[hung] = parent[parent[hung]]
