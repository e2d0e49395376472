"""Batch augmentation throughput: lib.data.augment.BatchAugment vs kornia's AugmentationSequential, same ops.

    python benchmarks/bench_augment.py                       # CPU, and CUDA when available
    python benchmarks/bench_augment.py --device cpu --reps 5
    pip install -r benchmarks/requirements.txt               # kornia, for the peer column

Ops on both sides: D4 flips/rot90 (p 0.5), small rotation + zoom (p 0.5, nearest masks), Gaussian noise
(p 0.5). Ours takes uint8 masks and keeps nodata; kornia gets float masks (it cannot take uint8).
Prints `case  ours  peer  ratio` in batches/s; ratio = ours / peer (> 1: ours is faster).
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.data.augment import BatchAugment  # noqa: E402
from lib.core.schema import AugmentConfig  # noqa: E402

CASES = [(16, 256, 4), (64, 128, 4), (8, 512, 4)]    # (batch, tile_px, masks)
FLIP_P, AFFINE_P, NOISE_P, DEGREES, SCALE, NOISE_STD = 0.5, 0.5, 0.5, 10.0, 0.1, 0.1


def make_batch(bsz: int, tile: int, k: int, device) -> dict:
    """A DSM (B, 1, H, W) with a nodata block and masks (B, K, H, W) uint8 0/1/255."""
    g = torch.Generator().manual_seed(0)
    dsm = 300 + 20 * torch.rand(bsz, 1, tile, tile, generator=g)
    dsm[:, :, : tile // 8, : tile // 8] = float("nan")
    masks = (torch.rand(bsz, k, tile, tile, generator=g) < 0.3).to(torch.uint8)
    masks[dsm.isnan().expand_as(masks)] = 255
    return {"dsm": dsm.to(device), "masks": masks.to(device)}


def ours(device):
    cfg = AugmentConfig(flip_p=FLIP_P, affine_p=AFFINE_P, rotate_deg=DEGREES, scale_frac=SCALE, offset_p=0.0,
                        noise_p=NOISE_P, noise_std_m=NOISE_STD, holes_p=0.0, cutout_p=0.0)
    aug = BatchAugment(cfg, seed=0, device=device)
    return lambda batch: aug(batch)


def peer(device):
    """kornia's pipeline with the same ops, or None and the reason when kornia is missing."""
    try:
        import kornia.augmentation as K
    except ImportError as exc:
        return None, f"kornia not importable ({exc}); pip install -r benchmarks/requirements.txt"
    seq = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=FLIP_P), K.RandomVerticalFlip(p=FLIP_P), K.RandomRotation90(times=(1, 3), p=FLIP_P),
        K.RandomAffine(degrees=DEGREES, scale=(1 - SCALE, 1 + SCALE), p=AFFINE_P),
        K.RandomGaussianNoise(std=NOISE_STD, p=NOISE_P),
        data_keys=["input", "mask"]).to(device)
    return (lambda batch: seq(batch["dsm"], batch["masks_f"])), None


def rates(fns: list, batch: dict, device, reps: int, rounds: int = 3) -> list[float]:
    """Best batches/s of each fn over `rounds` timed runs of `reps` calls, the fns interleaved round by
    round so that load from other processes hits them alike; two warm-up calls each first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [float("inf")] * len(fns)
    with torch.no_grad():
        for fn in fns:
            for _ in range(2):
                fn(batch)
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                sync()
                start = time.perf_counter()
                for _ in range(reps):
                    fn(batch)
                sync()
                best[i] = min(best[i], time.perf_counter() - start)
    return [reps / t for t in best]


def run_device(device, reps: int) -> None:
    peer_fn, reason = peer(device)
    ours_fn = ours(device)
    for bsz, tile, k in CASES:
        batch = make_batch(bsz, tile, k, device)
        batch["masks_f"] = batch["masks"].float()        # kornia's input; not timed on its side
        fns = [lambda b: ours_fn({"dsm": b["dsm"], "masks": b["masks"]})] + ([peer_fn] if peer_fn else [])
        measured = rates(fns, batch, device, reps)
        case = f"{device.type}_b{bsz}_{tile}px_k{k}"
        if peer_fn is None:
            print(f"{case:24s} {measured[0]:8.2f} {'n/a':>8s} {'n/a':>6s}")
        else:
            print(f"{case:24s} {measured[0]:8.2f} {measured[1]:8.2f} {measured[0] / measured[1]:6.2f}")
    if peer_fn is None:
        print(f"# peer skipped: {reason}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--reps", type=int, default=5, help="batches per timed round (best of 3 rounds)")
    args = parser.parse_args(argv)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"# torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads{gpu}")
    print(f"{'case':24s} {'ours':>8s} {'peer':>8s} {'ratio':>6s}   (batches/s)")
    if args.device in ("all", "cpu"):
        run_device(torch.device("cpu"), args.reps)
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            run_device(torch.device("cuda"), args.reps * 10)
        else:
            print("# cuda skipped: torch.cuda.is_available() is False on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
