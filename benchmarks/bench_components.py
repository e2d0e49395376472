"""Connected-component labelling: lib.gaps.components.label_components against scipy.ndimage.label.

    python benchmarks/bench_components.py
    python benchmarks/bench_components.py --size 2048 --connectivity 4 --repeats 5

Prints `case  ours_s  scipy_s  ratio` (best of --repeats, ratio = ours / scipy) for random masks at
p = 0.5 and p = 0.3 and a smooth "blobby" mask; scipy is optional and skipped with a message.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.gaps.components import label_components  # noqa: E402

try:
    from scipy import ndimage
except ImportError:
    ndimage = None


def blobby_mask(size: int, rng: np.random.Generator, scale_px: float = 24.0) -> np.ndarray:
    """(size, size) bool: Gaussian-smoothed white noise > 0, blobs about scale_px wide (FFT, numpy only)."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    freq_y = np.fft.fftfreq(size)[:, None]
    freq_x = np.fft.rfftfreq(size)[None, :]
    kernel = np.exp(-2 * (np.pi * scale_px) ** 2 * (freq_y ** 2 + freq_x ** 2))
    return np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=noise.shape) > 0


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (seconds) and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="mask side in pixels (default 4096)")
    parser.add_argument("--connectivity", type=int, choices=(4, 8), default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    shape = (args.size, args.size)
    cases = {
        "random_p0.5": rng.random(shape) < 0.5,
        "random_p0.3": rng.random(shape) < 0.3,
        "blobby": blobby_mask(args.size, rng),
    }
    if ndimage is None:
        print("scipy not installed: timing ours only (no baseline ratio)")
    structure = np.ones((3, 3), bool) if args.connectivity == 8 else None
    print(f"{'case':<14}{'ours_s':>9}{'scipy_s':>9}{'ratio':>7}   ({args.size}x{args.size}, "
          f"{args.connectivity}-connectivity, best of {args.repeats})")
    for name, mask in cases.items():
        ours_s, (labels, n) = best_time(lambda: label_components(mask, args.connectivity), args.repeats)
        if ndimage is None:
            print(f"{name:<14}{ours_s:9.3f}{'-':>9}{'-':>7}   {n} components")
            continue
        scipy_s, (ref, n_ref) = best_time(lambda: ndimage.label(mask, structure), args.repeats)
        same = n == n_ref and np.array_equal(labels, ref)
        print(f"{name:<14}{ours_s:9.3f}{scipy_s:9.3f}{ours_s / scipy_s:7.2f}   {n} components"
              + ("" if same else "  MISMATCH with scipy"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
