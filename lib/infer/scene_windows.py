"""Whole-scene gap mapping: overlapping windows blended with a smooth weight, streamed strip by strip.

Memory is bounded by the window batch and one window-high strip of rows, not by the scene: each DSM row
is decoded once into a reused strip of `window_px` rows (the overlap with the next strip is the halo),
on a GPU the next window batch is read on a background thread while the model runs, the accumulator holds only the
rows in flight, and finished rows go straight to streamed (Cloud-Optimized) GeoTIFF writers. All K
thresholds of a window run in one call of predict_thresholds, the only place windows meet the model.
Finished rows are made to nest over the thresholds (optional; lib.gaps.nesting), counting the raw maps'
violations first. The area filter, gap table, polygons and quick-look follow in lib/infer/scene_gaps.py;
the end-to-end driver (resampling, many scenes) is lib/infer/mapping.py.
"""
import functools
import queue
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.core.errors import ConfigError
from lib.gaps.nesting import nest_probabilities, nesting_violations
from lib.gaps.masks import IGNORE, threshold_tag
from lib.geoio.cog import CogWriter
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import RasterWriter
from lib.data.scene_ground import write_scene_ground
from lib.data.tiling import tile_origins
from lib.infer.loading import each_threshold

BLEND_FLOOR = 1e-3  # weight at a window's outer edge: > 0, so scene borders (one window only) stay defined


@dataclass(frozen=True)
class ScenePlan:
    """Window grid over a (height, width) scene; windows past the scene edge are padded with NaN."""

    height: int
    width: int
    window_px: int
    overlap_px: int
    rows: tuple[int, ...]  # window top rows, increasing
    cols: tuple[int, ...]  # window left columns, increasing

    @property
    def padded_width(self) -> int:
        return max(self.width, self.window_px)


def _starts(size: int, window_px: int, step_px: int) -> tuple[int, ...]:
    """Window starts every step_px, the last flush with the edge; (0,) when the scene is smaller."""
    return tuple(int(s) for s in tile_origins(max(size, window_px), window_px, window_px, step_px)[:, 0])


def plan_scene(height: int, width: int, window_px: int, overlap: float, stride: int = 1) -> ScenePlan:
    """Windows of window_px sharing round(overlap * window_px) pixels with each neighbour."""
    if window_px % stride:
        raise ConfigError(f"predict.window_px ({window_px}) must be a multiple of the model stride {stride}",
                          hint=f"use {max(stride, window_px // stride * stride)}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"predict.overlap must be in [0, 1), found {overlap}")
    overlap_px = int(round(overlap * window_px))
    step = window_px - overlap_px
    return ScenePlan(height, width, window_px, overlap_px, _starts(height, window_px, step),
                     _starts(width, window_px, step))


def blend_ramp(window_px: int, overlap_px: int, floor: float = BLEND_FLOOR) -> torch.Tensor:
    """(window_px,) profile: flat 1 in the middle, raised-cosine ramps over the overlap, never below floor.

    Across an overlap of two neighbours the ramps are sin² and cos², so one window fades into the next;
    dividing by the accumulated weight makes any coverage (scene borders, flush last windows) exact.
    """
    ramp = torch.ones(window_px, dtype=torch.float64)
    if overlap_px:
        phase = (torch.arange(overlap_px, dtype=torch.float64) + 0.5) / overlap_px * (torch.pi / 2)
        ramp[:overlap_px] = torch.sin(phase) ** 2
        ramp[-overlap_px:] = torch.minimum(ramp[-overlap_px:], ramp[:overlap_px].flip(0))
    return (floor + (1 - floor) * ramp).float()


def _coverage(ramp: torch.Tensor, starts, size: int) -> torch.Tensor:
    """(size,) sum of the 1-D window weights `ramp` (w,) placed at `starts`."""
    total = torch.zeros(size, dtype=ramp.dtype, device=ramp.device)
    for s in starts:
        total[s:s + len(ramp)] += ramp
    return total


def d4_average(fn, x: torch.Tensor) -> torch.Tensor:
    """Mean of fn over the 8 rotations/flips of x (B,C,H,W), each output (B,K,H,W) mapped back."""
    total = 0.0
    for flip in (False, True):
        xf = x.flip(-1) if flip else x
        for k in range(4):
            p = torch.rot90(fn(torch.rot90(xf, k, (-2, -1))), -k, (-2, -1))
            total = total + (p.flip(-1) if flip else p)
    return total / 8


def predict_thresholds(net, dsm: torch.Tensor, thresholds_m: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """dsm (B,1,H,W) metres -> probabilities (B,K,H,W) at the K thresholds, in ONE forward pass (or 8 with tta).

    Uses net.forward_thresholds when it has one (lib.infer.loading: each window normalised once, not K times).
    """
    multi = getattr(net, "forward_thresholds", None) or functools.partial(each_threshold, net)

    def fn(x):
        return multi(x, thresholds_m)
    return d4_average(fn, dsm) if tta else fn(dsm)


def gpu_batch_size(net, window_px: int, thresholds_m, device, requested: int, fraction: float = 0.5,
                   most: int = 256) -> int:
    """Windows per forward on a GPU, from its free memory: one window's peak at the K thresholds is measured,
    and as many as fill `fraction` of what is free are taken (at least `requested`, at most `most`).
    Unmeasured on real GPUs so far (no GPU in the sessions that wrote it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return requested
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        channels = 1 + bool(getattr(net, "needs_ground", False))
        x = torch.full((1, channels, window_px, window_px), 300.0, device=device)
        predict_thresholds(net, x, torch.tensor(list(thresholds_m), device=device))
    per_window = max(torch.cuda.max_memory_allocated(device) - before, 1)
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(most, max(requested, fraction * free // per_window)))


def channels_last(net) -> None:
    """Convert the model's weights to channels-last in place (oneDNN's fast convolution layout on CPU,
    tensor cores' on GPU; the same values); TorchScript modules are left as they are."""
    if isinstance(net, torch.nn.Module) and not isinstance(net, torch.jit.ScriptModule):
        net.to(memory_format=torch.channels_last)


def _strips(paths, plan: ScenePlan):
    """(r0, (C, w, padded width) float32 strip) for each window row, one channel per raster in paths, in one
    reused buffer: the rows two window rows share are moved up, only the new ones are read, so every row is
    decoded once."""
    w = plan.window_px
    strip = np.full((len(paths), w, plan.padded_width), np.nan, np.float32)
    prev, end = 0, 0                             # scene rows [prev, end) are in the buffer
    for r0 in plan.rows:
        keep = max(end - r0, 0)
        strip[:, :keep] = strip[:, r0 - prev:r0 - prev + keep]
        new_end = min(r0 + w, plan.height)
        if new_end > r0 + keep:
            for channel, path in enumerate(paths):
                strip[channel, keep:new_end - r0, :plan.width] = read_raster(
                    path, window=(r0 + keep, 0, new_end - r0 - keep, plan.width))[0]
        strip[:, new_end - r0:] = np.nan
        prev, end = r0, new_end
        yield r0, strip


def _batches(paths, plan: ScenePlan, batch_size: int, pad_batches: bool, pin: bool):
    """([(r0, c0), ...], (B, C, w, w) float32 tensor) in row-major window order, C = len(paths) (the DSM, then
    the scene's ground for a model that reads it). pin: page-locked host memory, so the copy to a GPU can
    overlap compute."""
    w, origins, c = plan.window_px, [], len(paths)
    x = torch.empty((batch_size, c, w, w), pin_memory=pin)
    for r0, strip in _strips(paths, plan):
        for c0 in plan.cols:  # copied now: the strip buffer is reused for the next window row
            x[len(origins)] = torch.from_numpy(strip[:, :, c0:c0 + w])
            origins.append((r0, c0))
            if len(origins) == batch_size:
                yield origins, x
                origins, x = [], torch.empty((batch_size, c, w, w), pin_memory=pin)
    if origins:
        if pad_batches:
            x[len(origins):] = torch.nan
        yield origins, (x if pad_batches else x[:len(origins)])


def prefetched(iterable, depth: int = 1):
    """Iterate `iterable` on a background thread, up to `depth` items ahead: decoding and batching the
    next windows (numpy and zlib release the GIL) runs beside the forward of the current ones."""
    items, done = queue.Queue(depth), object()

    def work():
        try:
            for item in iterable:
                items.put(item)
        except BaseException as exc:  # re-raised on the consumer's thread
            items.put(exc)
        items.put(done)
    threading.Thread(target=work, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class _RowAccumulator:
    """Weighted probability sums for the rows in flight [row0, row0 + window_px) of the scene.

    The weight is an outer product and the windows form a full grid, so the accumulated weight is the
    outer product of two 1-D sums: no per-pixel weight buffer.
    """

    def __init__(self, k: int, plan: ScenePlan, device):
        self.plan, self.row0 = plan, 0
        w, width = plan.window_px, plan.padded_width
        ramp = blend_ramp(w, plan.overlap_px).to(device)                          # (w,)
        self.weight = torch.outer(ramp, ramp)                                     # (w, w)
        self.row_weight = _coverage(ramp, plan.rows, plan.height + w)             # (H + w,)
        self.col_weight = _coverage(ramp, plan.cols, width)                       # (W,)
        self.probs = torch.zeros(k, w, width, device=device)                      # (K, w, W) sum of w*p
        self.valid = torch.zeros(w, width, dtype=torch.bool, device=device)       # (w, W) DSM finite

    def add(self, r0: int, c0: int, probs: torch.Tensor, valid: torch.Tensor) -> None:
        """probs (K, w, w) and valid (w, w) of the window whose top-left pixel is (r0, c0)."""
        w = self.plan.window_px
        rows, cols = slice(r0 - self.row0, r0 - self.row0 + w), slice(c0, c0 + w)
        self.probs[:, rows, cols] += probs * self.weight
        self.valid[rows, cols] = valid

    def pop_until(self, row: int) -> tuple[int, np.ndarray]:
        """Finished rows [row0, row): (row0, (K, n, width) float32, NaN at nodata); the window moves down."""
        n, width, w = row - self.row0, self.plan.width, self.plan.window_px
        wsum = torch.outer(self.row_weight[self.row0:row], self.col_weight[:width])  # (n, width)
        probs = self.probs[:, :n, :width] / wsum
        probs = probs.masked_fill_(~self.valid[:n, :width], torch.nan).cpu().numpy()  # a host sync
        for buf in (self.probs, self.valid):  # move the w - n rows still in flight to the top
            buf[..., :w - n, :] = buf[..., n:, :].clone()
            buf[..., w - n:, :] = 0
        out, self.row0 = (self.row0, probs), row
        return out


def iter_scene(net, path, plan: ScenePlan, thresholds_m, batch_size: int = 8, tta: bool = False,
               device="cpu", pad_batches: bool = False):
    """Yield (row0, probabilities (K, n, width) float32 with NaN at nodata) top to bottom over the scene.

    On a GPU the next window batch is read on a background thread while this one runs through the model.
    pad_batches fills the last batch with NaN windows so every forward has the same shape (torch.compile).
    A model that reads the scene's ground (feature filtered_height) gets it from the ground filter run over
    the whole scene first (lib.data.scene_ground, into a temporary file removed afterwards).
    """
    if getattr(net, "needs_ground", False):
        with tempfile.TemporaryDirectory(prefix="forestgaps_ground_") as work:
            write_scene_ground(path, Path(work) / "ground.tif")
            yield from _iter_windows(net, [path, Path(work) / "ground.tif"], plan, thresholds_m, batch_size, tta,
                                     device, pad_batches)
        return
    yield from _iter_windows(net, [path], plan, thresholds_m, batch_size, tta, device, pad_batches)


def _iter_windows(net, paths, plan: ScenePlan, thresholds_m, batch_size: int, tta: bool, device, pad_batches: bool):
    device = torch.device(device)
    channels_last(net)
    with torch.inference_mode():
        t = torch.tensor(list(thresholds_m), dtype=torch.float32, device=device)
        acc = _RowAccumulator(len(t), plan, device)
    batches = _batches(paths, plan, batch_size, pad_batches, pin=device.type == "cuda")
    # on a GPU the host's decoding overlaps the forward; on CPU the model's threads already use every core
    for origins, x in prefetched(batches) if device.type == "cuda" else batches:
        with torch.inference_mode():  # not around the yields: the caller's code would run under it
            x = x.to(device, non_blocking=True)
            probs = predict_thresholds(net, x, t, tta)[:len(origins)].contiguous()  # (B, K, w, w); from NHWC
            valid = torch.isfinite(x[:len(origins), 0])
        for (r0, c0), p, v in zip(origins, probs, valid):
            with torch.inference_mode():
                done = acc.pop_until(r0) if r0 > acc.row0 else None  # the previous window row is in
                acc.add(r0, c0, p, v)
            if done:
                yield done
    with torch.inference_mode():
        done = acc.pop_until(plan.height)
    yield done


def gap_mask(probs: np.ndarray, prob_threshold: float = 0.5) -> np.ndarray:
    """Probabilities (NaN = nodata) -> uint8 1 gap, 0 not gap, IGNORE nodata."""
    mask = (probs > prob_threshold).astype(np.uint8)
    mask[np.isnan(probs)] = IGNORE
    return mask


class NestingCount:
    """Nesting violations of the raw maps (gap at T, not at the next higher T'), summed over a scene's strips.

    report() has lib.gaps.nesting.nesting_violations' form: {"pairs": [...], "rate": violations / gap pixels}.
    """

    def __init__(self, thresholds_m):
        self.thresholds_m = list(thresholds_m)
        self.counts = np.zeros((max(len(self.thresholds_m) - 1, 0), 2), np.int64)  # per pair: gap, violations

    def add(self, masks: np.ndarray) -> None:
        """masks (K, ...) bool at thresholds_m."""
        pairs = nesting_violations(masks, self.thresholds_m)["pairs"]
        self.counts += np.array([[p["gap_pixels"], p["violations"]] for p in pairs], np.int64).reshape(-1, 2)

    def report(self) -> dict:
        t = sorted(self.thresholds_m)
        pairs = [{"lower_m": low, "upper_m": high, "gap_pixels": int(gap), "violations": int(bad),
                  "rate": bad / gap if gap else float("nan")}
                 for low, high, (gap, bad) in zip(t, t[1:], self.counts.tolist())]
        gap, bad = self.counts.sum(axis=0).tolist() if len(self.counts) else (0, 0)
        return {"pairs": pairs, "rate": bad / gap if gap else float("nan")}


@dataclass
class WrittenScene:
    paths: dict[str, Path]  # {tag: gaps_{tag}.tif}
    nesting: dict           # NestingCount.report() of the maps before nesting


def write_scene(net, dsm_path, out_dir, plan: ScenePlan, thresholds_m, batch_size: int = 8, tta: bool = False,
                device="cpu", write_prob: bool = False, prob_threshold: float = 0.5, pad_batches: bool = False,
                progress=None, nested: bool = False, compress: bool = True, raw_dir=None) -> WrittenScene:
    """Stream the scene into gaps_{tag}.tif (uint8, before the area filter) and optional prob_{tag}.tif.

    Maps are Cloud-Optimized GeoTIFFs (lib.geoio.cog); with raw_dir the gap maps go there instead, as plain
    uncompressed GeoTIFFs for the area filter to read (lib.infer.scene_gaps), and compress=False writes
    plain uncompressed prob maps too (temporary files).
    nested: probabilities made monotone over the thresholds (lib.gaps.nesting), so the gap map at T lies inside
    the one at every T' > T; the violations of the raw maps are counted either way.
    progress(rows_done) is called after each finished block of rows.
    """
    info, out_dir = read_info(dsm_path), Path(out_dir)
    tags = [threshold_tag(t) for t in thresholds_m]
    paths = {tag: Path(raw_dir or out_dir) / f"gaps_{tag}.tif" for tag in tags}
    final = CogWriter if compress else functools.partial(RasterWriter, compress=False)
    gap_writer = functools.partial(RasterWriter, compress=False) if raw_dir else final
    nesting = NestingCount(thresholds_m)
    with ExitStack() as stack:
        gaps = [stack.enter_context(gap_writer(paths[tag], info, np.uint8, IGNORE)) for tag in tags]
        probs = [stack.enter_context(final(out_dir / f"prob_{tag}.tif", info, np.float32, float("nan")))
                 for tag in tags] if write_prob else []
        for row0, block in iter_scene(net, dsm_path, plan, thresholds_m, batch_size, tta, device, pad_batches):
            nesting.add(block > prob_threshold)                              # (K, n, W); NaN compares False
            if nested:
                block = nest_probabilities(block, thresholds_m)
            for k, writer in enumerate(gaps):
                writer.write(row0, gap_mask(block[k], prob_threshold))
            for k, writer in enumerate(probs):
                writer.write(row0, block[k])
            if progress:
                progress(row0 + block.shape[1])
    return WrittenScene(paths, nesting.report())
