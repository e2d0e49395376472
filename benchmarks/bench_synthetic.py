"""Synthetic site generation speed, and crown rendering against a per-tree loop.

    python benchmarks/bench_synthetic.py
    python benchmarks/bench_synthetic.py --sizes 512 1024 2048 4096 --repeats 5

Part 1 prints `size  wall_s  cpu_s  MP/s` for generate_site (default params, best of --repeats; cpu_s
is process time, a fairer figure on a shared machine). Part 2 renders the crowns of one closed stand
with lib.data.synth_canopy.render_crowns (vectorised: radius groups x offsets, np.maximum.at) and with the
straightforward per-tree numpy loop (one window update per tree), and prints `trees  ours_s  loop_s
ratio` (ratio = loop / ours, > 1: ours is faster).
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.data.synth_canopy import FORESTS, N_LOBES, make_trees, render_crowns, stand_trees  # noqa: E402
from lib.data.synthetic import SiteParams, generate_site  # noqa: E402


def best(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best process (CPU) seconds over `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def loop_crowns(trees, ground: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Reference renderer: one window per tree, same outline and profile as render_crowns (no jitter)."""
    canvas = np.full(shape, -np.inf, np.float32)
    k = np.arange(2, 2 + N_LOBES)
    for i in range(trees.y.size):
        reach = int(np.ceil(trees.radius[i] * (1 + np.abs(trees.lobes[i]).sum()) + 0.71))
        cy, cx = int(np.rint(trees.y[i])), int(np.rint(trees.x[i]))
        y0, y1 = max(cy - reach, 0), min(cy + reach + 1, shape[0])
        x0, x1 = max(cx - reach, 0), min(cx + reach + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0 - cy: y1 - cy, x0 - cx: x1 - cx].astype(np.float32)
        theta = np.arctan2(dy, dx)[..., None]
        basis = np.concatenate([np.cos(k * theta), np.sin(k * theta)], axis=-1)
        outline = trees.radius[i] * (1 + basis @ trees.lobes[i])
        u = np.sqrt((dy - (trees.y[i] - cy)) ** 2 + (dx - (trees.x[i] - cx)) ** 2) / outline
        top = ground[i] + trees.height[i] - trees.depth[i] * np.minimum(u, 1) ** trees.power[i]
        window = canvas[y0:y1, x0:x1]
        np.copyto(window, np.maximum(window, top), where=u <= 1)
    return canvas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="site sides, pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case; the best is kept")
    parser.add_argument("--crown-size", type=int, default=512, help="side of the crown-rendering case, pixels")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, numpy {np.__version__}")

    print(f"{'size':>6} {'wall_s':>8} {'cpu_s':>8} {'MP/s':>7}   (generate_site, default params)")
    for size in args.sizes:
        params = SiteParams(size_px=size)
        wall, cpu = best(lambda: generate_site(0, params), args.repeats)
        print(f"{size:>6} {wall:8.3f} {cpu:8.3f} {size * size / 1e6 / wall:7.2f}")

    rng = np.random.default_rng(0)
    n = args.crown_size
    forest = FORESTS["temperate"]
    y, x, height, crown, max_radius = stand_trees(rng, "closed_canopy", forest, (0.0, n, 0.0, n), 1.0)
    trees = make_trees(rng, y, x, height, crown, max_radius, forest, 1.0)
    ground = np.zeros(trees.y.size, np.float32)
    ours_out = render_crowns(trees, ground, np.zeros((n, n), np.float32))
    loop_out = loop_crowns(trees, ground, (n, n))
    same = np.isneginf(ours_out) == np.isneginf(loop_out)
    agree = float(same.mean())
    ours, _ = best(lambda: render_crowns(trees, ground, np.zeros((n, n), np.float32)), args.repeats)
    loop, _ = best(lambda: loop_crowns(trees, ground, (n, n)), max(1, args.repeats // 2))
    print(f"\n{'trees':>7} {'ours_s':>8} {'loop_s':>8} {'ratio':>7}   (crowns of a {n}^2 closed stand; "
          f"footprints agree on {agree:.2%} of pixels)")
    print(f"{trees.y.size:>7} {ours:8.3f} {loop:8.3f} {loop / ours:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
