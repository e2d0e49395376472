"""Tar shards vs the old layout (one .npy per array per tile), read through the same DataLoader.

    python benchmarks/bench_shards.py                      # 512 tiles of 256 x 256, warm and cold cache
    python benchmarks/bench_shards.py --tiles 2048 --workers 4 --batch-size 32
    python benchmarks/bench_shards.py --folder /data/tmp   # measure another disk

Cold passes evict the files from the page cache with posix_fadvise(DONTNEED) first (no root needed);
on file systems that ignore it, cold equals warm. Prints samples/s, MB/s of file bytes, the ratio,
and the raw sequential read bandwidth of the shard bytes.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.data import ShardDataset, build_loader  # noqa: E402
from lib.shards import ShardWriter, mask_member, write_manifest  # noqa: E402

THRESHOLDS = (2, 5, 10, 15)
ARRAYS = ("dsm", "chm") + tuple(mask_member(t)[:-4] for t in THRESHOLDS)


def synthetic_tile(i: int, px: int, rng: np.random.Generator) -> dict:
    """One sample as prepare_data writes it: dsm + chm float32, four uint8 masks, provenance json."""
    chm = np.clip(rng.normal(15, 8, (px, px)), 0, None).astype(np.float32)
    dsm = (250 + chm + rng.normal(0, 0.2, (px, px))).astype(np.float32)
    masks = {mask_member(t): (chm < t).astype(np.uint8) for t in THRESHOLDS}
    return {"__key__": f"site{i % 4:02d}_r{i:05d}", "dsm.npy": dsm, "chm.npy": chm, **masks,
            "json": {"site": f"site{i % 4:02d}", "window": [i, 0, px, px]}}


def write_both(root: Path, tiles: int, px: int, max_bytes: int) -> tuple[list[Path], list[Path]]:
    """Writes the same tiles as shards (root/shards) and as root/npy/<array>/<key>.npy; returns the files."""
    rng = np.random.default_rng(0)
    for name in ARRAYS:
        (root / "npy" / name).mkdir(parents=True, exist_ok=True)
    with ShardWriter(root / "shards", "train", max_bytes) as writer:
        for i in range(tiles):
            sample = synthetic_tile(i, px, rng)
            writer.write(sample)
            for name in ARRAYS:
                np.save(root / "npy" / name / f"{sample['__key__']}.npy", sample[f"{name}.npy"])
    manifest = {"splits": {"train": {"shards": writer.shards}}, "thresholds_m": THRESHOLDS}
    write_manifest(root / "shards", manifest)
    shard_files = [root / "shards" / s["file"] for s in writer.shards]
    npy_files = sorted((root / "npy").rglob("*.npy"))
    return shard_files, npy_files


class NpyFolderDataset(Dataset):
    """The old layout: six np.load calls per sample, one small file each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.keys = sorted(p.stem for p in (folder / "dsm").glob("*.npy"))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        load = lambda name: np.load(self.folder / name / f"{key}.npy", allow_pickle=False)  # noqa: E731
        masks = np.stack([load(mask_member(t)[:-4]) for t in THRESHOLDS])
        return {"key": key, "dsm": torch.from_numpy(load("dsm"))[None],  # (1, H, W)
                "chm": torch.from_numpy(load("chm"))[None], "masks": torch.from_numpy(masks),
                "site": key.split("_")[0]}


def evict(files: list[Path]) -> None:
    """Drops the files from the page cache so the next read comes from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def time_epoch(loader: DataLoader) -> tuple[int, float]:
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["dsm"].shape[0]
    return samples, time.perf_counter() - start


def cpu_ms_per_sample(samples) -> float:
    """CPU time of this process per sample read: unlike wall time, barely moved by other load."""
    start, n = time.process_time(), 0
    for _ in samples:
        n += 1
    return (time.process_time() - start) / n * 1e3


def sequential_read(files: list[Path], chunk: int = 8 << 20) -> float:
    """Seconds to read the files front to back into one reused buffer."""
    buf = bytearray(chunk)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-mb", type=int, default=128, help="shard size cap")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per figure (best kept)")
    parser.add_argument("--folder", default=None, help="where to write (default: a temp dir, removed after)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        root = Path(tmp)
        shard_files, npy_files = write_both(root, args.tiles, args.tile_px, args.max_mb << 20)
        shard_mb = sum(p.stat().st_size for p in shard_files) / 1e6
        npy_mb = sum(p.stat().st_size for p in npy_files) / 1e6
        print(f"{args.tiles} tiles {args.tile_px}^2, dsm+chm+{len(THRESHOLDS)} masks: "
              f"{len(shard_files)} shards "
              f"({shard_mb:.0f} MB) vs {len(npy_files)} .npy files ({npy_mb:.0f} MB); "
              f"batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
        shards = build_loader(ShardDataset(root / "shards", "train"), args.batch_size, args.workers)
        npy = DataLoader(NpyFolderDataset(root / "npy"), batch_size=args.batch_size, shuffle=True,
                         num_workers=args.workers, persistent_workers=args.workers > 0)
        layouts = {"npy files": (npy, npy_files, npy_mb), "shards": (shards, shard_files, shard_mb)}
        for loader, _, _ in layouts.values():
            time_epoch(loader)  # starts the persistent workers and fills the page cache
        for cache in ("warm", "cold"):
            best = {name: 0.0 for name in layouts}  # best of the repeats: other load only slows runs
            for _ in range(args.repeats):
                for name, (loader, files, _) in layouts.items():  # interleaved: load swings hit both
                    if cache == "cold":
                        evict(files)
                    samples, seconds = time_epoch(loader)
                    best[name] = max(best[name], samples / seconds)
            for name, (_, _, mb) in layouts.items():
                rate = best[name]
                print(f"  {cache:4s} {name:9s}: {rate:8.0f} samples/s {rate * mb / args.tiles:8.0f} MB/s")
            print(f"  {cache:4s} ratio shards / npy files: {best['shards'] / best['npy files']:.2f}x")
        npy_set, shard_set = NpyFolderDataset(root / "npy"), ShardDataset(root / "shards", "train")
        npy_cpu = min(cpu_ms_per_sample(npy_set[i] for i in range(len(npy_set))) for _ in range(args.repeats))
        shard_cpu = min(cpu_ms_per_sample(shard_set) for _ in range(args.repeats))
        print(f"  warm CPU per sample, one process, no loader: npy files {npy_cpu:.2f} ms, shards "
              f"{shard_cpu:.2f} ms ({npy_cpu / shard_cpu:.2f}x)")
        for cache in ("warm", "cold"):
            seconds = []
            for _ in range(args.repeats):
                if cache == "cold":
                    evict(shard_files)
                seconds.append(sequential_read(shard_files))
            print(f"  {cache:4s} raw sequential read of shard bytes: {shard_mb / min(seconds):8.0f} MB/s")
        print(f"  best of {args.repeats} per figure; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
