"""What every script shares at its edge: error reporting, logging set-up, the resolved-config banner,
range-checked number types for argparse."""
import argparse
import functools
import logging
import math
import sys
from pathlib import Path

from lib.core.errors import ForestGapsError


def handle_errors(main):
    """Wrap a script's main(argv): ForestGapsError/OSError -> `error: ...` on stderr, exit 2; bugs keep tracebacks."""
    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except ForestGapsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except OSError as exc:  # a folder that is missing, read-only or full: the user's to fix, not a bug
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}\n  hint: check that the folder exists, is writable "
                  "and has free space", file=sys.stderr)
            return ForestGapsError.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapper


def setup_logging(log_file: str | Path | None = None, rank: int = 0, level: int = logging.INFO) -> None:
    """Console (rank 0 only) and optional file logging through Python's logging."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_forestgaps", False):
            root.removeHandler(handler)
            handler.close()
    handlers = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
        if log_file:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler._forestgaps = True
        handler.setFormatter(logging.Formatter("%(message)s" if isinstance(handler, logging.StreamHandler)
                                               and not isinstance(handler, logging.FileHandler)
                                               else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def number(kind: type = float, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type=`: a finite `kind` in [low, high] ((low, high] with low_open). argparse turns a
    refusal into `<prog>: error: argument --x: ...` and exit 2, before anything runs."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or low_open and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
