"""Synthetic forest sites: the embedded default data (DSM, DTM, CHM, stand map), numpy only.

A site is a crop of a slightly larger world (so crowns and gaps cross its border naturally):
terrain -> stand polygons -> trees per stand -> gaps (trees removed, regrowth inside, crowns leaning
in) -> canopy = max over crowns -> sensor (LiDAR pits and noise, or photogrammetric smoothing) ->
flight-line steps -> nodata holes. Everything is reproducible from (seed, params).
"""
from dataclasses import dataclass, replace

import numpy as np
import torch

from lib.data.synth_canopy import FORESTS, make_trees, open_gaps, render_crowns, render_gaps, sample_gaps, stand_trees
from lib.core.errors import ConfigError, DataError
from lib.gaps.morphology import cone_erosion
from lib.data.synth_terrain import fractal_noise, gaussian_blur, make_terrain, max_filter3, upsample

STAND_TYPES = ("closed_canopy", "gappy", "young_regrowth", "plantation_rows", "bare")   # ids 0..4
STAND_UNKNOWN = 255                              # stand id of hybrid sites (a real CHM: stands unknown)
SENSORS = ("lidar", "photogrammetry")
GAP_WEIGHT = np.array([1.0, 3.0, 0.0, 0.5, 0.0])  # relative gap density per stand type
CELL_PX = 2                                      # stand map resolution, pixels per cell
MAX_CROWN_M = 36.0                               # widest crown reach: 52 m umbrella, widest allometry, lobes


@dataclass(frozen=True)
class SiteParams:
    """What a synthetic site looks like. Defaults: a 512 m temperate LiDAR scene on rolling hills."""
    size_px: int = 512                   # side of the square site, pixels
    pixel_size_m: float = 1.0            # ground size of a pixel, metres
    forest: str = "temperate"            # "temperate" (20-35 m) | "tropical" (emergents to 52 m) | "mixed"
    relief_m: float = 80.0               # terrain elevation range before the slope cap, metres (0-300)
    max_slope_deg: float = 35.0          # terrain slope never exceeds this, degrees
    hillside: float = 0.0                # share of relief in one planar incline across the site, 0-1
    ridges: float = 0.3                  # strength of sharp ridges, 0-1
    gullies: float = 0.3                 # strength of V-shaped gullies, 0-1
    terraces: float = 0.0                # strength of terracing (flat treads, steep risers), 0-1
    base_elevation_m: float = 100.0      # elevation of the lowest terrain point, metres a.s.l.
    stand_area_ha: float = 5.0           # typical stand (polygon) area, hectares
    stand_weights: tuple | None = None   # area share per STAND_TYPES entry; None = the forest's default
    gap_fraction: float = 0.08           # target share of forest-stand area in canopy gaps, 0-1
    gap_size_exponent: float = 1.9       # gap areas ~ area^-exponent (power law), > 1
    max_gap_area_m2: float = 10000.0     # largest gap, square metres
    regrowth_max_m: float = 12.0         # tallest regrowth inside gaps, metres
    canopy_roughness_m: float = 1.0      # amplitude of within-crown texture at 30 m canopy, metres
    sensor: str = "lidar"                # "lidar" (pits, noise) | "photogrammetry" (smooth, no pits)
    noise_m: float = 0.1                 # vertical noise std on the canopy, metres
    pit_fraction: float = 0.01           # share of canopy pixels with a LiDAR pit (lidar only)
    smoothing_m: float = 1.5             # blur std of the photogrammetric surface, metres
    view_angle_deg: float = 0.0          # photogrammetry: off-nadir angle of the views; crowns hide the gap
                                         # floor within height x tan(angle) of them (0: no occlusion)
    strip_width_m: float = 300.0         # flight-line strip width, metres
    strip_offset_m: float = 0.05         # std of the elevation step between strips, metres
    nodata_fraction: float = 0.01        # share of pixels set to NaN (holes, dropouts), 0-0.5

    def __post_init__(self):
        _require(self, "size_px", isinstance(self.size_px, (int, np.integer)) and self.size_px >= 16, "an int >= 16")
        _require(self, "pixel_size_m", self.pixel_size_m > 0, "> 0")
        _require(self, "forest", self.forest in FORESTS, "one of " + ", ".join(FORESTS))
        _require(self, "sensor", self.sensor in SENSORS, "one of " + ", ".join(SENSORS))
        _require(self, "max_slope_deg", 0 < self.max_slope_deg <= 70, "in (0, 70]")
        _require(self, "gap_size_exponent", 1.05 <= self.gap_size_exponent <= 4, "in [1.05, 4]")
        _require(self, "nodata_fraction", 0 <= self.nodata_fraction <= 0.5, "in [0, 0.5]")
        _require(self, "view_angle_deg", 0 <= self.view_angle_deg < 60, "in [0, 60)")
        for name in ("hillside", "ridges", "gullies", "terraces", "gap_fraction", "pit_fraction"):
            _require(self, name, 0 <= getattr(self, name) <= 1, "in [0, 1]")
        for name in ("relief_m", "regrowth_max_m", "canopy_roughness_m", "noise_m", "smoothing_m",
                     "strip_offset_m"):
            _require(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("stand_area_ha", "max_gap_area_m2", "strip_width_m"):
            _require(self, name, getattr(self, name) > 0, "> 0")
        if self.stand_weights is not None:
            w = np.asarray(self.stand_weights, float)
            _require(self, "stand_weights", w.shape == (len(STAND_TYPES),) and (w >= 0).all() and w.sum() > 0,
                     f"{len(STAND_TYPES)} non-negative weights (not all 0) for {', '.join(STAND_TYPES)}")


def _require(params: SiteParams, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"SiteParams.{name}: got {getattr(params, name)!r}, expected {expected}")


@dataclass
class Site:
    """One scene: rasters on the same grid, plus what made it."""
    dsm: np.ndarray      # (H, W) float32 surface, metres a.s.l.; NaN = nodata
    dtm: np.ndarray      # (H, W) float32 terrain, metres a.s.l.; never NaN
    chm: np.ndarray      # (H, W) float32 dsm - dtm, metres; NaN where dsm is NaN
    stand: np.ndarray    # (H, W) uint8 index into STAND_TYPES (STAND_UNKNOWN for hybrid sites)
    params: SiteParams
    seed: int


def _stand_map(rng: np.random.Generator, cells: tuple[int, int], side_cells: float, weights: np.ndarray):
    """(cells) int64 polygon id and (P,) int64 stand type per polygon.

    Polygons are the Voronoi cells of a jittered seed grid seen through a smooth random warp, so
    boundaries wander; only the 3x3 neighbouring seeds are compared (9 passes, any number of stands).
    """
    rows, cols = (int(np.ceil(n / side_cells)) + 2 for n in cells)        # one ring of seeds beyond
    seed_y = (np.arange(rows)[:, None] - 1 + rng.uniform(0.15, 0.85, (rows, cols))) * side_cells
    seed_x = (np.arange(cols)[None, :] - 1 + rng.uniform(0.15, 0.85, (rows, cols))) * side_cells
    coarse = tuple((n - 1) // 4 + 2 for n in cells)
    warp_y, warp_x = (0.25 * side_cells * upsample(fractal_noise(rng, coarse, 4.0), 4, cells) for _ in range(2))
    wy = np.arange(cells[0], dtype=np.float32)[:, None] + warp_y
    wx = np.arange(cells[1], dtype=np.float32)[None, :] + warp_x
    home_y = np.clip(np.floor(wy / side_cells).astype(np.int64) + 1, 1, rows - 2)
    home_x = np.clip(np.floor(wx / side_cells).astype(np.int64) + 1, 1, cols - 2)
    best = np.full(cells, np.inf, np.float32)
    label = np.zeros(cells, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ky, kx = home_y + dy, home_x + dx
            dist = (wy - seed_y[ky, kx]) ** 2 + (wx - seed_x[ky, kx]) ** 2
            closer = dist < best
            best = np.where(closer, dist, best)
            label = np.where(closer, ky * cols + kx, label)
    used, polygon = np.unique(label, return_inverse=True)
    kinds = rng.choice(len(STAND_TYPES), size=used.size, p=weights / weights.sum())
    return polygon.reshape(cells), kinds


def _site_trees(rng: np.random.Generator, polygon: np.ndarray, kinds: np.ndarray, p: SiteParams):
    """All trees of the world, stand by stand, heights modulated by a smooth site-quality field."""
    forest = FORESTS[p.forest]
    n_poly = kinds.size
    cy, cx = np.indices(polygon.shape).reshape(2, -1)
    lo_y, lo_x = np.full(n_poly, polygon.shape[0]), np.full(n_poly, polygon.shape[1])
    hi_y, hi_x = np.zeros(n_poly, np.int64), np.zeros(n_poly, np.int64)
    for extreme, ufunc, coord in ((lo_y, np.minimum, cy), (lo_x, np.minimum, cx), (hi_y, np.maximum, cy),
                                  (hi_x, np.maximum, cx)):
        ufunc.at(extreme, polygon.ravel(), coord)
    parts = []
    for pid in range(n_poly):
        box = (lo_y[pid] * CELL_PX, (hi_y[pid] + 1) * CELL_PX, lo_x[pid] * CELL_PX, (hi_x[pid] + 1) * CELL_PX)
        y, x, height, crown, max_radius = stand_trees(rng, STAND_TYPES[kinds[pid]], forest, box, p.pixel_size_m)
        inside = polygon[(y // CELL_PX).astype(np.int64), (x // CELL_PX).astype(np.int64)] == pid
        parts.append((y[inside], x[inside], height[inside], crown[inside], max_radius[inside]))
    y, x, height, crown, max_radius = (np.concatenate(a) for a in zip(*parts))
    coarse = tuple((n - 1) // 8 + 2 for n in polygon.shape)
    quality = upsample(fractal_noise(rng, coarse, 4.0), 8, polygon.shape)
    height = height * (1 + 0.08 * quality[(y // CELL_PX).astype(np.int64), (x // CELL_PX).astype(np.int64)])
    return make_trees(rng, y, x, np.maximum(height, 1.0), crown, max_radius, forest, p.pixel_size_m)


def _vegetation(rng: np.random.Generator, dtm: np.ndarray, stand: np.ndarray, polygon: np.ndarray,
                kinds: np.ndarray, p: SiteParams) -> np.ndarray:
    """(H, W) float32 vegetation height above ground before sensor effects, metres."""
    shape, px = dtm.shape, p.pixel_size_m
    trees = _site_trees(rng, polygon, kinds, p)
    gaps = sample_gaps(rng, GAP_WEIGHT[kinds][polygon], CELL_PX, px, p.gap_fraction, p.gap_size_exponent,
                       p.max_gap_area_m2, p.regrowth_max_m)
    texture = fractal_noise(rng, shape, 3.5, corr_px=max(1.0, 3.0 / px))   # gap outlines, regrowth clumps
    cap, regrowth = render_gaps(gaps, texture)
    trees = open_gaps(trees, cap)
    iy = np.clip(np.rint(trees.y).astype(np.int64), 0, shape[0] - 1)
    ix = np.clip(np.rint(trees.x).astype(np.int64), 0, shape[1] - 1)
    leaves = fractal_noise(rng, shape, 2.5, corr_px=max(1.0, 2.0 / px))    # foliage: crown edges, texture
    crowns = render_crowns(trees, dtm[iy, ix], leaves) - dtm
    shrubs = fractal_noise(rng, shape, 3.0, corr_px=max(1.0, 4.0 / px))
    low = (0.4 + 0.4 * shrubs).clip(0, None)                     # grass, shrubs, logs: bare land, gaps
    shaded = (4.0 + 2.0 * shrubs).clip(0.5, None)                # understory beneath the canopy
    understory = np.where((stand == STAND_TYPES.index("bare")) | np.isfinite(cap), low, shaded)
    regrown = regrowth * np.clip(0.75 + 0.35 * texture, 0.1, 1.4)
    veg = np.maximum(np.maximum(np.minimum(crowns, cap), understory), regrown)
    return veg + (p.canopy_roughness_m / 30.0) * np.clip(veg, 0, 40) * leaves


def _lidar(rng: np.random.Generator, veg: np.ndarray, p: SiteParams) -> np.ndarray:
    """Noise plus pits: shots that slip between crowns, so the highest return lies far below the top."""
    drop = max_filter3(max_filter3(veg)) - veg                         # (H, W) below the 5x5 top
    weight = np.clip(drop / (0.3 * veg + 1.0), 0, 1) ** 2 * (veg > 5)  # crown flanks, between crowns
    mean = float(weight.mean())
    if p.pit_fraction > 0 and mean > 0:
        pits = rng.random(veg.shape, dtype=np.float32) < weight * (p.pit_fraction * float((veg > 5).mean()) / mean)
        veg = veg.copy()
        veg[pits] *= rng.beta(0.8, 1.5, int(pits.sum())).astype(np.float32)   # toward the ground
    sd = p.noise_m * np.clip(veg / 5.0, 0.3, 1.0)
    return veg + sd * rng.standard_normal(veg.shape, dtype=np.float32)


def occluded(veg: np.ndarray, view_angle_deg: float, pixel_size_m: float) -> np.ndarray:
    """The surface image matching reconstructs when views come in at up to view_angle_deg off nadir: a gap
    floor within h x tan(angle) of an h m crown is hidden, the surface sloping down from the crown's edge
    (a grey dilation by a cone of slope 1 / tan(angle)), so narrow gaps are bridged and wide ones shrink."""
    if view_angle_deg <= 0:
        return veg
    slope = 1.0 / np.tan(np.radians(view_angle_deg))
    reach_px = int(np.ceil(float(np.nanmax(veg, initial=0.0)) / slope / pixel_size_m))
    if reach_px < 1:
        return veg
    lowered = cone_erosion(torch.from_numpy(-np.ascontiguousarray(veg, np.float32))[None, None], slope,
                           reach_px, pixel_size_m)
    return -lowered[0, 0].numpy()


def _photogrammetry(rng: np.random.Generator, veg: np.ndarray, p: SiteParams) -> np.ndarray:
    """Image matching sees no pits and little of narrow gaps: an occluded, dilated, blurred surface with
    wavy noise."""
    sigma_px = p.smoothing_m / p.pixel_size_m
    surface = gaussian_blur(max_filter3(occluded(veg, p.view_angle_deg, p.pixel_size_m)), sigma_px)
    coarse = tuple((n - 1) // 2 + 2 for n in veg.shape)
    wavy = upsample(fractal_noise(rng, coarse, 3.0, corr_px=max(1.0, 3.0 / p.pixel_size_m)), 2, veg.shape)
    return surface + p.noise_m * wavy


def _flight_lines(rng: np.random.Generator, shape: tuple[int, int], p: SiteParams) -> np.ndarray:
    """(H, W) float32 elevation offset, constant within each flight strip, metres."""
    angle = rng.uniform(0, np.pi)
    yy, xx = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
    across = (np.cos(angle) * xx + np.sin(angle) * yy) * p.pixel_size_m + rng.uniform(0, p.strip_width_m)
    strip = np.floor(across / p.strip_width_m).astype(np.int64)
    strip -= strip.min()
    return rng.normal(0.0, p.strip_offset_m, int(strip.max()) + 1).astype(np.float32)[strip]


def _nodata(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """(H, W) bool, exactly round(fraction * H * W) True: blobs (water, dropouts) with ragged edges."""
    count = int(round(fraction * shape[0] * shape[1]))
    coarse = tuple((n - 1) // 4 + 2 for n in shape)
    score = upsample(fractal_noise(rng, coarse, 3.0, corr_px=8.0), 4, shape)
    score += 0.4 * rng.standard_normal(shape, dtype=np.float32)
    mask = np.zeros(shape[0] * shape[1], bool)
    if count:
        mask[np.argpartition(-score.ravel(), count - 1)[:count]] = True
    return mask.reshape(shape)


def generate_site(seed: int, params: SiteParams | None = None) -> Site:
    """A synthetic site of params.size_px^2 pixels, bitwise reproducible from (seed, params)."""
    p = params or SiteParams()
    rng_terrain, rng_stands, rng_veg, rng_sensor = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    margin = int(np.ceil(MAX_CROWN_M / p.pixel_size_m)) + CELL_PX    # crowns reach in from outside
    world = -(-(p.size_px + 2 * margin) // 16) * 16                    # FFT-friendly, CELL_PX multiple
    dtm = make_terrain(rng_terrain, (world, world), p.pixel_size_m, p.relief_m, p.max_slope_deg,
                       p.ridges, p.gullies, p.terraces, p.hillside)
    weights = np.asarray(FORESTS[p.forest].stand_weights if p.stand_weights is None else p.stand_weights, float)
    side_cells = float(np.sqrt(p.stand_area_ha * 1e4) / (p.pixel_size_m * CELL_PX))
    polygon, kinds = _stand_map(rng_stands, (world // CELL_PX,) * 2, side_cells, weights)
    stand = np.repeat(np.repeat(kinds[polygon].astype(np.uint8), CELL_PX, 0), CELL_PX, 1)
    veg = _vegetation(rng_veg, dtm, stand, polygon, kinds, p)
    veg = _lidar(rng_sensor, veg, p) if p.sensor == "lidar" else _photogrammetry(rng_sensor, veg, p)
    crop = slice((world - p.size_px) // 2, (world - p.size_px) // 2 + p.size_px)
    dtm = dtm[crop, crop] - (dtm[crop, crop].min() - np.float32(p.base_elevation_m))   # lowest point = base
    dsm = dtm + veg[crop, crop] + _flight_lines(rng_sensor, dtm.shape, p)
    dsm[_nodata(rng_sensor, dsm.shape, p.nodata_fraction)] = np.nan
    return Site(dsm=dsm, dtm=dtm, chm=dsm - dtm, stand=np.ascontiguousarray(stand[crop, crop]),
                params=p, seed=seed)


def _random_relief(rng: np.random.Generator, extent_m: float, log_uniform) -> tuple[float, float]:
    """(relief_m, max_slope_deg): a quarter flat, 30 % rolling, 45 % mountain sides whose median slope is
    20-45 degrees (steep real scenes such as Wellington have a median of 37 and a 99th percentile of 52)."""
    draw = rng.random()
    if draw < 0.25:
        return float(rng.uniform(0, 5)), float(rng.uniform(15, 45))
    if draw < 0.55:
        return log_uniform(5, 200), float(rng.uniform(15, 40))
    target = rng.uniform(20, 45)                               # rough median slope, degrees
    relief = (extent_m + 2 * MAX_CROWN_M) * np.tan(np.radians(target)) * rng.uniform(1.0, 2.0)
    return float(relief), float(min(target + rng.uniform(8, 18), 60))


def random_site_params(rng: np.random.Generator, size_px: int, pixel_size_m: float = 1.0) -> SiteParams:
    """A varied scene for dataset diversity: forest type, relief (flat, rolling or steep), slope, gaps, sensor."""
    def log_uniform(lo, hi):
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    lidar = rng.random() < 0.7
    weights = None
    if rng.random() < 0.25:
        weights = (1.0, 0.0, 0.0, 0.0, 0.0)                            # one closed stand, like most plots
    elif rng.random() < 0.5:
        weights = tuple(float(w) for w in rng.dirichlet(np.ones(len(STAND_TYPES))))
    forest = str(rng.choice(list(FORESTS)))
    relief_m, max_slope_deg = _random_relief(rng, size_px * pixel_size_m, log_uniform)
    return SiteParams(
        size_px=int(size_px), pixel_size_m=float(pixel_size_m), forest=forest, relief_m=relief_m,
        max_slope_deg=max_slope_deg, hillside=rng.uniform(0, 0.8) if rng.random() < 0.4 else 0.0,
        ridges=rng.uniform(0, 1), gullies=rng.uniform(0, 1),
        terraces=rng.uniform(0.3, 0.9) if rng.random() < 0.1 else 0.0,
        base_elevation_m=rng.uniform(0, 1500), stand_area_ha=log_uniform(2, 30), stand_weights=weights,
        gap_fraction=log_uniform(0.005, 0.3), gap_size_exponent=rng.uniform(1.5, 2.4),
        max_gap_area_m2=log_uniform(300, 10000), regrowth_max_m=rng.uniform(4, 14),
        canopy_roughness_m=rng.uniform(0.4, 1.5), sensor="lidar" if lidar else "photogrammetry",
        noise_m=rng.uniform(0.03, 0.25) if lidar else rng.uniform(0.1, 0.4),
        pit_fraction=log_uniform(0.001, 0.03) if lidar else 0.0, smoothing_m=rng.uniform(0.5, 2.5),
        strip_width_m=rng.uniform(150, 600), strip_offset_m=rng.uniform(0, 0.15),
        nodata_fraction=log_uniform(1e-4, 0.05) if rng.random() < 0.6 else 0.0,
        view_angle_deg=0.0 if lidar else rng.uniform(5.0, 25.0))   # drawn last: earlier draws unchanged


def closed_canopy(params: SiteParams, rng: np.random.Generator) -> SiteParams:
    """params made one closed stand with few gaps (0.5-5 % of the area, log-uniform): most real forest
    scenes, and rarer among random_site_params' draws (benchmarks/synthetic_realism.py)."""
    gaps = float(np.exp(rng.uniform(np.log(0.005), np.log(0.05))))
    return replace(params, stand_weights=(1.0, 0.0, 0.0, 0.0, 0.0), gap_fraction=gaps)


def hybrid_site(chm: np.ndarray, seed: int, params: SiteParams | None = None, **overrides) -> Site:
    """A real (H, W) CHM laid onto synthetic terrain: real canopy texture with exact labels.

    params (or SiteParams fields as keywords, e.g. relief_m=150) set the terrain and the sensor; the size
    comes from chm. site.chm is the input (float32, NaN kept). With a "lidar" sensor dsm = dtm + chm
    (the CHM already holds its LiDAR texture), so dsm - dtm equals chm up to float32 rounding of the sum
    (< 1e-4 m below 1000 m a.s.l.); "photogrammetry" smooths the canopy surface as image matching does
    (the labels stay the real CHM). Flight-line steps are added when strip_offset_m > 0. Stands are
    unknown (STAND_UNKNOWN).
    """
    chm = np.array(chm, dtype=np.float32)
    if chm.ndim != 2 or min(chm.shape) < 2:
        raise DataError(f"hybrid_site: chm has shape {chm.shape}, expected a 2-D raster (H, W)")
    if np.isinf(chm).any():
        raise DataError("hybrid_site: chm holds infinite values, expected finite heights or NaN for nodata")
    base = params or SiteParams(strip_offset_m=0.0)
    p = replace(base, size_px=max(max(chm.shape), 16), nodata_fraction=0.0, **overrides)
    rng_terrain, rng_sensor = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    side = p.size_px
    dtm = make_terrain(rng_terrain, (side, side), p.pixel_size_m, p.relief_m, p.max_slope_deg, p.ridges,
                       p.gullies, p.terraces, p.hillside)[: chm.shape[0], : chm.shape[1]]
    dtm = dtm - (dtm.min() - np.float32(p.base_elevation_m))                 # lowest point = base
    canopy = chm
    if p.sensor == "photogrammetry":
        canopy = _photogrammetry(rng_sensor, np.nan_to_num(chm), p)
        canopy[np.isnan(chm)] = np.nan
    dsm = dtm + canopy
    if p.strip_offset_m > 0:
        dsm += _flight_lines(rng_sensor, dtm.shape, p)
    return Site(dsm=dsm, dtm=dtm, chm=chm, stand=np.full(chm.shape, STAND_UNKNOWN, np.uint8), params=p, seed=seed)


def random_hybrid_params(rng: np.random.Generator, size_px: int, pixel_size_m: float = 1.0) -> SiteParams:
    """Terrain and sensor of a hybrid site, drawn like random_site_params (canopy fields are unused)."""
    return replace(random_site_params(rng, size_px, pixel_size_m), nodata_fraction=0.0)


def stand_tile_params(seed: int, stand_type: str | int, size_px: int, pixel_size_m: float = 1.0) -> SiteParams:
    """Params of a one-stand-type site on varied terrain and sensor, drawn from seed."""
    if stand_type in STAND_TYPES:
        kind = STAND_TYPES.index(stand_type)
    elif isinstance(stand_type, (int, np.integer)) and 0 <= stand_type < len(STAND_TYPES):
        kind = int(stand_type)
    else:
        raise ConfigError(f"stand_type {stand_type!r} is unknown, expected one of {', '.join(STAND_TYPES)} "
                          f"or an id 0..{len(STAND_TYPES) - 1}")
    rng = np.random.default_rng(seed)
    params = random_site_params(rng, size_px, pixel_size_m)
    gaps = {"closed_canopy": (0.0, 0.03), "gappy": (0.2, 0.45), "plantation_rows": (0.0, 0.03)}
    return replace(params, stand_weights=tuple(float(i == kind) for i in range(len(STAND_TYPES))),
                   gap_fraction=rng.uniform(*gaps.get(STAND_TYPES[kind], (0.0, 0.0))),
                   gap_size_exponent=rng.uniform(1.5, 1.8))


def generate_stand_tile(seed: int, stand_type: str | int, size_px: int, pixel_size_m: float = 1.0) -> np.ndarray:
    """(size_px, size_px) float32 DSM of one stand type (tile classification); NaN = nodata.

    The same as generate_site(seed, stand_tile_params(seed, ...)).dsm, whose CHM and masks go with it.
    """
    return generate_site(seed, stand_tile_params(seed, stand_type, size_px, pixel_size_m)).dsm
