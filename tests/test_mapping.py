"""predict.py on scenes end to end: other pixel sizes (0.5 m and 2 m versions of a 1 m scene), nested maps
and their violation report, many scenes with resume and one combined table, and 2 torchrun processes
giving the outputs of one."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import predict
from conftest import make_checkpoint
from lib.gaps.nesting import nesting_violations
from lib.geoio.geopackage import read_gpkg
from lib.geoio.geotiff_read import read_info, read_raster
from tests.test_scene_windows import random_dsm, write_dsm

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no-quicklook", "--window", "32"]
CUT = "--predict.prob_threshold=0.54"  # where the untrained test model's maps are neither all gap nor none


def run(ckpt, dsm, out, *extra) -> Path:
    assert predict.main(["--checkpoint", str(ckpt), "--dsm", str(dsm), "--out", str(out), *QUIET, *extra]) == 0
    return Path(out)


def smooth_dsm(h, w, seed=0) -> np.ndarray:
    """A DSM with structure at several scales (noise smoothed by a box filter), metres."""
    x = torch.from_numpy(random_dsm(h + 8, w + 8, seed) - 300)[None, None]
    return (300 + 3 * F.avg_pool2d(x, 9, stride=1)[0, 0].numpy()).astype(np.float32)


def band(path) -> np.ndarray:
    return read_raster(path)[0]


def test_half_metre_scene_maps_as_its_one_metre_original(tmp_path):
    """0.5 m made by splitting each 1 m pixel in four: the area average gives the 1 m scene back exactly,
    so the maps are the 1 m maps with each pixel split in four, and the gap tables are equal."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt", data={"tile_px": 32, "min_area_m2": 2.0})
    dsm = smooth_dsm(45, 70)
    dsm[10:14, 20:31] = np.nan
    write_dsm(tmp_path / "dsm1.tif", dsm)
    info = write_dsm(tmp_path / "dsm05.tif", np.kron(dsm, np.ones((2, 2), np.float32)), pixel_m=0.5)
    one, half = run(ckpt, tmp_path / "dsm1.tif", tmp_path / "one", "--write-prob"), \
        run(ckpt, tmp_path / "dsm05.tif", tmp_path / "half", "--write-prob")
    for tag in ("2m", "5m", "10m", "15m"):
        gaps = band(half / f"gaps_{tag}.tif")
        np.testing.assert_array_equal(gaps, np.kron(band(one / f"gaps_{tag}.tif"), np.ones((2, 2))))
        assert (one / f"gaps_{tag}.csv").read_text().count("\n") == (half / f"gaps_{tag}.csv").read_text().count("\n")
        areas = [[row["gap_area"] for row in csv.DictReader(open(d / f"gaps_{tag}.csv"))] for d in (one, half)]
        assert areas[0] == areas[1]
        prob = torch.from_numpy(band(one / f"prob_{tag}.tif"))[None, None]
        want = F.interpolate(prob, scale_factor=2, mode="bilinear", align_corners=False)[0, 0].numpy()
        ok = np.isfinite(want)                       # torch spreads NaN; lib.geoio.resample renormalises around it
        np.testing.assert_allclose(band(half / f"prob_{tag}.tif")[ok], want[ok], atol=1e-6)
    out_info = read_info(half / "gaps_5m.tif")
    assert (out_info.height, out_info.width, out_info.pixel_size, out_info.origin) == \
        (info.height, info.width, (0.5, 0.5), info.origin)
    assert np.array_equal(np.isnan(band(half / "gaps_5m.tif")), np.isnan(band(tmp_path / "dsm05.tif")))
    summary = json.loads((half / "predict.json").read_text())
    assert summary["pixel_size_m"] == {"input": [0.5, 0.5], "model": 1.0, "resampled": True}
    assert not list(half.glob(".model_grid*"))      # the model-grid files are gone


def test_two_metre_scene_is_refined_bilinearly_and_mapped_back(tmp_path):
    """2 m -> 1 m is bilinear (= torch's interpolate), and back: the mean of the 2 x 2 model pixels for
    probabilities, the pixel at +0.25 m of each centre for the gap maps."""
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    coarse = smooth_dsm(24, 30, seed=1)
    write_dsm(tmp_path / "dsm2.tif", coarse, pixel_m=2.0)
    fine = F.interpolate(torch.from_numpy(coarse)[None, None], scale_factor=2, mode="bilinear", align_corners=False)
    write_dsm(tmp_path / "dsm1.tif", fine[0, 0].numpy())
    two = run(ckpt, tmp_path / "dsm2.tif", tmp_path / "two", "--write-prob", "--no-filter")
    one = run(ckpt, tmp_path / "dsm1.tif", tmp_path / "one", "--write-prob", "--no-filter")
    for tag in ("2m", "15m"):
        prob1 = torch.from_numpy(band(one / f"prob_{tag}.tif"))[None, None]
        prob2 = band(two / f"prob_{tag}.tif")
        np.testing.assert_allclose(prob2, F.avg_pool2d(prob1, 2)[0, 0].numpy(), atol=1e-4)
        nearest = band(one / f"gaps_{tag}.tif")[1::2, 1::2]
        clear = np.abs(prob1[0, 0, 1::2, 1::2].numpy() - 0.5) > 1e-3
        assert np.array_equal(band(two / f"gaps_{tag}.tif")[clear], nearest[clear]) and clear.mean() > 0.9
    assert read_info(two / "gaps_2m.tif").pixel_size == (2.0, 2.0)


def test_nested_maps_nest_and_the_raw_violations_are_reported(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    write_dsm(tmp_path / "dsm.tif", random_dsm(64, 80, seed=3))
    tags, t = ("2m", "5m", "10m", "15m"), [2.0, 5.0, 10.0, 15.0]
    raw = run(ckpt, tmp_path / "dsm.tif", tmp_path / "raw", "--no-filter", "--no-nested", CUT)
    nested = run(ckpt, tmp_path / "dsm.tif", tmp_path / "nested", "--no-filter", CUT)
    masks = {d: np.stack([band(d / f"gaps_{tag}.tif") == 1 for tag in tags]) for d in (raw, nested)}
    brute = nesting_violations(masks[raw], t)                     # counted on the raw maps as written
    reports = [json.loads((d / "predict.json").read_text())["nesting"] for d in (raw, nested)]
    assert brute["rate"] > 0.001                                  # the test model does contradict itself
    for report in reports:
        assert report["before_nesting"]["rate"] == pytest.approx(brute["rate"])
        assert [p["violations"] for p in report["before_nesting"]["pairs"]] == [p["violations"] for p in brute["pairs"]]
    assert (reports[0]["nested"], reports[1]["nested"]) == (False, True)
    assert nesting_violations(masks[nested], t)["rate"] == 0
    assert (masks[nested] >= masks[raw]).all()                    # nesting only adds gap pixels


def make_region(folder: Path, n: int = 4) -> list[Path]:
    """n small DSMs of different sizes, one of them at 0.5 m (resampled), one with nodata."""
    folder.mkdir()
    paths = []
    for i in range(n):
        dsm = smooth_dsm(40 + 8 * i, 56 - 4 * i, seed=10 + i)
        if i == 1:
            dsm[5:15, 5:12] = np.nan
        paths.append(folder / f"tile_{i}.tif")
        write_dsm(paths[-1], dsm, pixel_m=0.5 if i == 2 else 1.0)
    return paths


def test_region_maps_every_scene_into_one_table_and_resumes(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    paths = make_region(tmp_path / "dsms")
    (tmp_path / "list.txt").write_text("# four tiles\n" + "\n".join(f"dsms/{p.name}" for p in paths) + "\n\n")
    args = ["--checkpoint", ckpt, "--dsm-list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "out"), *QUIET, CUT]
    assert predict.main(args) == 0
    out = tmp_path / "out"
    table = list(csv.DictReader(open(out / "gaps_all_5m.csv")))
    for p in paths:
        rows = list(csv.DictReader(open(out / p.stem / "gaps_5m.csv")))
        assert [{k: v for k, v in r.items() if k != "scene"} for r in table if r["scene"] == p.stem] == rows
    assert len(table) == sum(len(list(csv.DictReader(open(out / p.stem / "gaps_5m.csv")))) for p in paths) > 8
    summary = json.loads((out / "predict.json").read_text())
    assert list(summary["scenes"]) == [p.stem for p in paths] and summary["tables"]["5m"] == "gaps_all_5m.csv"
    assert summary["scenes"]["tile_2"]["pixel_size_m"]["resampled"] is True
    stamps = {p.stem: (out / p.stem / "gaps_5m.tif").stat().st_mtime_ns for p in paths}
    (out / "tile_1" / "done.json").unlink()                       # as if killed before tile_1 finished
    (out / "tile_3" / "gaps_2m.csv").unlink()                     # an output lost after it finished
    capsys.readouterr()
    assert predict.main(args) == 0
    printed = capsys.readouterr().out
    assert "tile_0: finished before, skipped" in printed and "tile_2: finished before, skipped" in printed
    assert "tile_1: mapping" in printed and "tile_3: mapping" in printed and "2 scenes mapped, 2 skipped" in printed
    now = {p.stem: (out / p.stem / "gaps_5m.tif").stat().st_mtime_ns for p in paths}
    assert [now[s] == stamps[s] for s in sorted(now)] == [True, False, True, False]
    assert list(csv.DictReader(open(out / "gaps_all_5m.csv"))) == table
    assert predict.main(args + ["--thresholds", "5", "10"]) == 0  # other settings: nothing is reused
    assert "4 scenes mapped, 0 skipped" in capsys.readouterr().out
    assert json.loads((out / "tile_0" / "done.json").read_text())["settings"]["thresholds_m"] == [5.0, 10.0]


def test_region_from_a_folder_and_clear_errors(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    make_region(tmp_path / "dsms", n=2)
    assert predict.main(["--checkpoint", ckpt, "--dsm", str(tmp_path / "dsms"), "--out", str(tmp_path / "o"),
                         *QUIET]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"tile_0", "tile_1", "gaps_all_10m.csv", "predict.json"}
    (tmp_path / "dup").mkdir()
    write_dsm(tmp_path / "dup" / "tile_0.tif", random_dsm(40, 40))
    (tmp_path / "list.txt").write_text("dsms/tile_0.tif\ndup/tile_0.tif\n")
    (tmp_path / "bad.txt").write_text("dsms/tile_0.tif\nmissing.tif\n")
    for extra, message in ((["--dsm-list", str(tmp_path / "list.txt")], "the same name 'tile_0'"),
                           (["--dsm-list", str(tmp_path / "bad.txt")], "DSMs not found"),
                           (["--dsm", str(tmp_path / "dsms"), "--chm", str(tmp_path / "dup" / "tile_0.tif")],
                            "give a single --dsm file")):
        assert predict.main(["--checkpoint", ckpt, "--out", str(tmp_path / "e"), *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_folder_s_chms_and_dtms_are_not_mapped_as_dsms(tmp_path, caplog):
    from lib.infer.mapping import list_scenes
    for name in ("a_DSM.tif", "a_CHM.tif", "b.tif", "b_dtm.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_scenes(tmp_path)] == ["a_DSM.tif", "b.tif"]
    assert "2 file(s) named *_CHM / *_DTM not mapped as DSMs: a_CHM.tif, b_dtm.tiff" in caplog.text


def outputs(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes, except the JSON summaries (they hold timings); a GeoPackage as its layers'
    features (its gpkg_contents rows hold the time of writing)."""
    return {str(p.relative_to(folder)): repr([read_gpkg(p, f"gaps_{t}m") for t in (2, 5, 10, 15)]).encode()
            if p.suffix == ".gpkg" else p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".json"}


def test_two_torchrun_processes_give_the_outputs_of_one(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    make_region(tmp_path / "dsms")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["predict.py", "--checkpoint", ckpt, "--dsm", str(tmp_path / "dsms"), *QUIET, CUT, "--out"]
    single = subprocess.run([sys.executable, *args, str(tmp_path / "one")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args, str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert "[rank 0/2] tile_0: mapping" in pair.stdout and "[rank 1/2] tile_1: mapping" in pair.stdout
    assert "[rank 1/2] tile_2" not in pair.stdout                # rank r takes scenes r, r + 2
    one, two = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len(one) == 4 * 9 + 4 and one == two                   # 4 scenes x (4 tif + 4 csv + gpkg), 4 tables
    counts = [{name: scene["gaps"] for name, scene in json.loads((tmp_path / d / "predict.json").read_text())
               ["scenes"].items()} for d in ("one", "two")]
    assert counts[0] == counts[1] and sum(counts[0]["tile_0"].values()) > 8
