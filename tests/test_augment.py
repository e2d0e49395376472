"""Batch augmentations: exact D4, consistent geometry across keys, nodata kept, reproducible draws."""
import io
import math

import pytest
import torch

from lib.data.augment import BatchAugment, affine_theta, build_augment, d4_index, gather_pixels, warp
from lib.core.errors import ConfigError, DataError
from lib.core.schema import AugmentConfig

THRESHOLDS = (2.0, 5.0, 10.0)
NONE = dict(flip_p=0.0, affine_p=0.0, offset_p=0.0, noise_p=0.0, holes_p=0.0, cutout_p=0.0, jitter_p=0.0)


def only(**kw) -> AugmentConfig:
    """A config with every op off except those given."""
    return AugmentConfig(**{**NONE, **kw})


def make_batch(bsz=6, h=32, w=32, seed=0, device="cpu") -> dict:
    """Smooth canopy over a sloping ground, a nodata block, masks (CHM <= T) with 255 on nodata."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    j = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    phase = torch.rand(bsz, 2, 1, 1, generator=g) * 6.3
    chm = 8 + 6 * torch.sin(i / 4 + phase[:, :1]) * torch.cos(j / 5 + phase[:, 1:])    # (B, 1, H, W)
    chm = chm + 0.01 * torch.rand(bsz, 1, h, w, generator=g)    # ties broken: all 8 D4 variants differ
    dsm = 300 + 0.2 * i + 0.1 * j + chm
    dsm[:, :, 3:9, 20:26] = math.nan
    chm[:, :, 3:9, 20:26] = math.nan
    masks = (chm <= torch.tensor(THRESHOLDS).view(1, -1, 1, 1)).to(torch.uint8)
    masks[chm.isnan().expand_as(masks)] = 255
    batch = {"dsm": dsm, "chm": chm, "masks": masks, "key": [f"s{b}" for b in range(bsz)]}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that NaN == NaN in comparisons."""
    return x.view(torch.int32) if x.dtype == torch.float32 else x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a), bits(b))


def d4_by_hand(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 D4 images of x (..., H, W) with torch.rot90 and torch.flip."""
    rots = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


def test_d4_index_gives_the_eight_group_elements():
    x = torch.rand(1, 1, 5, 5)
    ours = [gather_pixels(x, d4_index(torch.tensor([c]), 5, 5)) for c in range(8)]
    expected = d4_by_hand(x)
    assert all(any(torch.equal(o, e) for e in expected) for o in ours)
    assert len({tuple(o.flatten().tolist()) for o in ours}) == 8


def test_d4_is_exact_and_consistent_across_keys():
    batch = make_batch(bsz=12)
    out = BatchAugment(only(flip_p=1.0), seed=3)(batch)
    for b in range(12):
        # The input is generic, so exactly one hand-made inverse brings the DSM back; it must fit every key.
        inverses = [k for k, back in enumerate(d4_by_hand(out["dsm"][b])) if same(back, batch["dsm"][b])]
        assert len(inverses) == 1
        k = inverses[0]
        for key in ("chm", "masks"):
            assert same(d4_by_hand(out[key][b])[k], batch[key][b])
        assert k != 0                                    # flip_p = 1 never draws the identity


def flips(x: torch.Tensor) -> list[torch.Tensor]:
    """The 4 flips of x (..., H, W); each is its own inverse."""
    return [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]


def test_d4_on_rectangular_tiles_only_flips():
    batch = make_batch(bsz=8, h=16, w=32)
    out = BatchAugment(only(flip_p=1.0), seed=1)(batch)
    for b in range(8):
        assert out["dsm"].shape == batch["dsm"].shape
        match = [k for k, back in enumerate(flips(out["dsm"][b])) if same(back, batch["dsm"][b])]
        assert len(match) == 1 and match[0] != 0
        assert same(flips(out["masks"][b])[match[0]], batch["masks"][b])


def test_affine_quarter_turn_equals_rot90():
    batch = make_batch(bsz=2)
    x = torch.cat([batch["dsm"], batch["chm"]], 1)
    theta = affine_theta(torch.full((2,), math.pi / 2), torch.ones(2), 32, 32)
    warped, masks = warp(x, batch["masks"], theta)
    # Pixel centres land on pixel centres: nearest is exact, bilinear exact up to rounding.
    assert torch.equal(masks, torch.rot90(batch["masks"], 1, (-2, -1)))
    torch.testing.assert_close(warped, torch.rot90(x, 1, (-2, -1)), equal_nan=True, atol=1e-3, rtol=0)


def test_affine_half_turn_on_rectangular_tile_equals_rot180():
    batch = make_batch(bsz=2, h=16, w=32)
    theta = affine_theta(torch.full((2,), math.pi), torch.ones(2), 16, 32)
    _, masks = warp(batch["dsm"], batch["masks"], theta)
    assert torch.equal(masks, batch["masks"].flip(-2, -1))


def test_affine_nearest_matches_brute_force_rigid_rotation():
    h, w, angle, scale = 16, 32, 0.3, 1.1
    masks = (torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8)
    _, out = warp(torch.zeros(1, 1, h, w), masks, affine_theta(torch.tensor([angle]), torch.tensor([scale]), h, w))
    # Reference: rotate pixel centres about the tile centre in pixel units (rigid even when h != w).
    dy = torch.arange(h, dtype=torch.float64).view(h, 1) - (h - 1) / 2
    dx = torch.arange(w, dtype=torch.float64).view(1, w) - (w - 1) / 2
    sx = scale * (math.cos(angle) * dx - math.sin(angle) * dy) + (w - 1) / 2
    sy = scale * (math.sin(angle) * dx + math.cos(angle) * dy) + (h - 1) / 2
    col, row = sx.round().long(), sy.round().long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    clear = ((sx - sx.floor() - 0.5).abs() > 1e-3) & ((sy - sy.floor() - 0.5).abs() > 1e-3)
    expected = torch.where(inside, masks[0, 0][row.clamp(0, h - 1), col.clamp(0, w - 1)], 255)
    assert inside.sum() > h * w // 2 and clear.float().mean() > 0.9
    assert torch.equal(out[0, 0][clear], expected.to(torch.uint8)[clear])


def test_affine_masks_match_thresholded_chm():
    batch = make_batch(bsz=8)
    out = BatchAugment(only(affine_p=1.0, rotate_deg=20.0, scale_frac=0.2), seed=5)(batch)
    chm, masks = out["chm"], out["masks"]
    grad = max(batch["chm"].diff(dim=d).nan_to_num().abs().max().item() for d in (-1, -2))
    for k, t in enumerate(THRESHOLDS):
        labelled = masks[:, k:k + 1] != 255
        # Nearest and bilinear pick points at most ~0.7 px apart: skip pixels that close to the contour.
        clear = labelled & ((chm - t).abs() > grad)
        assert clear.sum() > 0.5 * labelled.sum()
        assert torch.equal(masks[:, k:k + 1][clear], (chm <= t).to(torch.uint8)[clear])


def test_affine_keeps_nodata_without_smearing():
    batch = make_batch(bsz=8)
    batch["dsm"] = torch.where(batch["dsm"].isnan(), math.nan, 300.0)
    out = BatchAugment(only(affine_p=1.0, rotate_deg=30.0, scale_frac=0.3), seed=2)(batch)
    dsm, masks = out["dsm"], out["masks"]
    finite = dsm.isfinite()
    assert finite.any() and (~finite).any()
    torch.testing.assert_close(dsm[finite], torch.full_like(dsm[finite], 300.0), atol=1e-4, rtol=0)
    # Validity and masks use the same nearest source pixel: nodata (and outside) <=> 255.
    assert torch.equal(~finite.expand_as(masks), masks == 255)
    assert torch.equal(out["chm"].isnan(), ~finite)


def test_point_ops_keep_nodata_and_masks_valid():
    batch = make_batch(bsz=8)
    cfg = only(offset_p=1.0, noise_p=1.0, holes_p=1.0, cutout_p=1.0)
    out = BatchAugment(cfg, seed=4)(batch)
    for key in ("dsm", "chm"):
        assert not (batch[key].isnan() & out[key].isfinite()).any()
    assert set(out["masks"].unique().tolist()) <= {0, 1, 255} and out["masks"].dtype == torch.uint8


def test_offset_moves_the_dsm_only():
    batch = make_batch(bsz=8)
    out = BatchAugment(only(offset_p=1.0, offset_m=50.0), seed=0)(batch)
    delta = (out["dsm"] - batch["dsm"]).flatten(1)                  # (B, H*W)
    offset = delta.nanmean(1)
    spread = (delta - offset[:, None]).nan_to_num().abs().max()
    assert spread < 1e-3 and torch.equal(delta.isnan(), batch["dsm"].flatten(1).isnan())
    assert offset.abs().max() <= 50.0 and len(set(offset.round(decimals=2).tolist())) == 8
    assert same(out["chm"], batch["chm"]) and same(out["masks"], batch["masks"])


def test_noise_has_the_configured_std_and_spares_labels():
    batch = make_batch(bsz=8, h=64, w=64)
    out = BatchAugment(only(noise_p=1.0, noise_std_m=0.5), seed=0)(batch)
    delta = (out["dsm"] - batch["dsm"])
    delta = delta[delta.isfinite()]
    assert abs(delta.std().item() - 0.5) < 0.02 and abs(delta.mean().item()) < 0.02
    assert same(out["chm"], batch["chm"]) and same(out["masks"], batch["masks"])


def test_holes_are_rectangles_of_nodata_in_every_key():
    batch = make_batch(bsz=10)
    out = BatchAugment(only(holes_p=1.0, holes_max=1, hole_max_frac=0.25), seed=6)(batch)
    hole = out["dsm"].isnan() & batch["dsm"].isfinite()              # (B, 1, H, W)
    for b in range(10):
        ys, xs = torch.nonzero(hole[b, 0], as_tuple=True)
        box = out["dsm"][b, 0, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.isnan().all()                                      # one filled rectangle (holes_max=1)
        assert ys.max() - ys.min() + 1 <= 8 and xs.max() - xs.min() + 1 <= 8
    assert torch.equal(out["dsm"].isnan().expand_as(out["masks"]), out["masks"] == 255)
    assert torch.equal(out["chm"].isnan(), out["dsm"].isnan())
    assert same(torch.where(hole, 0.0, out["dsm"]), torch.where(hole, 0.0, batch["dsm"]))


def test_cutout_flattens_to_the_local_mean_and_ignores_labels():
    batch = make_batch(bsz=10)
    out = BatchAugment(only(cutout_p=1.0, cutout_max_frac=0.4), seed=7)(batch)
    cut = (out["masks"][:, :1] == 255) & (batch["masks"][:, :1] != 255)    # rectangle minus nodata
    assert cut.flatten(1).any(1).all()
    for b in range(10):
        region = cut[b, 0]
        expected = batch["dsm"][b, 0][region].double().mean().float()
        torch.testing.assert_close(out["dsm"][b, 0][region], expected.expand(int(region.sum())))
        assert out["chm"][b, 0][region].isnan().all() and (out["masks"][b][:, region] == 255).all()
    assert same(torch.where(cut, 0.0, out["dsm"]), torch.where(cut, 0.0, batch["dsm"]))


def test_probability_zero_is_the_identity():
    batch = make_batch()
    out = BatchAugment(only(rotate_deg=30.0, offset_m=10.0, noise_std_m=1.0), seed=0)(batch)
    assert all(same(out[k], batch[k]) for k in ("dsm", "chm", "masks")) and out["key"] is batch["key"]
    assert build_augment(AugmentConfig(enabled=False), "segmentation", 0, "cpu") is None


def test_probability_selects_a_fraction_of_samples():
    batch = {k: v.repeat(50, 1, 1, 1) if torch.is_tensor(v) else v for k, v in make_batch(bsz=4).items()}
    out = BatchAugment(only(affine_p=0.3), seed=0)(batch)
    changed = ~(bits(out["dsm"]) == bits(batch["dsm"])).flatten(1).all(1)
    assert 0.15 < changed.float().mean().item() < 0.45


@pytest.mark.parametrize("op", ["flip_p", "affine_p", "holes_p", "cutout_p", "offset_p", "noise_p"])
def test_parameters_differ_across_the_batch(op):
    one = make_batch(bsz=1)
    batch = {k: v.expand(16, *v.shape[1:]).clone() if torch.is_tensor(v) else v for k, v in one.items()}
    out = BatchAugment(only(**{op: 1.0}), seed=0)(batch)
    distinct = {bits(x).numpy().tobytes() for x in out["dsm"]}
    assert len(distinct) >= (6 if op == "flip_p" else 16)         # 7 flips: a repeat among 16 is expected


def test_same_seed_same_draws_and_state_dict_resumes():
    batch = make_batch()
    cfg = AugmentConfig(flip_p=0.5, affine_p=0.5, holes_p=0.5, cutout_p=0.5)
    a, b = BatchAugment(cfg, seed=11), BatchAugment(cfg, seed=11)
    first, twin = a(batch), b(batch)
    assert all(same(first[k], twin[k]) for k in ("dsm", "chm", "masks"))
    assert not same(BatchAugment(cfg, seed=12)(batch)["dsm"], first["dsm"])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    second = a(batch)
    resumed = BatchAugment(cfg, seed=999)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    third = resumed(batch)
    assert all(same(third[k], second[k]) for k in ("dsm", "chm", "masks"))
    assert not same(second["dsm"], first["dsm"])


def test_dsm_only_batch_for_regression():
    batch = {"dsm": make_batch()["dsm"]}
    out = build_augment(AugmentConfig(affine_p=0.5), "regression", 0, "cpu")(batch)
    assert set(out) == {"dsm"} and out["dsm"].shape == batch["dsm"].shape


def test_classification_geometry_and_band_jitter():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(8, 3, 16, 16, generator=g) * torch.tensor([1.0, 10.0, 300.0]).view(1, 3, 1, 1)
    label = torch.arange(8)
    cfg = only(jitter_p=1.0, band_jitter=0.2)
    out = BatchAugment(cfg, task="classification")({"image": image, "label": label})
    assert out["label"] is label
    x, y = image.flatten(2).double(), out["image"].flatten(2).double()     # (B, C, H*W)
    xc, yc = x - x.mean(2, keepdim=True), y - y.mean(2, keepdim=True)
    gain = (xc * yc).sum(2) / (xc * xc).sum(2)
    torch.testing.assert_close(yc, gain[..., None] * xc, atol=1e-3 * x.abs().max().item(), rtol=0)
    assert ((gain - 1).abs() <= 0.2 + 1e-5).all() and len(set(gain.flatten().round(decimals=4).tolist())) == 24
    flipped = BatchAugment(only(flip_p=1.0), task="classification")({"image": image, "label": label})
    assert all(any(same(v, image[b]) for v in d4_by_hand(flipped["image"][b])) for b in range(8))


def test_bad_batches_and_tasks_raise():
    aug = BatchAugment(only(flip_p=1.0))
    batch = make_batch()
    with pytest.raises(DataError, match="no 'dsm'"):
        aug({"chm": batch["chm"]})
    with pytest.raises(DataError, match="masks"):
        aug(dict(batch, masks=batch["masks"].float()))
    with pytest.raises(DataError, match="chm"):
        aug(dict(batch, chm=batch["chm"][:, :, :16]))
    with pytest.raises(ConfigError, match="segmentation"):
        BatchAugment(only(), task="detection")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_runs_on_cuda_with_the_same_properties():
    batch = make_batch(bsz=8, device="cuda")
    cfg = AugmentConfig(flip_p=1.0, affine_p=1.0, holes_p=1.0, cutout_p=1.0, noise_p=1.0)
    aug = build_augment(cfg, "segmentation", 0, "cuda")
    state = aug.state_dict()
    torch.cuda.set_sync_debug_mode("error")          # the claim: no op waits on the host
    try:
        out = aug(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["dsm"].device.type == "cuda" and out["masks"].dtype == torch.uint8
    assert not (out["dsm"].isnan().expand_as(out["masks"]) & (out["masks"] != 255)).any()
    assert set(out["masks"].unique().tolist()) <= {0, 1, 255}
    again = build_augment(cfg, "segmentation", 1, "cuda")
    again.load_state_dict(state)
    assert same(again(batch)["dsm"], out["dsm"])
