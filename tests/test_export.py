"""Export: TorchScript for every segmentation model and ExportedProgram, checked against eager (NaN included),
the model card, a failing parity check, ONNX's optional dependencies, and the exported model in predict.py."""
import importlib.util
import json

import numpy as np
import pytest
import torch

import export
import predict
from conftest import make_checkpoint
from lib.infer import export as lib_export
from lib.core.errors import ExportError
from lib.infer.loading import load_model
from lib.models import MODELS
from lib.geoio.geotiff_read import read_raster
from tests.test_scene_windows import random_dsm, write_dsm

SEGMENTATION_MODELS = sorted(name for name, spec in MODELS.items() if not spec.classifier_only)
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def tiny(tmp_path, name="unet_film_cbam"):
    return load_model(make_checkpoint(tmp_path / f"{name}.ckpt", model={"name": name, "base_channels": 4, "depth": 2}))


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_torchscript_matches_eager_for_every_segmentation_model(tmp_path, name):
    loaded = tiny(tmp_path, name)
    card = lib_export.export_model(loaded, "torchscript", tmp_path / "m.ts")
    assert card["parity_max_abs_diff"] <= lib_export.PARITY_TOL
    # the file works through the one loading path, on a shape and batch it was not traced with
    reloaded = load_model(tmp_path / "m.ts")
    dsm = torch.from_numpy(random_dsm(96, 64))[None, None].repeat(2, 1, 1, 1)
    dsm[0, 0, 10:20, 5:30] = float("nan")
    t = torch.tensor([2.0, 15.0])
    with torch.no_grad():
        eager, scripted = loaded.net(dsm, t), reloaded.net(dsm, t)
        assert not torch.allclose(eager, loaded.net(dsm, t.flip(0)), atol=1e-3)  # the threshold matters
    assert torch.allclose(eager, scripted, atol=1e-5)
    assert (reloaded.thresholds_m, reloaded.tile_px, reloaded.stride) == ([2.0, 5.0, 10.0, 15.0], 32, 4)


def test_exported_program_matches_eager(tmp_path):
    """One model: torch.export costs seconds per graph. export_model loads the .pt2 back for its parity check
    (batch 1-3, 32 and 64 px, NaN holes), so passing means the saved file matches eager."""
    loaded = tiny(tmp_path, "unet_film_cbam")
    card = lib_export.export_model(loaded, "exported", tmp_path / "m.pt2")
    assert card["parity_max_abs_diff"] <= lib_export.PARITY_TOL and card["format"] == "exported"
    reloaded = load_model(tmp_path / "m.pt2")                  # the one loading path reads it with its card
    assert (reloaded.thresholds_m, reloaded.tile_px, reloaded.stride) == ([2.0, 5.0, 10.0, 15.0], 32, 4)
    dsm = torch.from_numpy(random_dsm(64, 96))[None, None].repeat(3, 1, 1, 1)
    dsm[1, 0, 5:20, 30:50] = float("nan")
    t = torch.tensor([2.0, 10.0, 15.0])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.net(dsm, t), loaded.net(dsm, t), atol=1e-5, rtol=0)


def test_model_card_holds_what_deployment_needs(tmp_path):
    loaded = tiny(tmp_path)
    lib_export.export_model(loaded, "torchscript", tmp_path / "m.ts")
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["thresholds_m"] == [2.0, 5.0, 10.0, 15.0] and card["tile_px"] == 32 and card["stride"] == 4
    assert card["pixel_size_m"] == 1.0 and card["normalization"] == {"scale": 5.0, "ref_quantile": 0.05}
    assert card["model"] == "unet_film_cbam" and card["config"]["data"]["min_area_m2"] == 1.0
    assert {"version", "metrics", "format"} <= set(card)


def test_a_model_that_drifts_fails_the_parity_check(tmp_path, monkeypatch):
    loaded = tiny(tmp_path)
    drift = {"torchscript": lambda net, example, path: (lambda d, t: net(d, t) + 1e-3),
             "exported": lambda net, example, path: (lambda d, t: torch.where(torch.isnan(d), torch.nan, net(d, t)))}
    monkeypatch.setattr(lib_export, "EXPORTERS", drift)
    with pytest.raises(ExportError, match="differs from eager by 0.001"):
        lib_export.export_model(loaded, "torchscript", tmp_path / "m.ts")
    with pytest.raises(ExportError, match="differs from eager by inf"):   # NaN where eager gives 0
        lib_export.export_model(loaded, "exported", tmp_path / "m.pt2")
    assert not list(tmp_path.glob("m.*"))


def test_export_never_replaces_a_weights_card(tmp_path):
    card = tmp_path / "gaps_dsm_v1.json"
    card.write_text(json.dumps({"file": "gaps_dsm_v1.pt", "sha256": "ab" * 32}))
    with pytest.raises(ExportError, match="weights card of gaps_dsm_v1.pt"):
        lib_export.export_model(tiny(tmp_path), "torchscript", tmp_path / "gaps_dsm_v1.ts")
    assert json.loads(card.read_text())["sha256"] == "ab" * 32 and not (tmp_path / "gaps_dsm_v1.ts").exists()


@pytest.mark.skipif(HAS_ONNX, reason="onnx and onnxruntime are installed")
def test_onnx_without_its_packages_says_what_to_install(tmp_path):
    with pytest.raises(ExportError, match="pip install .*onnx"):
        lib_export.export_model(tiny(tmp_path), "onnx", tmp_path / "m.onnx")


@pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxruntime not installed (optional)")
def test_onnx_matches_eager(tmp_path):
    card = lib_export.export_model(tiny(tmp_path), "onnx", tmp_path / "m.onnx")
    assert card["parity_max_abs_diff"] <= lib_export.PARITY_TOL


def test_export_script_and_predict_with_the_exported_model(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    assert export.main(["--checkpoint", ckpt, "--format", "torchscript"]) == 0
    assert "max abs difference" in capsys.readouterr().out and (tmp_path / "m.ts").is_file()
    dsm = random_dsm(70, 90)
    dsm[3:9, 4:40] = np.nan
    write_dsm(tmp_path / "dsm.tif", dsm)
    for model in ("m.ckpt", "m.ts"):
        assert predict.main(["--checkpoint", str(tmp_path / model), "--dsm", str(tmp_path / "dsm.tif"),
                             "--out", str(tmp_path / model.replace(".", "_")), "--window", "32", "--write-prob"]) == 0
    eager, scripted = (read_raster(tmp_path / d / "prob_5m.tif")[0] for d in ("m_ckpt", "m_ts"))
    np.testing.assert_allclose(scripted, eager, atol=1e-5)
    assert np.array_equal(np.isnan(scripted), np.isnan(dsm))
