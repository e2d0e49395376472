"""lib/data/build_segmentation.py through prepare_data.py: a single plot of ~1 km² at 1 m, as a forest
scientist brings it, prepares with the README's command (no block override) into a buffered spatial split."""
import json

import numpy as np
import pytest

import prepare_data
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_write import write_raster


def _plot(folder, height=898, width=1078):
    """A DSM/CHM pair of blocky random canopy on a 1 m grid: cheap, with gaps at every threshold."""
    rng = np.random.default_rng(0)
    chm = rng.uniform(0, 30, (height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
    info = GeoInfo(height=height, width=width, pixel_size=(1.0, 1.0), origin=(1_750_000.0, 5_430_000.0))
    dsm, chm_path = folder / "plot_DSM.tif", folder / "plot_CHM.tif"
    write_raster(dsm, (chm + 100).astype(np.float32), info, nodata=float("nan"))
    write_raster(chm_path, chm.astype(np.float32), info, nodata=float("nan"))
    return dsm, chm_path


def _prepare(capsys, config, dsm, chm, out):
    code = prepare_data.main(["--config", config, "--dsm", str(dsm), "--chm", str(chm), "--out", str(out)])
    return code, capsys.readouterr()


def _check_split(out, site):
    manifest = json.loads((out / "manifest.json").read_text())
    rule, meta = manifest["split_rule"], manifest["sites"][site]
    assert rule["rule"] == "block" and rule["block_px"] == 1024 and "fit_block_split" in rule["block_px_rule"]
    assert meta["block_px"] < 1024 and rule["buffer_px"] >= 1
    assert all(manifest["splits"][s]["samples"] > 0 for s in ("train", "val", "test"))
    return manifest


@pytest.mark.parametrize("config", ["configs/quick.json", "configs/config.json"])
def test_a_single_small_plot_prepares_with_a_buffered_block_split(tmp_path, capsys, caplog, config):
    dsm, chm = _plot(tmp_path)
    code, out = _prepare(capsys, config, dsm, chm, tmp_path / "ds")
    assert code == 0, out.err
    manifest = _check_split(tmp_path / "ds", "plot_DSM")
    side = manifest["sites"]["plot_DSM"]["block_px"]
    assert f"split by {side} px blocks instead" in caplog.text
    assert f"split by blocks of {side} px with a 1 px buffer" in out.out
    samples = [manifest["splits"][s]["samples"] for s in ("train", "val", "test")]
    assert samples[0] > samples[1] + samples[2]                        # train keeps the most ground


def test_the_wellington_plot_prepares_with_the_quick_config(real_data, tmp_path, capsys):
    dsm, chm = real_data / "wellington_DSM.tif", real_data / "wellington_CHM.tif"
    code, out = _prepare(capsys, "configs/quick.json", dsm, chm, tmp_path / "ds")
    assert code == 0, out.err
    _check_split(tmp_path / "ds", "wellington_DSM")


def test_a_site_too_small_to_split_is_refused_with_what_would_work(tmp_path, capsys):
    dsm, chm = _plot(tmp_path, 120, 160)
    code, out = _prepare(capsys, "configs/quick.json", dsm, chm, tmp_path / "ds")
    assert code == 2 and "too small to split into train/val/test" in out.err
    hint = out.err.split("hint: ")[1]
    assert "--data.tile_px=32 --data.stride_px=32 would split it" in hint
    assert not (tmp_path / "ds" / "manifest.json").exists()
    code = prepare_data.main(["--config", "configs/quick.json", "--dsm", str(dsm), "--chm", str(chm),
                              "--out", str(tmp_path / "ds"), "--data.tile_px=32", "--data.stride_px=32"])
    assert code == 0, capsys.readouterr().err                          # the hint works
