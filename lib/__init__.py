"""forestgaps library: the modules shared by the top-level scripts, one sub-package per layer.

Each sub-package imports only from itself and the ones listed above it (tests/test_layers.py):
    core     errors, configs, schema and recipe hash, YAML-lite, bounded JSON, atomic writes, environment
    geoio    GeoTIFF read/write and codecs, georeference, resampling, GeoPackage, GeoJSON, PNG
    gaps     gap science without a model: ForestGapR masks, polygons, analyses, the classical method
    data     synthetic forests, sources, tiling and splits, shards and their checks, normalisation, augmentation
    models   blocks and the model registry (never imports data code)
    train    the training loop, tasks, losses, metrics, callbacks, schedules, checkpoints, DDP
    infer    checkpoint loading, scene mapping, scores, evaluation, export, shipped weights
    tune     sanity checks, LR and batch-size finders, hyper-parameter search

Start here: the training loop lib/train/trainer.py; the loss lib/train/losses.py; the sample reader
lib/data/dataset.py; the scene mapper lib/infer/mapping.py. More: docs/pipeline_overview.md.
"""

__version__ = "0.1.0"
