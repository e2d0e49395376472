"""Tar shards of tiles: a size-capped writer, a forward-only reader, checksums and the manifest.

A sample is a dict `{"__key__": str, "<name>.npy": ndarray, "json": dict, ...}` stored WebDataset
style as plain POSIX tar members `<key>.<member>`. Readers stream one open file front to back; they
never re-open a tar per sample (that cost 60 ms a sample in the old tool).
"""
import functools
import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np

from lib.core import safejson
from lib.core.errors import ShardError
from lib.data.sample_check import check_manifest
from lib.gaps.masks import threshold_tag

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MANIFEST = "manifest.json"


def mask_member(threshold_m: float) -> str:
    """Member name of the gap mask at one CHM threshold: 2.0 -> 'mask_2m.npy', 2.5 -> 'mask_2.5m.npy'."""
    return f"mask_{threshold_tag(threshold_m)}.npy"


def _check_key(key) -> str:
    if not isinstance(key, str) or not key or any(c in key for c in "./\\"):
        raise ShardError(f"sample key {key!r} is invalid: expected a non-empty string "
                         "without '.', '/' or '\\'")
    return key


def _encode(key: str, member: str, value) -> bytes:
    """Bytes of one member: `.npy` arrays (no pickles), `json` values, raw bytes otherwise."""
    if member == "npy" or member.endswith(".npy"):
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise ShardError(f"{key}.{member}: expected a numeric ndarray, found {type(value).__name__}"
                             + (f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else ""))
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if member == "json" or member.endswith(".json"):
        try:
            return json.dumps(value, allow_nan=False, sort_keys=True).encode()
        except (TypeError, ValueError, RecursionError) as e:
            raise ShardError(f"{key}.{member}: not strict JSON ({e})") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ShardError(f"{key}.{member}: expected bytes for a member that is neither .npy nor .json, "
                     f"found {type(value).__name__}")


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header with fixed owner and mtime, so the same samples give the same shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    try:
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    except ValueError as e:
        raise ShardError(f"tar member {name!r} cannot be stored in a ustar header: {e}") from None


class ShardWriter:
    """Writes samples to `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... of at most ~max_bytes each.

    Each shard is written under a hidden temporary name and renamed when complete, so a crash never
    leaves a half-written shard under a final name. A sample never spans two shards.
    """

    def __init__(self, folder, prefix: str, max_bytes: int = 128 * 2**20):
        if not prefix or any(c in prefix for c in "/\\"):
            raise ShardError(f"shard prefix {prefix!r} is invalid: expected a plain file-name stem")
        self.folder, self.prefix, self.max_bytes = os.fspath(folder), prefix, max_bytes
        os.makedirs(self.folder, exist_ok=True)
        self.shards: list[dict] = []
        self._keys: set[str] = set()
        self._file = None

    def write(self, sample: dict) -> None:
        """Appends one sample; starts a new shard first when this one would pass max_bytes."""
        key = _check_key(sample.get("__key__"))
        if key in self._keys:
            raise ShardError(f"sample key {key!r} written twice to shards {self.prefix}-*.tar")
        members = []
        for member, value in sample.items():
            if member == "__key__":
                continue
            if not member or any(c in member for c in "/\\") or ".." in member:
                raise ShardError(f"{key}: member name {member!r} is invalid (no '/', '\\' or '..')")
            data = _encode(key, member, value)
            members.append((_tar_header(f"{key}.{member}", len(data)), data))
        size = sum(len(h) + len(d) + (-len(d) % BLOCK) for h, d in members)
        if self._file is not None and self._count and self._bytes + size + 2 * BLOCK > self.max_bytes:
            self._finish()
        if self._file is None:
            self._open()
        for header, data in members:
            self._put(header)
            self._put(data)
            self._put(bytes(-len(data) % BLOCK))
        self._keys.add(key)
        self._count += 1

    def close(self) -> list[dict]:
        """Finishes the open shard; returns `[{"file", "samples", "bytes", "sha256"}]` of every shard."""
        if self._file is not None:
            self._finish()
        return list(self.shards)

    def abort(self) -> None:
        """Drops the shard being written (its temporary file); finished shards stay."""
        if self._file is not None:
            self._file.close()
            os.remove(self._tmp)
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = os.path.join(self.folder, f".{self._name}.{os.getpid()}.tmp")
        self._file = open(self._tmp, "wb")
        self._hash, self._bytes, self._count = hashlib.sha256(), 0, 0

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def _finish(self) -> None:
        self._put(ZERO_BLOCK * 2)  # end-of-archive marker: readers use it to detect truncation
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, os.path.join(self.folder, self._name))
        self.shards.append({"file": self._name, "samples": self._count, "bytes": self._bytes,
                            "sha256": self._hash.hexdigest()})


def _pax_fields(data: bytes, path: str, after: str) -> dict:
    """Records `"<len> <key>=<value>\\n"` of a pax extended header (tars written by Python's tarfile)."""
    fields, pos = {}, 0
    try:
        while pos < len(data) and data[pos]:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            fields[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError:
        raise ShardError(f"{path}: bad pax header after member {after!r}") from None
    return fields


def _plain_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a ustar header as ShardWriter writes them, in a fifth of tarfile's time;
    None for anything else (prefix, base-256 size, bad checksum), which goes to _any_header."""
    if block[257:265] != b"ustar\x0000" or block[345] or block[124] & 0x80:
        return None
    try:
        size, checksum = int(block[124:136].strip(b" \0"), 8), int(block[148:156].strip(b" \0"), 8)
    except ValueError:
        return None
    if checksum != 256 + sum(block[:148]) + sum(block[156:]):  # the checksum field counts as spaces
        return None
    return block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size, block[156:157]


def _any_header(block: bytes, path: str, last: str) -> tuple[str, int, bytes]:
    """(name, size, type) of any tar header tarfile can read (GNU, pax, old formats)."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise ShardError(f"{path}: bad tar header after member {last!r} ({e})") from None
    return info.name, info.size, info.type


def _iter_members(f, path: str, wanted) -> Iterator[tuple[str, bytearray | None]]:
    """(name, data) of each regular member, reading forward only; data is None when not `wanted(name)`."""
    total, last, long_name, pax = os.fstat(f.fileno()).st_size, "<start of file>", None, {}
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            found = f"a {len(block)}-byte partial header" if block else "no end-of-archive marker"
            raise ShardError(f"{path}: truncated tar: {found} after member {last!r}")
        if block == ZERO_BLOCK:
            return
        header_name, size, kind = _plain_header(block) or _any_header(block, path, last)
        name = long_name or pax.get("path", header_name)
        size = int(pax["size"]) if pax.get("size", "").isdigit() else size
        if not 0 <= f.tell() + size <= total:
            raise ShardError(f"{path}: truncated tar: member {name!r} needs {size} bytes, "
                             f"{total - f.tell()} left")
        is_file = kind in (tarfile.REGTYPE, tarfile.AREGTYPE)
        if is_file and not wanted(name):
            f.seek(size + (-size % BLOCK), os.SEEK_CUR)  # forward only: skipped bytes are never copied
            data = None
        else:
            data = bytearray(size)  # writable: arrays decoded from it are views, not copies
            f.readinto(data)
            f.seek(-size % BLOCK, os.SEEK_CUR)
        if is_file:
            long_name, pax, last = None, {}, name
            yield name, data
        elif kind == tarfile.XHDTYPE:
            pax = _pax_fields(data, path, last)
        elif kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind != tarfile.XGLTYPE:
            raise ShardError(f"{path}: member {name!r} is not a regular file (tar type {kind!r})")


def _split_name(name: str, path: str) -> tuple[str, str]:
    """`'<key>.<member>'` -> (key, member); refuses names that could escape a folder."""
    if name.startswith("/") or "/" in name or "\\" in name or ".." in name:
        raise ShardError(f"{path}: member {name!r} refused: names with '/', '\\' or '..' are unsafe")
    key, dot, member = name.partition(".")
    if not key or not dot or not member:
        raise ShardError(f"{path}: member {name!r} is not named '<key>.<member>'")
    return key, member


@functools.lru_cache(maxsize=256)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple, str]:
    """(dtype, shape, order) of a whole .npy v1/v2 header; cached, as a dataset's tiles share a few."""
    fp = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects (pickles are refused)")
    return dtype, shape, "F" if fortran else "C"


def _load_npy(data: bytearray) -> np.ndarray:
    """A .npy member as an array viewing `data` (np.load would copy it twice and re-parse the header)."""
    if data[:6] != b"\x93NUMPY" or data[6:7] not in (b"\x01", b"\x02"):
        return np.load(io.BytesIO(data), allow_pickle=False)  # not v1/v2: numpy's own error or reader
    start = 10 if data[6] == 1 else 12  # magic, version, then a 2- or 4-byte header length
    offset = start + int.from_bytes(data[8:start], "little")
    dtype, shape, order = _npy_layout(bytes(data[:offset]))
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes, the header says {shape} {dtype}")
    return np.frombuffer(data, dtype, count, offset).reshape(shape, order=order)


def _decode(member: str, data: bytearray, path: str, name: str):
    if member == "npy" or member.endswith(".npy"):
        try:
            return _load_npy(data)
        except Exception as e:  # untrusted bytes: numpy raises ValueError, TokenError, SyntaxError...; and
            # object arrays land here: no pickles are loaded
            raise ShardError(f"{path}: member {name!r} is not a plain .npy array ({e})") from None
    if member == "json" or member.endswith(".json"):
        return safejson.loads(data, f"{path}: member {name!r}", ShardError)
    return bytes(data)


def _iter_groups(f, path: str, keep: frozenset | None, start: int, stop: int | None
                 ) -> Iterator[tuple[str, dict]]:
    """(key, {member: bytearray | None}) per sample; None for bytes skipped (outside start:stop, not kept)."""
    index, seen, key, group = 0, set(), None, {}

    def wanted(name: str) -> bool:  # called before `name` is grouped: a new key starts sample index + 1
        name_key, _, member = name.partition(".")
        i = index + (key is not None and name_key != key)
        return start <= i and (stop is None or i < stop) and (keep is None or member in keep)

    for name, data in _iter_members(f, path, wanted):
        name_key, member = _split_name(name, path)
        if name_key != key:
            if key is not None:
                yield key, group
                index += 1
            if name_key in seen:
                raise ShardError(f"{path}: members of sample {name_key!r} are not contiguous")
            seen.add(name_key)
            key, group = name_key, {}
        if member in group:
            raise ShardError(f"{path}: member {name!r} appears twice")
        group[member] = data
    if key is not None:
        yield key, group


def iter_shard(path, required: Iterable[str] = (), members: Iterable[str] | None = None,
               start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Samples `start:stop` of one shard, streamed front to back from a single open file.

    required: members every sample must have. members: members to decode (None: all); other members,
    and every member of the samples before `start`, are skipped without being copied.
    """
    path, required = os.fspath(path), frozenset(required)
    keep = None if members is None else frozenset(members)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardError(f"cannot open shard {path}: {e.strerror}") from None
    with f:
        for index, (key, group) in enumerate(_iter_groups(f, path, keep, start, stop)):
            if stop is not None and index >= stop:
                return
            if index < start:
                continue
            missing = required.difference(group)
            if missing:
                raise ShardError(f"{path}: sample {key!r} lacks member(s) {sorted(missing)}; "
                                 f"found {sorted(group)}")
            yield {"__key__": key, **{m: _decode(m, data, path, f"{key}.{m}")
                                      for m, data in group.items() if data is not None}}


def verify_shard(path, sha256: str) -> None:
    """Raises ShardError when the file's SHA-256 is not `sha256` (hex)."""
    try:
        with open(path, "rb") as f:
            found = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ShardError(f"cannot read shard {os.fspath(path)}: {e.strerror}") from None
    if found != sha256.lower():
        raise ShardError(f"{os.fspath(path)}: checksum mismatch: sha256 {found}, manifest says {sha256}",
                         hint="the shard was modified or truncated after it was written; re-run prepare_data")


def _check_entry(entry, split: str, path: str) -> None:
    file = entry.get("file") if isinstance(entry, dict) else None
    ok = (isinstance(file, str) and file not in ("", ".", "..") and not any(c in file for c in "/\\")
          and isinstance(entry.get("samples"), int) and entry["samples"] >= 0
          and isinstance(entry.get("sha256"), str))
    if not ok:
        raise ShardError(f"{path}: split {split!r} has a bad shard entry {entry!r}: expected "
                         "{'file': plain file name, 'samples': int >= 0, 'sha256': hex string}")


def write_manifest(folder, manifest: dict) -> None:
    """Writes `folder/manifest.json` atomically; write it last, after every shard it lists."""
    path = os.path.join(os.fspath(folder), MANIFEST)
    tmp = os.path.join(os.fspath(folder), f".{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON: it lists every shard's sha256, so it names the dataset."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_manifest(folder) -> dict:
    """Reads and checks `folder/manifest.json`: `{"splits": {name: {"shards": [entry, ...]}}, ...}`."""
    path = os.path.join(os.fspath(folder), MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = safejson.loads(f.read(), path, ShardError)
    except OSError as e:
        raise ShardError(f"cannot read manifest {path}: {e.strerror}",
                         hint="run prepare_data.py; it writes the manifest after every shard") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise ShardError(f"{path}: expected an object with a 'splits' object, found {type(splits).__name__}")
    for split, body in splits.items():
        if not isinstance(body, dict) or not isinstance(body.get("shards"), list):
            raise ShardError(f"{path}: split {split!r} has no 'shards' list")
        for entry in body["shards"]:
            _check_entry(entry, split, path)
    check_manifest(manifest, path)
    return manifest
