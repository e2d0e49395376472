"""Bad inputs through the real scripts (main(argv) in-process): rasters, shards, configs, checkpoints.

Each gives exit code 2 and one `error:` line that says what is wrong, where (file, key, member) and what
was expected; some oddities are accepted with a warning that gives the fraction of pixels concerned.
"""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import tifffile
import torch

from conftest import TINY, tiny_config
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_raster
from lib.geoio.geotiff_write import write_raster

GRID = GeoInfo(96, 96, (1.0, 1.0), (0.0, 96.0))
EPSG_2193 = (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 2193)  # GeoKeyDirectory: projected, EPSG:2193


def run(script: str, *argv, capsys) -> tuple[int, str]:
    """(exit code, stderr from its `error:` line on) of `script.main(argv)`; log lines may come before."""
    code = __import__(script).main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err[err.find("error: "):] if "error: " in err else err


def chm_array(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((96, 96)) * 30).astype(np.float32)  # (H, W) metres


def tif(path, array, info=GRID):
    write_raster(path, array, GeoInfo(array.shape[0], array.shape[1], info.pixel_size, info.origin,
                                      geokeys=info.geokeys))
    return path


# ----------------------------------------------------------------------------------------- rasters
def _truncated_directory(p):
    data = tif(p, chm_array()).read_bytes()  # our writer puts the image directory at the end
    p.write_bytes(data[: len(data) // 2])


def _truncated_pixels(p):
    tifffile.imwrite(p, chm_array())  # directory first, pixels after it
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.6)])


RASTERS = {  # name: (make(path), what the error says after the path)
    "missing": (lambda p: None, "no such file"),
    "not_a_tiff": (lambda p: p.write_text("elevation,x,y\n"), "not a readable TIFF"),
    "truncated_directory": (_truncated_directory, "truncated TIFF: no image directory"),
    "truncated_pixels": (_truncated_pixels, "truncated or damaged: block 0 ends at byte"),
    "three_bands": (lambda p: tifffile.imwrite(p, np.zeros((96, 96, 3), np.uint8), photometric="rgb"),
                    "expected one band, found 3"),
    "all_nodata": (lambda p: tif(p, np.full((96, 96), np.nan, np.float32)), "every pixel is nodata"),
}


@pytest.mark.parametrize("case", RASTERS)
def test_bad_raster_for_gaps(tmp_path, capsys, case):
    make, expected = RASTERS[case]
    path = tmp_path / f"{case}.tif"
    make(path)
    code, err = run("gaps", "--chm", path, "--thresholds", 5, "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and err.startswith(f"error: {path}: {expected}"), err


def _prepare(tmp_path, dsm, chm, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": {**TINY["data"], "block_px": 32, "root": str(tmp_path / "ds")},
                                  "model": TINY["model"]}))
    return run("prepare_data", "--config", config, "--dsm", dsm, "--chm", chm, capsys=capsys)


GRIDS = {  # the CHM's grid, and the line the error gives for it
    "shape": (GeoInfo(90, 96, (1.0, 1.0), (0.0, 96.0)), "shape: {dsm} is 96x96, {chm} is 90x96"),
    "origin": (GeoInfo(96, 96, (1.0, 1.0), (5.0, 96.0)), "origin: {dsm} at (0.0, 96.0), {chm} at (5.0, 96.0): "
                                                          "off by +5.000 m in x (+5.00 px)"),
    "pixel_size": (GeoInfo(96, 96, (2.0, 2.0), (0.0, 96.0)), "pixel size: {dsm} has (1.0, 1.0), {chm} has (2.0, 2.0)"),
    "crs": (GeoInfo(96, 96, (1.0, 1.0), (0.0, 96.0), geokeys=EPSG_2193[:-1] + (32760,)),
            "CRS: {dsm} is EPSG:2193, {chm} is EPSG:32760"),
}


@pytest.mark.parametrize("case", GRIDS)
def test_dsm_and_chm_on_different_grids(tmp_path, capsys, case):
    info, line = GRIDS[case]
    dsm = tif(tmp_path / "dsm.tif", chm_array() + 300, GeoInfo(96, 96, (1.0, 1.0), (0.0, 96.0), geokeys=EPSG_2193))
    chm = tif(tmp_path / "chm.tif", chm_array()[: info.height], info)
    code, err = _prepare(tmp_path, dsm, chm, capsys)
    assert code == 2 and err.startswith("error: rasters are not on the same grid:"), err
    assert line.format(dsm=dsm, chm=chm) in err


def test_raster_smaller_than_a_tile(tmp_path, capsys):
    small = GeoInfo(20, 20, (1.0, 1.0), (0.0, 20.0))
    dsm = tif(tmp_path / "dsm.tif", chm_array()[:20, :20] + 300, small)
    code, err = _prepare(tmp_path, dsm, tif(tmp_path / "chm.tif", chm_array()[:20, :20], small), capsys)
    assert code == 2 and "error: site 'dsm' is 20x20 px, smaller than one 32 px tile" in err


def test_integer_dsm_is_accepted_as_float32(tmp_path, capsys):
    from lib.data.shards import iter_shard, read_manifest
    dsm_int = (chm_array() + 300).astype(np.int16)
    code, err = _prepare(tmp_path, tif(tmp_path / "dsm.tif", dsm_int), tif(tmp_path / "chm.tif", chm_array()), capsys)
    assert code == 0, err
    manifest = read_manifest(tmp_path / "ds")
    shard = manifest["splits"]["train"]["shards"][0]["file"]
    sample = next(iter_shard(tmp_path / "ds" / shard))
    r, c, px, _ = sample["json"]["window"]
    assert sample["dsm.npy"].dtype == np.float32
    assert np.array_equal(sample["dsm.npy"], dsm_int[r:r + px, c:c + px].astype(np.float32))


def test_nan_and_inf_pixels_are_nodata_never_gap(tmp_path, capsys):
    chm = chm_array()
    chm[:10], chm[10:20], chm[20:30] = np.nan, np.inf, -np.inf
    code, err = run("gaps", "--chm", tif(tmp_path / "chm.tif", chm), "--thresholds", 40, "--out", tmp_path,
                    capsys=capsys)
    assert code == 0, err
    labels, _ = read_raster(tmp_path / "gaps_40m.tif")  # gap ids; 0 (no gap) is the nodata value, read as NaN
    assert np.isnan(labels[:30]).all() and (labels[30:] > 0).all()  # at 40 m every valid pixel is gap


@pytest.mark.parametrize("case", ["negative_chm", "fill_9999"])
def test_absurd_values_warn_with_their_fraction(tmp_path, capsys, case):
    chm = chm_array()
    if case == "negative_chm":
        chm[:24] = -10.0  # a quarter of the pixels: DSM and DTM swapped there, say
        expected = r"25\.00% of the valid canopy heights are below -1 m \(lowest -10\.00 m\)"
    else:
        chm[:48] = 9999.0
        expected = r"50\.00% of pixels are \+-9999 and the file has no nodata tag"
    path = tif(tmp_path / "chm.tif", chm)
    with pytest.warns(UserWarning, match=expected):
        code, err = run("gaps", "--chm", path, "--thresholds", 5, "--out", tmp_path / "out", capsys=capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------ shards
def _members(path) -> list:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_members(path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _replace_second(payload: bytes):
    """The second member (the first sample's chm.npy) gets `payload`."""
    return lambda path: _write_members(path, [(m, payload if i == 1 else d) for i, (m, d) in enumerate(_members(path))])


class Payload:
    """Unpickling it would create a file: proof that a refused pickle never ran."""
    marker = None

    def __reduce__(self):
        return (open, (str(Payload.marker), "w"))


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _replace_member(index: int, payload: bytes):
    return lambda path: _write_members(path, [(m, payload if i == index else d)
                                              for i, (m, d) in enumerate(_members(path))])


def _traversal(path):
    (first, data), *rest = _members(path)
    _write_members(path, [(tarfile.TarInfo("../escape.dsm.npy"), data), *rest])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))


SHARDS = {  # name: (edit the train shard, reseal the manifest's checksum, expected error)
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), True,
                  "{shard}: truncated tar: member "),
    "member_missing": (lambda p: _write_members(p, [x for i, x in enumerate(_members(p)) if i != 1]), True,
                       "{shard}: sample '{key}' lacks member(s) ['chm.npy']"),
    "bad_npy_header": (_replace_second(b"\x93NUMPY\x07\x00garbage"), True,
                       "{shard}: member '{key}.chm.npy' is not a plain .npy array"),
    "pickle_npy": (lambda p: _replace_second(_pickled_npy())(p), True,
                   "{shard}: member '{key}.chm.npy' is not a plain .npy array (dtype object holds Python "
                   "objects (pickles are refused))"),
    "path_traversal": (_traversal, True, "{shard}: member '../escape.dsm.npy' refused"),
    "mask_label_7": (_replace_member(3, _npy(np.full((32, 32), 7, np.uint8))), True,
                     "{shard}: sample '{key}' member 'mask_2m.npy': labels [7] outside {{0 (no gap), 1 (gap)"),
    "dsm_31x32": (_replace_member(0, _npy(np.zeros((31, 32), np.float32))), True,
                  "{shard}: sample '{key}' member 'dsm.npy': shape (31, 32), expected (32, 32)"),
    "checksum_mismatch": (_flip_byte, False, "{shard}: checksum mismatch: sha256 "),
    "shard_missing": (lambda p: p.unlink(), False, "cannot read shard {shard}: No such file or directory"),
}


@pytest.mark.parametrize("case", SHARDS)
def test_bad_shard_stops_training(tiny_dataset, tmp_path, capsys, case):
    import hashlib
    edit, reseal, expected = SHARDS[case]
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "data", root)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    shard = root / entry["file"]
    key = _members(shard)[0][0].name.split(".")[0]
    Payload.marker = tmp_path / "pickle_ran"
    edit(shard)
    if reseal:  # a shard whose manifest matches it: the reader's own checks must catch it
        entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(manifest))
    cfg = _config_file(tmp_path, data={"root": str(root)}, train={"epochs": 1}, log={"tensorboard": False})
    code, err = run("train", "--config", cfg, capsys=capsys)
    assert code == 2 and err.startswith("error: " + expected.format(shard=shard, key=key)), err
    assert not Payload.marker.exists()


def test_bad_manifest(tiny_dataset, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "data", root)
    (root / "manifest.json").write_text('{"splits": {"train": ')
    code, err = run("train", "--config", _config_file(tmp_path, data={"root": str(root)}), capsys=capsys)
    assert code == 2 and err.startswith(f"error: {root / 'manifest.json'}:") and "invalid JSON" in err, err


def test_evaluating_an_empty_split_is_an_error(tiny_dataset, tmp_path, capsys):
    from conftest import make_checkpoint
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "data", root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["test"] = {"shards": [], "samples": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    checkpoint = make_checkpoint(tmp_path / "m.ckpt")
    code, err = run("evaluate", "--checkpoint", checkpoint, "--split", "test", f"--data.root={root}",
                    "--out", str(tmp_path / "eval"), capsys=capsys)
    assert code == 2 and "the 'test' split has no tiles" in err and "'val': " in err, err
    assert not (tmp_path / "eval" / "report.json").exists()


# ----------------------------------------------------------------------------------------- configs
def _config_file(tmp_path, text: str | None = None, suffix: str = ".json", **sections) -> str:
    data = json.loads(json.dumps(TINY))
    data["run"]["output_root"] = str(tmp_path / "runs")
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(data) if text is None else text)
    return str(path)


CONFIGS = {  # name: (config file text or None, overrides, expected error after 'error: ')
    "unknown_key": (None, ["--optim.lrr=0.1"], "override '--optim.lrr=0.1': unknown key 'optim.lrr'\n  hint: did you mean 'optim.lr'?"),
    "wrong_type": (None, ["--train.epochs=2.5"], "override '--train.epochs=2.5': train.epochs: expected int, found 2.5"),
    "negative_lr": (None, ["--optim.lr=-1e-3"], "override '--optim.lr=-1e-3': optim.lr: -0.001 is below the minimum 0.0"),
    "nan_lr": (None, ["--optim.lr=nan"], "override '--optim.lr=nan': optim.lr: expected a finite number, found nan"),
    "negative_threshold": (None, ["--data.thresholds_m=[-5]"],
                           "override '--data.thresholds_m=[-5]': data.thresholds_m[0]: -5.0 must be above 0.0"),
    "broken_list": (None, ["--data.thresholds_m=[1,"],
                    "override '--data.thresholds_m=[1,': data.thresholds_m: cannot read inline value '[1,'"),
    "deep_json": ('{"model": {"extra": ' + "[" * 3000 + "]" * 3000 + "}}", [], "{path}: nested deeper than 64 levels"),
    "unsorted_thresholds": (None, ["--data.thresholds_m=[5, 2]"],
                            "{path}: data.thresholds_m must be strictly increasing, found [5.0, 2.0]"),
    "tile_not_divisible": (None, ["--data.tile_px=34"], "{path}: data.tile_px (34) must be divisible by the "
                                                         "model stride 4"),
    "invalid_json": ('{\n  "optim": {"lr": 0.1,}\n}', [], "{path}:2:23: invalid JSON: Expecting property name"),
    "junk_argument": (None, ["--verbose"], "unrecognised argument '--verbose'"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_bad_config(tmp_path, capsys, case):
    text, overrides, expected = CONFIGS[case]
    path = _config_file(tmp_path, text)
    code, err = run("train", "--config", path, *overrides, capsys=capsys)
    assert code == 2 and err.startswith("error: " + expected.format(path=path)), err


@pytest.mark.parametrize("text, where", [("optim:\n  lr: 1\n   momentum: 2\n", "3:4: unexpected indentation"),
                                         ("optim:\n  lr: [1, 2\n", "2:7: cannot read inline value '[1, 2'"),
                                         ("optim:\n\tlr: 1\n", "2:1: tab in indentation"),
                                         ("".join(" " * i + "k:\n" for i in range(3000)),
                                          "65:65: nested deeper than 64 levels")])
def test_bad_yaml_lite_names_line_and_column(tmp_path, capsys, text, where):
    path = _config_file(tmp_path, text, suffix=".yaml")
    code, err = run("train", "--config", path, capsys=capsys)
    assert code == 2 and err.startswith(f"error: {path}:{where}"), err


def test_config_file_missing_or_not_utf8(tmp_path, capsys):
    code, err = run("train", "--config", tmp_path / "none.json", capsys=capsys)
    assert code == 2 and err.startswith(f"error: config file not found: {tmp_path / 'none.json'}")
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: forêt\n".encode("latin-1"))
    code, err = run("train", "--config", path, capsys=capsys)
    assert code == 2 and err.startswith(f"error: {path}: not UTF-8 text (byte 16: b'\\xea')"), err


# ------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tiny_dataset):
    """last.ckpt of a one-epoch tiny run."""
    from lib.train import runner
    cfg = tiny_config(tiny_dataset, run={"name": "bad_inputs"}, train={"epochs": 1}, log={"tensorboard": False})
    return runner.train_model(cfg) / "last.ckpt"


def _train_args(tiny_dataset, tmp_path, *extra):
    cfg = _config_file(tmp_path, data={"root": str(tiny_dataset / "data")}, train={"epochs": 1},
                       log={"tensorboard": False})
    return ["--config", cfg, *extra]


def test_resume_from_another_model_names_the_difference(tiny_dataset, checkpoint, tmp_path, capsys):
    code, err = run("train", *_train_args(tiny_dataset, tmp_path, "--model.base_channels=8", "--resume", checkpoint),
                    capsys=capsys)
    assert code == 2 and err.startswith(f"error: cannot resume from {checkpoint}: it does not fit this run"), err
    assert "hint: the checkpoint was saved with model.base_channels=4 (here 8)" in err


def _truncated(path, ckpt):
    data = ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _needs_pickle(path, ckpt):
    torch.save({"model": {}, "config": {}, "payload": Payload()}, path)


BAD_CHECKPOINTS = {
    "truncated": (_truncated, "cannot load checkpoint {path}: PytorchStreamReader failed reading zip archive"),
    "needs_pickle": (_needs_pickle, "cannot load checkpoint {path}: it holds Python objects that need pickle "
                                    "to load; refused"),
    "foreign": (lambda path, ckpt: torch.save({"weights": torch.zeros(3)}, path),
                "{path} is not a forestgaps checkpoint (no 'model'/'config' entries)"),
}


@pytest.mark.parametrize("script", ["train", "evaluate"])
@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint(tiny_dataset, checkpoint, tmp_path, capsys, case, script):
    make, expected = BAD_CHECKPOINTS[case]
    path, Payload.marker = tmp_path / f"{case}.ckpt", tmp_path / "pickle_ran"
    make(path, checkpoint)
    argv = _train_args(tiny_dataset, tmp_path, "--resume", path) if script == "train" else ["--checkpoint", path]
    code, err = run(script, *argv, capsys=capsys)
    assert code == 2 and err.startswith("error: " + expected.format(path=path)), err
    assert not Payload.marker.exists()


def test_grid_over_a_key_that_does_not_exist(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"optim.lrx": [0.1, 0.01]}))
    code, err = run("grid_search", "--config", _config_file(tmp_path), "--grid", grid, capsys=capsys)
    assert code == 2 and "unknown key 'optim.lrx'" in err and "did you mean 'optim.lr'?" in err, err
