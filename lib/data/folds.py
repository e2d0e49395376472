"""k-fold over sites, for comparing models: the dataset's train and val sites are cut into k groups;
fold i validates on group i and trains on the others. Test sites are never read.

Each fold is an ordinary dataset folder (shards + manifest) that the Trainer reads unchanged; its
normalisation and gap fractions are recomputed from its own train tiles, so no statistic of a fold's
validation sites leaks into its training. Folds are rebuilt only when the source dataset changes.
Tile-classification datasets have no sites and are refused with what to do instead.
"""
from pathlib import Path

import numpy as np

from lib.core.errors import ConfigError, DataError
from lib.gaps.masks import IGNORE, threshold_tag
from lib.data.normalize import compute_height_stats
from lib.data.shards import ShardWriter, iter_shard, read_manifest, write_manifest

SPLITS = ("train", "val")


def site_folds(manifest: dict, k: int, seed: int) -> list[list[str]]:
    """k groups (sizes differ by at most one) of the non-test sites, shuffled with `seed`."""
    sites = sorted(name for name, meta in manifest.get("sites", {}).items() if meta.get("split") != "test")
    if k < 2 or len(sites) < k:
        raise DataError(f"k-fold over sites needs 2 <= k <= the {len(sites)} train+val sites "
                        f"({', '.join(sites) or 'none listed in the manifest'}), found k={k}",
                        hint="lower search.folds, or prepare the data with more sites")
    order = np.random.default_rng(seed).permutation(len(sites))
    return [sorted(sites[i] for i in part) for part in np.array_split(order, k)]


class _Tally:
    """Tiles, sites and per-threshold gap / valid pixel counts of one split."""

    def __init__(self, k: int):
        self.tiles, self.sites = 0, set()
        self.gap, self.valid = np.zeros(k, np.int64), np.zeros(k, np.int64)

    def add(self, site: str, masks: np.ndarray) -> None:           # masks (K, H, W) uint8
        self.tiles += 1
        self.sites.add(site)
        self.gap += (masks == 1).sum(axis=(1, 2))
        self.valid += (masks != IGNORE).sum(axis=(1, 2))

    def summary(self, thresholds) -> dict:
        frac = self.gap / np.maximum(self.valid, 1)
        return {"tiles": self.tiles, "sites": sorted(self.sites),
                "gap_fraction": {threshold_tag(t): round(float(f), 5) for t, f in zip(thresholds, frac)}}


def build_fold(source: Path, out: Path, val_sites: list[str], signature: dict) -> dict:
    """Re-shard the source's train+val samples into this fold's train/val; returns its manifest."""
    manifest = read_manifest(source)
    thresholds, members = manifest["thresholds_m"], [f"{m}.npy" for m in manifest["mask_members"]]
    shard_bytes = max(s["bytes"] for split in SPLITS for s in manifest["splits"][split]["shards"])
    writers = {s: ShardWriter(out, s, max_bytes=max(shard_bytes, 2 ** 20)) for s in SPLITS}
    tallies = {s: _Tally(len(thresholds)) for s in SPLITS}

    def reroute():
        """Write every sample to its fold split; yield the fold's train tiles for the statistics."""
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                for sample in iter_shard(source / shard["file"]):
                    site = sample["json"]["site"]
                    new = "val" if site in val_sites else "train"
                    sample["json"] = {**sample["json"], "split": new}
                    writers[new].write(sample)
                    tallies[new].add(site, np.stack([sample[m] for m in members]))
                    if new == "train":
                        yield sample["dsm.npy"], sample.get("chm.npy")

    normalization = compute_height_stats(reroute(), manifest["normalization"].get("ref_quantile", 0.05))
    shards = {s: w.close() for s, w in writers.items()}
    sites = {name: {**meta, "split": "val" if name in val_sites else "train"}
             for name, meta in manifest.get("sites", {}).items() if meta.get("split") != "test"}
    fold = {k: v for k, v in manifest.items() if k != "sha256"}
    fold.update(splits={s: {"shards": shards[s], "samples": tallies[s].tiles} for s in SPLITS},
                summary={s: tallies[s].summary(thresholds) for s in SPLITS}, sites=sites,
                normalization=normalization, split_rule={"rule": "site_kfold", **signature})
    write_manifest(out, fold)
    return fold


def prepare_folds(data_root: str | Path, out_dir: str | Path, k: int, seed: int) -> list[str]:
    """Dataset folders out_dir/fold<i> (built, or reused when built from the same source); their paths."""
    source, out_dir = Path(data_root), Path(out_dir)
    manifest = read_manifest(source)
    if manifest.get("task") == "classification":
        tiles = sum(manifest["summary"][s]["tiles"] for s in SPLITS)
        raise ConfigError(f"search.folds={k}: k-fold here is by site, for segmentation and regression datasets; "
                          f"{source} is a classification dataset ({tiles} train+val tiles in "
                          f"{len(manifest['class_names'])} classes, no sites)",
                          hint="drop --folds (search.folds=0): points are then compared on the dataset's own "
                               "val split; to see seed noise, repeat the search with another "
                               "--run.seed and --name")
    shards = [s["sha256"] for split in SPLITS for s in manifest["splits"][split]["shards"]]
    roots = []
    for i, val_sites in enumerate(site_folds(manifest, k, seed)):
        out = out_dir / f"fold{i}"
        signature = {"source": str(source.resolve()), "source_shards": shards, "fold": i, "folds": k,
                     "seed": seed, "val_sites": val_sites}
        if not (out / "manifest.json").exists() or read_manifest(out).get("split_rule") != \
                {"rule": "site_kfold", **signature}:
            build_fold(source, out, val_sites, signature)
        roots.append(str(out))
    return roots
