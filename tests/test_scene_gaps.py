"""lib/infer/scene_gaps.py: the banded area filter, table and polygons equal the whole-scene computation."""
import csv
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from lib.gaps.masks import IGNORE, gap_stats
from lib.geoio.geopackage import GpkgWriter, read_gpkg
from lib.geoio.geotiff_read import iter_strips, read_raster
from lib.geoio.geotiff_write import write_raster
from lib.infer.scene_gaps import filter_bands, filter_gaps, mask_labels
from tests.test_cog import cog_layout
from tests.test_scene_windows import INFO


def scene(tmp_path, height=700, width=90):
    """A raw gap map with gaps of every size, one taller than a band, and a nodata hole; its DSM."""
    rng = np.random.default_rng(3)
    gap = rng.random((height, width)) < 0.25                   # below percolation (0.41): gaps of all sizes
    gap[:height * 3 // 4, 40] = True                           # one gap from the top row over 3/4 of the scene
    dsm = (300 + 5 * rng.standard_normal((height, width))).astype(np.float32)
    dsm[100:120, 10:30] = np.nan
    raw = np.where(np.isnan(dsm), IGNORE, gap).astype(np.uint8)
    info = replace(INFO, height=height, width=width)
    write_raster(tmp_path / "raw.tif", raw, info, nodata=IGNORE)
    write_raster(tmp_path / "dsm.tif", dsm, info, nodata=float("nan"))
    return raw, dsm, info


def test_bands_decide_whole_gaps_in_scan_order(tmp_path):
    raw, _, info = scene(tmp_path, 300, 60)
    whole, n = mask_labels(raw == 1, 2.0, 30.0, info.pixel_area)
    ids, masks, total = np.zeros_like(whole), [], 0
    bands = filter_bands(tmp_path / "raw.tif", iter_strips(tmp_path / "dsm.tif", 8), (2.0, 30.0), 8)
    for row0, band_ids, k, dsm, mask in bands:
        assert len(dsm) == len(band_ids) and (k == 0 or band_ids.max() == k)
        ids[row0:row0 + len(band_ids)] += np.where(band_ids > 0, band_ids + total, 0)
        total += k
        masks.append(mask)
    np.testing.assert_array_equal(ids, whole)                          # each gap once, whole, in scan order
    np.testing.assert_array_equal(np.concatenate(masks), np.where(raw == IGNORE, IGNORE, whole > 0))


@pytest.mark.parametrize("area", [(0.0, 1e9), (3.0, 40.0)])
def test_banded_filter_equals_the_whole_scene(tmp_path, area):
    raw, dsm, info = scene(tmp_path)
    with GpkgWriter(tmp_path / "gaps.gpkg", info.epsg) as gpkg:
        n = filter_gaps(tmp_path / "gaps_5m.tif", tmp_path / "dsm.tif", *area, gpkg, "gaps_5m",
                        raw_path=tmp_path / "raw.tif")
    labels, n_whole = mask_labels(raw == 1, *area, info.pixel_area)
    assert n == n_whole > 10
    expected = np.where(np.isnan(dsm), IGNORE, labels > 0).astype(np.uint8)
    np.testing.assert_array_equal(cog_layout(tmp_path / "gaps_5m.tif")[3][0], expected)
    stats = gap_stats(labels, n_whole, dsm, info)
    with open(tmp_path / "gaps_5m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["gap_id"]) for r in rows] == list(range(1, n + 1))
    np.testing.assert_allclose([float(r["gap_area"]) for r in rows], stats["gap_area"])
    np.testing.assert_allclose([float(r["x"]) for r in rows], stats["x"], atol=1e-6)
    np.testing.assert_allclose([float(r["dsm_max"]) for r in rows], stats["chm_max"], atol=1e-6)
    srs, features = read_gpkg(tmp_path / "gaps.gpkg", "gaps_5m")
    assert srs == 2193 and [f["gap_id"] for f in features] == list(range(1, n + 1))


def test_filter_in_place_keeps_the_map_when_it_fails(tmp_path):
    raw, _, _ = scene(tmp_path, 50, 50)
    shutil.copy(tmp_path / "raw.tif", tmp_path / "gaps.tif")
    with pytest.raises(Exception):
        filter_gaps(tmp_path / "gaps.tif", tmp_path / "missing_dsm.tif", 0.0, 1e9)
    np.testing.assert_array_equal(read_raster(tmp_path / "gaps.tif")[0], np.where(raw == IGNORE, np.nan, raw))


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="GDAL (Debian gdal-bin) is not installed")
def test_ogrinfo_reads_one_layer_per_threshold(tmp_path):
    scene(tmp_path, 80, 60)
    with GpkgWriter(tmp_path / "gaps.gpkg", 2193, "NZGD2000 / New Zealand Transverse Mercator 2000") as gpkg:
        for tag in ("2m", "5m"):
            gpkg.layer(f"gaps_{tag}")
            filter_gaps(tmp_path / f"gaps_{tag}.tif", tmp_path / "dsm.tif", 0.0, 1e9, gpkg, f"gaps_{tag}",
                        raw_path=tmp_path / "raw.tif")
        gpkg.layer("gaps_10m")                                 # a threshold without gaps: an empty layer
    text = subprocess.run(["ogrinfo", "-so", "-al", str(tmp_path / "gaps.gpkg")], capture_output=True,
                          text=True, check=True).stdout
    assert "Layer name: gaps_2m" in text and "Layer name: gaps_5m" in text and "Layer name: gaps_10m" in text
    assert "Multi Polygon" in text and "2193" in text and "Feature Count: 0" in text
