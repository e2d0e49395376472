"""ShardDataset: sample format, (seed, epoch) determinism, rank x worker split, cache == streaming."""
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from lib.data.dataset import ShardDataset, build_loader, calibrate_loader, rank_range, shard_parts, worker_range
from lib.core.errors import ShardError
from lib.data.shards import ShardWriter, mask_member, read_manifest, write_manifest

THRESHOLDS = [5, 2]  # deliberately not sorted: masks must follow the manifest's order
MASK_VALUE = {5: 1, 2: 255}  # each threshold's mask is constant: its value tells the channels apart
COUNTS = [7, 3, 9, 4, 6]  # uneven shards: 29 samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A split of 5 shards with uneven sample counts, 8 x 8 tiles; returns the folder."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    shards, i = [], 0
    for n in COUNTS:  # one writer per shard to control the counts exactly
        with ShardWriter(root, f"train{len(shards)}") as w:
            for _ in range(n):
                dsm = rng.normal(300, 5, (8, 8)).astype(np.float32)
                dsm[0, 0] = np.nan
                w.write({"__key__": f"site{i % 2}_r{i:04d}", "dsm.npy": dsm,
                         "chm.npy": np.full((8, 8), i, np.float32),
                         **{mask_member(t): np.full((8, 8), MASK_VALUE[t], np.uint8) for t in THRESHOLDS},
                         "extra.npy": np.zeros(3), "json": {"site": f"site{i % 2}", "i": i}})
                i += 1
        shards += w.shards
    write_manifest(root, {"splits": {"train": {"shards": shards}}, "thresholds_m": THRESHOLDS})
    return root


def keys(dataset, epoch=0) -> list[str]:
    dataset.set_epoch(epoch)
    return [s["key"] for s in dataset]


def loader_keys(loader, epoch) -> tuple[list[str], int]:
    """Keys in loader order and the number of batches."""
    loader.dataset.set_epoch(epoch)
    batches = [b["key"] for b in loader]
    return [k for b in batches for k in b], len(batches)


def test_sample_format(folder):
    ds = ShardDataset(folder, "train", shuffle=False)
    samples = list(ds)
    assert len(samples) == len(ds) == sum(COUNTS)
    s = samples[3]
    assert s["key"] == "site1_r0003" and s["site"] == "site1"
    assert s["dsm"].shape == (1, 8, 8) and s["dsm"].dtype == torch.float32 and torch.isnan(s["dsm"][0, 0, 0])
    assert torch.equal(s["chm"], torch.full((1, 8, 8), 3.0))
    assert s["masks"].dtype == torch.uint8 and s["masks"].shape == (2, 8, 8)
    assert s["masks"][:, 0, 0].tolist() == [MASK_VALUE[t] for t in THRESHOLDS]
    assert set(s) == {"key", "dsm", "chm", "masks", "site"}  # "extra" is not decoded
    batch = next(iter(build_loader(ds, batch_size=4, workers=0)))
    assert batch["dsm"].shape == (4, 1, 8, 8) and batch["site"] == ["site0", "site1", "site0", "site1"]


def test_order_is_a_function_of_seed_and_epoch(folder):
    a = ShardDataset(folder, "train", seed=1, buffer_size=8)
    b = ShardDataset(folder, "train", seed=1, buffer_size=8)
    e0, e1 = keys(a, 0), keys(a, 1)
    assert e0 == keys(b, 0) and e1 == keys(b, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert keys(ShardDataset(folder, "train", seed=2, buffer_size=8), 0) != e0
    assert len(set(e0)) == sum(COUNTS)


@pytest.mark.parametrize("world,workers,align",
                         [(1, 1, 1), (2, 2, 1), (2, 2, 3), (3, 4, 2), (4, 3, 5), (8, 2, 1)])
def test_split_arithmetic_partitions_the_stream(world, workers, align):
    """Brute force over every slot: equal rank sizes, disjoint worker ranges, parts inside shards."""
    total = sum(COUNTS)
    seen = Counter()
    for rank in range(world):
        start, stop = rank_range(total, rank, world)
        assert stop - start == total // world
        lo_prev = start
        for worker in range(workers):
            lo, hi = worker_range(start, stop, worker, workers, align)
            assert lo == lo_prev and (lo == stop or (lo - start) % align == 0)
            lo_prev = hi
            for shard, first, last in shard_parts(COUNTS, lo, hi):
                assert 0 <= first < last <= COUNTS[shard]
                base = sum(COUNTS[:shard])
                seen.update(range(base + first, base + last))
        assert lo_prev == stop
    assert set(seen.values()) == {1} and sorted(seen) == list(range(world * (total // world)))


@pytest.mark.parametrize("batch_size,drop_last", [(3, False), (3, True), (2, True)])
def test_two_ranks_two_workers(folder, batch_size, drop_last):
    """Every rank yields the same samples and batches; no duplicates; only the remainder is dropped."""
    total = sum(COUNTS)
    per_rank = total // 2  # 29 samples: one dropped
    expected = per_rank // batch_size * batch_size if drop_last else per_rank
    got = []
    for rank in range(2):
        ds = ShardDataset(folder, "train", seed=3, buffer_size=4, rank=rank, world_size=2)
        loader = build_loader(ds, batch_size=batch_size, workers=2, drop_last=drop_last)
        rank_keys, n_batches = loader_keys(loader, epoch=1)
        assert len(ds) == per_rank and len(rank_keys) == expected
        assert n_batches == len(loader)  # exact: no length warning, every rank steps the same
        got += rank_keys
    assert len(set(got)) == len(got) == 2 * expected


def test_rank_from_torch_distributed(folder, monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    ds = ShardDataset(folder, "train")
    assert (ds.rank, ds.world_size, len(ds)) == (1, 2, sum(COUNTS) // 2)
    explicit = ShardDataset(folder, "train", rank=0, world_size=1)
    assert (explicit.rank, explicit.world_size) == (0, 1)


def test_evaluation_mode_keeps_every_sample(folder):
    got = []
    for rank in range(3):
        ds = ShardDataset(folder, "train", shuffle=False, rank=rank, world_size=3, equal_counts=False)
        got.append(loader_keys(build_loader(ds, batch_size=4, workers=2), 0)[0])
        assert len(got[-1]) == len(ds)
    flat = list(itertools.chain(*got))
    assert sorted(flat) == sorted(keys(ShardDataset(folder, "train", shuffle=False)))
    assert len(set(flat)) == sum(COUNTS)


def test_cache_equals_streaming(folder):
    stream = ShardDataset(folder, "train", seed=5, buffer_size=6)
    cached = ShardDataset(folder, "train", seed=5, buffer_size=6, cache=True)
    for epoch in range(3):
        stream.set_epoch(epoch)
        cached.set_epoch(epoch)
        for a, b in itertools.zip_longest(stream, cached):
            assert a["key"] == b["key"] and torch.equal(a["masks"], b["masks"])
            assert torch.equal(a["dsm"].nan_to_num(-1), b["dsm"].nan_to_num(-1))
            b["dsm"].fill_(0)  # a caller's in-place edit must not reach the cache
    assert len(cached._cache) == len(COUNTS)


def test_persistent_workers_follow_set_epoch(folder):
    ds = ShardDataset(folder, "train", seed=7, buffer_size=4, cache=True)
    loader = build_loader(ds, batch_size=4, workers=2)
    runs = [loader_keys(loader, epoch)[0] for epoch in (0, 1, 0)]
    assert runs[0] != runs[1] and runs[0] == runs[2]
    fresh = ShardDataset(folder, "train", seed=7, buffer_size=4)
    assert runs[1] == loader_keys(build_loader(fresh, batch_size=4, workers=2), 1)[0]


def test_manifest_count_mismatch(folder, tmp_path):
    manifest = read_manifest(folder)
    shards = manifest["splits"]["train"]["shards"]
    for shard in shards:
        (tmp_path / shard["file"]).write_bytes((folder / shard["file"]).read_bytes())
    for wrong in (COUNTS[0] + 2, COUNTS[0] - 2):
        shards[0]["samples"] = wrong
        write_manifest(tmp_path, manifest)
        for cache in (False, True):
            with pytest.raises(ShardError, match=rf"{shards[0]['file']}.*manifest says {wrong}"):
                list(ShardDataset(tmp_path, "train", shuffle=False, cache=cache))


def test_mask_members_set_the_channel_order(folder, tmp_path):
    manifest = read_manifest(folder)
    for shard in manifest["splits"]["train"]["shards"]:
        (tmp_path / shard["file"]).write_bytes((folder / shard["file"]).read_bytes())
    manifest["mask_members"] = [mask_member(t)[:-4] for t in reversed(THRESHOLDS)]
    write_manifest(tmp_path, manifest)
    s = next(iter(ShardDataset(tmp_path, "train", shuffle=False)))
    assert s["masks"][:, 0, 0].tolist() == [MASK_VALUE[t] for t in reversed(THRESHOLDS)]
    del manifest["mask_members"], manifest["thresholds_m"]
    write_manifest(tmp_path, manifest)
    with pytest.raises(ShardError, match="mask_members"):
        ShardDataset(tmp_path, "train")
    assert set(next(iter(ShardDataset(tmp_path, "train", arrays=("dsm",))))) == {"key", "dsm", "site"}


def test_bad_split_and_arrays(folder):
    with pytest.raises(ShardError, match=r"no split 'val'.*\['train'\]"):
        ShardDataset(folder, "val")
    with pytest.raises(ShardError, match="lacks member"):
        list(ShardDataset(folder, "train", arrays=("dsm", "ortho")))
    with pytest.raises(ShardError, match="'json' has no 'region'"):
        list(ShardDataset(folder, "train", meta_keys=("site", "region")))


def test_calibrate_loader_picks_a_trial(folder):
    ds = ShardDataset(folder, "train", buffer_size=4)
    result = calibrate_loader(ds, batch_size=2, max_workers=1, trial_batches=3, prefetch_factors=(2,))
    assert [(t["workers"], t["prefetch_factor"]) for t in result["trials"]] == [(0, None), (1, 2)]
    best = max(result["trials"], key=lambda t: t["samples_per_s"])
    assert (result["workers"], result["prefetch_factor"]) == (best["workers"], best["prefetch_factor"])
    assert best["samples_per_s"] > 0
