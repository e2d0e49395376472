"""Whole-scene prediction: seamless blending, one forward per window batch, nodata, georeference, memory,
the area filter and gap table, scene scores, and predict.py end to end."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import predict
from conftest import make_checkpoint
from lib.gaps.analysis import summarize_gap_map
from lib.gaps.masks import IGNORE, gap_labels, gap_masks
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import RasterWriter, write_raster
from lib.infer.scene_gaps import filter_gaps
from lib.infer.scene_windows import blend_ramp, d4_average, iter_scene, plan_scene, predict_thresholds, write_scene
from lib.infer.scene_scores import score_scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NZTM_KEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 1026, 34737, 12, 0, 3072, 0, 1, 2193)
INFO = GeoInfo(height=0, width=0, pixel_size=(1.0, 1.0), origin=(1802139.25, 5467490.5),
               geokeys=NZTM_KEYS, geo_ascii="NZTM2000 2|")


class PointOracle(torch.nn.Module):
    """A per-pixel stand-in model (gap where DSM - 300 m <= T): blending must reproduce it exactly."""

    def forward(self, dsm, thresholds_m):
        return torch.sigmoid(thresholds_m.view(-1, 1, 1, 1) - torch.nan_to_num(dsm - 300.0))


class BoxOracle(torch.nn.Module):
    """A 7x7 box filter with zero padding: like a CNN, it is wrong near every window edge."""

    def forward(self, dsm, thresholds_m):
        x = F.avg_pool2d(torch.nan_to_num(dsm - 300.0), 7, stride=1, padding=3)
        return torch.sigmoid(x - thresholds_m.view(-1, 1, 1, 1) + 5.0)


def write_dsm(path, dsm: np.ndarray, pixel_m: float = 1.0):
    info = replace(INFO, height=dsm.shape[0], width=dsm.shape[1], pixel_size=(pixel_m, pixel_m))
    write_raster(path, dsm, info, nodata=float("nan"))
    return info


def random_dsm(h, w, seed=0) -> np.ndarray:
    return (300 + 4 * np.random.default_rng(seed).standard_normal((h, w))).astype(np.float32)


def scene(net, path, window, overlap, thresholds=(2.0, 5.0), batch=3, **kw) -> np.ndarray:
    """(K, H, W) probabilities of the whole scene, from the streamed blocks."""
    info = read_info(path)
    plan = plan_scene(info.height, info.width, window, overlap, stride=4)
    blocks = list(iter_scene(net, path, plan, thresholds, batch, **kw))
    assert [b[0] for b in blocks] == sorted({b[0] for b in blocks}) and blocks[0][0] == 0
    return np.concatenate([b[1] for b in blocks], axis=1)


def test_blend_ramp_is_positive_flat_inside_and_fades_neighbours():
    ramp = blend_ramp(64, 16)
    assert ramp.min() > 0 and torch.all(ramp[16:48] == 1)
    assert torch.allclose(ramp, ramp.flip(0))
    # two neighbours 48 px apart: their ramps sum to (nearly) 1 over the shared 16 px
    assert torch.allclose(ramp[48:] + ramp[:16], torch.ones(16), atol=2e-3)


@pytest.mark.parametrize("shape", [(130, 201), (40, 23)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.8])
def test_windowed_equals_whole_for_a_per_pixel_model(tmp_path, shape, overlap):
    dsm = random_dsm(*shape)
    write_dsm(tmp_path / "dsm.tif", dsm)
    whole = scene(PointOracle(), tmp_path / "dsm.tif", 256, 0.0)    # one window covers the scene
    windowed = scene(PointOracle(), tmp_path / "dsm.tif", 32, overlap)
    assert windowed.shape == (2, *shape)
    np.testing.assert_allclose(windowed, whole, atol=1e-6)


def test_blending_hides_window_edges(tmp_path):
    write_dsm(tmp_path / "dsm.tif", random_dsm(160, 224))
    whole = scene(BoxOracle(), tmp_path / "dsm.tif", 256, 0.0)
    blended = np.abs(scene(BoxOracle(), tmp_path / "dsm.tif", 64, 0.25) - whole)
    naive = np.abs(scene(BoxOracle(), tmp_path / "dsm.tif", 64, 0.0) - whole)
    assert naive.max() > 0.2                   # the test can see a seam: tiles side by side show one
    assert blended.max() < 0.05
    # no systematic step: the column profile of the error has no spike at the window edges
    profile = blended.mean(axis=(0, 1))
    assert profile.max() < 0.01 and profile.max() < 0.1 * naive.mean(axis=(0, 1)).max()


def test_every_window_at_every_threshold_in_forwards_no_larger_than_the_window_batch(tmp_path):
    write_dsm(tmp_path / "dsm.tif", random_dsm(70, 90))
    calls = []

    class Recorder(PointOracle):
        def forward(self, dsm, thresholds_m):
            calls.append((dsm.shape[0], thresholds_m.tolist()))
            return super().forward(dsm, thresholds_m)

    scene(Recorder(), tmp_path / "dsm.tif", 32, 0.25, thresholds=(2.0, 5.0, 10.0), batch=4)
    plan = plan_scene(70, 90, 32, 0.25, 4)
    windows = len(plan.rows) * len(plan.cols)
    assert [t for _, ts in calls for t in ts] == [2.0, 5.0, 10.0] * windows   # each pair once, window-major
    assert max(n for n, _ in calls) <= 4                                    # not batch x thresholds at once
    assert len(calls) == 3 * -(-windows // 4)                               # one forward per threshold and batch


def test_tta_average_is_d4_equivariant():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, 5, padding=2)  # not equivariant itself; 2 outputs like 2 thresholds

    def fn(x):
        return torch.sigmoid(conv(x) + torch.linspace(0, 1, x.shape[-1]))  # a column ramp: not D4-equivariant

    x, t = torch.randn(2, 1, 16, 16), torch.tensor([2.0, 5.0])
    with torch.no_grad():
        base = d4_average(fn, x)
        assert base.shape == (2, 2, 16, 16)
        assert torch.allclose(d4_average(fn, x.flip(-1)), base.flip(-1), atol=1e-6)
        assert torch.allclose(d4_average(fn, x.rot90(1, (-2, -1))), base.rot90(1, (-2, -1)), atol=1e-6)
        point = PointOracle()                      # per pixel: D4-equivariant, TTA changes nothing
        plain = predict_thresholds(point, x + 300, t)
        assert torch.allclose(predict_thresholds(point, x + 300, t, tta=True), plain, atol=1e-6)
        assert torch.allclose(plain[:, 1:], point(x + 300, t[1:].repeat(2)))


def test_nodata_passes_through_to_every_output(tmp_path):
    dsm = random_dsm(90, 70)
    dsm[10:30, 5:25] = np.nan
    dsm[60, :] = np.nan
    write_dsm(tmp_path / "dsm.tif", dsm)
    plan = plan_scene(90, 70, 32, 0.25, 4)
    write_scene(PointOracle(), tmp_path / "dsm.tif", tmp_path, plan, [2.0, 5.0], write_prob=True)
    for tag in ("2m", "5m"):
        prob, prob_info = read_raster(tmp_path / f"prob_{tag}.tif")
        gaps, gaps_info = read_raster(tmp_path / f"gaps_{tag}.tif")  # 255 is the nodata tag -> NaN
        assert np.array_equal(np.isnan(prob), np.isnan(dsm)) and np.array_equal(np.isnan(gaps), np.isnan(dsm))
        assert gaps_info.nodata == IGNORE and prob_info.nodata != prob_info.nodata  # NaN tag
        assert set(np.unique(gaps[~np.isnan(gaps)])) <= {0.0, 1.0}


def test_outputs_keep_the_georeference(tmp_path):
    info = write_dsm(tmp_path / "dsm.tif", random_dsm(50, 75))
    write_scene(PointOracle(), tmp_path / "dsm.tif", tmp_path, plan_scene(50, 75, 32, 0.25), [5.0], write_prob=True)
    filter_gaps(tmp_path / "gaps_5m.tif", tmp_path / "dsm.tif", 1.0, 1e6)
    for name in ("gaps_5m.tif", "prob_5m.tif"):
        out = read_info(tmp_path / name)
        assert (out.height, out.width, out.pixel_size, out.origin) == (50, 75, info.pixel_size, info.origin)
        assert out.geokeys == info.geokeys and out.geo_ascii == info.geo_ascii and out.epsg == 2193
        if shutil.which("gdalinfo"):
            report = json.loads(subprocess.run(["gdalinfo", "-json", str(tmp_path / name)], capture_output=True,
                                               text=True, check=True).stdout)
            assert report["geoTransform"] == [info.origin[0], 1.0, 0.0, info.origin[1], 0.0, -1.0]
            assert 'ID["EPSG",2193]' in report["coordinateSystem"]["wkt"]


def test_filter_gaps_applies_the_label_area_filter_and_writes_the_table(tmp_path):
    dsm = np.full((40, 60), 320.0, np.float32)
    dsm[5:7, 5:7] = 300.0          # 4 m² gap: dropped by min_area 5
    dsm[20:30, 10:20] = 300.0      # 100 m² gap: kept
    dsm[2:5, 40:43] = 300.0        # 9 m² gap: kept
    dsm[0, 0] = np.nan
    info = write_dsm(tmp_path / "dsm.tif", dsm)
    write_scene(PointOracle(), tmp_path / "dsm.tif", tmp_path, plan_scene(40, 60, 32, 0.25), [5.0])
    n = filter_gaps(tmp_path / "gaps_5m.tif", tmp_path / "dsm.tif", 5.0, 1000.0)
    expected, n_expected = gap_labels(np.where(np.isnan(dsm), np.nan, dsm - 300.0), 5.0, 5.0, 1000.0, 1.0)
    gaps, _ = read_raster(tmp_path / "gaps_5m.tif")
    assert n == n_expected == 2
    assert np.array_equal(np.nan_to_num(gaps, nan=IGNORE), np.where(np.isnan(dsm), IGNORE, expected > 0))
    rows = (tmp_path / "gaps_5m.csv").read_text().splitlines()
    assert rows[0].split(",") == ["gap_id", "gap_area", "dsm_max", "dsm_min", "dsm_mean", "dsm_sd", "dsm_gini",
                                  "dsm_range", "x", "y"]
    first = rows[1].split(",")  # gap 2 in scan order of the filtered map is the 9 m² one at the top
    assert first[:2] == ["1", "9"] and float(first[8]) == pytest.approx(info.origin[0] + 41.5)
    assert float(first[9]) == pytest.approx(info.origin[1] - 3.5) and float(first[4]) == pytest.approx(300.0)


def test_scene_scores_against_a_reference(tmp_path):
    rng = np.random.default_rng(1)
    chm = np.clip(20 + 8 * rng.standard_normal((64, 80)), 0, None).astype(np.float32)
    chm[10:30, 10:40] = 1.0
    dsm = 300 + chm
    info = write_dsm(tmp_path / "dsm.tif", dsm)
    write_raster(tmp_path / "chm.tif", chm, replace(info, height=64, width=80))
    ref = gap_masks(chm, [2.0, 10.0], 1.0, 1e6, 1.0)
    pred = ref.copy()
    pred[1, :, :40] = np.where(ref[1, :, :40] == IGNORE, IGNORE, 0)    # miss part of the 10 m gaps
    for tag, mask in zip(("2m", "10m"), pred):
        write_raster(tmp_path / f"gaps_{tag}.tif", mask, replace(info, height=64, width=80), nodata=IGNORE)
    scores = score_scene(tmp_path, tmp_path / "dsm.tif", [2.0, 10.0], 1.0, 1e6, chm_path=tmp_path / "chm.tif")
    assert scores["model"]["2m"] == {"iou": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0}
    tp = int(((pred[1] == 1) & (ref[1] == 1)).sum())
    assert scores["model"]["10m"]["recall"] == pytest.approx(tp / (ref[1] == 1).sum())
    assert scores["model"]["10m"]["precision"] == 1.0
    assert set(scores["classical"]["mean"]) == set(scores["ground_filter"]["mean"]) == {"iou", "f1", "precision",
                                                                                        "recall"}
    assert np.array_equal(read_raster(tmp_path / "ref_gaps_10m.tif")[0] == 1, ref[1] == 1)
    stats = scores["gap_statistics"]
    for k, tag in enumerate(("2m", "10m")):                       # the statistics of both maps, side by side
        ref_labels, n_ref = gap_labels(chm, [2.0, 10.0][k], 1.0, 1e6, 1.0)
        pred_labels, n_pred = gap_labels(np.where(pred[k] == 1, 0.0, 1.0), 0.5, 1.0, 1e6, 1.0)
        assert stats[tag]["reference"] == summarize_gap_map(ref_labels, n_ref, info)
        assert stats[tag]["model"] == summarize_gap_map(pred_labels, n_pred, info)
    assert stats["10m"]["model"]["gap_area_m2"] < stats["10m"]["reference"]["gap_area_m2"]
    assert set(stats["2m"]["model"]) >= {"n_gaps", "lambda_asner", "lambda_hanel", "clark_evans_r"}
    write_raster(tmp_path / "dtm.tif", dsm - chm, replace(info, height=64, width=80))     # CHM = DSM - DTM
    from_dtm = score_scene(tmp_path, tmp_path / "dsm.tif", [2.0, 10.0], 1.0, 1e6, dtm_path=tmp_path / "dtm.tif")
    assert from_dtm["model"] == scores["model"] and from_dtm["reference_kind"] == "dtm"


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    sys.path.insert(0, sys.argv[3] + "/tests")
    from test_scene_windows import PointOracle
    from lib.geoio.geotiff_read import read_info
    from lib.infer.scene_windows import plan_scene, write_scene

    def run(path, out):
        info = read_info(path)
        write_scene(PointOracle(), path, out, plan_scene(info.height, info.width, 256, 0.25), [2, 5, 10, 15], 8)
    run(sys.argv[1], sys.argv[2])  # warm-up on one strip: library pages, allocator pools, buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(sys.argv[4], sys.argv[2])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_increase_mb": (after - before) / 1024}))
""")


def test_memory_is_bounded_by_the_strip_not_the_scene(tmp_path):
    """Peak RSS of a 4096 x 4096 scene after a warm-up on one strip of the same width.

    glibc's malloc is pinned to mmap for blocks > 128 kB (MALLOC_MMAP_THRESHOLD_): with its default
    dynamic threshold, freed strip-sized blocks stay in the heap and peak RSS measures that hoarding
    (about 60-110 MB here) rather than what the code holds.
    """
    n, k = 4096, 4
    rng = np.random.default_rng(0)
    for name, height in (("strip.tif", 256), ("big.tif", n)):
        with RasterWriter(tmp_path / name, replace(INFO, height=height, width=n), np.float32, compress=False) as out:
            for row0 in range(0, height, 256):
                out.write(row0, (300 + 5 * rng.standard_normal((256, n))).astype(np.float32))
    (tmp_path / "out").mkdir()
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "strip.tif"), str(tmp_path / "out"),
                             REPO, str(tmp_path / "big.tif")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, result.stderr
    increase = json.loads(result.stdout.splitlines()[-1])["peak_increase_mb"]
    whole_scene_mb = (k + 2) * n * n * 4 / 2**20  # DSM + K probabilities + weights, float32: 384 MB
    print(f"peak RSS increase for a {n}x{n} scene: {increase:.0f} MB (whole-scene float arrays: {whole_scene_mb:.0f} MB)")
    assert increase < 0.1 * whole_scene_mb
    assert read_info(tmp_path / "out" / "gaps_15m.tif").height == n


def test_predict_refuses_another_pixel_size_without_resampling(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    write_dsm(tmp_path / "dsm.tif", random_dsm(40, 40), pixel_m=0.5)
    assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "dsm.tif"), "--out", str(tmp_path / "o"),
                         "--no-resample"]) == 2
    err = capsys.readouterr().err
    assert "0.5 x 0.5 m pixels" in err and "trained on 1 m pixels" in err and "--no-resample" in err
    assert not (tmp_path / "o").exists()


def test_predict_cli_on_the_real_wellington_scene(tmp_path, real_data):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", data={"tile_px": 32, "min_area_m2": 2.0, "max_area_m2": 5000.0})
    dsm_path, out = real_data / "wellington_DSM.tif", tmp_path / "out"
    code = predict.main(["--checkpoint", ckpt, "--dsm", str(dsm_path), "--chm", str(real_data / "wellington_CHM.tif"),
                         "--out", str(out), "--thresholds", "5", "10", "--window", "64", "--write-prob",
                         "--predict.batch_size=2"])
    assert code == 0
    dsm, info = read_raster(dsm_path)
    for tag in ("5m", "10m"):
        for name in (f"gaps_{tag}.tif", f"prob_{tag}.tif", f"ref_gaps_{tag}.tif"):
            out_info = read_info(out / name)
            assert (out_info.origin, out_info.pixel_size, out_info.geokeys, out_info.height, out_info.width) == \
                (info.origin, info.pixel_size, info.geokeys, info.height, info.width)
        gaps = read_raster(out / f"gaps_{tag}.tif")[0]
        assert np.array_equal(np.isnan(gaps), np.isnan(dsm))
        header = (out / f"gaps_{tag}.csv").read_text().splitlines()[0]
        assert header.startswith("gap_id,gap_area,dsm_max")
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) >= {"model", "classical", "reference", "thresholds_m"}
    assert set(scores["model"]) == set(scores["classical"]) == set(scores["ground_filter"]) == {"5m", "10m", "mean"}
    assert scores["gap_statistics"]["10m"]["reference"]["n_gaps"] > 0 and "lambda_hanel" in \
        scores["gap_statistics"]["10m"]["model"]
    assert (out / "quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "predict.json").read_text())
    assert summary["predict"]["window_px"] == 64 and summary["predict"]["batch_size"] == 2


def test_prefetched_yields_everything_in_order_and_reraises_errors():
    from lib.infer.scene_windows import prefetched

    assert list(prefetched(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad strip")
    with pytest.raises(ValueError, match="bad strip"):
        list(prefetched(broken()))


def test_padded_batches_have_one_shape_and_change_nothing(tmp_path):
    write_dsm(tmp_path / "dsm.tif", random_dsm(70, 90))
    shapes = []

    class Recording(PointOracle):
        def forward(self, dsm, thresholds_m):
            shapes.append(tuple(dsm.shape))
            return super().forward(dsm, thresholds_m)
    padded = scene(Recording(), tmp_path / "dsm.tif", 32, 0.25, batch=4, pad_batches=True)
    assert len(set(shapes)) == 1 and shapes[0][0] == 4          # the window batch's size, every call
    np.testing.assert_allclose(padded, scene(PointOracle(), tmp_path / "dsm.tif", 32, 0.25, batch=4), atol=1e-6)
