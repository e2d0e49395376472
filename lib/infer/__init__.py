"""Inference and evaluation: checkpoint loading, scene mapping, scores, quality, export, shipped weights."""
