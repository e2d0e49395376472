"""Gap rasters to polygons: one MultiPolygon per gap id, holes kept, rings along pixel edges.

How: every pixel side between a gap pixel and a pixel of another id is a directed edge with the gap on
its left (map coordinates, y up), so shells run counter-clockwise and holes clockwise (RFC 7946).
Each edge's successor is the next edge of the same id at its end vertex. Where two pixels of one gap
touch only at a corner (a saddle), the ring turns so that parts stay 4-connected, except when both
pixels belong to one 4-connected part: then it crosses, so the shell stays a simple ring and a pocket
that touches the outside at a corner becomes a hole. That is the valid OGC/GEOS form that terra and sf
give (parts may touch at a point, a hole may touch its shell at a point). Rings are the cycles of the
successor permutation, found and ordered by pointer jumping (no per-edge Python loop).
A polygon's area is its pixel count x pixel area exactly: the rings follow pixel edges.
"""
from dataclasses import dataclass

import numpy as np

from lib.gaps.components import label_components
from lib.core.errors import DataError

# Edge directions, counter-clockwise in map coordinates: left turn = +1, right turn = +3 (mod 4).
E, N, W, S = 0, 1, 2, 3
_START = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])   # (row, col) of an edge's start vertex, from its pixel
_END = np.array([[1, 1], [0, 1], [0, 0], [1, 0]])     # ... of its end vertex
_OWNER = np.array([[-1, 0], [-1, -1], [0, -1], [0, 0]])  # pixel owning the edge leaving a vertex in dir d
_ACROSS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # the neighbour across a pixel's side of each dir


@dataclass
class GapPolygons:
    """Polygons of gaps 1..n: rings as slices of one vertex array, sorted by gap, part, shell first."""

    area: np.ndarray        # (n,) m², = pixel count x pixel area
    perimeter: np.ndarray   # (n,) m, all rings (holes included)
    centroid: np.ndarray    # (n, 2) area centroid (x, y) in CRS units
    label_point: np.ndarray  # (n, 2) centroid of the largest part's outer ring, as sp's labpt
    coords: np.ndarray      # (V, 2) ring vertices (x, y), each ring open (first vertex not repeated)
    ring_start: np.ndarray  # (R + 1,) ring r is coords[ring_start[r]:ring_start[r + 1]]
    ring_gap: np.ndarray    # (R,) gap id of each ring
    ring_part: np.ndarray   # (R,) part number (4-connected component), same for a shell and its holes

    def __len__(self) -> int:
        return len(self.area)

    def parts(self, gap_id: int) -> list[list[np.ndarray]]:
        """Polygons of one gap: [[shell, hole, ...], ...], each ring closed, shape (k + 1, 2)."""
        lo, hi = np.searchsorted(self.ring_gap, [gap_id, gap_id + 1])
        polygons: dict[int, list[np.ndarray]] = {}
        for r in range(lo, hi):
            ring = self.coords[self.ring_start[r]:self.ring_start[r + 1]]
            polygons.setdefault(int(self.ring_part[r]), []).append(np.vstack([ring, ring[:1]]))
        return list(polygons.values())

    def features(self, columns: dict[str, np.ndarray]):
        """Yield (parts, properties) per gap; properties hold plain Python values, NaN as None."""
        values = self.attribute_lists(columns)
        for i, row in enumerate(zip(*values.values())):
            yield self.parts(i + 1), dict(zip(values, row))

    def attribute_lists(self, columns: dict[str, np.ndarray]) -> dict[str, list]:
        """Each column as a list of plain Python values, NaN as None (SQL NULL, JSON null), checked to hold
        one value per gap; column-wise, so that writers need no Python work per feature and value."""
        values = {}
        for name, column in columns.items():
            column = np.asarray(column)
            values[name] = column.tolist()
            if column.dtype.kind == "O" or (column.dtype.kind in "fc" and np.isnan(column).any()):
                values[name] = [None if v != v else v for v in values[name]]
        if any(len(v) != len(self) for v in values.values()):
            raise DataError(f"attribute columns need {len(self)} values each, got "
                            f"{ {name: len(v) for name, v in values.items()} }")
        return values


def gap_polygons(labels: np.ndarray, n: int, info) -> GapPolygons:
    """(H, W) gap ids 1..n (0 = none) on info's grid (a lib.geoio.georef.GeoInfo) -> GapPolygons.

    Ids are patches that do not touch each other, as gap_labels makes them.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise DataError(f"gap labels must be a 2-D integer array, got shape {labels.shape} "
                        f"dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > n):
        raise DataError(f"gap labels must lie in 0..{n}, found {labels.min()}..{labels.max()}")
    height, width = labels.shape
    padded = np.zeros((height + 2, width + 2), labels.dtype)   # a border of 0: neighbours need no bounds check
    padded[1:-1, 1:-1] = labels
    parts, _ = label_components(padded > 0, connectivity=4)
    pixel, direction, slot, edge = _edges(padded)            # (M,) owner pixel (flat in padded), (M,) E/N/W/S
    nxt = _successors(padded, parts, pixel, direction, slot, edge)
    ring, rank = _cycles(nxt)                               # (M,) ring = its smallest edge, rank in ring
    row, col = np.divmod(pixel, width + 2)
    corner = np.stack([row - 1, col - 1], 1)                 # (M, 2) (row, col) of the pixel in labels
    start, end = corner + _START[direction], corner + _END[direction]   # (M, 2) (row, col) of vertices
    gap = padded.ravel()[pixel].astype(np.int64)
    part = parts.ravel()[pixel].astype(np.int64)
    return _assemble(n, info, ring, rank, start, end, direction, gap, part, nxt)


def _edges(padded: np.ndarray):
    """Boundary edges of a 0-bordered id grid in (pixel, direction) order: sides whose neighbour holds another
    id; and their index by (pixel, direction) as edge[slot[pixel], direction], -1 where there is none. Only
    gap pixels are visited (a few % of a scene): slot is -1 outside them, which picks edge's last row, all -1."""
    flat = padded.ravel()
    gap_px = (flat != 0).nonzero()[0]                                       # (G,)
    own = flat[gap_px]
    side = np.empty((len(gap_px), 4), bool)                                 # (G, 4)
    for d, step in enumerate(_ACROSS @ [padded.shape[1], 1]):
        np.not_equal(flat[gap_px + step], own, out=side[:, d])
    key = np.flatnonzero(side)
    edge = np.full((len(gap_px) + 1, 4), -1, np.int64)
    edge[:-1][side] = np.arange(len(key))
    slot = np.full(flat.size, -1, np.int32 if flat.size < 2**31 else np.int64)
    slot[gap_px] = np.arange(len(gap_px))
    return gap_px[key // 4], key % 4, slot, edge


def _successors(padded, parts, pixel, direction, slot, edge) -> np.ndarray:
    """Index of the edge that follows each edge in its ring, shape (M,); pixels flat in the 0-bordered grid."""
    flat, flat_parts = padded.ravel(), parts.ravel()
    own = flat[pixel]
    turns = np.arange(4)
    # flat step from an edge's pixel to the pixel owning the edge that leaves its end vertex, by (direction, turn)
    step = (_END[:, None] + _OWNER[(turns[:, None] + turns) % 4]) @ [padded.shape[1], 1]

    def candidate(turn):
        """Edge leaving the end vertex after `turn` with the same id, or -1."""
        owner = pixel + step[direction, turn]
        return np.where(flat[owner] == own, edge[slot[owner], (direction + turn) % 4], -1), owner

    left, _ = candidate(1)
    straight, _ = candidate(0)
    right, right_owner = candidate(3)
    # Saddle: both turns exist. Cross (turn right) only within one 4-connected part.
    join = (left >= 0) & (right >= 0) & (flat_parts[right_owner] == flat_parts[pixel])
    nxt = np.where(left >= 0, left, np.where(straight >= 0, straight, right))
    nxt = np.where(join, right, nxt)
    if len(nxt) and (nxt < 0).any():
        raise AssertionError("open boundary: a pixel edge has no successor")  # cannot happen
    return nxt


def _cycles(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycles of a permutation: (M,) the smallest index of each element's cycle, (M,) steps from it."""
    m = len(nxt)
    index = np.arange(m)
    root, jump = index.copy(), nxt.copy()
    while True:                                  # root = min over a window doubling each round
        new = np.minimum(root, root[jump])
        if np.array_equal(new, root):            # no change: every cycle fits in the window
            break
        root, jump = new, jump[jump]
    prev = np.empty_like(nxt)
    prev[nxt] = index
    is_root = root == index
    pointer = np.where(is_root, index, prev)     # list ranking: distance back to the cycle's root
    rank = (~is_root).astype(np.int64)
    while True:
        ahead = pointer[pointer]
        if np.array_equal(ahead, pointer):
            return root, rank
        rank = rank + rank[pointer]
        pointer = ahead


def _assemble(n, info, ring, rank, start, end, direction, gap, part, nxt) -> GapPolygons:
    """Per-ring areas and centroids from the edges (shoelace), per-gap sums and label points."""
    (sx, sy), (ox, oy) = info.pixel_size, info.origin
    x0, y0, x1, y1 = start[:, 1], -start[:, 0], end[:, 1], -end[:, 0]   # pixel units, y up
    cross = (x0 * y1 - x1 * y0).astype(np.float64)
    first_edge = ring == np.arange(len(ring))                          # a ring is named by its smallest edge
    ring_ids = np.flatnonzero(first_edge)                               # rings in order of first edge
    ring_of = (np.cumsum(first_edge) - 1)[ring]
    n_rings = len(ring_ids)
    twice_area = np.bincount(ring_of, cross, n_rings)                  # signed, > 0 for shells
    cx = np.bincount(ring_of, (x0 + x1) * cross, n_rings) / (3 * twice_area)
    cy = np.bincount(ring_of, (y0 + y1) * cross, n_rings) / (3 * twice_area)
    r_gap, r_part = gap[ring_ids], part[ring_ids]
    area_px = np.bincount(r_gap, twice_area / 2, n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):               # n = 0 or an empty id
        centroid = np.stack([np.bincount(r_gap, twice_area / 2 * cx, n + 1)[1:] / area_px,
                             np.bincount(r_gap, twice_area / 2 * cy, n + 1)[1:] / area_px], 1)
    horizontal = (direction == E) | (direction == W)
    perimeter = np.bincount(gap, np.where(horizontal, sx, sy), n + 1)[1:]
    # label point: the shell (positive ring) with the largest area; ties go to the first in scan order
    # (sp breaks them by its heap sort over GEOS's ring order, which this cannot reproduce)
    shell = twice_area > 0
    order = np.lexsort((np.arange(n_rings), -twice_area, ~shell, r_gap))
    first = order[np.r_[True, r_gap[order][1:] != r_gap[order][:-1]]] if n_rings else order
    label = np.full((n, 2), np.nan)
    label[r_gap[first] - 1] = np.stack([cx[first], cy[first]], 1)
    # vertices: the start of each edge that turns, ordered by ring (gap, part, shell first), then rank
    prev = np.empty_like(nxt)
    prev[nxt] = np.arange(len(nxt))
    turns = direction != direction[prev]                     # the previous edge's direction differs
    ring_key = np.lexsort((~shell, r_part, r_gap))
    ring_pos = np.empty(n_rings, np.int64)
    ring_pos[ring_key] = np.arange(n_rings)
    size = np.bincount(ring_of, minlength=n_rings)[ring_key]                # edges per ring, in output order
    place = (np.cumsum(size) - size)[ring_pos[ring_of]] + rank              # (M,) a permutation: no sort needed
    order = np.empty_like(place)
    order[place] = np.arange(len(place))
    keep = order[turns[order]]
    counts = np.bincount(ring_of[turns], minlength=n_rings)[ring_key]

    def to_map(xy_px):
        return np.stack([ox + xy_px[..., 0] * sx, oy + xy_px[..., 1] * sy], -1)

    return GapPolygons(
        area=area_px * sx * sy, perimeter=perimeter, centroid=to_map(centroid), label_point=to_map(label),
        coords=to_map(np.stack([x0[keep], y0[keep]], 1).astype(np.float64)),
        ring_start=np.r_[0, np.cumsum(counts)], ring_gap=r_gap[ring_key], ring_part=r_part[ring_key])
