"""Atomic text writes: a temp file in the same folder, fsync, then os.replace, so a kill never leaves half a file."""
import json
import os
from pathlib import Path

from lib.errors import DataError


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` in one step (readers see the old or the new file, never a mix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


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
