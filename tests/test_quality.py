"""Scene quality: reference gaps and IoU against brute force, the pipeline with an oracle net, the classical
baseline on Wellington against the lead's published figures."""
import numpy as np
import pytest
import torch

from lib.gaps.masks import IGNORE
from lib.infer.quality import classical_ious, flat_closed_scene, ious, reference_gaps, score_scene
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_write import write_raster

GROUND_M = 100.0


class OracleNet(torch.nn.Module):
    """Knows the ground is flat at GROUND_M: gap probability 1 where dsm - ground <= T (flip: inverted order)."""

    def __init__(self, flip: bool = False):
        super().__init__()
        self.flip = flip

    def forward(self, dsm, thresholds_m):                      # (B,1,H,W) metres, (B,) metres
        t = thresholds_m.view(-1, 1, 1, 1)
        gap = (dsm - GROUND_M <= (30.0 - t if self.flip else t)).float()
        return torch.where(torch.isfinite(dsm), gap, torch.zeros_like(gap))


def test_reference_gaps_and_ious_match_brute_force():
    rng = np.random.default_rng(0)
    chm = rng.uniform(0, 20, (12, 9)).astype(np.float32)
    dsm = chm + 50
    chm[0, :3] = np.nan
    dsm[5, 5] = np.nan
    ref = reference_gaps(chm, dsm, [2.0, 10.0])
    pred = rng.random((2, 12, 9)) < 0.4
    for k, t in enumerate([2.0, 10.0]):
        for i, j in np.ndindex(12, 9):
            valid = np.isfinite(chm[i, j]) and np.isfinite(dsm[i, j])
            assert ref[k, i, j] == (int(chm[i, j] <= t) if valid else IGNORE)
        valid = ref[k] != IGNORE
        gap, p = ref[k] == 1, pred[k] & valid
        assert ious(pred, ref)[k] == pytest.approx((p & gap).sum() / (p | gap).sum())


def _write_scene(folder, shape=(70, 90)):
    rng = np.random.default_rng(1)
    chm = rng.gamma(2.0, 6.0, shape).astype(np.float32)
    chm[10:14, 20:30] = np.nan
    dsm = GROUND_M + chm
    info = GeoInfo(height=shape[0], width=shape[1], pixel_size=(1.0, 1.0), origin=(0.0, float(shape[0])))
    paths = folder / "s_DSM.tif", folder / "s_CHM.tif"
    for path, array in zip(paths, (dsm, chm)):
        write_raster(path, array, info, nodata=float("nan"))
    return paths


def test_score_scene_with_an_oracle_and_an_inverted_net(tmp_path):
    dsm_path, chm_path = _write_scene(tmp_path)
    thresholds = [2.0, 5.0, 10.0, 15.0]
    good = score_scene(OracleNet(), dsm_path, chm_path, thresholds, window_px=32, dense_thresholds_m=(1.0, 4.0, 9.0))
    assert good["model"] == pytest.approx([1.0] * 4) and good["model_nested"] == pytest.approx([1.0] * 4)
    assert good["nesting"]["rate"] == 0 and good["nesting_dense"]["rate"] == 0
    assert good["valid_pixels"] == 70 * 90 - 40
    assert all(0 <= v <= 1 for v in good["classical"]["best"])
    bad = score_scene(OracleNet(flip=True), dsm_path, chm_path, thresholds, window_px=32, dense_thresholds_m=())
    from lib.geoio.geotiff_read import read_raster
    chm = read_raster(chm_path)[0]
    maps = [chm <= 30 - t for t in thresholds]                              # what the inverted net maps
    wrong = sum((low & ~high).sum() for low, high in zip(maps, maps[1:]))
    assert bad["nesting"]["rate"] == pytest.approx(wrong / sum(m.sum() for m in maps[:-1]))
    assert "nesting_dense" not in bad
    ref = reference_gaps(chm, chm + GROUND_M, thresholds)
    assert bad["model_nested"] == pytest.approx(ious(np.stack([maps[0]] * 4), ref))  # the widest (2 m) map wins


def test_classical_best_is_the_best_window(tmp_path):
    dsm_path, chm_path = flat_closed_scene(tmp_path, size_px=96)
    from lib.geoio.geotiff_read import read_raster
    dsm, chm = read_raster(dsm_path)[0], read_raster(chm_path)[0]
    ref = reference_gaps(chm, dsm, [5.0, 10.0])
    scores = classical_ious(dsm, ref, [5.0, 10.0], windows_m=(11.0, 31.0))
    table = np.array([scores["windows"]["11m"], scores["windows"]["31m"]])
    assert scores["best"] == pytest.approx(table.max(0).tolist())
    assert scores["best_window_m"] == [(11.0, 31.0)[i] for i in table.argmax(0)]


def test_classical_baseline_on_wellington_matches_the_published_figures(real_data):
    from lib.geoio.geotiff_read import read_raster
    dsm, _ = read_raster(real_data / "wellington_DSM.tif")
    chm, _ = read_raster(real_data / "wellington_CHM.tif")
    scores = classical_ious(dsm, reference_gaps(chm, dsm, [2, 5, 10, 15]), [2, 5, 10, 15])
    assert scores["best"] == pytest.approx([0.052, 0.185, 0.463, 0.539], abs=0.001)  # the lead's measurement


def _shipped_model():
    from lib.infer.loading import load_model
    from lib.infer.weights import DEFAULT_WEIGHTS, verified_weights
    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("no shipped weights in this checkout")
    return load_model(verified_weights())


def _assert_beats_classical(report, thresholds, scene: str) -> None:
    for t, raw, nested, classical in zip(thresholds, report["model"], report["model_nested"],
                                         report["classical"]["best"]):
        assert min(raw, nested) > classical, (f"{scene} at {t} m: the shipped model ({raw:.3f}, nested "
                                              f"{nested:.3f}) does not beat classical ({classical:.3f})")
    assert report["nesting"]["rate"] < 0.01


def test_shipped_model_beats_the_classical_method_on_wellington(real_data):
    """Issue 12: the shipped weights beat the best classical window at every threshold on the unseen NZ scene."""
    from lib.infer.quality import score_scene
    loaded, thresholds = _shipped_model(), [2.0, 5.0, 10.0, 15.0]
    report = score_scene(loaded.net, real_data / "wellington_DSM.tif", real_data / "wellington_CHM.tif", thresholds,
                         window_px=loaded.config.predict.window_px, stride=loaded.stride, dense_thresholds_m=())
    _assert_beats_classical(report, thresholds, "Wellington")


def test_shipped_model_beats_the_classical_method_on_flat_closed_canopy():
    """Issue 12: ... and on flat closed temperate canopy (a seed no training site uses), the classical
    method's best case, where LiDAR pits let the opening find the ground."""
    from lib.infer.quality import score_flat_closed
    loaded, thresholds = _shipped_model(), [2.0, 5.0, 10.0, 15.0]
    report = score_flat_closed(loaded.net, thresholds, window_px=loaded.config.predict.window_px,
                               stride=loaded.stride, dense_thresholds_m=())
    _assert_beats_classical(report, thresholds, "flat closed scene")
