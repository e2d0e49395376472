"""Data: synthetic forests, sources, tiling and splits, shards and their checks, normalisation, augmentation."""
