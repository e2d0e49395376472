"""Shard reading -> batches on the device: ours vs webdataset on the same shards vs one .npy per array.

    python benchmarks/bench_shards.py                      # 512 tiles of 256 x 256, warm and cold cache
    python benchmarks/bench_shards.py --tiles 2048 --workers 4 --batch-size 32
    python benchmarks/bench_shards.py --folder /data/tmp   # measure another disk
    pip install -r benchmarks/requirements.txt             # webdataset, for the peer column

All three go through one DataLoader setup (batch size, workers, pin_memory on CUDA) and decode the
same way (np.load of each .npy member, masks stacked to (K, H, W) uint8); ours and webdataset read
the same tar files and shuffle with a 256-sample buffer; the .npy layout (the original ForestGaps)
shuffles indices. Batches are moved to --device. Cold passes evict the files from the page cache
with posix_fadvise(DONTNEED) first (no root needed; where ignored, cold equals warm). Prints
`case  ours  peer  ratio` in samples/s (ratio > 1: ours is faster), ours in MB/s against the raw
sequential read of the shard bytes (also with no workers, in-process), and samples per CPU-second
of the loader and its workers (steadier than wall time on a shared machine).
Targets (issue 8): >= 1.5x webdataset, >= 3x npy, >= 70 % of the raw read.
"""
import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe, row  # noqa: E402
from lib.data.dataset import ShardDataset, build_loader  # noqa: E402
from lib.data.shards import ShardWriter, mask_member, write_manifest  # noqa: E402

try:
    import webdataset as wds
except ImportError:
    wds = None

THRESHOLDS = (2, 5, 10, 15)
MASKS = tuple(mask_member(t) for t in THRESHOLDS)
ARRAYS = ("dsm", "chm") + tuple(m[:-len(".npy")] for m in MASKS)


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
        masks = np.stack([load(m[:-len(".npy")]) for m in MASKS])  # (K, H, W)
        return {"key": key, "dsm": torch.from_numpy(load("dsm"))[None],  # (1, H, W)
                "chm": torch.from_numpy(load("chm"))[None], "masks": torch.from_numpy(masks),
                "site": key.split("_")[0]}


def wds_sample(raw: dict) -> dict:
    """webdataset's raw member bytes -> the sample ShardDataset yields, decoded the same way."""
    load = lambda member: np.load(io.BytesIO(raw[member]), allow_pickle=False)  # noqa: E731
    masks = np.stack([load(m) for m in MASKS])  # (K, H, W) uint8
    return {"key": raw["__key__"], "dsm": torch.from_numpy(load("dsm.npy"))[None],  # (1, H, W)
            "chm": torch.from_numpy(load("chm.npy"))[None], "masks": torch.from_numpy(masks),
            "site": json.loads(raw["json"])["site"]}


def make_loaders(root: Path, shard_files: list[Path], args, pin: bool) -> dict:
    """name -> DataLoader with one setup (batch size, workers, pin_memory); webdataset when installed."""
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin,
                  persistent_workers=args.workers > 0)
    shards = ShardDataset(root / "shards", "train")
    shards.batch_align = args.batch_size  # what build_loader does: worker ranges of whole batches
    loaders = {"shards": DataLoader(shards, **common),
               "npy": DataLoader(NpyFolderDataset(root / "npy"), shuffle=True, **common)}
    if wds is not None:  # shard shuffle, a 256-sample buffer, shards split over the workers
        dataset = (wds.WebDataset([str(p) for p in shard_files], shardshuffle=len(shard_files),
                                  empty_check=False, seed=0).shuffle(256).map(wds_sample))
        loaders["webdataset"] = DataLoader(dataset, **common)
    return loaders


def evict(files: list[Path]) -> None:
    """Drops the files from the page cache so the next read comes from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def time_epoch(loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(samples/s, CPU ms a sample over this process and its workers) of one epoch, each batch moved
    to the device (and waited for). CPU time, unlike wall time, is barely moved by other jobs."""
    start, cpu, samples = time.perf_counter(), tree_cpu_seconds(), 0
    for batch in loader:
        x = batch["dsm"].to(device, non_blocking=True)
        batch["masks"].to(device, non_blocking=True)
        samples += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start), (tree_cpu_seconds() - cpu) / samples * 1e3


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the DataLoader workers), from /proc (Linux)."""
    total, me = time.process_time(), os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def sequential_read(files: list[Path], chunk: int = 8 << 20) -> float:
    """Seconds to read the files front to back into one reused buffer."""
    buf = bytearray(chunk)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def measure(layouts: dict, cache: str, repeats: int, device) -> tuple[dict, dict]:
    """Best samples/s and CPU ms a sample per layout; layouts interleaved per repeat, so that load
    swings hit them alike."""
    rate, cpu = {name: 0.0 for name in layouts}, {name: float("inf") for name in layouts}
    for _ in range(repeats):
        for name, (loader, files) in layouts.items():
            if cache == "cold":
                evict(files)
            r, c = time_epoch(loader, device)
            rate[name], cpu[name] = max(rate[name], r), min(cpu[name], c)
    return rate, cpu


def in_process_rate(root: Path, args, device, repeats: int) -> float:
    """Best samples/s of ours with no workers and one torch thread: no batches cross processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on busy cores, torch's small CPU ops (stack) are 10x slower on 2 threads
    try:
        loader = build_loader(ShardDataset(root / "shards", "train"), args.batch_size, 0)
        return max(time_epoch(loader, device)[0] for _ in range(repeats + 1))
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-mb", type=int, default=128, help="shard size cap")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per figure (best kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", default=None, help="where to write (default: a temp dir, removed after)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    pin = device.type == "cuda"

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        root = Path(tmp)
        shard_files, npy_files = write_both(root, args.tiles, args.tile_px, args.max_mb << 20)
        shard_mb = sum(p.stat().st_size for p in shard_files) / 1e6
        print(f"# {describe()}")
        print(f"# {args.tiles} tiles {args.tile_px}², dsm + chm + {len(THRESHOLDS)} masks: {len(shard_files)}"
              f" shards ({shard_mb:.0f} MB) vs {len(npy_files)} .npy files; batch {args.batch_size},"
              f" {args.workers} workers, to {device}; samples/s, best of {args.repeats}")
        print(f"{'case':28s}{'ours':>10s}{'peer':>10s}{'ratio':>7s}")
        layouts = {name: (loader, npy_files if name == "npy" else shard_files)
                   for name, loader in make_loaders(root, shard_files, args, pin).items()}
        for loader, _ in layouts.values():
            time_epoch(loader, device)  # starts the persistent workers and fills the page cache
        raw = {}
        for cache in ("warm", "cold"):
            rate, cpu = measure(layouts, cache, args.repeats, device)
            raw[cache] = report(cache, rate, shard_files, shard_mb / args.tiles, args.repeats)
        print(row("warm, 0 workers vs raw (MB/s)", in_process_rate(root, args, device, args.repeats)
                  * shard_mb / args.tiles, raw["warm"], "ours in-process, 1 torch thread"))
        for peer in ("npy", "webdataset"):  # the last (cold) pass: CPU time hardly depends on the cache
            print(row(f"CPU/sample vs {peer}", 1e3 / cpu["shards"], 1e3 / cpu[peer] if peer in cpu else None,
                      f"samples per CPU-second, loader + workers: {cpu['shards']:.2f} vs "
                      f"{cpu.get(peer, float('nan')):.2f} ms a sample"))
        if wds is None:
            print("# webdataset skipped: not importable; pip install -r benchmarks/requirements.txt")
        print(f"# load average now {os.getloadavg()[0]:.1f}")
    return 0


def report(cache: str, best: dict, shard_files: list[Path], mb_per_sample: float, repeats: int) -> float:
    """Rows against each peer (targets in the note), then ours against the raw read of the shard bytes,
    whose MB/s it returns."""
    ours = best["shards"]
    print(row(f"{cache} vs npy files", ours, best["npy"], "target >= 3x"))
    print(row(f"{cache} vs webdataset", ours, best.get("webdataset"), "target >= 1.5x"))
    seconds = []
    for _ in range(repeats):
        if cache == "cold":
            evict(shard_files)
        seconds.append(sequential_read(shard_files))
    raw_mb_s = sum(p.stat().st_size for p in shard_files) / 1e6 / min(seconds)
    print(row(f"{cache} vs raw read (MB/s)", ours * mb_per_sample, raw_mb_s, "target >= 0.70 of raw"))
    return raw_mb_s


if __name__ == "__main__":
    sys.exit(main())
