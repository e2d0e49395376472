"""The ground filter over a whole site or scene, for the filtered_height input feature.

The filter needs context (its cone reaches radius_m, its terrain slope and hole filling reach further):
run on one training tile or one prediction window it misses the ground on steep slopes (mean IoU 0.24
against 0.38 on a real CHM over a steep real DTM, 128 px windows against the whole scene). So it runs on
the whole site before tiling (prepare_data) and on the whole scene before the window pass (predict), in
blocks with a margin wide enough that a large scene costs bounded memory and matches the whole-scene run.
"""
import math

import numpy as np
import torch

from lib.gaps.ground_filter import GroundFilter, ground_surface
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import RasterWriter

BLOCK_PX = 1024          # core of each block; blocks overlap by the margin on every side
MARGIN_RADII = 2.0       # the margin in filter radii (the cone's reach, plus the slope probe's smoothing)


def site_ground(dsm: np.ndarray, pixel_size_m: float, f: GroundFilter = GroundFilter()) -> np.ndarray:
    """The filter's ground (H, W) float32 metres under a whole DSM (H, W), NaN where the DSM is nodata."""
    z = torch.from_numpy(np.ascontiguousarray(dsm, np.float32))[None, None]
    with torch.inference_mode():
        return ground_surface(z, pixel_size_m, f)[0, 0].numpy()


def margin_px(pixel_size_m: float, f: GroundFilter = GroundFilter()) -> int:
    return math.ceil(MARGIN_RADII * f.radius_m / pixel_size_m)


def write_scene_ground(dsm_path, out_path, f: GroundFilter = GroundFilter(), block_px: int = BLOCK_PX) -> None:
    """The filter's ground under the DSM at dsm_path, as a float32 GeoTIFF on the same grid (NaN nodata).

    Blocks of block_px + a margin on each side; only the core is kept. A scene within one block (with its
    margin) is filtered whole, so the result equals site_ground; memory is one strip of blocks.
    """
    info = read_info(dsm_path)
    px = float(info.pixel_size[0])
    m = margin_px(px, f)
    with RasterWriter(out_path, info, np.float32, float("nan"), compress=False) as out:
        for r0 in range(0, info.height, block_px):
            top, bottom = max(r0 - m, 0), min(r0 + block_px + m, info.height)
            strip = read_raster(dsm_path, window=(top, 0, bottom - top, info.width))[0]
            core = np.empty((min(block_px, info.height - r0), info.width), np.float32)
            for c0 in range(0, info.width, block_px):
                left, right = max(c0 - m, 0), min(c0 + block_px + m, info.width)
                ground = site_ground(strip[:, left:right], px, f)
                core[:, c0:c0 + block_px] = ground[r0 - top:r0 - top + core.shape[0], c0 - left:c0 - left + block_px]
            out.write(r0, core)
