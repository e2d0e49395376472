"""forestgaps library: the modules shared by the top-level scripts."""

__version__ = "0.1.0"
