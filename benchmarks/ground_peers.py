"""The ground filters a DSM-only user already has, as peers in bench_quality (benchmark-only; never at run time).

- SAGA GIS "DTM Filter (slope-based)" (Vosselman 2000): `saga_cmd grid_filter 7` (Debian `saga`),
- WhiteboxTools RemoveOffTerrainObjects (PyPI `whitebox-workflows`),
- the cloth simulation filter (Zhang et al. 2016; PyPI `cloth-simulation-filter`) on the DSM's pixels as points.

Each returns the ground (H, W) under a DSM (H, W) metres; cells a filter leaves without ground are filled
from the others by lib/gaps/morphology.fill_holes (a harmonic membrane, the gridded analogue of the linear
interpolation in a TIN). `SETTINGS` is each peer's small grid; `missing()` says which peers are absent.
"""
import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from lib.gaps.morphology import fill_holes
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_raster
from lib.geoio.geotiff_write import write_raster

NODATA = -9999.0


def _filled(ground: np.ndarray, keep: np.ndarray) -> np.ndarray:
    z = torch.from_numpy(np.ascontiguousarray(ground, np.float32))[None, None]
    known = torch.from_numpy(keep & np.isfinite(ground))[None, None]
    return fill_holes(z, known)[0, 0].numpy()


def _write(path: Path, dsm: np.ndarray, pixel_size_m: float) -> None:
    """Uncompressed GeoTIFF with a -9999 nodata (Whitebox does not read float predictors)."""
    h, w = dsm.shape
    info = GeoInfo(height=h, width=w, pixel_size=(pixel_size_m, pixel_size_m), origin=(500000.0, 5e6 + h * pixel_size_m))
    write_raster(path, np.where(np.isfinite(dsm), dsm, NODATA).astype(np.float32), info, nodata=NODATA,
                 compress=False)


def saga_ground(dsm: np.ndarray, pixel_size_m: float, radius_m: float = 10.0, slope_pct: float = 30.0) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "dsm.tif", Path(tmp) / "ground.tif"
        _write(src, dsm, pixel_size_m)
        radius = max(1, round(radius_m / pixel_size_m))
        subprocess.run(["saga_cmd", "grid_filter", "7", "-INPUT", str(src), "-GROUND", str(out), "-RADIUS",
                        str(radius), "-TERRAINSLOPE", str(slope_pct)], check=True, capture_output=True, timeout=600)
        ground, _ = read_raster(out)
    return _filled(ground, np.isfinite(ground))


def whitebox_ground(dsm: np.ndarray, pixel_size_m: float, filter_m: float = 11.0, slope_deg: float = 15.0):
    import whitebox_workflows
    wbe = whitebox_workflows.WbEnvironment()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "dsm.tif"
        _write(src, dsm, pixel_size_m)
        size = max(3, round(filter_m / pixel_size_m)) | 1
        out = wbe.remove_off_terrain_objects(wbe.read_raster(str(src)), filter_size=size, slope_threshold=slope_deg)
        ground = np.asarray(out.to_numpy(), np.float32)
    ground[ground == NODATA] = np.nan
    return _filled(ground, np.isfinite(ground))


def csf_ground(dsm: np.ndarray, pixel_size_m: float, cloth_m: float = 2.0, rigidness: int = 2,
               class_threshold_m: float = 0.5, slope_smooth: bool = True) -> np.ndarray:
    import CSF
    rows, cols = np.nonzero(np.isfinite(dsm))
    points = np.stack([cols * pixel_size_m, -rows * pixel_size_m, dsm[rows, cols]], axis=1).astype(np.float64)
    csf = CSF.CSF()
    csf.params.bSloopSmooth, csf.params.cloth_resolution = slope_smooth, cloth_m
    csf.params.rigidness, csf.params.class_threshold = rigidness, class_threshold_m
    csf.setPointCloud(points)
    ground_idx, other = CSF.VecInt(), CSF.VecInt()
    with _quiet_stdout():
        csf.do_filtering(ground_idx, other, exportCloth=False)
    keep = np.zeros(dsm.shape, bool)
    idx = np.asarray(ground_idx, int)
    keep[rows[idx], cols[idx]] = True
    return _filled(dsm, keep)


@contextlib.contextmanager
def _quiet_stdout():
    """CSF's C++ core prints its progress on file descriptor 1: send it to /dev/null meanwhile."""
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


PEERS = {"saga": saga_ground, "whitebox": whitebox_ground, "csf": csf_ground}
SETTINGS = {
    "saga": [dict(radius_m=r, slope_pct=s) for r in (5.0, 15.0, 40.0) for s in (15.0, 30.0, 60.0)],
    "whitebox": [dict(filter_m=f, slope_deg=s) for f in (11.0, 31.0, 81.0) for s in (10.0, 20.0, 40.0)],
    "csf": [dict(cloth_m=c, rigidness=r) for c in (1.0, 3.0, 8.0) for r in (1, 2, 3)],
}


def missing() -> list[str]:
    """Peers not installed here, each with how to install it."""
    absent = []
    if shutil.which("saga_cmd") is None:
        absent.append("saga (apt-get install saga)")
    if importlib.util.find_spec("whitebox_workflows") is None:
        absent.append("whitebox (pip install whitebox-workflows)")
    if importlib.util.find_spec("CSF") is None:
        absent.append("csf (pip install cloth-simulation-filter)")
    return absent
