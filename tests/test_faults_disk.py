"""Unwritable output folders and full disks: exit code 2, an error naming the path, previous outputs whole.

Root ignores permissions, so a read-only folder is a path under a regular file or one in /sys. A full disk
is `open` patched to raise ENOSPC as write(2) does, and, where mounting is allowed, a real small tmpfs.
"""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from test_faults import checkpoints_readable, dataset_state, prepare_config, write_config


def _chm_file(tmp_path: Path) -> Path:
    from lib.geoio.georef import GeoInfo
    from lib.geoio.geotiff_write import write_raster
    path = tmp_path / "chm.tif"
    write_raster(path, torch.rand(64, 64).numpy() * 30, GeoInfo(64, 64, (1.0, 1.0), (0.0, 64.0)))
    return path


def _read_only_folder(tmp_path: Path, kind: str) -> Path:
    """A folder nobody can create things in, root included: a path under a regular file, or /sys."""
    if kind == "under_a_file":
        (tmp_path / "a_file").write_text("")
        return tmp_path / "a_file" / "out"
    probe = Path("/sys/forestgaps-probe")
    try:
        probe.mkdir()
        probe.rmdir()
        pytest.skip("/sys is writable here")
    except OSError:
        return Path("/sys/forestgaps-out")


@pytest.mark.parametrize("kind", ["under_a_file", "sys"])
@pytest.mark.parametrize("script", ["train", "prepare_data", "gaps"])
def test_unwritable_output_folder_exits_2_naming_it(tiny_dataset, tmp_path, capsys, script, kind):
    folder = _read_only_folder(tmp_path, kind)
    config = write_config(tmp_path, tiny_dataset / "data", "ro")
    argv = {"train": ["--config", config, f"--run.output_root={folder}"],
            "prepare_data": ["--config", config, f"--data.root={folder}"],
            "gaps": ["--chm", _chm_file(tmp_path), "--thresholds", "5", "--out", folder]}[script]
    assert __import__(script).main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err and "Traceback" not in err


class FullDisk:
    """Stands in for open() in one module: from the (skip+1)-th file on, writes past 4 KiB raise ENOSPC."""

    def __init__(self, skip: int):
        self.skip = skip

    def __call__(self, *args, **kwargs):
        f, full = open(*args, **kwargs), self.skip <= 0
        self.skip -= 1
        return _FullFile(f, 4096 if full else float("inf"))


class _FullFile:
    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            raise OSError(28, os.strerror(28))  # ENOSPC, as write(2) reports it: no file name
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_during_checkpoint_keeps_the_previous_one(tiny_dataset, tmp_path, monkeypatch, capsys):
    import train
    from lib.train import checkpoint
    config = write_config(tmp_path, tiny_dataset / "data", "full")
    monkeypatch.setattr(checkpoint, "open", FullDisk(skip=1), raising=False)  # the 2nd checkpoint fails
    assert train.main(["--config", str(config)]) == 2
    run_dir = tmp_path / "runs" / "full"
    err = capsys.readouterr().err
    assert f"cannot write checkpoint {run_dir / 'last.ckpt'}: No space left on device" in err
    assert checkpoints_readable(run_dir) == {"last.ckpt": (0, 3)}
    assert not list(run_dir.glob("*.tmp"))


def test_disk_full_during_prepare_keeps_the_previous_dataset(tiny_dataset, tmp_path, monkeypatch, capsys):
    import prepare_data
    from lib.data import shards
    root = tmp_path / "data"
    config = prepare_config(tmp_path, root, "full")
    assert prepare_data.main(["--config", str(config)]) == 0
    before = dataset_state(root)
    monkeypatch.setattr(shards, "open", FullDisk(skip=1), raising=False)  # the 2nd shard fails
    assert prepare_data.main(["--config", str(config), "--data.synthetic_size_px=128"]) == 2
    assert f"cannot write the dataset into {root}: No space left on device" in capsys.readouterr().err
    assert dataset_state(root) == before
    assert sorted(p.name for p in root.iterdir()) == [
        "config.json", "manifest.json", "test-000000.tar", "train-000000.tar", "val-000000.tar"]


@pytest.fixture
def small_disk(tmp_path):
    """make(kib) -> a folder on a real tmpfs of that size; skips where mounting is not allowed."""
    points = []

    def make(kib: int) -> Path:
        point = tmp_path / f"disk{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        points.append(point)
        return point
    yield make
    for point in points:
        subprocess.run(["umount", "--lazy", str(point)], check=True)  # a log handler may hold a file


class FillDisk:
    """A callback that, right after the checkpoint of step 3, fills the disk to half a checkpoint of room."""
    order = 99

    def __getattr__(self, hook):  # every other hook does nothing
        return lambda *args, **kwargs: None

    def on_batch_end(self, trainer, logs):
        if logs.get("optimizer_step") and trainer.step == 3:
            last = trainer.run_dir / "last.ckpt"
            stat = os.statvfs(last)
            with open(trainer.run_dir.parent / "filler", "wb") as f:
                f.write(bytes(max(0, stat.f_bavail * stat.f_frsize - last.stat().st_size // 2)))


def test_really_full_disk_during_training(tiny_dataset, small_disk, monkeypatch, capsys):
    """A real tmpfs that fills up: the next checkpoint write fails, the previous one survives."""
    import train
    from lib.train import runner
    build = runner.build_callbacks
    monkeypatch.setattr(runner, "build_callbacks", lambda *a, **k: build(*a, **k) + [FillDisk()])
    disk = small_disk(4096)
    config = write_config(disk, tiny_dataset / "data", "full")
    assert train.main(["--config", str(config), f"--run.output_root={disk}"]) == 2
    assert f"cannot write checkpoint {disk / 'full' / 'last.ckpt'}: No space left" in capsys.readouterr().err
    assert checkpoints_readable(disk / "full") == {"last.ckpt": (0, 3)}
    assert not list((disk / "full").glob("*.tmp"))


def test_really_full_disk_during_prepare(tiny_dataset, small_disk, capsys):
    """Room for one dataset, not for a second beside it while it is built: the first stays whole."""
    import prepare_data
    size = sum(p.stat().st_size for p in (tiny_dataset / "data").iterdir())
    disk = small_disk(int(size * 1.5) // 1024)
    config = prepare_config(disk, disk / "data", "full")
    assert prepare_data.main(["--config", str(config)]) == 0
    before = dataset_state(disk / "data")
    assert prepare_data.main(["--config", str(config), "--run.seed=1"]) == 2
    assert f"cannot write the dataset into {disk / 'data'}: No space left" in capsys.readouterr().err
    assert dataset_state(disk / "data") == before
    assert not (disk / "data" / ".staging").exists()
