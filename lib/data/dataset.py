"""The streaming training set: tar shards listed in the manifest, shuffled per (seed, epoch), split
across DDP ranks and DataLoader workers so that every rank yields the same number of samples.

Splitting: the shards, in the epoch's seeded order, form one virtual stream of N samples (counts from
the manifest). Rank r takes the contiguous range [r*M, (r+1)*M) with M = N // world (the last N % world
samples are DROPPED so that every rank yields M and no DDP collective waits forever; equal_counts=False
keeps them, for evaluation). Each worker takes a contiguous run of whole batches of its rank's range,
so a rank has at most one partial batch and len(loader) is exact. A range that starts inside a shard
skips that shard's head without decoding it; no sample is read by two slots.
"""
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lib.core.errors import ConfigError, ShardError
from lib.data.sample_check import SampleSpec
from lib.data.shards import iter_shard, mask_member, read_manifest, verify_shard

FLOAT32_ARRAYS = ("dsm", "chm", "ground")  # cast to float32 on read; other arrays keep their stored dtype


def rank_range(total: int, rank: int, world: int, equal_counts: bool = True) -> tuple[int, int]:
    """Rank's contiguous [start, stop) of a stream of `total`; equal sizes (remainder dropped) or all kept."""
    if equal_counts:
        per = total // world
        return rank * per, (rank + 1) * per
    return rank * total // world, (rank + 1) * total // world


def worker_range(start: int, stop: int, worker: int, workers: int, align: int = 1) -> tuple[int, int]:
    """Worker's contiguous sub-range of [start, stop), cut at multiples of `align` samples from start."""
    blocks = -(-(stop - start) // align)
    lo = start + worker * blocks // workers * align
    hi = start + (worker + 1) * blocks // workers * align
    return min(lo, stop), min(hi, stop)


def shard_parts(counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard index, first, stop) inside each shard that the stream range [start, stop) touches.

    counts: samples per shard, in stream order.
    """
    parts, offset = [], 0
    for i, n in enumerate(counts):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            parts.append((i, lo - offset, hi - offset))
        offset += n
    return parts


def _shuffled(stream, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle buffer: holds `size` items, yields a random one per arrival (memory: size samples)."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}, world_size={world_size}: give both, with 0 <= rank < world_size")
    return rank, world_size


def _mask_members(manifest: dict, folder: Path) -> list[str]:
    """Mask member names in channel order: the manifest's "mask_members" stems, else its "thresholds_m"."""
    if "mask_members" in manifest:  # types checked by read_manifest
        return [f"{stem}.npy" for stem in manifest["mask_members"]]
    if manifest.get("thresholds_m"):
        return [mask_member(t) for t in manifest["thresholds_m"]]
    raise ShardError(f"{folder / 'manifest.json'}: masks requested but neither 'mask_members' nor "
                     "'thresholds_m' is listed")


class ShardDataset(IterableDataset):
    """Samples of one split as dicts: "key", "dsm"/"chm" (1, H, W) float32, "masks" (K, H, W) uint8 in
    the manifest's mask order, and the json fields named in meta_keys (e.g. "site").

    cache=True keeps decoded shards in memory after their first read (small datasets; per process, so
    build_loader keeps workers alive between epochs). Memory while streaming: buffer_size samples per worker.
    verify=True checks every listed shard's SHA-256 against the manifest once, here (a full read, ~0.5 GB/s).
    """

    def __init__(self, folder, split: str, seed: int = 0, shuffle: bool = True, buffer_size: int = 256,
                 cache: bool = False, arrays=("dsm", "chm", "mask_*"), meta_keys=("site",),
                 rank: int | None = None, world_size: int | None = None, equal_counts: bool = True,
                 verify: bool = True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if split not in manifest["splits"]:
            raise ShardError(f"{self.folder / 'manifest.json'}: no split {split!r}; "
                             f"splits are {sorted(manifest['splits'])}")
        self.shards = manifest["splits"][split]["shards"]
        if verify:  # a flipped bit fails here, naming the shard, rather than as a silently wrong sample
            for entry in self.shards:
                verify_shard(self.folder / entry["file"], entry["sha256"])
        self.names = [a for a in arrays if a != "mask_*"]
        bad = [a for a in self.names if not a or "*" in a or "." in a]
        if bad:
            raise ConfigError(f"arrays {bad} invalid: expected member stems like 'dsm', or 'mask_*'")
        self.mask_members = _mask_members(manifest, self.folder) if "mask_*" in arrays else []
        self.spec = SampleSpec(manifest, meta_keys)
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1 sample, found {buffer_size}")
        self.meta_keys = tuple(meta_keys)
        self.members = {f"{a}.npy" for a in self.names} | set(self.mask_members)
        if self.meta_keys:
            self.members.add("json")
        self.seed, self.shuffle, self.buffer_size, self.cache = seed, shuffle, buffer_size, cache
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.equal_counts = equal_counts
        self.batch_align = 1  # build_loader sets the batch size: worker ranges are whole batches
        self._epoch = multiprocessing.RawValue("q", 0)  # shared memory: persistent workers see set_epoch
        self._cache: dict[str, list[dict]] = {}

    def set_epoch(self, epoch: int) -> None:
        """The order is a function of (seed, epoch): call before iterating each epoch."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        start, stop = rank_range(self._total(), self.rank, self.world_size, self.equal_counts)
        return stop - start

    def _total(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def __iter__(self) -> Iterator[dict]:
        epoch = self._epoch.value
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.arange(len(self.shards))
        if self.shuffle:  # the same permutation on every rank and worker: they cut one common stream
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        start, stop = rank_range(self._total(), self.rank, self.world_size, self.equal_counts)
        start, stop = worker_range(start, stop, worker, workers, self.batch_align)
        parts = shard_parts([self.shards[i]["samples"] for i in order], start, stop)
        stream = (self._to_sample(raw)
                  for i, lo, hi in parts for raw in self._read(self.shards[order[i]], lo, hi))
        if not self.shuffle:
            return stream
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        return _shuffled(stream, self.buffer_size, rng)

    def _read(self, shard: dict, start: int, stop: int) -> Iterator[dict]:
        """Decoded samples start:stop of one shard, checking the manifest's sample count."""
        path, n = self.folder / shard["file"], shard["samples"]
        if self.cache:
            if shard["file"] not in self._cache:
                samples = list(self._decode(path))
                if len(samples) != n:
                    raise _count_error(path, len(samples), n)
                self._cache[shard["file"]] = samples
            yield from self._cache[shard["file"]][start:stop]
            return
        got = 0
        for sample in self._decode(path, start, None if stop == n else stop):  # to the end: sees extras
            got += 1
            if got > stop - start:
                raise _count_error(path, f"more than {n}", n)
            yield sample
        if got < stop - start:
            raise _count_error(path, start + got, n)

    def _decode(self, path, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Samples of one shard, each checked against the manifest (SampleSpec)."""
        return (self.spec.check(raw, path)
                for raw in iter_shard(path, required=self.members, members=self.members, start=start, stop=stop))

    def _to_sample(self, raw: dict) -> dict:
        """Shard members -> tensors; cached arrays are copied so an in-place edit cannot reach the cache."""
        out = {"key": raw["__key__"]}
        for name in self.names:
            a = raw[f"{name}.npy"]
            if name in FLOAT32_ARRAYS:
                a = a.astype(np.float32, copy=False)
            if self.cache:
                a = a.copy()
            out[name] = torch.from_numpy(a[None] if a.ndim == 2 else a)  # (1, H, W)
        if "ground" in out:  # the scene-level ground filter travels as the DSM's channel 1 (lib.data.normalize)
            out["dsm"] = torch.cat([out["dsm"], out.pop("ground")])               # (2, H, W)
        if self.mask_members:
            masks = np.stack([raw[m] for m in self.mask_members])  # (K, H, W), a fresh array
            out["masks"] = torch.from_numpy(masks.astype(np.uint8, copy=False))
        for k in self.meta_keys:  # present: checked by self.spec
            out[k] = raw["json"][k]
        return out


def _count_error(path, found, n: int) -> ShardError:
    return ShardError(f"{path}: holds {found} samples, the manifest says {n}",
                      hint="the shard and manifest.json do not match; re-run prepare_data")


def build_loader(dataset, batch_size: int, workers: int, pin_memory: bool = False, drop_last: bool = False,
                 prefetch_factor: int | None = None) -> DataLoader:
    """DataLoader; a ShardDataset gets worker ranges of whole batches. Workers persist across epochs."""
    if isinstance(dataset, ShardDataset):
        dataset.batch_align = batch_size
    # Its own generator: creating an iterator must not draw from the global torch RNG (exact resume).
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def calibrate_loader(dataset, batch_size: int, max_workers: int, trial_batches: int = 20,
                     prefetch_factors=(2, 4)) -> dict:
    """Times a few (workers, prefetch_factor) pairs; returns the fastest with every trial's samples/s.

    The first batch of each trial is not timed: worker start-up is paid once per run, not per batch.
    """
    candidates = sorted({0, max_workers} | {w for w in (1, 2, 4, 8, 16, 32) if w <= max_workers})
    trials = []
    for workers in candidates:
        for prefetch in prefetch_factors if workers else (None,):
            loader = build_loader(dataset, batch_size, workers, prefetch_factor=prefetch)
            it = iter(loader)
            next(it, None)
            start, samples = time.perf_counter(), 0
            for _, batch in zip(range(trial_batches), it):
                samples += len(batch["key"])
            seconds = time.perf_counter() - start
            trials.append({"workers": workers, "prefetch_factor": prefetch,
                           "samples_per_s": samples / seconds if samples else 0.0})
            del it, loader  # shuts the workers down before the next trial
    best = max(trials, key=lambda t: t["samples_per_s"])
    return {"workers": best["workers"], "prefetch_factor": best["prefetch_factor"], "trials": trials}
