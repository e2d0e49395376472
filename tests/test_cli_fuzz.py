"""Fuzz the command lines: random values for every numeric option, degenerate rasters (1 x 1, one row,
constant, all nodata), a float DSM as --gap-map, a model card that is not JSON, a flat DSM to prepare.

A script run in-process must return 0 (and write its outputs) or 2 with one `error:` line naming the file
or the option; an exception escaping main() is the traceback a user would see, and fails the test.
"""
import random

import numpy as np
import pytest

from conftest import TINY, make_checkpoint
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_write import write_raster

BAD_NUMBERS = ["-1", "-0.5", "nan", "inf", "-inf", "1e999", "abc", "", "0x10", "1,5"]
GOOD_NUMBERS = ["0", "1", "2.5", "10"]


def run(script: str, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of script.main(argv); an exception escaping it fails the test."""
    module = __import__(script)
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refusals: exit 2 with `<prog>: error: ...`
        code = exc.code
    except Exception as exc:
        pytest.fail(f"{script} {argv}: traceback: {type(exc).__name__}: {exc}")
    return code, capsys.readouterr().err


def tif(path, array, nodata=None):
    h, w = array.shape
    write_raster(path, np.asarray(array, np.float32), GeoInfo(h, w, (1.0, 1.0), (0.0, float(h))), nodata=nodata)
    return path


def _clear(code: int, err: str, names) -> bool:
    lines = [line for line in err.splitlines() if "error: " in line]
    return code == 2 and len(lines) == 1 and any(str(n) in lines[0] for n in names)


def test_gaps_numeric_options(tmp_path, capsys):
    """Every bad value of every numeric option is refused naming the option; random good ones run."""
    chm = tif(tmp_path / "chm.tif", np.random.default_rng(0).random((24, 24)) * 20)
    base = ["--chm", chm, "--simulations", "3"]
    for option in ["--thresholds", "--min-area", "--max-area", "--simulations", "--seed", "--ground-window"]:
        for value in BAD_NUMBERS + ["1e6" if option == "--simulations" else "-2"]:
            argv = [*base, "--out", tmp_path / "out", option, value]
            argv += [] if option == "--thresholds" else ["--thresholds", "5"]
            code, err = run("gaps", argv, capsys)
            assert _clear(code, err, [option]), (option, value, err)
    rng = random.Random(5)
    for case in range(6):
        argv = [*base, "--out", tmp_path / f"ok{case}", "--thresholds", rng.choice(GOOD_NUMBERS[1:]),
                "--min-area", rng.choice(GOOD_NUMBERS), "--max-area", "1e4", "--seed", rng.choice(["0", "7"])]
        code, err = run("gaps", argv, capsys)
        assert code == 0 and (tmp_path / f"ok{case}").is_dir(), (argv, err)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (2, 2)])
def test_gaps_analysis_on_tiny_rasters(tmp_path, capsys, shape):
    raster = tif(tmp_path / "r.tif", np.full(shape, 1.0))
    for source in ("--chm", "--dsm"):                   # --dsm alone: heights from the ground filter
        out = tmp_path / source[2:]
        code, err = run("gaps", [source, raster, "--thresholds", "5", "--analysis", "--simulations", "3",
                                 "--out", out], capsys)
        assert code == 0, err
        assert (out / "analysis_5m.json").exists() and (out / "quicklook_5m.png").exists()


@pytest.mark.parametrize("kind", ["constant", "nodata"])
def test_gaps_on_degenerate_rasters(tmp_path, capsys, kind):
    values = np.full((16, 16), 7.0) if kind == "constant" else np.full((16, 16), -9999.0)
    chm = tif(tmp_path / "chm.tif", values, nodata=-9999.0)
    code, err = run("gaps", ["--chm", chm, "--thresholds", "5", "10", "--analysis", "--simulations", "3",
                             "--out", tmp_path / "out"], capsys)
    assert code == 0 or _clear(code, err, [chm]), err


def test_a_float_dsm_is_not_a_gap_map(tmp_path, capsys):
    dsm = tif(tmp_path / "dsm.tif", 300 + np.random.default_rng(1).random((16, 16)))
    code, err = run("gaps", ["--gap-map", dsm, "--out", tmp_path / "out"], capsys)
    assert _clear(code, err, [dsm]) and "not a gap map" in err, err
    gap_map = tif(tmp_path / "gaps_5m.tif", np.where(np.eye(16) > 0, 1, 0))
    code, err = run("gaps", ["--gap-map", gap_map, "--out", tmp_path / "out"], capsys)
    assert code == 0, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.ckpt")


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (3, 3)])
def test_predict_on_tiny_rasters(tmp_path, capsys, checkpoint, shape):
    dsm = tif(tmp_path / "dsm.tif", 300 + np.random.default_rng(2).random(shape))
    code, err = run("predict", ["--checkpoint", checkpoint, "--dsm", dsm, "--out", tmp_path / "out"], capsys)
    assert code == 0 or _clear(code, err, [dsm]), err
    if code == 0:
        assert (tmp_path / "out" / "quicklook.png").exists()


def test_predict_numeric_options(tmp_path, capsys, checkpoint):
    dsm = tif(tmp_path / "dsm.tif", 300 + np.random.default_rng(3).random((32, 32)))
    rng = random.Random(6)
    for case in range(12):
        option = rng.choice(["--window", "--overlap", "--batch-size", "--thresholds"])
        value = rng.choice(BAD_NUMBERS + ["0", "1e9"])
        code, err = run("predict", ["--checkpoint", checkpoint, "--dsm", dsm, "--out", tmp_path / f"o{case}",
                                    option, value], capsys)
        assert _clear(code, err, [option, option[2:].replace("-", "_"), "thresholds"]), (option, value, err)


def test_an_exported_model_whose_card_is_not_json(tmp_path, capsys):
    model = tmp_path / "model.ts"
    model.write_bytes(b"not a model")
    for text in ["{not json", "[1, 2]", '{"thresholds_m": "2,5", "pixel_size_m": 1, "tile_px": 32, "stride": 4}',
                 '{"a": ' + "[" * 5000 + "]" * 5000 + "}"]:
        (tmp_path / "model.json").write_text(text)
        code, err = run("predict", ["--checkpoint", model, "--dsm", tif(tmp_path / "d.tif", np.ones((8, 8))),
                                    "--out", tmp_path / "out"], capsys)
        assert _clear(code, err, [tmp_path / "model.json"]), (text[:30], err)


def test_prepare_data_names_a_flat_dsm(tmp_path, capsys):
    import json
    dsm = tif(tmp_path / "flat_DSM.tif", np.full((64, 64), 305.0))
    chm = tif(tmp_path / "flat_CHM.tif", np.random.default_rng(4).random((64, 64)) * 20)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**TINY, "data": {**TINY["data"], "root": str(tmp_path / "data")}}))
    code, err = run("prepare_data", ["--config", config, "--dsm", dsm, "--chm", chm], capsys)
    assert _clear(code, err, [dsm]) and "same height" in err, err
    code, err = run("prepare_data", ["--config", config, "--export-scene", tmp_path / "s", "--scene-size", "-5"],
                    capsys)
    assert _clear(code, err, ["--scene-size"]), err
