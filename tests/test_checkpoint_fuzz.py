"""Fuzz the checkpoint readers: byte flips, truncations and edited entries (saved again with a fresh digest,
as a buggy writer would leave them). Each case is a ModelError naming the file, or a load whose contents
are exactly what was saved; the shipped weights (no digest, vouched for by their card) keep loading.
"""
import logging
import random

import pytest
import torch

from conftest import make_checkpoint
from lib.core.errors import ForestGapsError
from lib.infer.loading import load_model
from lib.train.checkpoint import DIGEST, atomic_torch_save, load_checkpoint, payload_digest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, payload) of a tiny checkpoint written by atomic_torch_save (so with its digest)."""
    folder = tmp_path_factory.mktemp("ckpt")
    payload = torch.load(make_checkpoint(folder / "plain.ckpt"), weights_only=True)
    atomic_torch_save(payload, folder / "good.ckpt")
    return folder / "good.ckpt", payload


def _clear(path, exc: Exception) -> bool:
    return isinstance(exc, ForestGapsError) and str(path) in str(exc)


def _load_or_error(path, case, reference: str) -> str:
    """'clear' or 'ok' (what loads is exactly the saved payload, and it builds a model); fails otherwise."""
    try:
        ckpt = load_checkpoint(path)
        load_model(path)
    except Exception as exc:
        assert _clear(path, exc), f"{case}: {type(exc).__name__}: {exc}"
        return "clear"
    assert payload_digest(ckpt) == reference, f"{case}: loaded different contents without an error"
    return "ok"


@pytest.mark.parametrize("seed", [1, 2])
def test_byte_flips_and_truncations(saved, tmp_path, seed):
    path, payload = saved
    data, rng = path.read_bytes(), random.Random(seed)
    reference = payload_digest(payload)
    outcomes = []
    for case in range(30):
        edited = bytearray(data)
        if case % 5 == 4:
            edited = edited[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                edited[rng.randrange(len(edited))] ^= 1 << rng.randrange(8)
        target = tmp_path / f"{seed}_{case}.ckpt"
        target.write_bytes(bytes(edited))
        outcomes.append(_load_or_error(target, (seed, case), reference))
    assert outcomes.count("clear") >= 20, outcomes          # torch alone let 18 of 20 flips through


def test_a_flip_inside_a_tensor_is_caught(saved, tmp_path):
    """The case torch misses: the zip structure intact, one weight changed."""
    path, payload = saved
    data = bytearray(path.read_bytes())
    weight = payload["model"]["encoder.blocks.0.conv1.conv.weight"] if "encoder.blocks.0.conv1.conv.weight" \
        in payload["model"] else next(v for v in payload["model"].values() if torch.is_tensor(v) and v.numel() > 8)
    at = bytes(data).find(weight.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:16])
    assert at > 0
    data[at + 3] ^= 0x10
    target = tmp_path / "flip.ckpt"
    target.write_bytes(bytes(data))
    with pytest.raises(ForestGapsError, match="do not match the digest"):
        load_checkpoint(target)


def _edits():
    """name -> edit of a checkpoint payload (in place)."""
    def model(fn):
        return lambda c: fn(c["model"])

    def first_conv(c):
        return next(k for k, v in c["model"].items() if torch.is_tensor(v) and v.dim() == 4)
    return {
        "no_normalization": lambda c: c.pop("normalization"),
        "normalization_list": lambda c: c.__setitem__("normalization", [5.0, 0.05]),
        "normalization_empty": lambda c: c.__setitem__("normalization", {}),
        "normalization_nan": lambda c: c["normalization"].__setitem__("scale", float("nan")),
        "normalization_text": lambda c: c["normalization"].__setitem__("scale", "5"),
        "unknown_model": lambda c: c["config"]["model"].__setitem__("name", "unet_9000"),
        "config_not_dict": lambda c: c.__setitem__("config", [1]),
        "config_bad_value": lambda c: c["config"]["data"].__setitem__("thresholds_m", [-5.0]),
        "config_deep": lambda c: c["config"]["model"].__setitem__("extra", _deep(200)),
        "model_not_dict": lambda c: c.__setitem__("model", [1]),
        "weight_not_tensor": model(lambda m: m.__setitem__(next(iter(m)), [1.0])),
        "weight_nan": lambda c: c["model"][first_conv(c)].fill_(float("nan")),
        "weight_inf": lambda c: c["model"][first_conv(c)].view(-1)[0].fill_(float("inf")),
        "weight_int32": lambda c: c["model"].__setitem__(first_conv(c), c["model"][first_conv(c)].int()),
        "weight_shape": lambda c: c["model"].__setitem__(first_conv(c), c["model"][first_conv(c)][:1]),
        "weight_missing": lambda c: c["model"].pop(first_conv(c)),
        "weight_extra": model(lambda m: m.__setitem__("surplus.weight", torch.zeros(3))),
        "step_text": lambda c: c.__setitem__("step", "7"),
        "metrics_list": lambda c: c.__setitem__("metrics", [1]),
        "version_text": lambda c: c.__setitem__("version", "v5"),
    }


def _deep(n: int):
    value = {}
    for _ in range(n):
        value = {"a": value}
    return value


@pytest.mark.parametrize("name", list(_edits()))
def test_edited_entries_are_refused_naming_the_file(saved, tmp_path, name):
    _, payload = saved
    ckpt = {k: v for k, v in torch.load(saved[0], weights_only=True).items() if k != DIGEST}
    _edits()[name](ckpt)
    target = tmp_path / f"{name}.ckpt"
    atomic_torch_save(ckpt, target)                                        # a valid digest over bad contents
    with pytest.raises(ForestGapsError) as info:
        load_model(target)
    assert str(target) in str(info.value), str(info.value)


def test_empty_and_foreign_files(tmp_path):
    for name, data in {"empty.ckpt": b"", "text.ckpt": b"hello", "zip.ckpt": b"PK\x03\x04" + bytes(40)}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ForestGapsError, match=str(tmp_path / name)):
            load_checkpoint(tmp_path / name)
    torch.save({"model": {}, "config": {}, DIGEST: 5}, tmp_path / "digest_int.ckpt")
    with pytest.raises(ForestGapsError, match="digest"):
        load_checkpoint(tmp_path / "digest_int.ckpt")


def test_old_checkpoints_without_a_digest_load_with_a_warning(tmp_path, caplog):
    path = make_checkpoint(tmp_path / "old.ckpt")                          # plain torch.save, no digest
    with caplog.at_level(logging.WARNING):
        ckpt = load_checkpoint(path)
    assert DIGEST not in ckpt and "has no digest" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = load_model(None or __import__("lib.infer.loading", fromlist=["x"]).resolve_checkpoint(None))
    assert loaded.thresholds_m and "has no digest" not in caplog.text       # the card vouched for it
