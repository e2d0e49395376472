"""A trained model's recipe: the config keys that change what training produces, hashed.

Two runs with the same recipe hash on data with the same digest (lib.data.shards.manifest_digest) trained
the same model, whatever their names, output folders, devices, logging and evaluation settings. The
dataset is identified by its digest, so the keys that only prepare data (and the paths they read) are
not part of the recipe. config_hash (lib.core.config) hashes everything, for trial ids.
"""
import hashlib
import json

from lib.core.config import config_to_dict

ALL = "*"
NOT_RECIPE = {
    "run": ("name", "output_root", "device"),
    "data": ("root", "synthetic_sites", "synthetic_size_px", "sites", "raster_folder", "class_folder",
             "stride_px", "min_valid_fraction", "min_area_m2", "max_area_m2", "split", "split_fractions",
             "block_px", "test_sites", "shard_mb", "cache", "hybrid_chms", "hybrid_per_chm"),
    "train": ("checkpoint_every_steps", "profile_steps"),
    "log": ALL, "eval": ALL, "predict": ALL, "search": ALL,
}


def recipe(cfg) -> dict:
    """The resolved config without the keys in NOT_RECIPE."""
    out = {}
    for section, values in config_to_dict(cfg).items():
        dropped = NOT_RECIPE.get(section, ())
        if dropped != ALL:
            out[section] = {k: v for k, v in values.items() if k not in dropped}
    return out


def recipe_hash(cfg) -> str:
    """Short stable hash of recipe(cfg)."""
    return hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()[:12]
