"""Datasets: synthetic forests, site sources, tiling and splits, shards, normalisation, augmentation, the reader."""
