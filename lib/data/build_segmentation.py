"""Build a tile dataset: sites -> gap masks -> tiles -> spatial split -> tar shards -> manifest (written last)."""
import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from lib.core.errors import DataError
from lib.gaps.masks import IGNORE, gap_masks, threshold_tag
from lib.data.normalize import FILTERED
from lib.data.scene_ground import site_ground
from lib.data.shards import MANIFEST, ShardWriter, mask_member, write_manifest
from lib.data.tiling import SPLITS, assign_sites, fit_block_split, tile_origins, valid_fractions

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
    """(origin, split) pairs kept for one site, its gap masks (K, H, W), and {block_px, draw} of its block
    split (None when split by site)."""
    h, w = site.dsm.shape
    px = data_cfg.tile_px
    valid = np.isfinite(site.dsm) & np.isfinite(site.chm)
    if h < px or w < px:
        raise DataError(f"site {site.name!r} is {h}x{w} px, smaller than one {px} px tile",
                        hint=_small_site_hint(valid, data_cfg, seed))
    pixel_area = float(site.info.pixel_size[0] * site.info.pixel_size[1])
    masks = gap_masks(site.chm, data_cfg.thresholds_m, data_cfg.min_area_m2, data_cfg.max_area_m2, pixel_area)
    origins = _kept_origins(valid, px, data_cfg.stride_px, data_cfg.min_valid_fraction)
    if split_rule == "site":
        return [(o, site_split) for o in origins], masks, None
    fit = fit_block_split(origins, (h, w), px, data_cfg.block_px, _buffer_px(data_cfg),
                          data_cfg.split_fractions, seed)
    if fit is None:
        raise DataError(f"site {site.name!r} ({h}x{w} px) is too small to split into train/val/test by "
                        f"blocks of {px} px tiles with a buffer, whatever the block size",
                        hint=_small_site_hint(valid, data_cfg, seed))
    if fit["block_px"] != data_cfg.block_px:
        log.warning("site %r (%dx%d px): %d px blocks leave a split without tiles, split by %d px blocks "
                    "instead (manifest.json split_rule)", site.name, h, w, data_cfg.block_px, fit["block_px"])
    kept = [(o, SPLITS[i]) for o, i in zip(origins, fit.pop("split")) if i >= 0]
    return kept, masks, fit


def _kept_origins(valid: np.ndarray, tile_px: int, stride_px: int, min_valid_fraction: float) -> np.ndarray:
    origins = tile_origins(*valid.shape, tile_px, stride_px)
    return origins[valid_fractions(valid, origins, tile_px) >= min_valid_fraction]


def _buffer_px(data_cfg) -> int:
    return max(1, data_cfg.tile_px - data_cfg.stride_px)


def _small_site_hint(valid: np.ndarray, data_cfg, seed: int) -> str:
    """What would split the site: smaller tiles (the first that fit), or more sites."""
    sites = "add sites (5 or more are split by site) or name held-out ones in data.test_sites"
    tile = data_cfg.tile_px // 2
    while tile >= 16:
        origins = _kept_origins(valid, tile, tile, data_cfg.min_valid_fraction)
        if fit_block_split(origins, valid.shape, tile, data_cfg.block_px, 1, data_cfg.split_fractions, seed):
            return f"--data.tile_px={tile} --data.stride_px={tile} would split it; or {sites}"
        tile //= 2
    return sites


class _Build:
    """The state of one dataset build: split rule and assignment, open shard writers, running tallies."""

    def __init__(self, cfg, sources, out: Path):
        self.data, self.seed, self.out = cfg.data, cfg.run.seed, out
        self.rule = choose_split_rule(self.data.split, len(sources), self.data.test_sites)
        self.site_splits = assign_sites([s.name for s in sources], self.data.split_fractions, self.seed,
                                        self.data.test_sites) if self.rule == "site" else {}
        self.tally = _SplitTally(len(self.data.thresholds_m))
        self.members = [mask_member(t) for t in self.data.thresholds_m]
        self.site_meta, self.crs = {}, None

    def write_sites(self, sources, writers):
        """Write every site's tiles; yield the train ones so the statistics stream (nothing held)."""
        start = time.time()
        for n, source in enumerate(sources, start=1):
            yield from self.write_site(source, n, writers)
            log.info("[%d/%d] %s: %d tiles (%.1f s)", n, len(sources), source.name,
                     self.site_meta[source.name]["tiles"], time.time() - start)

    def write_site(self, source, n: int, writers):
        """Load one site, write its kept tiles to their split's shards; yield (dsm, chm) of train tiles."""
        site = source.load()
        _check_pixel_size(site, self.data.pixel_size_m)
        self.crs = self.crs or _crs_of(site.info)
        kept, masks, blocks = _site_tiles(site, self.data, self.rule, self.site_splits.get(site.name),
                                            self.seed + n)
        px = self.data.tile_px
        ground = site_ground(site.dsm, self.data.pixel_size_m) if FILTERED in self.data.input_features else None
        for (r, c), split in kept:
            window = (slice(r, r + px), slice(c, c + px))
            tile_masks = masks[(slice(None),) + window]
            sample = {"__key__": f"{site.name}_r{r:05d}_c{c:05d}",
                      "dsm.npy": np.ascontiguousarray(site.dsm[window], dtype=np.float32),
                      "chm.npy": np.ascontiguousarray(site.chm[window], dtype=np.float32),
                      "json": {"site": site.name, "window": [int(r), int(c), px, px], "split": split,
                               "thresholds_m": list(self.data.thresholds_m),
                               "min_area_m2": self.data.min_area_m2, "max_area_m2": self.data.max_area_m2,
                               **site.provenance}}
            if ground is not None:
                sample["ground.npy"] = np.ascontiguousarray(ground[window])
            for member, mask in zip(self.members, tile_masks):
                sample[member] = np.ascontiguousarray(mask)
            writers[split].write(sample)
            self.tally.add(split, site.name, tile_masks)
            if split == "train":
                yield sample["dsm.npy"], sample["chm.npy"]
        self.site_meta[site.name] = {"split": self.site_splits.get(site.name, "block"), "tiles": len(kept),
                                     "shape": list(site.dsm.shape), **site.provenance}
        self.site_meta[site.name].update(blocks or {})

    def manifest(self, shards: dict, normalization: dict) -> dict:
        d = self.data
        return {
            "format_version": FORMAT_VERSION, "task": d.task,
            "thresholds_m": list(d.thresholds_m), "mask_members": [m[:-len(".npy")] for m in self.members],
            "tile_px": d.tile_px, "pixel_size_m": d.pixel_size_m, "crs": self.crs,
            "min_area_m2": d.min_area_m2, "max_area_m2": d.max_area_m2,
            "split_rule": _describe_rule(self.rule, d),
            "splits": {s: {"shards": shards[s], "samples": self.tally.tiles[s]} for s in SPLITS},
            "summary": self.tally.summary(d.thresholds_m), "sites": self.site_meta,
            "normalization": normalization,
        }


def build_dataset(cfg, sources, out: str | Path) -> dict:
    """Write shards for every split and the manifest into `out`; returns the manifest.

    Everything is built in `out/.staging` and moved in only once complete (see commit_staged): a crash, a kill
    or a full disk while building leaves the previous dataset in `out` whole.
    """
    from lib.data.normalize import compute_height_stats

    out = Path(out)
    stage, writers = out / ".staging", {}
    try:
        shutil.rmtree(stage, ignore_errors=True)  # what a killed build left
        stage.mkdir(parents=True)
        build = _Build(cfg, sources, stage)
        max_bytes = int(cfg.data.shard_mb * 2 ** 20)
        writers = {s: ShardWriter(stage, s, max_bytes=max_bytes) for s in SPLITS}
        normalization = compute_height_stats(build.write_sites(sources, writers))
        shards = {s: w.close() for s, w in writers.items()}
        if not build.tally.tiles["train"]:
            raise DataError("no training tile survived tiling and the valid-fraction filter",
                            hint="lower data.tile_px or data.min_valid_fraction, or add sites")
        for split in ("val", "test"):
            if not build.tally.tiles[split]:
                log.warning("the %s split has no tiles: too few blocks or sites (lower data.block_px or add "
                            "sites); evaluate.py --split %s will have nothing to score", split, split)
        manifest = build.manifest(shards, normalization)
        write_manifest(stage, manifest)
    except BaseException as exc:
        for writer in writers.values():
            with contextlib.suppress(OSError):  # closing a file on a full disk fails again
                writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write the dataset into {out}: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else ""),
                            hint="check free disk space and that the folder is writable; the previous "
                                 "dataset there, if any, is unchanged") from None
        raise
    commit_staged(stage, out, manifest)
    return manifest


def commit_staged(stage: Path, out: Path, manifest: dict) -> None:
    """Old manifest out, new shards in, new manifest in last (renames only); then stale files deleted.

    A kill in here leaves no manifest, so readers refuse the folder until a rerun completes; they never
    see a manifest that lists shards of another build.
    """
    (out / MANIFEST).unlink(missing_ok=True)
    listed = {e["file"] for split in manifest["splits"].values() for e in split["shards"]}
    for name in sorted(listed):
        os.replace(stage / name, out / name)
    os.replace(stage / MANIFEST, out / MANIFEST)
    shard = rf"({'|'.join(SPLITS)})-\d{{6}}\.tar"
    stale = re.compile(rf"{shard}|\.({shard}|{re.escape(MANIFEST)})\.\d+\.tmp")  # left by killed runs
    for path in out.iterdir():
        if path.name not in listed and stale.fullmatch(path.name):
            path.unlink()
    shutil.rmtree(stage, ignore_errors=True)


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
            "buffer_px": _buffer_px(data_cfg),
            "block_px_rule": "per site (sites.<name>.block_px, .draw): data.block_px, or where that leaves "
                             "a split without tiles, the side and seeded draw whose tile shares are closest "
                             "to the fractions with the fewest tiles lost (lib/data/tiling.py fit_block_split)",
            "note": "tiles whose extent plus the buffer meets another split's block are dropped"}
