"""Versioning: the recipe hash ignores names, paths, devices and logging but not what trains the model; every
checkpoint records it with the dataset's digest and the package version."""
import pytest
import torch

from conftest import tiny_config
from lib import __version__
from lib.core.config import build_config, config_hash
from lib.core.recipe import recipe_hash
from lib.data.shards import manifest_digest, read_manifest
from lib.train import runner
from lib.train.checkpoint import load_checkpoint


def test_recipe_hash_ignores_names_paths_and_logging_but_not_the_recipe():
    base = recipe_hash(build_config({}))
    same = [{"run": {"name": "other", "output_root": "elsewhere", "device": "cpu"}},
            {"data": {"root": "data/other", "cache": True, "synthetic_sites": 3}},
            {"log": {"tensorboard": False, "progress_every_steps": 3}}, {"eval": {"batch_size": 3}},
            {"predict": {"window_px": 128}}, {"train": {"checkpoint_every_steps": 5}}]
    for change in same:
        assert recipe_hash(build_config(change)) == base, change
    for change in ({"optim": {"lr": 0.01}}, {"model": {"depth": 3}}, {"run": {"seed": 1}},
                   {"train": {"batch_size": 4}}, {"data": {"task": "regression"}}, {"augment": {"enabled": False}}):
        assert recipe_hash(build_config(change)) != base, change
    assert config_hash(build_config({"run": {"name": "other"}})) != config_hash(build_config({}))


@pytest.fixture(scope="module")
def two_runs(tiny_dataset):
    """last.ckpt of two 3-step runs that differ only in run.name."""
    paths = []
    for name in ("first", "second"):
        cfg = tiny_config(tiny_dataset, run={"name": name}, train={"epochs": 1, "max_steps": 3},
                          log={"tensorboard": False, "images_every_epochs": 0})
        paths.append(runner.train_model(cfg) / "last.ckpt")
    return paths


def test_every_checkpoint_names_its_dataset_recipe_and_package(two_runs, tiny_dataset):
    first, second = (load_checkpoint(p)["version"] for p in two_runs)
    digest = manifest_digest(read_manifest(tiny_dataset / "data"))
    assert len(digest) == 64
    for version in (first, second):
        assert version["dataset_manifest"] == digest and version["project"] == __version__
    assert first["recipe_hash"] == second["recipe_hash"] and len(first["recipe_hash"]) == 12
    assert first["config_hash"] != second["config_hash"]                   # the names differ
    assert torch.equal(load_checkpoint(two_runs[0])["model"]["head.weight"],
                       load_checkpoint(two_runs[1])["model"]["head.weight"])  # one recipe: one model
