"""Normalizer: shift invariance, NaN handling, state round-trips; streaming stats against numpy."""
import json

import numpy as np
import pytest
import torch

from lib.core.errors import DataError
from lib.data.normalize import HIST_BIN_M, Normalizer, compute_height_stats, tile_reference, tile_reference_numpy


def quantised_dsm(rng, shape=(3, 1, 24, 20), base=40.0) -> torch.Tensor:
    """Heights on a 1/256 m grid: adding whole metres is exact in float32, so outputs can match bitwise."""
    x = base + np.round(rng.uniform(0, 35, shape) * 256) / 256
    return torch.tensor(x, dtype=torch.float32)


def test_shift_invariance_bitwise():
    rng = np.random.default_rng(0)
    dsm = quantised_dsm(rng)
    dsm[0, 0, :5, :7] = float("nan")
    norm = Normalizer(scale=7.5, ref_quantile=0.05)
    ref = norm(dsm)
    for shift in (500.0, -30.0, 2000.0):
        assert torch.equal(norm(dsm + shift), ref)


def test_shift_invariance_arbitrary_floats():
    rng = np.random.default_rng(1)
    dsm = torch.tensor(rng.uniform(0, 35, (2, 1, 32, 32)), dtype=torch.float32)
    norm = Normalizer(scale=6.0)
    # float32 rounding of dsm + 500 is at most ~3e-5 m per value
    torch.testing.assert_close(norm(dsm + 500), norm(dsm), atol=1e-4 / 6.0, rtol=0)


def test_reference_matches_numpy_nearest_rank():
    rng = np.random.default_rng(2)
    dsm = torch.tensor(rng.normal(100, 20, (4, 1, 9, 11)), dtype=torch.float32)
    dsm[1, 0, ::2] = float("nan")
    dsm[2, 0, 3, 3] = float("inf")
    for q in (0.0, 0.05, 0.5, 1.0):
        ref = tile_reference(dsm, q).flatten()
        for b in range(4):
            v = dsm[b].flatten().numpy()
            v = np.sort(v[np.isfinite(v)])
            assert ref[b].item() == v[int(np.floor(q * (v.size - 1)))]
            assert tile_reference_numpy(dsm[b, 0].numpy(), q) == ref[b].item()
    assert tile_reference_numpy(np.full((3, 3), np.nan, np.float32), 0.05) == 0.0 == tile_reference(
        torch.full((1, 1, 3, 3), float("nan")), 0.05).item()


def test_numpy_reference_equals_torch_on_large_tiles():
    """Where float32 rank rounding could differ: many pixels, odd quantiles."""
    rng = np.random.default_rng(3)
    dsm = rng.normal(300, 15, (1, 1, 257, 263)).astype(np.float32)
    dsm[0, 0, rng.random((257, 263)) < 0.1] = np.nan
    for q in (0.05, 0.013, 0.333, 0.999):
        assert tile_reference_numpy(dsm[0, 0], q) == tile_reference(torch.from_numpy(dsm), q).item()


def test_nan_handling_and_validity_channel():
    rng = np.random.default_rng(3)
    dsm = quantised_dsm(rng, (2, 1, 8, 8))
    dsm[0, 0, 2:4, 2:4] = float("nan")
    dsm[1] = float("nan")  # all invalid: zeros, no NaN leaks out
    out = Normalizer(scale=5.0, validity=True)(dsm)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    valid = torch.isfinite(dsm)
    assert torch.equal(out[:, 1:] == 1, valid)
    assert (out[:, :1][~valid] == 0).all()
    ref = tile_reference(dsm[:1], 0.05)
    torch.testing.assert_close(out[:1, :1][valid[:1]], ((dsm[:1] - ref) / 5.0)[valid[:1]])
    assert Normalizer().out_channels == 1 and Normalizer(validity=True).out_channels == 2


def test_state_dict_and_stats_round_trip():
    rng = np.random.default_rng(4)
    dsm = quantised_dsm(rng)
    a = Normalizer(scale=3.25, ref_quantile=0.1)
    b = Normalizer()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(dsm), b(dsm))
    c = Normalizer.from_stats(json.loads(json.dumps(a.stats())))
    assert torch.equal(a(dsm), c(dsm))
    assert c.normalise_threshold(6.5).item() == pytest.approx(2.0)
    with pytest.raises(DataError, match="scale"):
        Normalizer.from_stats({"ref_quantile": 0.05})
    with pytest.raises(DataError, match="> 0"):
        Normalizer(scale=0.0)


def test_export_keeps_stats():
    rng = np.random.default_rng(5)
    dsm = quantised_dsm(rng)
    norm = Normalizer(scale=4.0, validity=True)
    exported = torch.export.export(norm, (dsm,))
    assert torch.equal(exported.module()(dsm + 100), norm(dsm))


def test_compute_height_stats_matches_numpy():
    rng = np.random.default_rng(6)
    tiles = []
    for i in range(5):
        dsm = rng.normal(200 + 100 * i, 8, (30, 40)).astype(np.float32)  # elevations differ per tile
        dsm[i, :] = np.nan
        chm = rng.uniform(0, 30, (30, 40)).astype(np.float32)
        tiles.append((dsm, chm if i else None))
    stats = compute_height_stats(iter(tiles), ref_quantile=0.05)
    rel = np.concatenate([
        (d - tile_reference(torch.tensor(d)[None, None], 0.05).item())[np.isfinite(d)] for d, _ in tiles])
    chm = np.concatenate([c.ravel() for _, c in tiles if c is not None])
    for got, want in ((stats["dsm_rel"], rel.astype(np.float64)), (stats["chm"], chm.astype(np.float64))):
        assert got["count"] == want.size
        assert got["mean"] == pytest.approx(want.mean(), rel=1e-9)
        assert got["std"] == pytest.approx(want.std(), rel=1e-9)
        assert (got["min"], got["max"]) == (want.min(), want.max())
        for p in (1, 5, 50, 95, 99):  # the bin centre of the sorted value at numpy's lower rank
            exact = np.sort(want)[int(np.floor(p / 100 * (want.size - 1)))]
            assert abs(got[f"p{p}"] - exact) <= 0.51 * HIST_BIN_M
    assert stats["scale"] == stats["dsm_rel"]["std"]
    json.dumps(stats, allow_nan=False)
    norm = Normalizer.from_stats(stats)
    assert float(norm.scale) == pytest.approx(rel.std())


def test_compute_height_stats_empty_split():
    with pytest.raises(DataError, match="scale"):
        compute_height_stats([(np.full((4, 4), np.nan, np.float32), None)])


FEATURES = ["dsm", "relative_height_9m", "relative_height_15m"]


def test_feature_channels_equal_the_classical_relative_height():
    from lib.gaps.baselines import classical_relative_height
    rng = np.random.default_rng(7)
    dsm = quantised_dsm(rng, (2, 1, 32, 28))
    dsm[1, 0, 4:9, 3:11] = float("nan")
    norm = Normalizer(scale=4.0, validity=True, features=FEATURES, pixel_size_m=0.5)
    out = norm(dsm)
    assert out.shape == (2, 4, 32, 28) and norm.out_channels == 4 and torch.isfinite(out).all()
    valid = torch.isfinite(dsm)[:, 0]
    torch.testing.assert_close(out[:, 0], Normalizer(scale=4.0)(dsm)[:, 0])
    for c, window_m in ((1, 9.0), (2, 15.0)):
        want = classical_relative_height(dsm, window_m, 0.5)[:, 0] / 4.0   # 18 and 30 px windows
        torch.testing.assert_close(out[:, c][valid], want[valid])
        assert (out[:, c][~valid] == 0).all()
    assert torch.equal(out[:, 3] == 1, valid)


def test_features_ignore_absolute_elevation():
    rng = np.random.default_rng(8)
    dsm = quantised_dsm(rng, (2, 1, 40, 40))
    dsm[0, 0, :6, :] = float("nan")
    norm = Normalizer(scale=6.0, features=FEATURES)
    ref = norm(dsm)
    for shift in (500.0, -30.0):
        # the opening commutes with a shift; float32 rounding of dsm + 500 is ~3e-5 m
        torch.testing.assert_close(norm(dsm + shift), ref, atol=1e-4, rtol=0)


def test_features_round_trip_through_stats_and_state_dict():
    rng = np.random.default_rng(9)
    dsm = quantised_dsm(rng, (2, 1, 24, 24))
    a = Normalizer(scale=2.5, ref_quantile=0.1, features=FEATURES, pixel_size_m=2.0)
    b = Normalizer.from_stats(json.loads(json.dumps(a.stats())))
    assert b.features == FEATURES and b.pixel_size_m == 2.0 and torch.equal(a(dsm), b(dsm))
    c = Normalizer.from_stats({"scale": 2.5, "ref_quantile": 0.1}, features=FEATURES, pixel_size_m=2.0)
    c.load_state_dict(a.state_dict())
    assert torch.equal(a(dsm), c(dsm))
    old = Normalizer.from_stats({"scale": 2.5, "ref_quantile": 0.1})   # a manifest or an older checkpoint
    assert old.features == ["dsm"] and old.out_channels == 1


@pytest.mark.parametrize("bad", [["rgb"], ["relative_height_0m"], ["dsm", "dsm"], [], ["relative_height_5"]])
def test_unknown_features_are_refused(bad):
    with pytest.raises(DataError, match="relative_height_<W>m"):
        Normalizer(features=bad)


def test_traced_normaliser_with_features_matches():
    rng = np.random.default_rng(10)
    dsm = quantised_dsm(rng, (1, 1, 32, 32))
    norm = Normalizer(scale=3.0, features=FEATURES)
    traced = torch.jit.trace(norm, (dsm,), check_trace=False)
    assert torch.equal(traced(dsm + 100), norm(dsm + 100))


def test_traced_threshold_normalisation_has_no_baked_device():
    """A traced model moved to CUDA must not send its thresholds back to the export-time device."""
    class Thresholds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = Normalizer(scale=4.0)

        def forward(self, t):
            return self.norm.normalise_threshold(t)

    traced = torch.jit.trace(Thresholds(), (torch.tensor([2.0, 5.0]),))
    assert "Device" not in str(traced.graph)
    torch.testing.assert_close(traced(torch.tensor([8.0, 1.0])), torch.tensor([2.0, 0.25]))
