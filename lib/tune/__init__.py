"""Tuning before and around training: sanity checks, LR and batch-size finders, hyper-parameter search."""
