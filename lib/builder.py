"""Build a tile dataset: sites -> gap masks -> tiles -> spatial split -> tar shards -> manifest (written last)."""
import logging
import time
from pathlib import Path

import numpy as np

from lib.errors import DataError
from lib.gaps import gap_masks, threshold_tag, IGNORE
from lib.shards import ShardWriter, write_manifest
from lib.tiling import SPLITS, assign_sites, assign_tiles_by_block, block_split_map, tile_origins, valid_fractions

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def choose_split_rule(rule: str, n_sites: int, test_sites) -> str:
    """'site' when asked, or when there are enough sites (>= 5) or named test sites; 'block' otherwise."""
    if rule != "auto":
        return rule
    return "site" if test_sites or n_sites >= 5 else "block"


class _SplitTally:
    """Per-split counts for the summary: tiles, sites, gap and nodata pixels per threshold."""

    def __init__(self, k: int):
        self.tiles = {s: 0 for s in SPLITS}
        self.sites = {s: set() for s in SPLITS}
        self.gap = {s: np.zeros(k, np.int64) for s in SPLITS}
        self.valid = {s: np.zeros(k, np.int64) for s in SPLITS}
        self.nodata = {s: 0 for s in SPLITS}
        self.pixels = {s: 0 for s in SPLITS}

    def add(self, split: str, site: str, masks: np.ndarray) -> None:
        self.tiles[split] += 1
        self.sites[split].add(site)
        self.gap[split] += (masks == 1).sum(axis=(1, 2))
        self.valid[split] += (masks != IGNORE).sum(axis=(1, 2))
        self.nodata[split] += int((masks[0] == IGNORE).sum())
        self.pixels[split] += masks[0].size

    def summary(self, thresholds) -> dict:
        out = {}
        for s in SPLITS:
            frac = self.gap[s] / np.maximum(self.valid[s], 1)
            out[s] = {"tiles": self.tiles[s], "sites": sorted(self.sites[s]),
                      "gap_fraction": {threshold_tag(t): round(float(f), 5) for t, f in zip(thresholds, frac)},
                      "nodata_fraction": round(self.nodata[s] / max(self.pixels[s], 1), 5)}
        return out


def _site_tiles(site, data_cfg, split_rule, site_split, seed):
    """(origin, split) pairs kept for one site, and its gap masks (K, H, W)."""
    h, w = site.dsm.shape
    px = data_cfg.tile_px
    if h < px or w < px:
        raise DataError(f"site {site.name!r} is {h}x{w} px, smaller than one {px} px tile",
                        hint="lower data.tile_px")
    pixel_area = float(site.info.pixel_size[0] * site.info.pixel_size[1])
    masks = gap_masks(site.chm, data_cfg.thresholds_m, data_cfg.min_area_m2, data_cfg.max_area_m2, pixel_area)
    origins = tile_origins(h, w, px, data_cfg.stride_px)
    valid = np.isfinite(site.dsm) & np.isfinite(site.chm)
    keep = valid_fractions(valid, origins, px) >= data_cfg.min_valid_fraction
    origins = origins[keep]
    if split_rule == "site":
        splits = [site_split] * len(origins)
    else:
        blocks = block_split_map(h, w, data_cfg.block_px, data_cfg.split_fractions, seed)
        buffer_px = max(1, data_cfg.tile_px - data_cfg.stride_px)
        idx = assign_tiles_by_block(origins, px, blocks, data_cfg.block_px, buffer_px)
        splits = [SPLITS[i] if i >= 0 else None for i in idx]
    return [(o, s) for o, s in zip(origins, splits) if s is not None], masks


def build_dataset(cfg, sources, out: str | Path) -> dict:
    """Write shards for every split and the manifest into `out`; returns the manifest."""
    from lib.normalize import compute_height_stats

    data_cfg, seed = cfg.data, cfg.run.seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rule = choose_split_rule(data_cfg.split, len(sources), data_cfg.test_sites)
    site_splits = assign_sites([s.name for s in sources], data_cfg.split_fractions, seed,
                               data_cfg.test_sites) if rule == "site" else {}
    max_bytes = int(data_cfg.shard_mb * 2 ** 20)
    writers = {s: ShardWriter(out, s, max_bytes=max_bytes) for s in SPLITS}
    tally = _SplitTally(len(data_cfg.thresholds_m))
    tags = [threshold_tag(t) for t in data_cfg.thresholds_m]
    site_meta, crs = {}, {}

    def write_sites():
        """Write every site's tiles; yield the train ones so the statistics stream (nothing held)."""
        start = time.time()
        for n, source in enumerate(sources, start=1):
            yield from _write_site(source, n, data_cfg, rule, site_splits, seed, writers, tally, tags,
                                   site_meta, crs)
            log.info("[%d/%d] %s: %d tiles (%.1f s)", n, len(sources), source.name,
                     site_meta[source.name]["tiles"], time.time() - start)

    normalization = compute_height_stats(write_sites())
    shards = {s: w.close() for s, w in writers.items()}
    if not tally.tiles["train"]:
        raise DataError("no training tile survived tiling and the valid-fraction filter",
                        hint="lower data.tile_px or data.min_valid_fraction, or add sites")
    manifest = {
        "format_version": FORMAT_VERSION, "task": data_cfg.task,
        "thresholds_m": list(data_cfg.thresholds_m), "mask_members": [f"mask_{t}" for t in tags],
        "tile_px": data_cfg.tile_px, "pixel_size_m": data_cfg.pixel_size_m, "crs": crs or None,
        "min_area_m2": data_cfg.min_area_m2, "max_area_m2": data_cfg.max_area_m2,
        "split_rule": _describe_rule(rule, data_cfg),
        "splits": {s: {"shards": shards[s], "samples": tally.tiles[s]} for s in SPLITS},
        "summary": tally.summary(data_cfg.thresholds_m), "sites": site_meta,
        "normalization": normalization,
    }
    write_manifest(out, manifest)
    return manifest


def _write_site(source, n, data_cfg, rule, site_splits, seed, writers, tally, tags, site_meta, crs):
    """Load one site, write its kept tiles to their split's shards; yield (dsm, chm) of train tiles."""
    site = source.load()
    _check_pixel_size(site, data_cfg.pixel_size_m)
    if not crs and _crs_of(site.info):
        crs.update(_crs_of(site.info))
    kept, masks = _site_tiles(site, data_cfg, rule, site_splits.get(site.name), seed + n)
    px = data_cfg.tile_px
    for (r, c), split in kept:
        window = (slice(r, r + px), slice(c, c + px))
        tile_masks = masks[(slice(None),) + window]
        sample = {"__key__": f"{site.name}_r{r:05d}_c{c:05d}",
                  "dsm.npy": np.ascontiguousarray(site.dsm[window], dtype=np.float32),
                  "chm.npy": np.ascontiguousarray(site.chm[window], dtype=np.float32),
                  "json": {"site": site.name, "window": [int(r), int(c), px, px], "split": split,
                           "thresholds_m": list(data_cfg.thresholds_m),
                           "min_area_m2": data_cfg.min_area_m2, "max_area_m2": data_cfg.max_area_m2,
                           **site.provenance}}
        for k, tag in enumerate(tags):
            sample[f"mask_{tag}.npy"] = np.ascontiguousarray(tile_masks[k])
        writers[split].write(sample)
        tally.add(split, site.name, tile_masks)
        if split == "train":
            yield sample["dsm.npy"], sample["chm.npy"]
    site_meta[site.name] = {"split": site_splits.get(site.name, "block"), "tiles": len(kept),
                            "shape": list(site.dsm.shape), **site.provenance}


def _check_pixel_size(site, expected: float) -> None:
    px, py = site.info.pixel_size
    if abs(px - expected) > 1e-6 * expected or abs(py - expected) > 1e-6 * expected:
        raise DataError(f"site {site.name!r} has {px}x{py} m pixels but data.pixel_size_m is {expected}",
                        hint="resample the raster or set --data.pixel_size_m to match")


def _crs_of(info) -> dict | None:
    epsg = getattr(info, "epsg", None)
    return {"epsg": epsg} if epsg else None


def _describe_rule(rule: str, data_cfg) -> dict:
    if rule == "site":
        return {"rule": "site", "fractions": data_cfg.split_fractions, "test_sites": data_cfg.test_sites}
    return {"rule": "block", "block_px": data_cfg.block_px, "fractions": data_cfg.split_fractions,
            "buffer_px": max(1, data_cfg.tile_px - data_cfg.stride_px),
            "note": "tiles whose extent plus the buffer meets another split's block are dropped"}
