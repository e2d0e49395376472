"""Fuzz the shard and manifest readers: edited samples and manifests, byte flips and truncations, each with
the manifest's checksum recomputed (as a buggy writer would leave it), so only the readers' own checks stand.

Each case ends in a ShardError naming the shard (and member) or the manifest, or is read in full through the
DataLoader with every batch holding what the manifest promises.
"""
import hashlib
import io
import json
import random
import shutil
import tarfile

import numpy as np
import pytest

from lib.core.errors import ShardError
from lib.data.dataset import ShardDataset, build_loader
from lib.data.sample_check import MASK_LABELS
from lib.data.shards import iter_shard


class RawJSON(str):
    """JSON text written as is: nesting json.dumps itself cannot write."""


def _deep(n: int) -> RawJSON:
    return RawJSON('{"site": "a", "x": ' + "[" * n + "]" * n + "}")


def _npy_header(text: str) -> bytes:
    """A version 1 .npy with this header text (numpy parses it as a Python literal) and no data."""
    header = text.encode().ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _sample_edits(px: int):
    """name -> edit of one decoded sample (in place); each a kind of bad content the readers must catch."""
    def mask(sample):
        return sorted(m for m in sample if m.startswith("mask_"))

    def set_first_mask(value):
        return lambda s: s.__setitem__(mask(s)[0], value)
    return {
        "label_2": lambda s: s[mask(s)[0]].__setitem__((0, 0), 2),
        "label_37": lambda s: s[mask(s)[-1]].__setitem__((3, 5), 37),
        "label_254": lambda s: s[mask(s)[0]].__setitem__((1, 1), 254),
        "mask_int64": set_first_mask(np.zeros((px, px), np.int64)),
        "mask_float": set_first_mask(np.zeros((px, px), np.float32)),
        "mask_bool": set_first_mask(np.zeros((px, px), bool)),
        "mask_short": set_first_mask(np.zeros((px - 1, px), np.uint8)),
        "mask_3d": set_first_mask(np.zeros((1, px, px), np.uint8)),
        "dsm_short": lambda s: s.__setitem__("dsm.npy", np.zeros((px - 1, px), np.float32)),
        "dsm_wide": lambda s: s.__setitem__("dsm.npy", np.zeros((px, px + 1), np.float32)),
        "dsm_1d": lambda s: s.__setitem__("dsm.npy", np.zeros(px * px, np.float32)),
        "dsm_4d": lambda s: s.__setitem__("dsm.npy", np.zeros((1, 1, px, px), np.float32)),
        "dsm_complex": lambda s: s.__setitem__("dsm.npy", np.zeros((px, px), np.complex64)),
        "dsm_bool": lambda s: s.__setitem__("dsm.npy", np.zeros((px, px), bool)),
        "dsm_int16": lambda s: s.__setitem__("dsm.npy", np.zeros((px, px), np.int16)),   # accepted: numbers
        "dsm_nan": lambda s: s["dsm.npy"].__setitem__((0, 0), np.nan),                   # accepted: nodata
        "chm_3x": lambda s: s.__setitem__("chm.npy", np.zeros((3, px, px), np.float32)),
        "npy_header_unclosed": lambda s: s.__setitem__("chm.npy", _npy_header("{'descr': '<f4', 'shape': (32,")),
        "npy_header_not_dict": lambda s: s.__setitem__("chm.npy", _npy_header("[1, 2]")),
        "json_list": lambda s: s.__setitem__("json", [1, 2]),
        "json_deep": lambda s: s.__setitem__("json", _deep(5000)),
        "json_no_site": lambda s: s["json"].pop("site"),
    }


def _manifest_edits():
    return {
        "deep": lambda m: m.__setitem__("sites", "DEEP"),
        "not_object": lambda m: m.clear() or m.setdefault("splits", [1]),
        "thresholds_negative": lambda m: m.__setitem__("thresholds_m", [-5.0, 5.0, 10.0, 15.0]),
        "thresholds_string": lambda m: m.__setitem__("thresholds_m", "2,5"),
        "thresholds_repeated": lambda m: m.__setitem__("thresholds_m", [2.0, 2.0, 5.0, 10.0]),
        "tile_px_string": lambda m: m.__setitem__("tile_px", "32"),
        "tile_px_zero": lambda m: m.__setitem__("tile_px", 0),
        "tile_px_other": lambda m: m.__setitem__("tile_px", 64),
        "pixel_size_nan_text": lambda m: m.__setitem__("pixel_size_m", "nan"),
        "mask_members_path": lambda m: m.__setitem__("mask_members", ["../x"] * 4),
        "mask_members_short": lambda m: m.__setitem__("mask_members", m["mask_members"][:2]),
        "normalization_list": lambda m: m.__setitem__("normalization", [1]),
        "shard_entry_bad": lambda m: m["splits"]["train"]["shards"][0].__setitem__("samples", "9"),
        "split_missing": lambda m: m["splits"].pop("train"),
    }


def _member_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value)
        return buf.getvalue()
    return (value if isinstance(value, RawJSON) else json.dumps(value)).encode()


def _rewrite(root, manifest, entry, samples) -> None:
    """Write `samples` as the shard of `entry` (plain tarfile: a writer with bugs) and reseal the manifest."""
    with tarfile.open(root / entry["file"], "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for member, value in sample.items():
                if member != "__key__":
                    data = _member_bytes(value)
                    info = tarfile.TarInfo(f"{sample['__key__']}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    _reseal(root, manifest, entry)


def _reseal(root, manifest, entry) -> None:
    entry["sha256"] = hashlib.sha256((root / entry["file"]).read_bytes()).hexdigest()
    _write_manifest(root, manifest)


def _write_manifest(root, manifest) -> None:
    """manifest.json, with a "DEEP" value nested 5000 lists deep (json.dumps cannot write that itself)."""
    (root / "manifest.json").write_text(json.dumps(manifest).replace('"DEEP"', "[" * 5000 + "]" * 5000))


def _read_all(root) -> int:
    """Every train batch through the DataLoader; asserts what an accepted batch must hold."""
    dataset = ShardDataset(root, "train", shuffle=False)
    px = json.loads((root / "manifest.json").read_text())["tile_px"]
    batches = 0
    for batch in build_loader(dataset, 4, 0):
        b = len(batch["key"])
        assert batch["dsm"].shape == (b, 1, px, px) and batch["chm"].shape == (b, 1, px, px)
        assert batch["masks"].shape[-2:] == (px, px)
        assert set(batch["masks"].unique().tolist()) <= set(MASK_LABELS)
        batches += 1
    return batches


def _expect_clear_or_ok(root, names: list[str], case) -> str:
    """'clear' (ShardError naming one of `names`) or 'ok' (read in full, checked); anything else fails."""
    try:
        _read_all(root)
    except ShardError as exc:
        assert any(str(n) in str(exc) for n in names), f"{case}: {exc}"
        return "clear"
    except Exception as exc:
        pytest.fail(f"{case}: {type(exc).__name__}: {exc}")
    return "ok"


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "data", root)
    return root


def test_edited_samples_are_refused_by_shard_and_member(dataset_copy):
    root = dataset_copy
    pristine = json.loads((root / "manifest.json").read_text())
    entry0 = pristine["splits"]["train"]["shards"][0]
    original = list(iter_shard(root / entry0["file"]))
    accepted = {"dsm_int16", "dsm_nan", "mask_bool"}
    for name, edit in _sample_edits(pristine["tile_px"]).items():
        manifest = json.loads(json.dumps(pristine))
        entry = manifest["splits"]["train"]["shards"][0]
        samples = [{k: (v.copy() if isinstance(v, np.ndarray) else json.loads(json.dumps(v)))
                    for k, v in s.items()} for s in original]
        edit(samples[1])
        _rewrite(root, manifest, entry, samples)
        outcome = _expect_clear_or_ok(root, [root / entry["file"]], name)
        assert outcome == ("ok" if name in accepted else "clear"), name
        if outcome == "clear" and name.startswith(("label", "mask", "dsm", "chm")):
            try:
                _read_all(root)
            except ShardError as exc:  # names the sample and the member too
                assert samples[1]["__key__"] in str(exc) and ".npy" in str(exc), str(exc)


def test_edited_manifests_are_refused_by_name(dataset_copy):
    root = dataset_copy
    pristine = (root / "manifest.json").read_text()
    for name, edit in _manifest_edits().items():
        manifest = json.loads(pristine)
        edit(manifest)
        _write_manifest(root, manifest)
        outcome = _expect_clear_or_ok(root, [root / "manifest.json", root], name)
        assert outcome == "clear", name


@pytest.mark.parametrize("seed", [11, 12])
def test_random_byte_edits_of_a_resealed_shard(dataset_copy, seed):
    """Flips, runs of random bytes and truncations anywhere in the shard: clear or checked, never a crash."""
    root, rng = dataset_copy, random.Random(seed)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    pristine = (root / entry["file"]).read_bytes()
    outcomes = []
    for case in range(40):
        data = bytearray(pristine)
        kind = rng.choice(["flip", "run", "truncate", "header"])
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        else:
            at = rng.randrange(512) if kind == "header" else rng.randrange(len(data))
            for i in range(at, min(len(data), at + (1 if kind == "flip" else rng.randint(2, 64)))):
                data[i] = rng.randrange(256) if kind != "flip" else data[i] ^ (1 << rng.randrange(8))
        (root / entry["file"]).write_bytes(bytes(data))
        _reseal(root, manifest, entry)
        outcomes.append(_expect_clear_or_ok(root, [root / entry["file"]], (seed, case, kind)))
    assert "clear" in outcomes
