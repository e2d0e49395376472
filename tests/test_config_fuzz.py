"""Fuzz the config front door: thousands of mutated configs, YAML-lite and JSON texts and overrides.

Whatever comes in, only a ConfigError may come out; and whatever is accepted survives a round trip
through its saved JSON unchanged (so no NaN or other value that a checkpoint could not reproduce).
"""
import copy
import json
import random
import string

import pytest

from conftest import REPO, TINY
from lib.core import yamllite
from lib.core.config import apply_overrides, build_config, config_to_dict, read_config_file
from lib.core.errors import ConfigError
from lib.core.schema import Config

SEED_CONFIGS = [TINY, json.loads((REPO / "configs" / "quick.json").read_text()),
                json.loads((REPO / "configs" / "config.json").read_text())]
VALUES = [0, 1, -1, 2, 7, 16, 64, 255, 10 ** 30, -(10 ** 30), 0.0, 0.5, -0.5, 1e-3, 1e30, float("nan"),
          float("inf"), -float("inf"), True, False, None, "", "x", "auto", "unet", "relu", "1e-3", "[1, 2]",
          [], [1], [2.0, 5.0], [5, 2], [0.7, 0.15, 0.15], [None], [[1]], ["a"], {}, {"a": 1}, {"lr": 1}]


def _paths(data: dict, prefix=()):
    """Every (path, value) of a nested dict, sections included."""
    for key, value in data.items():
        yield prefix + (key,), value
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def _schema_paths():
    defaults = config_to_dict(Config())
    return [p for p, v in _paths(defaults) if not isinstance(v, dict) or len(p) == 2]


SCHEMA_PATHS = _schema_paths()


def mutate(data: dict, rng: random.Random) -> dict:
    """One to four random edits: set a known or unknown key to a random value, delete, retype, nest."""
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 4)):
        paths = list(_paths(data))
        action = rng.random()
        if action < 0.45:  # a real schema key, any value
            path = rng.choice(SCHEMA_PATHS)
        elif action < 0.6 and paths:  # an existing key, maybe of a section
            path = rng.choice(paths)[0]
        elif action < 0.7 and paths:  # delete
            *parents, leaf = rng.choice(paths)[0]
            node = data
            for key in parents:
                node = node[key]
            node.pop(leaf, None)
            continue
        else:  # a misspelt or invented key
            section = rng.choice(list(data) + ["optimm", "", "x"])
            path = (section, rng.choice(["lrr", "tile", "", " ", "a.b", "épochs", "0"]))
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {} if rng.random() < 0.9 else rng.choice(VALUES)
            node = node[key]
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = copy.deepcopy(rng.choice(VALUES))
    return data


def check(build, case) -> None:
    """build() -> Config or ConfigError, nothing else; an accepted config round-trips through JSON."""
    try:
        cfg = build()
    except ConfigError:
        return
    except Exception as exc:  # the fuzz is looking for exactly this
        pytest.fail(f"{type(exc).__name__}: {exc}\n  for {case!r}")
    try:
        text = json.dumps(config_to_dict(cfg), allow_nan=False)
    except ValueError:
        pytest.fail(f"accepted a non-finite number: {config_to_dict(cfg)}")
    again = build_config(json.loads(text))
    assert config_to_dict(again) == config_to_dict(cfg) == json.loads(text), case


def test_mutated_configs_only_raise_config_error():
    rng = random.Random(1)
    for _ in range(3000):
        data = mutate(rng.choice(SEED_CONFIGS), rng)
        check(lambda: build_config(data), data)


def yaml_of(data, indent: int = 0) -> str:
    """A config dict as YAML-lite text (block mappings, inline lists)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(" " * indent + f"{key}:")
            lines.append(yaml_of(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def mutate_text(text: str, rng: random.Random) -> str:
    """Character and line edits that break syntax: insert, delete, swap lines, re-indent, tabs."""
    alphabet = ":-[]{},#'\" \t\n" + string.ascii_letters[:6] + "0123456789.e"
    for _ in range(rng.randint(1, 5)):
        action, i = rng.random(), rng.randrange(len(text) + 1)
        if action < 0.35:
            text = text[:i] + rng.choice(alphabet) + text[i:]
        elif action < 0.6:
            text = text[:i] + text[i + rng.randint(1, 6):]
        else:
            lines = text.split("\n")
            j = rng.randrange(len(lines))
            if action < 0.75:
                lines[j] = " " * rng.choice([1, 2, 3, 4, 8]) + lines[j]
            elif action < 0.85:
                lines.insert(j, lines[rng.randrange(len(lines))])
            elif action < 0.95:
                lines[j] = "- " + lines[j].strip()
            else:
                lines[j] = "\t" + lines[j]
            text = "\n".join(lines)
    return text


def test_mutated_yaml_lite_texts_only_raise_config_error():
    rng = random.Random(2)
    texts = [yaml_of(d) for d in SEED_CONFIGS]
    for _ in range(3000):
        text = mutate_text(rng.choice(texts), rng)

        def build():
            data = yamllite.loads(text, where="fuzz.yaml")
            if not isinstance(data, dict):
                raise ConfigError("top level is not a mapping")
            return build_config(data)
        check(build, text)


def test_mutated_files_and_overrides_only_raise_config_error(tmp_path):
    rng = random.Random(3)
    json_path, yaml_path = tmp_path / "fuzz.json", tmp_path / "fuzz.yaml"
    for i in range(600):
        seed = rng.choice(SEED_CONFIGS)
        json_path.write_text(mutate_text(json.dumps(seed, indent=1), rng), encoding="utf-8")
        yaml_path.write_bytes(mutate_text(yaml_of(seed), rng).encode("utf-8", "surrogatepass")
                              + (bytes([rng.randrange(128, 256)]) if i % 50 == 0 else b""))  # not UTF-8
        for path in (json_path, yaml_path):
            check(lambda: build_config(read_config_file(path)), path.read_bytes())
        key = ".".join(rng.choice(SCHEMA_PATHS)) if rng.random() < 0.8 else rng.choice(["a", "a..b", ".x", "x."])
        value = rng.choice(["1", "-1", "1e-3", "nan", "inf", "true", "null", "[1,", "[2, 5]", "{a: 1}", "'x",
                            "", "=", "auto", "0x10", "1_0", "[[]]", "{}"])
        override = f"--{key}={value}" if rng.random() < 0.9 else f"--{key}"
        check(lambda: build_config(apply_overrides(seed, [override])), override)


def test_override_errors_name_the_override_and_the_key():
    """Bad values for random schema keys: the error quotes the override and names its key, never
    `override:0:0` or the config file it would have been merged into."""
    rng = random.Random(4)
    values = ["[1,", "{a:", "-5", "[-5]", "nan", "[nan]", "1e999", "'x", "[[]]", "x", "-1e-9", "[0]", "{}",
              "[" * 3000, "1" * 5000, "true", "[2, 1]", "[1.5, 1e400]"]
    for _ in range(1500):
        key = ".".join(rng.choice(SCHEMA_PATHS))
        override = f"--{key}={rng.choice(values)}"
        try:
            cfg = build_config(TINY, [override], source="tiny.json")
        except ConfigError as exc:
            text = str(exc)
            if text.startswith("override"):
                assert override[:40] in text and key in text, (override, text)
            else:  # a rule over a whole section after the override passed on its own
                assert text.startswith("tiny.json: ") and key.split(".")[0] in text, (override, text)
            continue
        json.dumps(config_to_dict(cfg), allow_nan=False)


def test_an_override_after_a_free_form_one_is_still_named():
    with pytest.raises(ConfigError, match=r"^override '--data.tile_px=-3': data.tile_px: -3 is below"):
        build_config({}, ["--model.extra.width=3", "--data.tile_px=-3"])


@pytest.mark.parametrize("depth", [10, 64, 65, 900, 5000])
def test_nested_files_are_refused_by_depth(tmp_path, depth):
    """JSON and YAML-lite nested `depth` levels (inside model.extra): accepted up to 64, else a ConfigError
    naming the file; never a RecursionError."""
    inner = "[" * (depth - 3) + "]" * (depth - 3)
    (tmp_path / "c.json").write_text('{"model": {"extra": {"a": ' + inner + "}}}")
    yaml = "model:\n  extra:\n" + "".join(" " * (4 + 2 * i) + f"k{i}:\n" for i in range(depth - 2))
    (tmp_path / "c.yaml").write_text(yaml)
    for path in (tmp_path / "c.json", tmp_path / "c.yaml"):
        try:
            build_config(read_config_file(path))
        except ConfigError as exc:
            assert depth > 64 and str(path) in str(exc) and "nested deeper" in str(exc), str(exc)
        else:
            assert depth <= 64
