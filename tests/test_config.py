"""Config loading: JSON/YAML-lite parsing, schema validation, overrides, errors that point at the problem."""
import json
import re

import pytest

from lib.core import yamllite
from lib.core.config import (build_config, config_from_args, config_hash, config_to_dict, load_config,
                        read_config_file, save_config)
from lib.core.errors import ConfigError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["--optim.lr=3e-4", "--train.epochs=3", "--data.thresholds_m=[2,5]",
                             "--run.name=abc", "--train.compile=true"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 3 and cfg.run.name == "abc" and cfg.train.compile is True
    assert cfg.data.thresholds_m == [2.0, 5.0]


def test_int_accepted_where_float_expected_but_not_reverse():
    assert isinstance(build_config({"optim": {"lr": 1}}).optim.lr, float)
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        build_config({"train": {"epochs": 2.5}})
    with pytest.raises(ConfigError, match="expected bool"):
        build_config({"train": {"compile": 1}})


def test_unknown_key_names_file_key_and_nearest(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lrr": 0.1}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert str(path) in text and "optim.lrr" in text and "did you mean 'optim.lr'" in text
    with pytest.raises(ConfigError, match="unknown key 'optimm'"):
        build_config({"optimm": {}})


def test_unknown_override_key_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lr": 0.1}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["--optim.lrr=1e-3"])
    text = str(info.value)
    assert "override '--optim.lrr=1e-3'" in text and str(path) not in text and "'optim.lr'" in text
    assert load_config(None, ["--model.extra.width=3"]).model.extra == {"width": 3}  # free-form mapping
    with pytest.raises(ConfigError, match="takes no --config"):
        build_config({}, ["--config=configs/quick.json"])  # evaluate/predict: the checkpoint's config


@pytest.mark.parametrize("override, said", [("--model.activation=mesh", "'mesh' is not one of"),
                                            ("--optim.lr=-1", "below the minimum"),
                                            ("--train.batch_size=eight", "expected int")])
def test_a_bad_override_value_names_the_override_not_the_file(tmp_path, override, said):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"activation": "relu"}, "optim": {"lr": 0.1}, "train": {"batch_size": 4}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    text = str(info.value)
    assert text.startswith(f"override {override!r}: ") and said in text and str(path) not in text
    with pytest.raises(ConfigError, match=re.escape(f"{path}: model.activation")):   # a bad value in the file
        build_config({"model": {"activation": "mesh"}}, [], source=str(path))


def test_str_fields_take_yaml_booleans_and_numbers_back_as_text(tmp_path):
    cfg = load_config(None, ["--train.amp=off", "--run.name=2024"])
    assert cfg.train.amp == "off" and cfg.run.name == "2024"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\nrun:\n  name: 7\n")
    cfg = load_config(path)
    assert cfg.train.amp == "off" and cfg.run.name == "7"
    with pytest.raises(ConfigError, match="expected str, found True"):
        load_config(None, ["--train.amp=on"])  # 'on' is no choice of train.amp: still an error


def test_out_of_range_and_choices():
    with pytest.raises(ConfigError, match="below the minimum"):
        build_config({"optim": {"lr": -1.0}})
    with pytest.raises(ConfigError, match="did you mean 'relu'"):
        build_config({"model": {"activation": "rlu"}})
    with pytest.raises(ConfigError, match="strictly increasing"):
        build_config({"data": {"thresholds_m": [5, 2]}})
    with pytest.raises(ConfigError, match="divisible"):
        build_config({"data": {"tile_px": 100}, "model": {"depth": 4}})


def test_json_syntax_error_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "optim": {"lr": 0.1,}\n}\n')
    with pytest.raises(ConfigError, match=r"bad.json:2:\d+: invalid JSON"):
        load_config(path)


def test_yaml_lite_equals_json(tmp_path):
    text = """
# a comment
run:
  name: trial   # trailing comment
  seed: 7
data:
  thresholds_m: [2, 5.5, 10]
  sites:
    - name: a
      dsm: "path#1.tif"
      chm: b.tif
  test_sites:
    - a
optim:
  lr: 1e-3
  nesterov: true
"""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    data = read_config_file(path)
    assert data == {"run": {"name": "trial", "seed": 7},
                    "data": {"thresholds_m": [2, 5.5, 10],
                             "sites": [{"name": "a", "dsm": "path#1.tif", "chm": "b.tif"}],
                             "test_sites": ["a"]},
                    "optim": {"lr": 1e-3, "nesterov": True}}
    assert load_config(path).data.sites[0]["dsm"] == "path#1.tif"


@pytest.mark.parametrize("text, where", [("a:\n  b: 1\n c: 2\n", ":3:"), ("a: [1, 2\n", ":1:"),
                                         ("a: 1\na: 2\n", ":2:"), ("just words\n", ":1:"),
                                         ("a:\n\tb: 1\n", ":2:")])
def test_yaml_lite_errors_have_positions(text, where):
    with pytest.raises(ConfigError, match=where):
        yamllite.loads(text, where="f.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["--model.depth=3", "--data.tile_px=64"])
    save_config(cfg, tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["--optim.lr=0.5"])) != config_hash(cfg)


def test_config_from_args_accepts_space_separated_and_rejects_junk():
    class Args:
        config = None
    cfg = config_from_args(Args, ["--optim.lr", "0.01", "--run.name=x"])
    assert cfg.optim.lr == 0.01 and cfg.run.name == "x"
    with pytest.raises(ConfigError, match="unrecognised argument"):
        config_from_args(Args, ["--verbose"])


def test_fuzzed_texts_only_raise_config_error():
    import random
    rng = random.Random(0)
    alphabet = "ab:-[]{}#\"' \n\t12.e,"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            data = yamllite.loads(text)
            build_config(data if isinstance(data, dict) else {})
        except ConfigError:
            pass
