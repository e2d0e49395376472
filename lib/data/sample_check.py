"""What each shard sample must hold, from its manifest (tile side, bands, classes), checked as it is read;
and the types of the manifest's own entries that readers use, checked when it is read.

A shard whose checksum was recomputed over bad content (a buggy writer) otherwise trains on mask label 37,
returns a 63 x 64 tile as is, or fails inside np.stack or the DataLoader's collate; here it is a ShardError
naming the shard, the sample and the member.
"""
import math

import numpy as np

from lib.core.errors import ShardError
from lib.gaps.masks import IGNORE

MASK_LABELS = (0, 1, IGNORE)                  # not gap, gap, nodata
_BAD_LABEL = np.ones(256, bool)
_BAD_LABEL[list(MASK_LABELS)] = False
NUMERIC = "fiu"                               # float, signed and unsigned integer dtypes


def _positive_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _number_list(value, positive: bool = True) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) and (v > 0 or not positive) for v in value)


MANIFEST_ENTRIES = {  # entry -> (check, what it must be); absent entries are not checked here
    "tile_px": (lambda v: _positive_int(v) is not None, "an integer > 0"),
    "bands": (lambda v: _positive_int(v) is not None, "an integer > 0"),
    "pixel_size_m": (lambda v: _number_list([v]), "a finite number > 0"),
    "thresholds_m": (lambda v: _number_list(v) and len(set(v)) == len(v), "distinct finite heights > 0 m"),
    "mask_members": (lambda v: isinstance(v, list) and v and all(
        isinstance(s, str) and s.startswith("mask_") and "." not in s and "/" not in s for s in v),
        "a list of stems like 'mask_2m'"),
    "class_names": (lambda v: isinstance(v, list) and v and all(isinstance(s, str) for s in v),
                    "a list of class names"),
    "normalization": (lambda v: isinstance(v, dict), "an object"),
}


def check_manifest(manifest: dict, path) -> None:
    """ShardError naming the manifest and the entry when an entry readers use has the wrong type or range."""
    for key, (ok, what) in MANIFEST_ENTRIES.items():
        if key in manifest and not ok(manifest[key]):
            raise ShardError(f"{path}: {key!r} must be {what}, found {str(manifest[key])[:80]}",
                             hint="the manifest was edited or written by another tool; re-run prepare_data")
    stems, thresholds = manifest.get("mask_members"), manifest.get("thresholds_m")
    if stems is not None and thresholds is not None and len(stems) != len(thresholds):
        raise ShardError(f"{path}: {len(stems)} 'mask_members' for {len(thresholds)} 'thresholds_m'")


class SampleSpec:
    """The manifest's promises about every sample: tiles of tile_px, images of `bands`, labels < classes."""

    def __init__(self, manifest: dict, meta_keys=()):
        self.meta_keys = tuple(meta_keys)
        self.tile_px = _positive_int(manifest.get("tile_px"))
        self.bands = _positive_int(manifest.get("bands"))
        names = manifest.get("class_names")
        self.classes = len(names) if isinstance(names, list) else None

    def check(self, raw: dict, path) -> dict:
        """raw (a decoded sample of shard `path`), after checking each member; ShardError otherwise."""
        key, sides = raw["__key__"], {}
        for member, value in raw.items():
            if member.endswith(".npy"):
                problem = self._array_problem(member[:-len(".npy")], value)
                sides.setdefault(value.shape[-2:], member)
                if problem or len(sides) > 1:
                    first = next(iter(sides))
                    problem = problem or f"shape {value.shape}, but {sides[first]!r} is {first} (H, W)"
                    raise ShardError(f"{path}: sample {key!r} member {member!r}: {problem}",
                                     hint="the shard does not hold what its manifest describes; re-run prepare_data")
        meta = raw.get("json", {})
        if not isinstance(meta, dict):
            raise ShardError(f"{path}: sample {key!r} member 'json' is {type(meta).__name__}, expected an object")
        missing = [k for k in self.meta_keys if k not in meta]
        if missing:
            raise ShardError(f"{path}: sample {key!r} member 'json' has no {missing[0]!r}; found {sorted(meta)}",
                             hint="set meta_keys to fields the json has")
        if "label" in meta and self.classes is not None:
            label = meta["label"]
            if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < self.classes):
                raise ShardError(f"{path}: sample {key!r} member 'json': label {label!r} is not a class index "
                                 f"0..{self.classes - 1}")
        return raw

    def _array_problem(self, stem: str, a: np.ndarray) -> str | None:
        """What is wrong with one array member, or None."""
        px = self.tile_px
        if stem.startswith("mask_"):
            if a.dtype not in (np.uint8, np.bool_):
                return f"dtype {a.dtype}, expected uint8"
            if a.ndim != 2 or px and a.shape != (px, px):
                return f"shape {a.shape}, expected ({px or 'H'}, {px or 'W'}) of the manifest's tile_px"
            if a.dtype == np.uint8 and _BAD_LABEL[a].any():
                bad = [int(v) for v in np.unique(a) if v not in MASK_LABELS][:5]
                return f"labels {bad} outside {{0 (no gap), 1 (gap), 255 (nodata)}}"
            return None
        if a.dtype.kind not in NUMERIC:
            return f"dtype {a.dtype}, expected numbers"
        if stem == "image":
            want = (self.bands, px, px)
            if a.ndim != 3 or any(w and s != w for s, w in zip(a.shape, want)):
                return f"shape {a.shape}, expected (bands {self.bands or 'C'}, {px or 'H'}, {px or 'W'})"
            return None
        if a.ndim not in (2, 3) or a.ndim == 3 and a.shape[0] != 1 or px and a.shape[-2:] != (px, px):
            return f"shape {a.shape}, expected ({px or 'H'}, {px or 'W'}) of the manifest's tile_px"
        return None
