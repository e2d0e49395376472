"""The base: errors, configs and their schema, YAML-lite, atomic writes, environment, script edges (no torch)."""
