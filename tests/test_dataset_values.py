"""A run records the thresholds, tile size and pixel size of the dataset it trained on, not the config's."""
import json

import torch

from conftest import tiny_config
from lib.train.runner import train_model, with_dataset_values


def test_dataset_values_replace_the_configs_and_say_so(tmp_path):
    cfg = tiny_config(tmp_path, data={"thresholds_m": [2.0, 5.0], "tile_px": 64, "pixel_size_m": 1.0})
    said = []
    manifest = {"thresholds_m": [10.0, 20.0, 30.0], "tile_px": 32, "pixel_size_m": 0.5}
    out = with_dataset_values(cfg, manifest, lambda *args: said.append(args[0] % args[1:]))
    assert (out.data.thresholds_m, out.data.tile_px, out.data.pixel_size_m) == ([10.0, 20.0, 30.0], 32, 0.5)
    assert len(said) == 1 and "data.thresholds_m=[10.0, 20.0, 30.0]" in said[0] and "tile_px=64" in said[0]
    same = {"thresholds_m": [2.0, 5.0], "tile_px": 64, "pixel_size_m": 1.0}
    assert with_dataset_values(cfg, same, said.append) is cfg and len(said) == 1


def test_trained_run_records_the_datasets_thresholds_and_tile(tiny_dataset, tmp_path):
    cfg = tiny_config(tmp_path, data={"root": str(tiny_dataset / "data"), "thresholds_m": [3.0, 6.0],
                                      "tile_px": 64},
                      train={"epochs": 1, "max_steps": 3, "batch_size": 4}, log={"tensorboard": False})
    manifest = json.loads((tiny_dataset / "data" / "manifest.json").read_text())
    run_dir = train_model(cfg)
    saved = json.loads((run_dir / "config.json").read_text())["data"]
    assert saved["thresholds_m"] == manifest["thresholds_m"] != [3.0, 6.0]
    assert saved["tile_px"] == manifest["tile_px"] == 32
    embedded = torch.load(run_dir / "last.ckpt", weights_only=True)["config"]["data"]
    assert embedded["thresholds_m"] == manifest["thresholds_m"] and embedded["tile_px"] == 32
