"""A ground filter for DSMs: the terrain under the canopy from the surface alone, over the whole scene.

Slope-based filtering (Vosselman 2000, the test of SAGA's "DTM Filter (slope-based)"): a cell is an object
(a crown) when some cell within `radius_m` lies lower by more than `step_m` + slope x distance. The slope
tolerated is `slope` plus the terrain's own slope, measured on a first pass that tolerates steep ground
(so hillsides are not mistaken for trees, while flat ground gets a tight test). SMRF's final pass (Pingel
et al. 2013) then keeps as ground every cell within `elevation_threshold_m` of the ground interpolated from
the survivors. Last, the terrain is the lowest surface that rises from the ground cells no faster than the
terrain's slope (a cone erosion restricted to them): under closed canopy ground is seen only in gaps, and
regrowth lifts their floors, so the lowest floor around, carried at the terrain's slope, is the better
estimate of the ground under a gap than its own floor. Holes left are interpolated
(lib/gaps/morphology.fill_holes). "progressive" swaps the cone test for Zhang et al.'s (2003) progressive
openings. All lengths are in metres, so one setting serves 0.25-2 m pixels. CHM estimate = DSM - ground.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.core.errors import ConfigError
from lib.gaps.morphology import cone_erosion, fill_holes, mean_filter, odd, opening

METHODS = ("slope", "progressive")
PROBE_SLOPE = 0.6          # the first pass, which measures the terrain's slope, tolerates this much
PROBE_RADIUS_M = 20.0      # ... over this reach, and its ground is smoothed over the same length


@dataclass(frozen=True)
class GroundFilter:
    """Settings of the filter; defaults chosen on the validation scenes of benchmarks/bench_quality.py."""
    method: str = "slope"             # "slope": Vosselman's cone test; "progressive": Zhang's openings
    radius_m: float = 80.0            # how far a cell looks for lower ground (slope; also lowest_floor)
    max_window_m: float = 64.0        # progressive: widest opening
    slope: float = 0.1                # rise/run tolerated on top of the terrain's own slope
    step_m: float = 0.5               # the least drop below a cell that makes it an object
    elevation_threshold_m: float = 0.5   # final pass: this close above the first ground = ground
    elevation_scaler: float = 1.0     # ... plus this x the first ground's slope x pixel size
    lowest_floor: bool = True         # the terrain rises from the lowest ground cells at the terrain's slope

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"ground filter method {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("radius_m", "max_window_m"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ground filter {name} must be > 0, got {getattr(self, name)}")
        for name in ("slope", "step_m", "elevation_threshold_m", "elevation_scaler"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"ground filter {name} must be >= 0, got {getattr(self, name)}")


def _slope(z: torch.Tensor, pixel_size_m: float) -> torch.Tensor:
    """|gradient| (rise/run) of a filled surface (B,1,H,W) by central differences."""
    padded = F.pad(z, (1, 1, 1, 1), mode="replicate")
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / (2 * pixel_size_m)
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / (2 * pixel_size_m)
    return torch.sqrt(dx * dx + dy * dy)


def _px(length_m: float, pixel_size_m: float) -> int:
    return max(1, round(length_m / pixel_size_m))


def _cone_objects(z: torch.Tensor, slope, radius_m: float, step_m: float, pixel_size_m: float) -> torch.Tensor:
    """Cells with a cell within radius_m lower by more than step_m + slope x distance."""
    return z - cone_erosion(z, slope, _px(radius_m, pixel_size_m), pixel_size_m) > step_m


def _smooth_slope(ground: torch.Tensor, pixel_size_m: float) -> torch.Tensor:
    """The slope of a ground surface smoothed over PROBE_RADIUS_M: the terrain's, not its bumps'."""
    smooth = mean_filter(ground, torch.isfinite(ground), odd(_px(PROBE_RADIUS_M, pixel_size_m)))
    return _slope(smooth, pixel_size_m)


def terrain_slope(z: torch.Tensor, pixel_size_m: float) -> torch.Tensor:
    """The terrain's slope (rise/run) under a filled DSM: a tolerant first pass, smoothed."""
    return _smooth_slope(fill_holes(z, ~_cone_objects(z, PROBE_SLOPE, PROBE_RADIUS_M, 0.5, pixel_size_m)),
                         pixel_size_m)


def _progressive_objects(z: torch.Tensor, f: GroundFilter, slope: torch.Tensor, pixel_size_m: float):
    """Cells whose surface drops by more than step_m + slope x step between two successive openings, the
    square windows doubling from 3 pixels to max_window_m."""
    widest = odd(max(3, _px(f.max_window_m, pixel_size_m)))
    sides, half = [], 1
    while 2 * half + 1 < widest:
        sides.append(2 * half + 1)
        half *= 2
    removed = torch.zeros_like(z, dtype=torch.bool)
    surface, previous = z, 1
    for side in sides + [widest]:
        opened = opening(surface, side)
        removed |= (surface - opened) > f.step_m + slope * ((side - previous) / 2 * pixel_size_m)
        surface, previous = opened, side
    return removed


def ground_surface(dsm: torch.Tensor, pixel_size_m: float = 1.0, f: GroundFilter = GroundFilter()) -> torch.Tensor:
    """The terrain model under a DSM (B,1,H,W) metres, NaN where the DSM is nodata."""
    valid = torch.isfinite(dsm)
    z = fill_holes(dsm, valid)                     # nodata holes must not look like pits or walls
    terrain = terrain_slope(z, pixel_size_m)
    tolerated = f.slope + terrain
    objects = (_cone_objects(z, tolerated, f.radius_m, f.step_m, pixel_size_m) if f.method == "slope"
               else _progressive_objects(z, f, tolerated, pixel_size_m))
    first = fill_holes(dsm, valid & ~objects)
    near = f.elevation_threshold_m + f.elevation_scaler * _slope(first, pixel_size_m) * pixel_size_m
    cells = valid & (dsm - first <= near)
    if f.lowest_floor:                             # carried at the slope of the first ground, not the probe's
        lowest = cone_erosion(torch.where(cells, dsm, torch.full_like(dsm, float("nan"))),
                              _smooth_slope(first, pixel_size_m), _px(f.radius_m, pixel_size_m), pixel_size_m)
        ground = fill_holes(lowest, torch.isfinite(lowest))
    else:
        ground = fill_holes(dsm, cells)
    return torch.where(valid, ground, torch.full_like(dsm, float("nan")))


def filtered_relative_height(dsm: torch.Tensor, pixel_size_m: float = 1.0,
                             f: GroundFilter = GroundFilter()) -> torch.Tensor:
    """DSM minus the filtered ground: a CHM estimate from the DSM alone; (B,1,H,W) metres."""
    return dsm - ground_surface(dsm, pixel_size_m, f)
