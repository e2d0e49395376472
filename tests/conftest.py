"""Shared fixtures: the real rasters beside the repository, skipped when absent."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests use tiny tensors: one intra-op thread is faster than two fighting over the CI's 2 cores.
torch.set_num_threads(1)


@pytest.fixture
def real_data() -> Path:
    """Folder of the shared real rasters; skips the test when it is not beside the repo."""
    if not (REAL_DATA / "ALS_CHM_DUC.tif").exists():
        pytest.skip(f"real rasters not found at {REAL_DATA}")
    return REAL_DATA


TINY = {
    "run": {"name": "tiny", "seed": 0},
    "data": {"synthetic_sites": 6, "synthetic_size_px": 96, "tile_px": 32, "stride_px": 32,
             "shard_mb": 1, "workers": 0},
    "model": {"name": "unet_film_cbam", "base_channels": 4, "depth": 2, "dropout": 0.1},
    "optim": {"lr": 0.003},
    "schedule": {"warmup_steps": 2},
    "train": {"epochs": 2, "batch_size": 4, "early_stopping_patience": 0},
    "eval": {"batch_size": 8},
    "predict": {"window_px": 32, "batch_size": 4},
    "log": {"images_every_epochs": 1, "progress_every_steps": 2},
}


def tiny_config(tmp_path, **sections):
    """The tiny test config with its data and runs under tmp_path; `sections` override whole keys."""
    import copy
    from lib.core.config import build_config
    data = copy.deepcopy(TINY)
    data["data"]["root"] = str(tmp_path / "data")
    data["run"]["output_root"] = str(tmp_path / "runs")
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(data)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared tiny synthetic dataset (6 sites of 96 px, 32 px tiles), built once per session."""
    from lib.data.build_segmentation import build_dataset
    from lib.data.site_sources import sources_from_config
    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(root)
    build_dataset(cfg, sources_from_config(cfg.data, cfg.run.seed), cfg.data.root)
    return root


def make_checkpoint(path, **sections) -> str:
    """An untrained but loadable checkpoint (tiny model) whose embedded config has `sections`.

    The weights are jittered: a fresh FiLM is the identity, and its output would not depend on the threshold.
    """
    import torch
    from lib.core.config import build_config, config_to_dict
    from lib.models import build_model
    cfg = build_config({"model": {"name": "unet_film_cbam", "base_channels": 4, "depth": 2},
                        "data": {"tile_px": 32}, "train": {"batch_size": 4}, **sections})
    torch.manual_seed(0)
    model = build_model(cfg.model, task="segmentation", in_channels=1, batch_size=cfg.train.batch_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "version": {}, "metrics": {},
                "normalization": {"scale": 5.0, "ref_quantile": 0.05}}, path)
    return str(path)
