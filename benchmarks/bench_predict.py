"""Whole-scene prediction: lib.infer.scene_windows (overlapping windows, batched, streamed in strips) against a naive loop
over non-overlapping tiles (whole scene in memory, one forward per tile), with the same model.

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --size 4096 --base-channels 16 --depth 4 --device cuda

Each run is its own process. Prints `case  ours  peer  ratio` (ratio = ours / peer): megapixels of scene
per second and the peak RSS increase during prediction (after model load and a warm-up forward). Ours runs
twice: with the peer's work (no overlap, one window per forward: the pipeline's own cost), and as used
(overlap: about (1 / (1 - overlap))² more pixels through the model, blended; batched windows). Then: one
forward of a window batch at every threshold with each window normalised once (ours) or K times, and
predict.py on a 0.5 m copy of the scene (resampled to 1 m and back) against the 1 m scene itself.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
THRESHOLDS = [2.0, 5.0, 10.0, 15.0]


class RSSPeak:
    """Highest resident set size seen while the block runs, sampled every 2 ms from /proc (Linux);
    ru_maxrss instead when /proc is absent (then start-up spikes can hide the run's own peak)."""

    def __enter__(self):
        self.start, self.peak, self._stop = self.rss_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss_mb())

    @staticmethod
    def rss_mb() -> float:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive(net, dsm_path, out: Path, window: int, device) -> None:
    """Read the whole scene, run each non-overlapping tile at all thresholds, write whole arrays."""
    import torch
    from lib.gaps.masks import threshold_tag
    from lib.geoio.geotiff_read import read_raster
    from lib.geoio.geotiff_write import write_raster
    from lib.infer.scene_windows import gap_mask, predict_thresholds

    dsm, info = read_raster(dsm_path)
    probs = np.empty((len(THRESHOLDS), *dsm.shape), np.float32)                 # (K, H, W)
    t = torch.tensor(THRESHOLDS, device=device)
    for r in range(0, dsm.shape[0], window):
        for c in range(0, dsm.shape[1], window):
            tile = dsm[r:r + window, c:c + window]
            h, w = tile.shape
            x = torch.from_numpy(np.pad(tile, ((0, window - h), (0, window - w)), constant_values=np.nan))
            with torch.no_grad():
                p = predict_thresholds(net, x[None, None].to(device), t)[0, :, :h, :w]
            probs[:, r:r + h, c:c + w] = p.cpu().numpy()
    probs[:, np.isnan(dsm)] = np.nan
    for k, threshold in enumerate(THRESHOLDS):
        write_raster(out / f"gaps_{threshold_tag(threshold)}.tif", gap_mask(probs[k]), info, nodata=255)


def worker(args) -> None:
    """One method in this process: prints {"seconds", "peak_increase_mb"} as JSON."""
    import torch
    from lib.core.env import select_device
    from lib.infer.loading import load_model
    from lib.geoio.geotiff_read import read_info
    from lib.infer.scene_windows import plan_scene, predict_thresholds, write_scene

    device = select_device(args.device)
    loaded = load_model(args.checkpoint, device)
    with torch.no_grad():  # warm-up: kernels, allocator pools
        predict_thresholds(loaded.net, torch.full((1, 1, args.window, args.window), 300.0, device=device),
                           torch.tensor(THRESHOLDS, device=device))
    info, out = read_info(args.dsm), Path(args.out)
    start = time.perf_counter()
    with RSSPeak() as rss:
        if args.worker == "ours":
            plan = plan_scene(info.height, info.width, args.window, args.overlap, loaded.stride)
            write_scene(loaded.net, args.dsm, out, plan, THRESHOLDS, args.batch_size, device=device)
        else:
            naive(loaded.net, args.dsm, out, args.window, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_increase_mb": rss.peak - rss.start}))


def normalise_once(ckpt, window: int, batch: int, repeats: int = 5) -> tuple[float, float]:
    """Seconds per window batch at the 4 thresholds: each window normalised once (InferenceModel's
    forward_thresholds) against K times (the same model seen as a plain callable: windows repeated K times)."""
    import torch
    from lib.infer.loading import load_model
    from lib.infer.scene_windows import predict_thresholds

    net = load_model(ckpt).net
    x = 300 + 5 * torch.randn(batch, 1, window, window, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(THRESHOLDS)
    best = {}
    with torch.no_grad():
        for name, model in (("once", net), ("k_times", lambda d, th: net(d, th))) * (repeats + 1):
            start = time.perf_counter()
            predict_thresholds(model, x, t)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best["once"], best["k_times"]


def resampling_cost(folder: Path, dsm, ckpt, args) -> tuple[float, float]:
    """Seconds of predict.py (area filter and gap tables included) on a 0.5 m copy of the scene (each pixel
    split in four: resampled to the model's 1 m, the maps brought back to 4x the pixels) and on the scene."""
    import contextlib
    import io

    import predict
    from lib.geoio.geotiff_read import read_raster
    from lib.geoio.geotiff_write import write_raster
    from lib.geoio.resample import resampled_grid

    x, info = read_raster(dsm)
    half = folder / "dsm_half.tif"
    write_raster(half, np.kron(x, np.ones((2, 2), np.float32)), resampled_grid(info, 0.5), nodata=float("nan"))
    best = {}
    for _ in range(args.repeats):
        for name, path in (("half", half), ("full", dsm)):
            argv = ["--checkpoint", str(ckpt), "--dsm", str(path), "--out", str(folder / f"predict_{name}"),
                    "--window", str(args.window), "--batch-size", str(args.batch_size), "--device", args.device,
                    "--no-quicklook"]
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert predict.main(argv) == 0
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best["half"], best["full"]


def make_inputs(folder: Path, size: int, base_channels: int, depth: int) -> tuple[Path, Path]:
    """A synthetic forest DSM (size x size, 1 m) and an untrained checkpoint of unet_film_cbam."""
    import torch
    from lib.core.config import build_config, config_to_dict
    from lib.models import build_model
    from lib.geoio.georef import GeoInfo
    from lib.geoio.geotiff_write import write_raster
    from lib.data.synthetic import SiteParams, generate_site

    site = generate_site(0, SiteParams(size_px=size))
    write_raster(folder / "dsm.tif", site.dsm, GeoInfo(size, size, (1.0, 1.0), (0.0, float(size))),
                 nodata=float("nan"))
    cfg = build_config({"model": {"name": "unet_film_cbam", "base_channels": base_channels, "depth": depth}})
    model = build_model(cfg.model, in_channels=1, batch_size=cfg.train.batch_size)
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "metrics": {}, "version": {},
                "normalization": {"scale": 10.0, "ref_quantile": 0.05}}, folder / "model.ckpt")
    return folder / "dsm.tif", folder / "model.ckpt"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="scene side in pixels (default 2048)")
    parser.add_argument("--base-channels", type=int, default=4, help="unet_film_cbam width (default 4)")
    parser.add_argument("--depth", type=int, default=2, help="unet_film_cbam depth (default 2)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward (ours; the peer runs one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the fastest is kept")
    parser.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--dsm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        dsm, ckpt = make_inputs(Path(tmp), args.size, args.base_channels, args.depth)
        results = {}
        runs = {"same_work": ("ours", 0.0, 1), "ours": ("ours", args.overlap, args.batch_size),
                "naive": ("naive", 0.0, 1)}                      # method, overlap, windows per forward
        for _ in range(args.repeats):  # interleaved, best of repeats: a busy machine slows whole runs
            for name, (method, overlap, batch) in runs.items():
                (Path(tmp) / name).mkdir(exist_ok=True)
                cmd = [sys.executable, __file__, "--worker", method, "--checkpoint", str(ckpt), "--dsm", str(dsm),
                       "--out", str(Path(tmp) / name), "--window", str(args.window), "--overlap", str(overlap),
                       "--batch-size", str(batch), "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                run = json.loads(done.stdout.splitlines()[-1])
                best = results.setdefault(name, run)
                best["seconds"] = min(best["seconds"], run["seconds"])
        once, k_times = normalise_once(ckpt, args.window, args.batch_size)
        half, full = resampling_cost(Path(tmp), dsm, ckpt, args)
    mp = args.size ** 2 / 1e6
    print(f"# {args.size}x{args.size} scene, unet_film_cbam base {args.base_channels} depth {args.depth}, "
          f"{len(THRESHOLDS)} thresholds, window {args.window}; device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads. Peer: whole scene in memory, 1 tile per forward, no overlap.")
    print(f"{'case':44} {'ours':>10} {'peer':>10} {'ratio':>7}")
    peer = results["naive"]
    for name, label in (("same_work", "overlap 0, 1 window/forward"),
                        ("ours", f"overlap {args.overlap}, {args.batch_size} window(s)/forward")):
        ours = results[name]
        for case, a, b in ((f"MP/s, {label}", mp / ours["seconds"], mp / peer["seconds"]),
                           (f"peak RSS MB, {label}", ours["peak_increase_mb"], peer["peak_increase_mb"])):
            print(f"{case:44} {a:10.3f} {b:10.3f} {a / b if b else float('nan'):7.2f}")
    case = f"s per forward of {args.batch_size} x {len(THRESHOLDS)}: norm once/K"
    print(f"{case:44} {once:10.4f} {k_times:10.4f} {once / k_times:7.2f}")
    print(f"{'predict.py s, 0.5 m input (resampled) / 1 m':44} {half:10.3f} {full:10.3f} {half / full:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
