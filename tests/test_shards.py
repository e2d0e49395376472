"""Tar shards: round-trip, rollover, atomic writes, and every refusal naming file and member."""
import io
import json
import os
import tarfile

import numpy as np
import pytest

from lib.core.errors import ShardError
from lib.data.shards import (ShardWriter, iter_shard, mask_member, read_manifest, verify_shard,
                        write_manifest)


def make_sample(i: int, rng: np.random.Generator, px: int = 16) -> dict:
    dsm = rng.normal(300, 10, (px, px)).astype(np.float32)
    dsm[0, i % px] = np.nan
    return {"__key__": f"site{i % 3:02d}_r{i:04d}_c0040",
            "dsm.npy": dsm,
            "chm.npy": rng.uniform(0, 30, (px, px)).astype(np.float32),
            mask_member(2): rng.choice(np.array([0, 1, 255], np.uint8), (px, px)),
            mask_member(2.5): rng.integers(0, 2, (px, px), dtype=np.uint8),
            "json": {"site": f"site{i % 3:02d}", "window": [i, 40, 16, 16], "thresholds": [2, 2.5]}}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, np.ndarray):
            assert b[k].dtype == v.dtype and b[k].shape == v.shape
            assert b[k].tobytes() == v.tobytes()  # bitwise, NaN included
        else:
            assert b[k] == v


def write(folder, samples, **kw) -> list[dict]:
    with ShardWriter(folder, "train", **kw) as w:
        for s in samples:
            w.write(s)
    return w.shards


def raw_tar(path, members: list[tuple[str, bytes]], kind=tarfile.REGTYPE) -> None:
    """A tar written by Python's tarfile (pax headers), for hostile or foreign shards."""
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.mtime = len(data), kind, 1.5  # float mtime: forces a pax header
            t.addfile(info, io.BytesIO(data))


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_mask_member_names():
    assert [mask_member(t) for t in (2, 2.0, 2.5, 10)] == ["mask_2m.npy", "mask_2m.npy", "mask_2.5m.npy",
                                                           "mask_10m.npy"]


def test_round_trip_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(i, rng) for i in range(7)]
    shards = write(tmp_path, samples)
    assert [s["file"] for s in shards] == ["train-000000.tar"] and shards[0]["samples"] == 7
    assert shards[0]["bytes"] == os.path.getsize(tmp_path / "train-000000.tar")
    out = list(iter_shard(tmp_path / "train-000000.tar"))
    assert len(out) == 7
    for a, b in zip(samples, out):
        assert_same(a, b)
    with tarfile.open(tmp_path / "train-000000.tar") as t:  # plain tar that standard tools read
        assert t.getnames()[:2] == ["site00_r0000_c0040.dsm.npy", "site00_r0000_c0040.chm.npy"]


def test_same_samples_same_bytes(tmp_path):
    rng = np.random.default_rng(1)
    samples = [make_sample(i, rng) for i in range(3)]
    a = write(tmp_path / "a", samples)
    b = write(tmp_path / "b", samples)
    assert a[0]["sha256"] == b[0]["sha256"]
    verify_shard(tmp_path / "a" / a[0]["file"], a[0]["sha256"])


def test_rollover_by_size(tmp_path):
    rng = np.random.default_rng(2)
    samples = [make_sample(i, rng) for i in range(20)]
    one = sum(len(npy_bytes(v)) for k, v in samples[0].items() if k.endswith("npy"))
    shards = write(tmp_path, samples, max_bytes=4 * one)
    assert len(shards) > 3 and sum(s["samples"] for s in shards) == 20
    assert all(s["bytes"] <= 4 * one for s in shards)
    assert sorted(os.listdir(tmp_path)) == [s["file"] for s in shards]  # no temp files left
    keys = [x["__key__"] for s in shards for x in iter_shard(tmp_path / s["file"])]
    assert keys == [s["__key__"] for s in samples]
    big = write(tmp_path / "big", samples[:1], max_bytes=10)  # one sample over the cap still fits alone
    assert big[0]["samples"] == 1


def test_crash_mid_shard_leaves_no_final_file(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train") as w:
            w.write(make_sample(0, rng))
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    w = ShardWriter(tmp_path, "val")  # a hard kill: nothing closes the writer
    w.write(make_sample(1, rng))
    assert not any(name.endswith(".tar") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("cut", [100, 512 + 50, 3000, -1024, -1030])
def test_truncated_shard(tmp_path, cut):
    rng = np.random.default_rng(4)
    path = tmp_path / write(tmp_path, [make_sample(i, rng) for i in range(3)])[0]["file"]
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="truncated|bad tar header") as e:
        list(iter_shard(path))
    assert str(path) in str(e.value) and "member '" in str(e.value)


def test_bad_npy_header_names_member(tmp_path):
    path = tmp_path / "x.tar"
    raw_tar(path, [("k1.dsm.npy", b"\x93NUMPY\x01\x00garbage-header" + bytes(64))])
    with pytest.raises(ShardError, match=r"x\.tar.*'k1\.dsm\.npy'"):
        list(iter_shard(path))


def test_pickle_npy_refused(tmp_path):
    path = tmp_path / "x.tar"
    raw_tar(path, [("k1.dsm.npy", npy_bytes(np.array([{"a": 1}], dtype=object)))])
    with pytest.raises(ShardError, match=r"'k1\.dsm\.npy'.*(?i:pickle|object)"):
        list(iter_shard(path))
    with pytest.raises(ShardError, match="numeric ndarray"):
        ShardWriter(tmp_path / "w", "t").write({"__key__": "k", "a.npy": np.array([None])})


@pytest.mark.parametrize("name", ["../evil.npy", "/abs.npy", "dir/k.dsm.npy", "k..npy"])
def test_path_traversal_refused(tmp_path, name):
    path = tmp_path / "x.tar"
    raw_tar(path, [(name, npy_bytes(np.zeros(2)))])
    with pytest.raises(ShardError, match="refused|not named"):
        list(iter_shard(path))


def test_symlink_member_refused(tmp_path):
    path = tmp_path / "x.tar"
    raw_tar(path, [("k.link", b"")], kind=tarfile.SYMTYPE)
    with pytest.raises(ShardError, match="not a regular file"):
        list(iter_shard(path))


def test_foreign_pax_tar_reads(tmp_path):
    path = tmp_path / "x.tar"
    raw_tar(path, [("k1.dsm.npy", npy_bytes(np.arange(4.0))), ("k1.json", b'{"site": "a"}'),
                   ("k2.json", b'{"site": "b"}')])
    out = list(iter_shard(path))
    assert [s["__key__"] for s in out] == ["k1", "k2"]
    assert np.array_equal(out[0]["dsm.npy"], np.arange(4.0)) and out[1]["json"] == {"site": "b"}


def test_missing_required_member(tmp_path):
    rng = np.random.default_rng(5)
    sample = make_sample(0, rng)
    del sample["chm.npy"]
    path = tmp_path / write(tmp_path, [sample])[0]["file"]
    with pytest.raises(ShardError, match=r"site00_r0000_c0040.*chm\.npy"):
        list(iter_shard(path, required={"dsm.npy", "chm.npy"}))


def test_members_start_stop(tmp_path):
    rng = np.random.default_rng(6)
    samples = [make_sample(i, rng) for i in range(9)]
    path = tmp_path / write(tmp_path, samples)[0]["file"]
    out = list(iter_shard(path, members={"dsm.npy", "json"}, start=2, stop=6))
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples[2:6]]
    for a, b in zip(samples[2:6], out):
        assert_same({k: a[k] for k in ("__key__", "dsm.npy", "json")}, b)
    assert len(list(iter_shard(path, start=8, stop=100))) == 1


def test_writer_refuses_bad_keys_and_duplicates(tmp_path):
    w = ShardWriter(tmp_path, "t")
    for key in ["a.b", "a/b", "", None]:
        with pytest.raises(ShardError, match="key"):
            w.write({"__key__": key, "x.npy": np.zeros(1)})
    w.write({"__key__": "a", "x.npy": np.zeros(1)})
    with pytest.raises(ShardError, match="twice"):
        w.write({"__key__": "a", "x.npy": np.zeros(1)})
    with pytest.raises(ShardError, match="strict JSON"):
        w.write({"__key__": "b", "json": {"nodata": float("nan")}})
    w.abort()


def test_checksum_mismatch(tmp_path):
    rng = np.random.default_rng(7)
    shard = write(tmp_path, [make_sample(0, rng)])[0]
    path = tmp_path / shard["file"]
    verify_shard(path, shard["sha256"])
    data = bytearray(path.read_bytes())
    data[2000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="checksum mismatch") as e:
        verify_shard(path, shard["sha256"])
    assert str(path) in str(e.value)


def test_manifest_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(8)
    shards = write(tmp_path, [make_sample(i, rng) for i in range(2)])
    manifest = {"splits": {"train": {"shards": shards}}, "thresholds": [2, 2.5]}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "train-000000.tar"]
    bad = {"splits": {"train": {"shards": [{"file": "../x.tar", "samples": 1, "sha256": "0"}]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="bad shard entry"):
        read_manifest(tmp_path)
    with pytest.raises(ShardError, match="cannot read manifest"):
        read_manifest(tmp_path / "nowhere")
