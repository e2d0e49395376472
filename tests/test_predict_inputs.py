"""predict.py on the DSMs users bring: bad thresholds, all-nodata files, scenes smaller than a window, a bad
file among many, nodata borders and -9999 fill, and elevations far from the training ones (shipped model)."""
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest

import predict
from conftest import make_checkpoint
from lib.core.errors import ConfigError
from lib.infer.loading import check_thresholds
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import write_raster
from tests.test_scene_windows import write_dsm
from tests.test_mapping import QUIET, smooth_dsm

CONTINUOUS = {"threshold_sampling": "continuous", "threshold_range_m": [1.0, 30.0]}


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_thresholds_must_be_finite_heights_above_zero(tmp_path, capsys, bad):
    with pytest.raises(ConfigError, match="must be canopy heights in metres > 0"):
        check_thresholds([2.0, bad], [2.0, 5.0], SimpleNamespace(**CONTINUOUS))
    ckpt = make_checkpoint(tmp_path / "m.ckpt", train={"batch_size": 4, **CONTINUOUS})
    write_dsm(tmp_path / "dsm.tif", smooth_dsm(40, 40))
    rc = predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "dsm.tif"), "--out", str(tmp_path / "o"),
                       *QUIET, "--thresholds", "2", str(bad)])
    assert rc == 2 and "> 0" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_out_of_range_thresholds_warn_and_unsorted_ones_still_nest(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", train={"batch_size": 4, **CONTINUOUS})
    write_dsm(tmp_path / "dsm.tif", smooth_dsm(48, 40))
    with caplog.at_level(logging.WARNING):
        assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "dsm.tif"), "--out", str(tmp_path / "o"),
                             *QUIET, "--thresholds", "40", "7.5", "0.5", "15",
                             "--predict.prob_threshold=0.54"]) == 0
    assert "[40.0, 0.5] m are outside the range" in caplog.text
    maps = {t: read_raster(tmp_path / "o" / f"gaps_{t}m.tif")[0] == 1 for t in ("0.5", "7.5", "15", "40")}
    for low, high in (("0.5", "7.5"), ("7.5", "15"), ("15", "40")):
        assert not (maps[low] & ~maps[high]).any()


@pytest.mark.parametrize("fill", [np.nan, -9999.0])
def test_an_all_nodata_dsm_is_a_clear_error(tmp_path, capsys, fill):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    path = tmp_path / "empty_DSM.tif"
    info = write_dsm(path, smooth_dsm(40, 40))
    write_raster(path, np.full((40, 40), fill, np.float32), info, nodata=fill)
    assert predict.main(["--checkpoint", ckpt, "--dsm", str(path), "--out", str(tmp_path / "o"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "every pixel" in err and "nodata" in err


@pytest.mark.parametrize("shape", [(20, 30), (1, 50), (37, 1)])
def test_a_scene_smaller_than_the_window_is_mapped_with_a_warning(tmp_path, caplog, shape):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    write_dsm(tmp_path / "small.tif", smooth_dsm(*shape))
    with caplog.at_level(logging.WARNING):
        assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "small.tif"),
                             "--out", str(tmp_path / "o"), *QUIET]) == 0
    assert "smaller than its 32 px window" in caplog.text
    gaps, info = read_raster(tmp_path / "o" / "gaps_5m.tif")
    assert gaps.shape == shape and not np.isnan(gaps).any()
    caplog.clear()
    write_dsm(tmp_path / "big.tif", smooth_dsm(32, 45))
    with caplog.at_level(logging.WARNING):
        assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "big.tif"),
                             "--out", str(tmp_path / "o2"), *QUIET]) == 0
    assert "window" not in caplog.text


def test_a_bad_file_in_a_region_is_reported_and_the_others_mapped_then_resumed(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    folder = tmp_path / "dsms"
    folder.mkdir()
    for i in range(3):
        write_dsm(folder / f"a{i}.tif", smooth_dsm(36, 40, seed=i))
    raw = (folder / "a1.tif").read_bytes()
    (folder / "b_truncated.tif").write_bytes(raw[:len(raw) // 2])
    (folder / "c_text.tif").write_text("x,y,z\n")
    args = ["--checkpoint", ckpt, "--dsm", str(folder), "--out", str(tmp_path / "out"), *QUIET]
    assert predict.main(args) == 2
    captured = capsys.readouterr()
    assert "3 scenes mapped, 0 skipped, 2 failed" in captured.out
    assert "b_truncated: FAILED" in captured.out and "c_text: FAILED" in captured.out
    assert "2 scene(s) failed: b_truncated, c_text" in captured.err
    out = tmp_path / "out"
    summary = json.loads((out / "predict.json").read_text())
    assert sorted(summary["scenes"]) == ["a0", "a1", "a2"] and sorted(summary["failed"]) == ["b_truncated", "c_text"]
    assert str(folder / "c_text.tif") in summary["failed"]["c_text"] and "TIFF" in summary["failed"]["c_text"]
    assert json.loads((out / "b_truncated" / "failed.json").read_text())["dsm"] == str(folder / "b_truncated.tif")
    scenes = {line.split(",")[0] for line in (out / "gaps_all_5m.csv").read_text().splitlines()[1:]}
    assert scenes == {"a0", "a1", "a2"}
    (out / "b_truncated" / ".gaps_5m.tif.4242.0a0b.tmp").write_bytes(b"half")   # as a killed run leaves them
    (out / "b_truncated" / ".model_grid.x1y2").mkdir()
    (folder / "c_text.tif").unlink()                                  # the user removes one and fixes the other
    write_dsm(folder / "b_truncated.tif", smooth_dsm(36, 40, seed=7))
    assert predict.main(args) == 0
    assert "1 scenes mapped, 3 skipped, 0 failed" in capsys.readouterr().out
    assert not (out / "b_truncated" / "failed.json").exists() and (out / "b_truncated" / "done.json").exists()
    assert not list((out / "b_truncated").glob(".*"))
    assert json.loads((out / "predict.json").read_text())["failed"] == {}        # c_text is no longer a scene


# ----------------------------------------------------------------------------- the shipped model, real DSM
def wellington_crop(real_data, offset_m=None):
    dsm, info = read_raster(real_data / "wellington_DSM.tif")
    dsm, info = dsm[:150, :200], info.with_shape(150, 200)
    if offset_m is not None:                                          # lowest pixel at offset_m
        dsm = (dsm.astype(np.float64) - np.nanmin(dsm) + offset_m).astype(np.float32)
    return dsm, info


def shipped(dsm_path, out, *extra):
    assert predict.main(["--dsm", str(dsm_path), "--out", str(out), "--no-quicklook",
                         "--thresholds", "2", "5", "10", "15", *extra]) == 0
    return np.stack([read_raster(out / f"prob_{t}m.tif")[0] for t in (2, 5, 10, 15)]) if "--write-prob" in extra \
        else np.stack([read_raster(out / f"gaps_{t}m.tif")[0] for t in (2, 5, 10, 15)])


def test_shipped_model_ignores_absolute_elevation(tmp_path, real_data):
    """Above 2000 m or below sea level, the maps are those of the same DSM at 100 m up to float32 noise."""
    probs = {}
    for offset in (100.0, 2000.0, -300.0):
        dsm, info = wellington_crop(real_data, offset)
        write_raster(tmp_path / f"dsm_{offset:g}.tif", dsm, info, nodata=float("nan"))
        probs[offset] = shipped(tmp_path / f"dsm_{offset:g}.tif", tmp_path / f"o{offset:g}", "--write-prob")
    for offset in (2000.0, -300.0):
        assert np.abs(probs[offset] - probs[100.0]).max() < 2e-3            # float32 steps of 1.2e-4 m at 2000 m
        assert ((probs[offset] > 0.5) != (probs[100.0] > 0.5)).mean() < 1e-3


def test_shipped_model_marks_nodata_border_holes_and_fill_as_nodata(tmp_path, real_data):
    dsm, info = wellington_crop(real_data)
    yy, xx = np.mgrid[:150, :200]
    nodata = np.hypot((yy - 75) / 75, (xx - 100) / 100) > 0.95 + 0.08 * np.sin(5 * np.arctan2(yy - 75, xx - 100))
    nodata[60:72, 80:100] = nodata[100:125, 150:160] = True           # an irregular outline and two holes
    dsm[nodata] = -9999.0
    write_raster(tmp_path / "dsm.tif", dsm, info, nodata=-9999.0)
    gaps = shipped(tmp_path / "dsm.tif", tmp_path / "o")                # 255 (the nodata tag) reads as NaN
    assert read_info(tmp_path / "o" / "gaps_10m.tif").nodata == 255
    assert (np.isnan(gaps) == nodata[None]).all()
    assert set(np.unique(gaps[:, ~nodata])) == {0.0, 1.0}


@pytest.mark.parametrize("fill", [0.0, -32767.0])
def test_an_undeclared_fill_value_around_the_survey_is_nodata(tmp_path, caplog, fill):
    """A photogrammetry DSM whose outline is 0 (or -32767) without a nodata tag maps like the same DSM with NaN
    there, with a warning, instead of the fill being read as a 400 m deep pit that the model calls gap."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    dsm = smooth_dsm(48, 56) + 100
    outline = np.zeros(dsm.shape, bool)
    outline[:6] = outline[:, -9:] = True
    dsm[outline] = np.nan
    write_dsm(tmp_path / "nan.tif", dsm)
    info = read_info(tmp_path / "nan.tif")
    write_raster(tmp_path / "fill.tif", np.where(outline, fill, dsm).astype(np.float32), info)  # no nodata tag
    maps = {}
    for name in ("nan", "fill"):
        with caplog.at_level(logging.WARNING):
            assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / f"{name}.tif"),
                                 "--out", str(tmp_path / name), *QUIET, "--write-prob"]) == 0
        maps[name] = [read_raster(tmp_path / name / f"{kind}_5m.tif")[0] for kind in ("gaps", "prob")]
    assert f"hold {fill:g}" in caplog.text and "treated as nodata" in caplog.text
    for fill_map, nan_map in zip(maps["fill"], maps["nan"]):
        np.testing.assert_array_equal(fill_map, nan_map)                 # NaN (nodata) on the outline in both
    assert np.isnan(maps["fill"][0][outline]).all()
    assert json.loads((tmp_path / "fill" / "predict.json").read_text())["undeclared_nodata"] == [fill]
    assert not list((tmp_path / "fill").glob(".dsm_nodata.*"))          # the temporary copy is gone


def test_a_legitimate_zero_height_is_kept(tmp_path):
    """0 m within FILL_GAP_M of the other heights (a coastal DSM) is a height, not nodata."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    dsm = smooth_dsm(40, 40) - 290                                       # heights around 10 m a.s.l.
    dsm[:4] = 0.0
    info = write_dsm(tmp_path / "coast.tif", dsm)
    write_raster(tmp_path / "coast.tif", dsm, info)
    assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "coast.tif"), "--out", str(tmp_path / "o"),
                         *QUIET]) == 0
    assert not np.isnan(read_raster(tmp_path / "o" / "gaps_5m.tif")[0]).any()
    assert json.loads((tmp_path / "o" / "predict.json").read_text())["undeclared_nodata"] == []


def test_progress_gives_percentage_rate_and_time_left_per_scene_and_region(capsys):
    progress = predict.progress_printer(total_mp=3.0)
    first = progress(100, 10_000)                      # 1 MP of the region's 3
    first(100)
    err = capsys.readouterr().err.strip()
    assert err.startswith("scene 100.0 %") and "MP/s" in err and "ETA 0:00:00" in err
    assert "region  33.3 %" in err and "ETA" in err.split("region")[1]
    progress(100, 20_000)(100)                         # the second scene ends the region
    assert "region 100.0 %" in capsys.readouterr().err
