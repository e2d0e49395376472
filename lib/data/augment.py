"""Batch augmentations on the device: D4, small affine, elevation offset, noise, nodata holes, cutout.

They run on the whole batch after it reaches the GPU (or CPU), vectorised over the batch: each sample
draws its own parameters from one seeded `torch.Generator` on the device, and no op waits on the host.
The generator state is the module's `state_dict()`, so a resumed run draws the same augmentations.

What each op does to the labels, and why the masks stay right:
- D4 and the small affine move DSM, CHM and masks with the same map; masks are never interpolated.
  The affine's zoom changes gap areas by up to (1 +- scale_frac)^2, so masks near `min_area_m2` may be
  slightly off; keep `scale_frac` small.
- The elevation offset adds a constant to the DSM only: canopy height (CHM) and masks do not change.
  There is no vertical scale jitter: scaling heights changes the CHM, so the masks (CHM <= threshold,
  area-filtered) would have to be recomputed with connected components, which we do not do on the device.
- Gaussian noise goes on the DSM (the model input) only; CHM targets and masks stay clean.
- Holes are nodata everywhere (DSM/CHM NaN, masks 255 = ignore), like acquisition gaps.
- Cutout flattens the valid DSM inside one rectangle to its mean height; the masks there become 255 and
  the CHM NaN, since the flat input no longer carries the evidence for those labels.
Nodata stays nodata through every op.
"""
import math

import torch
import torch.nn.functional as F

from lib.core.errors import ConfigError, DataError

IGNORE = 255                                 # mask value for "no label here"
TASKS = ("segmentation", "regression", "classification")
FLOAT_KEYS = ("dsm", "chm", "image")         # resampled bilinearly, NaN = nodata


def d4_index(code: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flat source index (B, H*W) of the D4 element `code` (B,) int64 in 0..7 of each sample.

    Bits of `code`: 1 flips rows, 2 flips columns, 4 transposes (square tiles only); the 8 codes are the
    8 elements of D4. out[b, i, j] = x[b, src_i, src_j].
    """
    i = torch.arange(h, device=code.device).view(1, h, 1)
    j = torch.arange(w, device=code.device).view(1, 1, w)
    code = code.view(-1, 1, 1)
    a = torch.where(code & 1 != 0, h - 1 - i, i)       # (B, H, 1)
    b = torch.where(code & 2 != 0, w - 1 - j, j)       # (B, 1, W)
    transpose = code & 4 != 0
    src_i = torch.where(transpose, b, a)               # (B, H, W)
    src_j = torch.where(transpose, a, b)
    return (src_i * w + src_j).view(-1, h * w)


def gather_pixels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) of any dtype picked at the flat pixel index (B, H*W): exact, no interpolation."""
    bsz, c, h, w = x.shape
    index = index.unsqueeze(1).expand(bsz, c, h * w)
    return x.reshape(bsz, c, h * w).gather(2, index).view(bsz, c, h, w)


def affine_theta(angle: torch.Tensor, scale: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) output -> input maps for `affine_grid`: rotate by angle (B,) radians, sample at scale (B,)."""
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(cos)
    # Normalised coordinates span [-1, 1] on both axes; the h/w factors keep the rotation rigid in pixels.
    row_x = torch.stack([cos, -sin * h / w, zero], -1)
    row_y = torch.stack([sin * w / h, cos, zero], -1)
    return torch.stack([row_x, row_y], 1)


def warp(x: torch.Tensor, masks: torch.Tensor | None, theta: torch.Tensor):
    """Resample x (B, F, H, W) NaN-aware bilinear and masks (B, K, H, W) uint8 nearest with theta (B, 2, 3).

    A pixel is valid when its nearest source pixel is valid and inside the tile; its value is the
    bilinear average of the valid neighbours only, so nodata never smears into heights. Pixels from
    outside the tile become NaN / 255.
    """
    bsz, nf, h, w = x.shape
    grid = F.affine_grid(theta.to(x.dtype), [bsz, 1, h, w], align_corners=False)   # (B, H, W, 2) in [-1, 1]
    finite = x.isfinite()
    sums = F.grid_sample(torch.cat([torch.where(finite, x, 0), finite.to(x.dtype)], 1), grid,
                         mode="bilinear", padding_mode="zeros", align_corners=False)
    # Nearest source pixel as an index: masks are gathered as uint8, never converted or interpolated.
    # It is one of the four bilinear corners, with weight >= 1/4, so the division below is safe.
    col = (((grid[..., 0] + 1) * w - 1) / 2).round()                                 # (B, H, W) pixels
    row = (((grid[..., 1] + 1) * h - 1) / 2).round()
    inside = ((col >= 0) & (col < w) & (row >= 0) & (row < h)).unsqueeze(1)           # (B, 1, H, W)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long().view(bsz, h * w)
    keep = gather_pixels(finite, index) & inside
    x = torch.where(keep, sums[:, :nf] / sums[:, nf:], math.nan)
    if masks is not None:
        masks = torch.where(inside, gather_pixels(masks, index), IGNORE)
    return x, masks


def random_rects(gen: torch.Generator, bsz: int, n: int, h: int, w: int, max_frac: float):
    """Row and column membership (B, n, H), (B, n, W) bool of n random rectangles per sample.

    Sides are uniform in [1, max_frac * side] pixels; rectangles lie inside the tile.
    """
    u = torch.rand(bsz, n, 4, generator=gen, device=gen.device)

    def span(u_side, u_start, length):
        side = (u_side * max_frac * length).ceil().clamp(1, length)                  # (B, n)
        start = torch.minimum((u_start * (length - side + 1)).floor(), length - side)
        pos = torch.arange(length, device=gen.device)
        return (pos >= start[..., None]) & (pos < (start + side)[..., None])

    return span(u[..., 0], u[..., 2], h), span(u[..., 1], u[..., 3], w)


class BatchAugment(torch.nn.Module):
    """Per-sample random augmentations of a batch dict, reproducible from `seed` and the state dict.

    Segmentation/regression: "dsm" (B, 1, H, W) float metres with NaN = nodata (B, 2, H, W with the scene's
    ground as channel 1: flipped, warped, holed and offset with the DSM), optional "chm" of the
    same shape, optional "masks" (B, K, H, W) uint8 0/1/255. Classification: "image" (B, C, H, W) float
    and "label" (B,), geometric ops and per-band jitter only. Other keys pass through unchanged.
    """

    def __init__(self, cfg_augment, task: str = "segmentation", seed: int = 0, device="cpu"):
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"augment: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        self.cfg, self.task = cfg_augment, task
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def get_extra_state(self) -> dict:
        """The generator state, saved by `state_dict()`: all a resumed run needs to draw the same ops."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        # get_state is a CPU ByteTensor even for a CUDA generator; map_location may have moved it.
        self.generator.set_state(state["generator"].cpu())

    @torch.no_grad()
    def forward(self, batch: dict) -> dict:
        t = self._tensors(batch)
        t = self._d4(t)
        t = self._affine(t)
        if self.task == "classification":
            t = self._band_jitter(t)
        else:
            t = self._holes(t)
            t = self._cutout(t)
            t = self._offset_noise(t)
        return {**batch, **t}

    def _tensors(self, batch: dict) -> dict:
        """The batch's image tensors, checked for shape, dtype and device."""
        keys = ("image",) if self.task == "classification" else ("dsm", "chm", "masks")
        if keys[0] not in batch:
            raise DataError(f"augment ({self.task}): the batch has no {keys[0]!r}; found keys {sorted(batch)}")
        ref = batch[keys[0]]
        if ref.dim() != 4 or not ref.is_floating_point():
            raise DataError(f"augment: batch[{keys[0]!r}] is {ref.dtype} of shape {tuple(ref.shape)}, "
                            f"expected float (B, C, H, W)")
        t = {k: batch[k] for k in keys if k in batch}
        for key, x in t.items():
            want = torch.uint8 if key == "masks" else ref.dtype
            # the DSM may carry the scene's ground filter as channel 1 (input feature filtered_height)
            channels = x.shape[1] if key in ("masks", "image") or key == "dsm" and x.shape[1] <= 2 else 1
            if x.dtype != want or tuple(x.shape) != (ref.shape[0], channels, *ref.shape[2:]):
                raise DataError(f"augment: batch[{key!r}] is {x.dtype} of shape {tuple(x.shape)}, expected "
                                f"{want} of shape (B={ref.shape[0]}, {channels}, {ref.shape[2]}, {ref.shape[3]})")
            if x.device != self.device:
                raise DataError(f"augment: batch[{key!r}] is on {x.device} but the augmentation generator is "
                                f"on {self.device}", hint="move the batch to the training device first")
        return t

    def _coin(self, p: float, bsz: int) -> torch.Tensor:
        """(B,) bool: which samples get an op of probability p."""
        return torch.rand(bsz, generator=self.generator, device=self.device) < p

    def _uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.generator, device=self.device)

    def _d4(self, t: dict) -> dict:
        """A random non-identity flip/rot90 per selected sample (flips only on non-square tiles)."""
        if self.cfg.flip_p <= 0:
            return t
        ref = next(iter(t.values()))
        bsz, _, h, w = ref.shape
        n_codes = 8 if h == w else 4
        code = torch.randint(1, n_codes, (bsz,), generator=self.generator, device=self.device)
        code = torch.where(self._coin(self.cfg.flip_p, bsz), code, 0)
        index = d4_index(code, h, w)                        # (B, H*W), shared by every key
        return {k: gather_pixels(x, index) for k, x in t.items()}

    def _affine(self, t: dict) -> dict:
        """Small rotation and zoom per selected sample: bilinear NaN-aware heights, nearest masks."""
        if self.cfg.affine_p <= 0:
            return t
        names = [k for k in FLOAT_KEYS if k in t]
        x = torch.cat([t[k] for k in names], 1)              # (B, F, H, W)
        bsz, _, h, w = x.shape
        keep = ~self._coin(self.cfg.affine_p, bsz)
        angle = self._uniform(-1, 1, bsz) * math.radians(self.cfg.rotate_deg)
        scale = self._uniform(1 - self.cfg.scale_frac, 1 + self.cfg.scale_frac, bsz)
        warped, masks = warp(x, t.get("masks"), affine_theta(angle, scale, h, w))
        # Unselected samples keep their exact pixels (an identity grid_sample is only close to identity).
        x = torch.where(keep.view(-1, 1, 1, 1), x, warped)
        out = dict(zip(names, x.split([t[k].shape[1] for k in names], 1)))
        if masks is not None:
            out["masks"] = torch.where(keep.view(-1, 1, 1, 1), t["masks"], masks)
        return out

    def _holes(self, t: dict) -> dict:
        """1..holes_max nodata rectangles per selected sample: DSM/CHM NaN and masks 255."""
        if self.cfg.holes_p <= 0:
            return t
        bsz, _, h, w = t["dsm"].shape
        n = self.cfg.holes_max
        chosen = self._coin(self.cfg.holes_p, bsz)
        count = torch.randint(1, n + 1, (bsz, 1), generator=self.generator, device=self.device)
        active = (torch.arange(n, device=self.device) < count) & chosen[:, None]          # (B, n)
        rows, cols = random_rects(self.generator, bsz, n, h, w, self.cfg.hole_max_frac)
        rows = rows & active[..., None]
        hole = torch.einsum("bnh,bnw->bhw", rows.float(), cols.float()).unsqueeze(1) > 0  # (B, 1, H, W)
        return {k: x.masked_fill(hole, IGNORE if k == "masks" else math.nan) for k, x in t.items()}

    def _cutout(self, t: dict) -> dict:
        """One rectangle per selected sample: valid DSM -> its mean there, masks 255, CHM NaN."""
        if self.cfg.cutout_p <= 0:
            return t
        dsm = t["dsm"]
        bsz, _, h, w = dsm.shape
        chosen = self._coin(self.cfg.cutout_p, bsz)
        rows, cols = random_rects(self.generator, bsz, 1, h, w, self.cfg.cutout_max_frac)
        rows, cols = rows[:, 0].to(dsm.dtype), cols[:, 0].to(dsm.dtype)   # (B, H), (B, W)
        valid = dsm[:, 0].isfinite()                                       # (B, H, W)
        total = torch.einsum("bh,bhw,bw->b", rows, torch.where(valid, dsm[:, 0], 0), cols)
        count = torch.einsum("bh,bhw,bw->b", rows, valid.to(dsm.dtype), cols)
        mean = (total / count.clamp(min=1)).view(-1, 1, 1, 1)
        rect = (rows[:, :, None] * cols[:, None, :] > 0) & chosen[:, None, None]
        rect = rect.unsqueeze(1)                                           # (B, 1, H, W)
        flat = torch.where(rect & valid.unsqueeze(1), mean, dsm[:, :1])  # a scene-ground channel stays as it is
        out = dict(t, dsm=torch.cat([flat, dsm[:, 1:]], 1))
        if "chm" in t:
            out["chm"] = t["chm"].masked_fill(rect, math.nan)
        if "masks" in t:
            out["masks"] = t["masks"].masked_fill(rect, IGNORE)
        return out

    def _offset_noise(self, t: dict) -> dict:
        """A constant elevation offset (+-offset_m) and per-pixel Gaussian noise on the DSM only."""
        dsm = t["dsm"]
        bsz = dsm.shape[0]
        if self.cfg.offset_p > 0 and self.cfg.offset_m > 0:
            offset = self._uniform(-self.cfg.offset_m, self.cfg.offset_m, bsz)
            offset = torch.where(self._coin(self.cfg.offset_p, bsz), offset, 0)
            dsm = dsm + offset.to(dsm.dtype).view(-1, 1, 1, 1)
        if self.cfg.noise_p > 0 and self.cfg.noise_std_m > 0:
            std = torch.where(self._coin(self.cfg.noise_p, bsz), self.cfg.noise_std_m, 0.0)
            noise = torch.randn(dsm.shape, generator=self.generator, device=self.device, dtype=dsm.dtype)
            dsm = dsm + noise * std.to(dsm.dtype).view(-1, 1, 1, 1)
        return dict(t, dsm=dsm)

    def _band_jitter(self, t: dict) -> dict:
        """Classification: band -> mean + g * (band - mean) + s * std, per sample and band."""
        j = self.cfg.band_jitter
        if self.cfg.jitter_p <= 0 or j <= 0:
            return t
        x = t["image"]
        bsz, c = x.shape[:2]
        mean = x.nanmean((2, 3), keepdim=True)                             # (B, C, 1, 1)
        std = (x - mean).square().nanmean((2, 3), keepdim=True).sqrt()
        gain = self._uniform(1 - j, 1 + j, bsz, c, 1, 1).to(x.dtype)
        shift = self._uniform(-j, j, bsz, c, 1, 1).to(x.dtype)
        jittered = mean + gain * (x - mean) + shift * std
        return dict(t, image=torch.where(self._coin(self.cfg.jitter_p, bsz).view(-1, 1, 1, 1), jittered, x))


def build_augment(cfg_augment, task: str = "segmentation", seed: int = 0, device="cpu") -> BatchAugment | None:
    """The batch augmentation for `task` on `device`, or None when `augment.enabled` is false."""
    if not cfg_augment.enabled:
        return None
    return BatchAugment(cfg_augment, task=task, seed=seed, device=device)
