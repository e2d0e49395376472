"""Where a dataset's sites come from: the synthetic generator, a config list, a folder, or CLI paths.

A source is loaded lazily, one site at a time, so preparing many large rasters never holds them all.
"""
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lib.core.errors import DataError


@dataclass
class SiteData:
    name: str
    dsm: np.ndarray       # (H, W) float32 metres, NaN = nodata
    chm: np.ndarray       # (H, W) float32 metres, NaN = nodata
    info: object          # lib.geoio.georef.GeoInfo of the grid
    provenance: dict = field(default_factory=dict)


@dataclass
class SiteSource:
    name: str
    load: Callable[[], SiteData]


def safe_site_name(name: str) -> str:
    """Site names end up in shard keys: letters, digits, '-' and '_' only (no dots)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    if not clean:
        raise DataError(f"site name {name!r} has no usable characters")
    return clean


def synthetic_sources(count: int, size_px: int, pixel_size_m: float, seed: int, closed_fraction: float = 0.0,
                      coarse_fraction: float = 0.0, coarse_factor: int = 2) -> list[SiteSource]:
    """`count` varied synthetic sites, each reproducible from (seed, index)."""
    def loader(index: int) -> Callable[[], SiteData]:
        def load() -> SiteData:
            site = synthetic_site(index, size_px, pixel_size_m, seed, closed_fraction, coarse_fraction, coarse_factor)
            site.provenance.pop("dtm")
            return site
        return load
    return [SiteSource(f"syn{i:03d}", loader(i)) for i in range(count)]


def hybrid_sources(chm_paths, per_chm: int, pixel_size_m: float, seed: int) -> list[SiteSource]:
    """`per_chm` sites per real CHM GeoTIFF, each on its own synthetic terrain and sensor, in one of the
    8 D4 orientations (copy i: rot90 i % 4, flipped when i // 4 is odd). The CHM is the exact label."""
    sources = []
    for path in chm_paths:
        stem = safe_site_name(Path(path).stem)
        sources += [SiteSource(f"hyb-{stem}-{i:02d}", _hybrid_loader(str(path), stem, i, pixel_size_m, seed))
                    for i in range(per_chm)]
    return sources


def _hybrid_loader(path: str, stem: str, index: int, pixel_size_m: float, seed: int) -> Callable[[], SiteData]:
    def load() -> SiteData:
        from lib.geoio.georef import GeoInfo
        from lib.geoio.geotiff_read import read_raster
        from lib.data.synthetic import hybrid_site, random_hybrid_params
        chm, info = read_raster(path)
        if any(abs(s - pixel_size_m) > 1e-6 * pixel_size_m for s in info.pixel_size):
            raise DataError(f"data.hybrid_chms: {path} has {info.pixel_size[0]:g} x {info.pixel_size[1]:g} m "
                            f"pixels but data.pixel_size_m is {pixel_size_m:g}", hint="resample the CHM")
        chm = np.rot90(chm, index % 4)
        chm = np.ascontiguousarray(chm[:, ::-1] if (index // 4) % 2 else chm)
        site_seed = int(np.random.SeedSequence([seed, zlib.crc32(stem.encode()), index]).generate_state(1)[0])
        params = random_hybrid_params(np.random.default_rng(site_seed), max(chm.shape), pixel_size_m)
        site = hybrid_site(chm, site_seed, params)
        grid = GeoInfo(height=chm.shape[0], width=chm.shape[1], pixel_size=(pixel_size_m, pixel_size_m),
                       origin=(0.0, float(chm.shape[0] * pixel_size_m)))
        return SiteData(f"hyb-{stem}-{index:02d}", site.dsm, site.chm, grid,
                        {"source": "hybrid", "chm_file": path, "seed": site_seed, "rot90": index % 4,
                         "flip": bool((index // 4) % 2), "sensor": params.sensor})
    return load


def synthetic_site(index: int, size_px: int, pixel_size_m: float, seed: int, closed_fraction: float = 0.0,
                   coarse_fraction: float = 0.0, coarse_factor: int = 2) -> SiteData:
    """One varied synthetic site, reproducible from (seed, index), on a local metric grid; with probability
    closed_fraction one closed stand with 0.5-5 % gaps, and with probability coarse_fraction seen by a sensor
    of coarse_factor x larger pixels (coarse_site). Each is its own draw: the other sites are unchanged."""
    from lib.geoio.georef import GeoInfo
    from lib.data.synthetic import closed_canopy, generate_site, random_site_params
    site_seed = seed * 100_003 + index
    coarse = np.random.default_rng([site_seed, 2]).random() < coarse_fraction
    sensor_px = pixel_size_m * coarse_factor if coarse else pixel_size_m
    sensor_size = -(-size_px // coarse_factor) if coarse else size_px
    params = random_site_params(np.random.default_rng(site_seed), sensor_size, sensor_px)
    closed = np.random.default_rng([site_seed, 1])
    if closed.random() < closed_fraction:
        params = closed_canopy(params, closed)
    site = generate_site(site_seed, params)
    info = GeoInfo(height=sensor_size, width=sensor_size, pixel_size=(sensor_px, sensor_px),
                   origin=(0.0, float(sensor_size * sensor_px)))
    data = SiteData(f"syn{index:03d}", site.dsm, site.chm, info,
                    {"source": "synthetic", "seed": site_seed, "forest": params.forest, "dtm": site.dtm})
    return coarse_site(data, pixel_size_m, size_px) if coarse else data


def coarse_site(site: SiteData, pixel_size_m: float, size_px: int) -> SiteData:
    """A synthetic site (its DTM in provenance) from a coarser sensor, brought to pixel_size_m (size_px square)
    as predict.py brings a coarser scene to the model's grid: the DSM and DTM bilinearly; the CHM by nearest
    neighbour, so the labels are the sensor's own cells (what a map is scored against once resampled back)."""
    from dataclasses import replace
    from lib.geoio.resample import resample, resampled_grid
    grid = resampled_grid(site.info, pixel_size_m)
    fine = replace(grid, height=size_px, width=size_px)   # the sensor grid covers at least size_px

    def fine_grid(array, method):
        return resample(array, site.info, grid, method)[:size_px, :size_px]
    provenance = {**site.provenance, "dtm": fine_grid(site.provenance["dtm"], "bilinear"),
                  "sensor_pixel_m": float(site.info.pixel_size[0])}
    return SiteData(site.name, fine_grid(site.dsm, "bilinear"), fine_grid(site.chm, "nearest"), fine, provenance)


def write_synthetic_scene(folder: str | Path, index: int, size_px: int, pixel_size_m: float, seed: int) -> dict:
    """Write a synthetic site as `<name>_DSM.tif`, `_DTM.tif`, `_CHM.tif` (to try gaps/predict without data)."""
    from lib.geoio.geotiff_write import write_raster
    site = synthetic_site(index, size_px, pixel_size_m, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, array in (("DSM", site.dsm), ("DTM", site.provenance["dtm"]), ("CHM", site.chm)):
        paths[kind] = folder / f"{site.name}_{kind}.tif"
        write_raster(paths[kind], array.astype(np.float32), site.info, nodata=float("nan"))
    return paths


def raster_source(name: str, dsm: str, chm: str | None = None, dtm: str | None = None) -> SiteSource:
    """A real site from a DSM with its CHM, or with its DTM (then CHM = DSM - DTM)."""
    if (chm is None) == (dtm is None):
        raise DataError(f"site {name!r}: give exactly one of chm or dtm beside dsm {dsm!r}")
    name = safe_site_name(name)

    def load() -> SiteData:
        from lib.geoio.geotiff_read import read_pair
        dsm_arr, chm_arr, info = read_pair(dsm, chm=chm, dtm=dtm)
        valid = dsm_arr[np.isfinite(dsm_arr)]
        if valid.size and valid.min() == valid.max():  # nothing to normalise or learn: a fill, not a survey
            raise DataError(f"{dsm}: every valid pixel of the DSM holds the same height ({float(valid[0]):g})",
                            hint="check that the file is a surface model and that its nodata value is set")
        files = {"dsm": str(dsm), **({"chm": str(chm)} if chm else {"dtm": str(dtm)})}
        return SiteData(name, dsm_arr, chm_arr, info, {"source": "raster", "files": files})
    return SiteSource(name, load)


def _missing_partner(site: str, kinds: dict[str, Path]) -> str:
    """What a lone raster of a site lacks, and what to do about it (kinds: dsm/chm/dtm -> path)."""
    found = ", ".join(path.name for path in kinds.values())
    if "dsm" in kinds:
        return (f"{found} without its _CHM.tif or _DTM.tif (training needs heights above ground; predict.py "
                f"maps a DSM alone)")
    if "chm" in kinds:
        return f"{found} without its _DSM.tif (a CHM alone on flat ground: copy it as {site}_DSM.tif)"
    return f"{found} without its _DSM.tif (a DTM gives heights only beside the surface it is the ground of)"


def folder_sources(folder: str | Path) -> list[SiteSource]:
    """Pairs `<site>_DSM.tif` + `<site>_CHM.tif` (or `_DTM.tif`) found in a folder (case-insensitive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.raster_folder {str(folder)!r} is not a folder")
    by_kind: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = re.match(r"(.+)_(dsm|chm|dtm)\.tiff?$", path.name, re.IGNORECASE)
        if match:
            by_kind.setdefault(match.group(1), {})[match.group(2).lower()] = path
    sources = []
    for site, kinds in sorted(by_kind.items()):
        if "dsm" not in kinds or len(kinds) == 1:
            warnings.warn(f"{folder}: site {site!r} skipped: {_missing_partner(site, kinds)}", stacklevel=2)
            continue
        if "chm" in kinds:
            sources.append(raster_source(site, str(kinds["dsm"]), chm=str(kinds["chm"])))
        elif "dtm" in kinds:
            sources.append(raster_source(site, str(kinds["dsm"]), dtm=str(kinds["dtm"])))
    if not sources:
        raise DataError(f"no <site>_DSM.tif with a matching _CHM.tif or _DTM.tif in {folder}")
    return sources


def sources_from_config(data_cfg, seed: int) -> list[SiteSource]:
    """Real sites when the config lists any (sites, raster_folder), synthetic ones otherwise; plus the
    hybrid sites of data.hybrid_chms."""
    sources = []
    for i, site in enumerate(data_cfg.sites):
        unknown = set(site) - {"name", "dsm", "chm", "dtm"}
        if "dsm" not in site or unknown:
            raise DataError(f"data.sites[{i}] needs keys name, dsm and chm or dtm; found {sorted(site)}")
        sources.append(raster_source(site.get("name", Path(site["dsm"]).stem), site["dsm"],
                                     site.get("chm"), site.get("dtm")))
    if data_cfg.raster_folder:
        sources += folder_sources(data_cfg.raster_folder)
    if not sources:
        sources = synthetic_sources(data_cfg.synthetic_sites, data_cfg.synthetic_size_px, data_cfg.pixel_size_m,
                                    seed, data_cfg.synthetic_closed_fraction, data_cfg.synthetic_coarse_fraction,
                                    data_cfg.synthetic_coarse_factor)
    sources += hybrid_sources(data_cfg.hybrid_chms, data_cfg.hybrid_per_chm, data_cfg.pixel_size_m, seed)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"site names must be unique, found {names}")
    return sources
