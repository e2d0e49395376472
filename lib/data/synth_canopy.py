"""Trees and canopy gaps of synthetic sites: lobed outlines stamped onto a raster, vectorised.

Crowns and gaps share one stamping routine: objects are grouped by outline radius, each group's
pixel offsets are computed once, and a (group, offset) matrix gives every covered pixel with its
normalised radial position u in [0, 1]. Crowns combine with np.maximum.at (canopy = max over
crowns); gaps with np.minimum.at on a height cap (union of openings).
"""
from dataclasses import dataclass

import numpy as np

N_LOBES = 4                  # outline harmonics k = 2..5: elongation, then lobes
MAX_LOBE_SUM = 0.35          # sum of |harmonic amplitudes|: outlines stay within 0.65..1.35 radii
EDGE_RISE_M = 60.0           # height a gap's cap climbs across its soft edge
MIN_GAP_M2 = 5.0             # smallest gap footprint
CROWN_ROUGHNESS = 0.06       # pixel-scale crenellation of crown outlines, in units of the radius
GAP_ROUGHNESS = 0.15         # the same for gap outlines


@dataclass
class Outlines:
    """Lobed star-shaped outlines: radius(theta) = radius * (1 + lobes . [cos k theta, sin k theta])."""
    y: np.ndarray            # (N,) float32 centre row, pixels
    x: np.ndarray            # (N,) float32 centre column, pixels
    radius: np.ndarray       # (N,) float32 mean outline radius, pixels
    lobes: np.ndarray        # (N, 2 * N_LOBES) float32 harmonic amplitudes, relative to radius


@dataclass
class Trees(Outlines):
    height: np.ndarray       # (N,) float32 apex above the stem's ground, metres
    depth: np.ndarray        # (N,) float32 apex-to-rim drop of the crown surface, metres
    power: np.ndarray        # (N,) float32 profile exponent: 1 cone, 2 paraboloid, 3-4 flat umbrella


@dataclass
class Gaps(Outlines):
    regrowth: np.ndarray     # (N,) float32 height of the regrowth inside, metres
    edge: np.ndarray         # (N,) float32 width of the soft rim around the opening, pixels


def random_lobes(rng: np.random.Generator, n: int, strength: float) -> np.ndarray:
    """(n, 2 * N_LOBES) harmonic amplitudes ~ strength / k, rescaled so their |sum| <= MAX_LOBE_SUM."""
    k = np.arange(2, 2 + N_LOBES, dtype=np.float32)
    lobes = rng.standard_normal((n, 2 * N_LOBES), dtype=np.float32) * np.tile(strength / k, 2)
    total = np.abs(lobes).sum(1, keepdims=True)
    return lobes * np.minimum(1.0, MAX_LOBE_SUM / np.maximum(total, 1e-6))


def _stamp_radius(reach: np.ndarray) -> np.ndarray:
    """Integer stamp radii; above 16 px on a 10 % geometric ladder, so groups stay a few dozen."""
    ladder = 16 * 1.1 ** np.ceil(np.log(np.maximum(reach, 16) / 16) / np.log(1.1))
    return np.ceil(np.where(reach <= 16, reach, ladder)).astype(np.int64)


def _paint(shapes: Outlines, jitter: np.ndarray, roughness: float, layers: list, max_elements: int = 1 << 22):
    """Rasterise outlines onto the grid of jitter (H, W): one (H, W) float32 raster per layer.

    layers: (fill, ufunc, value) triples; value(owner, u) gives the float32 value of the pixels of
    objects `owner` at radial position u in [0, 1], combined with ufunc.at (max or min). Outlines
    are crenellated at pixel scale (u -> u - roughness * jitter, pixels pushed past 1 drop out). The
    canvas is padded by the largest stamp, so no bounds checks are needed.
    """
    height, width = jitter.shape
    stamp = _stamp_radius(shapes.radius * (1 + np.abs(shapes.lobes).sum(1)) + 0.71)  # + sub-pixel centre
    pad = int(stamp.max()) if stamp.size else 0
    row = width + 2 * pad
    rough = np.pad(jitter.astype(np.float32) * roughness, pad).ravel()
    canvases = [np.full((height + 2 * pad) * row, fill, np.float32) for fill, _, _ in layers]
    harmonics = np.arange(2, 2 + N_LOBES)[:, None]
    for size in np.unique(stamp):
        dy, dx = np.mgrid[-size: size + 1, -size: size + 1]
        keep = dy * dy + dx * dx <= size * size
        dy, dx = dy[keep].astype(np.float32), dx[keep].astype(np.float32)          # (M,)
        step = (dy * row + dx).astype(np.int64)
        theta = np.arctan2(dy, dx)  # from the rounded centre: sub-pixel error only where lobes vanish
        basis = np.concatenate([np.cos(harmonics * theta), np.sin(harmonics * theta)]).astype(np.float32)
        members = np.flatnonzero(stamp == size)
        for ids in np.array_split(members, max(1, members.size * dy.size // max_elements)):
            cy, cx = np.rint(shapes.y[ids]), np.rint(shapes.x[ids])
            fy, fx = (shapes.y[ids] - cy)[:, None], (shapes.x[ids] - cx)[:, None]
            outline = shapes.radius[ids, None] * (1 + shapes.lobes[ids] @ basis)   # (G, M)
            u2 = ((dy - fy) ** 2 + (dx - fx) ** 2) / (outline * outline)            # (G, M)
            obj, off = np.nonzero(u2 <= 1)
            base = (cy.astype(np.int64) + pad) * row + cx.astype(np.int64) + pad
            pixel = base[obj] + step[off]
            u = np.maximum(np.sqrt(u2[obj, off]) + rough[pixel], 0)
            inside = u <= 1
            owner, pixel, u = ids[obj[inside]], pixel[inside], u[inside]
            for canvas, (_, ufunc, value) in zip(canvases, layers):
                ufunc.at(canvas, pixel, value(owner, u))
    return [c.reshape(height + 2 * pad, row)[pad: pad + height, pad: pad + width] for c in canvases]


def render_crowns(trees: Trees, stem_ground: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """(H, W) float32 top surface of all crowns in absolute metres (-inf where no crown).

    stem_ground (N,) is the terrain under each stem: on a slope the crown keeps its shape in absolute
    height, so its CHM is taller on the downhill side, as in real steep-terrain CHMs. jitter (H, W),
    about +-1, crenellates crown outlines (foliage clumps).
    """
    top = stem_ground.astype(np.float32) + trees.height

    def surface(owner, u):
        return top[owner] - trees.depth[owner] * u ** trees.power[owner]
    return _paint(trees, jitter, CROWN_ROUGHNESS, [(-np.inf, np.maximum, surface)])[0]


def render_gaps(gaps: Gaps, jitter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cap, regrowth), both (H, W) float32 metres above ground, on the grid of jitter.

    cap limits crown height: the gap's regrowth height over its opening, then rising by EDGE_RISE_M
    across a soft rim `edge` wide outside it (crowns lean over the border instead of ending in a
    wall); +inf away from gaps. regrowth is taller towards the border, where more light reaches
    (0 away from gaps). jitter (H, W), about +-1, roughens outlines.
    """
    outer = gaps.radius + gaps.edge
    opening = gaps.radius / outer                              # u where the rim starts

    def cap(owner, u):
        start = opening[owner]
        return gaps.regrowth[owner] + EDGE_RISE_M * np.clip((u - start) / (1 - start), 0, 1) ** 2

    def regrowth(owner, u):
        return gaps.regrowth[owner] * (0.8 + 0.4 * np.minimum(u / opening[owner], 1) ** 2)
    rims = Outlines(gaps.y, gaps.x, outer, gaps.lobes)
    cap_raster, regrowth_raster = _paint(rims, jitter, GAP_ROUGHNESS,
                                         [(np.inf, np.minimum, cap), (0.0, np.maximum, regrowth)])
    return cap_raster, regrowth_raster


def truncated_pareto(rng: np.random.Generator, n: int, low: float, high: float, exponent: float) -> np.ndarray:
    """(n,) samples with density ~ a^-exponent on [low, high] (inverse CDF; exponent != 1)."""
    e = 1.0 - exponent
    u = rng.random(n)
    return (low**e + u * (high**e - low**e)) ** (1.0 / e)


def sample_gaps(rng: np.random.Generator, weight: np.ndarray, cell_px: int, pixel_size_m: float,
                gap_fraction: float, exponent: float, max_area_m2: float, regrowth_max_m: float) -> Gaps:
    """Gaps over the grid until their summed area is gap_fraction of the area with weight > 0.

    weight (h, w) on cells of cell_px pixels sets where gaps fall (by stand type); areas follow a
    truncated power law from MIN_GAP_M2 to max_area_m2, so a few large gaps hold much of the gap area.
    """
    cell_m2 = (cell_px * pixel_size_m) ** 2
    forest_m2 = float((weight > 0).sum()) * cell_m2
    target = gap_fraction * forest_m2
    high = max(10.0, min(max_area_m2, 0.3 * forest_m2))
    if target <= 0:
        return _no_gaps()
    areas = truncated_pareto(rng, int(target / MIN_GAP_M2) + 1, MIN_GAP_M2, high, exponent)  # surely enough
    areas = areas[: int(np.searchsorted(np.cumsum(areas), target)) + 1]
    n = areas.size
    cell = rng.choice(weight.size, size=n, p=(weight / weight.sum()).ravel())
    y = (cell // weight.shape[1] + rng.random(n)) * cell_px
    x = (cell % weight.shape[1] + rng.random(n)) * cell_px
    lobes = random_lobes(rng, n, strength=0.5) * np.minimum(1, np.sqrt(areas / 50))[:, None]   # small: rounder
    radius = np.sqrt(areas / np.pi / (1 + 0.5 * (lobes**2).sum(1))) / pixel_size_m   # lobes add area
    regrowth = regrowth_max_m * rng.beta(0.8, 1.8, n)            # many fresh gaps, some well regrown
    edge = rng.uniform(2.0, 6.0, n) / pixel_size_m
    return Gaps(*(a.astype(np.float32) for a in (y, x, radius)), lobes,
                regrowth.astype(np.float32), edge.astype(np.float32))


def _no_gaps() -> Gaps:
    empty = np.zeros(0, np.float32)
    return Gaps(empty, empty, empty, np.zeros((0, 2 * N_LOBES), np.float32), empty, empty)


def open_gaps(trees: Trees, cap: np.ndarray) -> Trees:
    """Remove trees standing in gaps; trees at a gap's border lean into it and are a little lower.

    Each crown probes the cap at 8 points one crown radius out: open probes pull the crown 30 % of
    its radius towards the opening and lower it by up to 8 %.
    """
    height, width = cap.shape
    flat = cap.ravel()

    def cap_at(y, x):
        iy = np.clip(np.rint(y).astype(np.int64), 0, height - 1)
        ix = np.clip(np.rint(x).astype(np.int64), 0, width - 1)
        return flat[iy * width + ix]

    standing = cap_at(trees.y, trees.x) >= 0.5 * trees.height
    angles = np.arange(8) * (np.pi / 4)
    py = trees.y[:, None] + trees.radius[:, None] * np.sin(angles)          # (N, 8)
    px = trees.x[:, None] + trees.radius[:, None] * np.cos(angles)
    is_open = cap_at(py, px) < 0.5 * trees.height[:, None]
    n_open = is_open.sum(1)
    pull = 0.3 * trees.radius / np.maximum(n_open, 1)
    lean_y = (is_open * np.sin(angles)).sum(1) * pull
    lean_x = (is_open * np.cos(angles)).sum(1) * pull
    kept = np.flatnonzero(standing)
    return Trees(y=(trees.y + lean_y)[kept].astype(np.float32), x=(trees.x + lean_x)[kept].astype(np.float32),
                 radius=trees.radius[kept], lobes=trees.lobes[kept],
                 height=(trees.height * (1 - 0.01 * n_open))[kept].astype(np.float32),
                 depth=trees.depth[kept], power=trees.power[kept])


@dataclass(frozen=True)
class Forest:
    """One forest type: stand heights, crown mix, emergents and the default share of stand types."""
    top_m: tuple[float, float]          # range of stand top heights, metres
    conifer: float                      # share of conical crowns
    umbrella: float                     # share of flat umbrella crowns among the rest
    emergents_per_ha: float             # trees 4-12 m above the canopy (at most 52 m), per hectare
    crown_scale: float                  # crown width relative to the CROWNS allometry
    stand_weights: tuple[float, ...]    # default area share of each stand type (synthetic.STAND_TYPES)


FORESTS = {
    "temperate": Forest((20.0, 35.0), 0.25, 0.0, 0.0, 1.0, (0.60, 0.14, 0.12, 0.10, 0.04)),
    "tropical": Forest((28.0, 38.0), 0.0, 0.3, 0.5, 1.3, (0.68, 0.18, 0.08, 0.02, 0.04)),
    "mixed": Forest((18.0, 35.0), 0.5, 0.05, 0.3, 1.1, (0.50, 0.15, 0.13, 0.14, 0.08)),
}

# crown kind -> (radius / height, profile exponent range, depth / height range)
CROWNS = np.array([(0.10, 0.9, 1.3, 0.50, 0.80),     # 0 conifer: narrow deep cone
                   (0.20, 1.5, 2.5, 0.25, 0.50),     # 1 broadleaf: paraboloid dome
                   (0.24, 2.5, 4.0, 0.12, 0.25)],    # 2 umbrella: flat wide tropical top
                  np.float32)


def make_trees(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, height: np.ndarray,
               crown: np.ndarray, max_radius_m: np.ndarray, forest: Forest, pixel_size_m: float) -> Trees:
    """Trees at (y, x) pixels: allometric crown radius (grows with height), per-tree shape noise."""
    n = y.size
    ratio, power_lo, power_hi, depth_lo, depth_hi = CROWNS[crown].T
    spread = np.clip(rng.lognormal(0.0, 0.25, n), 0.6, 1.6)
    radius_m = np.minimum(forest.crown_scale * ratio * height * spread, max_radius_m)
    power = power_lo + (power_hi - power_lo) * rng.random(n)
    depth = height * (depth_lo + (depth_hi - depth_lo) * rng.random(n))
    return Trees(y=y.astype(np.float32), x=x.astype(np.float32),
                 radius=np.maximum(radius_m / pixel_size_m, 0.5).astype(np.float32),
                 lobes=random_lobes(rng, n, strength=0.25), height=height.astype(np.float32),
                 depth=depth.astype(np.float32), power=power.astype(np.float32))


def _jittered(rng, box, spacing):
    """One point uniformly inside each cell of a square grid: crowns spaced more evenly than random."""
    y0, y1, x0, x1 = box
    gy, gx = np.meshgrid(np.arange(y0, y1, spacing), np.arange(x0, x1, spacing), indexing="ij")
    y, x = gy.ravel() + spacing * rng.random(gy.size), gx.ravel() + spacing * rng.random(gx.size)
    keep = (y < y1) & (x < x1)
    return y[keep], x[keep]


def _poisson(rng, box, per_px2):
    y0, y1, x0, x1 = box
    n = rng.poisson(per_px2 * (y1 - y0) * (x1 - x0))
    return y0 + (y1 - y0) * rng.random(n), x0 + (x1 - x0) * rng.random(n)


def _clustered(rng, box, per_px2, spread_px):
    """Thomas process: Poisson parents, ~6 children each, normally scattered spread_px around them."""
    y0, y1, x0, x1 = box
    parent_y, parent_x = _poisson(rng, box, per_px2 / 6)
    children = rng.poisson(6, parent_y.size)
    y = np.repeat(parent_y, children) + spread_px * rng.standard_normal(children.sum())
    x = np.repeat(parent_x, children) + spread_px * rng.standard_normal(children.sum())
    keep = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    return y[keep], x[keep]


def _rows(rng, box, row_px, step_px):
    """Planting lattice at a random angle: rows row_px apart, a tree every step_px, small jitter."""
    y0, y1, x0, x1 = box
    half = 0.5 * np.hypot(y1 - y0, x1 - x0)
    across, along = np.meshgrid(np.arange(-half, half, row_px), np.arange(-half, half, step_px), indexing="ij")
    across = across.ravel() + 0.08 * row_px * rng.standard_normal(across.size)
    along = along.ravel() + 0.10 * step_px * rng.standard_normal(along.size)
    angle = rng.uniform(0, np.pi)
    y = 0.5 * (y0 + y1) + np.cos(angle) * across + np.sin(angle) * along
    x = 0.5 * (x0 + x1) - np.sin(angle) * across + np.cos(angle) * along
    keep = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    return y[keep], x[keep]


def _crown_mix(rng, forest: Forest, n: int) -> np.ndarray:
    draw = rng.random(n)
    return np.where(draw < forest.conifer, 0, np.where(rng.random(n) < forest.umbrella, 2, 1))


def stand_trees(rng: np.random.Generator, kind: str, forest: Forest, box: tuple, pixel_size_m: float):
    """Trees of one stand over box (y0, y1, x0, x1) pixels: (y, x, height_m, crown_kind, max_radius_m).

    closed/gappy: evenly spaced dominants, subordinates (random; clustered in gappy stands), tropical
    emergents; gappy stands are lower and understocked. young_regrowth: dense 3-12 m trees.
    plantation_rows: even-aged trees on a rotated lattice. bare: a few trees in small groups.
    """
    px2 = pixel_size_m**2
    top = rng.uniform(*forest.top_m)
    mix_ratio = forest.crown_scale * (forest.conifer * CROWNS[0, 0] + (1 - forest.conifer) * CROWNS[1, 0])
    if kind == "plantation_rows":
        top, row_m = rng.uniform(8.0, 30.0), rng.uniform(2.5, 5.0)
        y, x = _rows(rng, box, row_m / pixel_size_m, rng.uniform(1.8, 3.5) / pixel_size_m)
        keep = rng.random(y.size) > rng.uniform(0.03, 0.12)          # dead or missing trees
        height = top * rng.normal(1.0, 0.04, keep.sum())
        crown = np.full(height.size, 0 if rng.random() < 0.7 else 1)
        return y[keep], x[keep], height, crown, np.full(height.size, 0.55 * row_m)
    if kind == "bare":
        y, x = _clustered(rng, box, rng.uniform(0.0, 3.0) * 1e-4 * px2, 8.0 / pixel_size_m)
        return y, x, top * rng.uniform(0.3, 0.9, y.size), np.ones(y.size, np.int64), np.full(y.size, np.inf)
    if kind == "young_regrowth":
        top = rng.uniform(3.0, 12.0)
        y, x = _jittered(rng, box, 2 * mix_ratio * top * 0.8 / pixel_size_m)
        height = top * np.clip(rng.normal(0.85, 0.12, y.size), 0.3, 1.1)
        crown = np.minimum(_crown_mix(rng, forest, y.size), 1)          # no umbrellas among saplings
        return y, x, height, crown, np.full(y.size, np.inf)
    stocking = rng.uniform(0.9, 1.0)
    if kind == "gappy":
        top, stocking = top * rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.6)
    spacing_m = 2 * mix_ratio * top * rng.uniform(0.5, 0.7)             # crowns overlap: closed canopy
    dom_y, dom_x = _jittered(rng, box, spacing_m / pixel_size_m)
    keep = rng.random(dom_y.size) < stocking
    sub_y, sub_x = (_clustered(rng, box, 1.5 / spacing_m**2 * px2, spacing_m / pixel_size_m) if kind == "gappy"
                    else _poisson(rng, box, 1.5 / spacing_m**2 * px2))
    emg_y, emg_x = _poisson(rng, box, forest.emergents_per_ha * 1e-4 * px2)
    height = np.concatenate([top * np.clip(rng.normal(0.85, 0.13, keep.sum()), 0.45, 1.15),
                             top * rng.uniform(0.35, 0.8, sub_y.size),
                             np.minimum(top + rng.uniform(4.0, 12.0, emg_y.size), 52.0)])
    crown = np.concatenate([_crown_mix(rng, forest, keep.sum() + sub_y.size), np.full(emg_y.size, 2)])
    return (np.concatenate([dom_y[keep], sub_y, emg_y]), np.concatenate([dom_x[keep], sub_x, emg_x]),
            height, crown, np.full(height.size, np.inf))
