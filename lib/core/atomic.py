"""Atomic writes: a temp file in the same folder, fsync, then os.replace, so a kill never leaves half a file."""
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lib.core.errors import DataError


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success fsync it and rename it onto `path`.

    On any error the temp file is removed and `path` keeps its old content; an OSError (disk full,
    read-only folder) becomes a DataError naming the file. Permissions follow the umask (not 0600).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}",
                        hint="check free disk space and that the folder is writable") from None
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (readers see the old or the new file, never a mix)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` in one step (readers see the old or the new file, never a mix)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """Strict JSON (NaN and infinities as null, numpy/torch values as plain ones), atomically."""
    text = json.dumps(_plain(obj), indent=indent, separators=None if indent else (",", ":"), allow_nan=False)
    write_text(path, text + "\n")


def _plain(obj):
    """Recursively: array and scalar types with .tolist() (numpy, torch) -> Python, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line by rewriting the file atomically: a crash keeps every earlier line intact.

    Costs a copy of the file per append: meant for logs of tens to thousands of lines (search results).
    """
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSON-lines file ([] when absent)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not a JSON record ({exc.msg})",
                                hint="this file is written atomically: was it edited by hand?") from None
    return records
