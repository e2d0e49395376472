"""Gap polygons against brute force on small rasters (point-in-polygon, pixel counts, filled parts), the
published GapSPDF coordinates, the GeoPackage and GeoJSON round trips, and ogrinfo when installed."""
import json
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest

from lib.gaps.components import label_components
from lib.core.errors import DataError
from lib.gaps.masks import gap_labels, gap_stats
from lib.geoio.geojson import write_geojson
from lib.geoio.geopackage import APPLICATION_ID, geometry_blobs, parse_blob, read_gpkg, write_gpkg
from lib.gaps.polygons import GapPolygons, gap_polygons
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_raster

# ForestGapR README: GapSPDF(getForestGaps(ALS_CHM_DUC, 10, c(4, 1000))) merged with GapStats, x and y
# printed to 7 significant digits. Gaps 11 and 13 have several parts: sp places them at the centroid
# of the largest part's outer ring (its label point).
DUC_SPDF_XY = {1: (173088.7, 9673197), 10: (173044.2, 9673143), 11: (173038.7, 9673143),
               12: (173182.0, 9673138), 13: (173067.7, 9673121), 14: (173179.9, 9673132)}
# A 2008-style GeoKeyDirectory naming EPSG:2193 (NZTM2000) as the projected CRS
NZTM_KEYS = (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 2193)


def geo(height, width, pixel=(1.0, 1.0), origin=(500.0, 900.0), geokeys=None) -> GeoInfo:
    return GeoInfo(height=height, width=width, pixel_size=pixel, origin=origin, geokeys=geokeys)


def random_labels(seed, shape=(36, 44), level=8.0):
    """Gap ids of a noisy CHM: many gaps with diagonal joins, holes and holes touching shells."""
    rng = np.random.default_rng(seed)
    chm = rng.uniform(0, 20, shape).astype(np.float32)
    return gap_labels(chm, level, 0, 1e9, 1.0)


def ring_area(ring):
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def inside_even_odd(rings, px, py):
    """Brute-force point-in-polygon (even-odd over all rings) for points (px, py)."""
    inside = np.zeros(px.shape, bool)
    for ring in rings:
        (x0, y0), (x1, y1) = ring[:-1].T, ring[1:].T
        crosses = ((y0[None] > py[:, None]) != (y1[None] > py[:, None]))
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0[None] + (py[:, None] - y0[None]) * (x1 - x0)[None] / (y1 - y0)[None]
        inside ^= (crosses & (px[:, None] < x_at)).sum(1) % 2 == 1
    return inside


def test_square_with_hole_has_exact_rings_and_orientation():
    labels = np.zeros((5, 5), np.int32)
    labels[1:4, 1:4] = 1
    labels[2, 2] = 0
    info = geo(5, 5, origin=(0.0, 5.0))
    polygons = gap_polygons(labels, 1, info)
    (shell, hole), = polygons.parts(1)
    assert ring_area(shell) == 9 and ring_area(hole) == -1       # shell counter-clockwise, hole clockwise
    assert sorted(map(tuple, shell[:-1])) == [(1, 1), (1, 4), (4, 1), (4, 4)]
    assert sorted(map(tuple, hole[:-1])) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert polygons.area.tolist() == [8.0] and polygons.perimeter.tolist() == [16.0]
    assert polygons.label_point.tolist() == [[2.5, 2.5]]        # the shell's centroid, hole ignored


def test_corner_touching_pixels_are_parts_and_corner_pockets_are_holes():
    # gap 1 closes around a pocket that touches the outside at one corner: one shell + one hole (the
    # valid OGC form); gap 2 is two pixels touching at a corner: two parts.
    labels = np.array([[1, 1, 1, 0, 0],
                       [1, 0, 1, 0, 0],
                       [1, 1, 0, 0, 2],
                       [0, 0, 0, 2, 0]], np.int32)
    polygons = gap_polygons(labels, 2, geo(4, 5, origin=(0.0, 4.0)))
    (rings,) = polygons.parts(1)
    assert len(rings) == 2 and ring_area(rings[0]) == 8 and ring_area(rings[1]) == -1
    parts = polygons.parts(2)
    assert len(parts) == 2 and all(len(r) == 1 and ring_area(r[0]) == 1 for r in parts)
    for part in parts + [rings]:
        for ring in part:
            assert len(np.unique(ring[:-1], axis=0)) == len(ring) - 1    # simple: no vertex twice


@pytest.mark.parametrize("seed", range(4))
def test_polygons_match_brute_force(seed):
    labels, n = random_labels(seed, level=[6, 8, 9, 10][seed])
    info = geo(*labels.shape, pixel=(0.5, 2.0))
    polygons = gap_polygons(labels, n, info)
    stats = gap_stats(labels, n, np.zeros(labels.shape, np.float32), info)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    np.testing.assert_array_equal(polygons.area, counts * info.pixel_area)      # exact
    np.testing.assert_allclose(polygons.centroid, np.stack([stats["x"], stats["y"]], 1), rtol=0, atol=1e-9)
    padded = np.pad(labels, 1)
    sides = np.zeros(n + 1)
    for axis, length in ((0, info.pixel_size[0]), (1, info.pixel_size[1])):   # rows differ: x-long sides
        a, b = np.moveaxis(padded, axis, 0)[:-1], np.moveaxis(padded, axis, 0)[1:]
        differ = a != b
        np.add.at(sides, a[differ], length)
        np.add.at(sides, b[differ], length)
    np.testing.assert_allclose(polygons.perimeter, sides[1:])
    rows, cols = np.indices(labels.shape).reshape(2, -1)
    px, py = info.xy_of(rows, cols)
    for g in range(1, n + 1, max(1, n // 12)):
        rings = [ring for part in polygons.parts(g) for ring in part]
        np.testing.assert_array_equal(inside_even_odd(rings, px, py), labels.ravel() == g)
        for ring in rings:
            assert len(np.unique(ring[:-1], axis=0)) == len(ring) - 1


@pytest.mark.parametrize("seed", range(3))
def test_label_point_is_centroid_of_the_largest_filled_part(seed):
    labels, n = random_labels(seed + 10, level=9)
    info = geo(*labels.shape)
    polygons = gap_polygons(labels, n, info)
    parts, m = label_components(labels > 0, 4)
    filled_size, filled_xy, holes = {}, {}, {}
    for p in range(1, m + 1):
        part = np.pad(parts == p, 1)
        outside, k = label_components(~part, 4)              # component 1 touches the padded border
        filled = (part | (outside > 1))[1:-1, 1:-1]
        r, c = np.nonzero(filled)
        filled_size[p], filled_xy[p], holes[p] = filled.sum(), np.mean(info.xy_of(r, c), axis=1), k - 1
    for g in range(1, n + 1):
        ps = np.unique(parts[labels == g])
        best = ps[np.argmax([filled_size[p] for p in ps])]   # argmax: the first on ties (scan order)
        np.testing.assert_allclose(polygons.label_point[g - 1], filled_xy[best], atol=1e-9)
        got = polygons.parts(g)
        assert len(got) == len(ps)
        assert sorted(len(rings) - 1 for rings in got) == sorted(holes[p] for p in ps)


def test_published_gapspdf_coordinates(real_data):
    chm, info = read_raster(real_data / "ALS_CHM_DUC.tif")
    labels, n = gap_labels(chm, 10, 4, 1000, info.pixel_area)
    polygons = gap_polygons(labels, n, info)
    for gap_id, (x, y) in DUC_SPDF_XY.items():
        got_x, got_y = polygons.label_point[gap_id - 1]
        assert abs(got_x - x) <= 0.05 and abs(got_y - y) <= 0.5, (gap_id, got_x, got_y)
    assert len(polygons.parts(13)) > 1 and len(polygons.parts(11)) > 1


def test_no_gaps_and_bad_labels():
    polygons = gap_polygons(np.zeros((4, 6), np.int32), 0, geo(4, 6))
    assert len(polygons) == 0 and polygons.coords.shape == (0, 2) and len(polygons.ring_start) == 1
    with pytest.raises(DataError, match="0..1"):
        gap_polygons(np.full((2, 2), 3, np.int32), 1, geo(2, 2))
    with pytest.raises(DataError, match="integer"):
        gap_polygons(np.zeros((2, 2)), 0, geo(2, 2))


def columns_of(polygons, n):
    sd = np.linspace(0, 1, n)
    sd[::3] = np.nan                                          # one-pixel gaps have no sd: NULL / null
    return {"gap_id": np.arange(1, n + 1), "gap_area": polygons.area, "perimeter": polygons.perimeter,
            "chm_sd": sd, "kind": np.array(["gap"] * n)}


def test_gpkg_round_trip(tmp_path):
    labels, n = random_labels(3, level=9)
    info = geo(*labels.shape, pixel=(0.5, 0.5), geokeys=NZTM_KEYS)
    polygons = gap_polygons(labels, n, info)
    columns = columns_of(polygons, n)
    path = tmp_path / "gaps.gpkg"
    write_gpkg(path, polygons, columns, info.epsg, "NZGD2000 / NZTM")
    srs_id, features = read_gpkg(path)
    assert srs_id == 2193 and len(features) == n
    for k, feature in enumerate(features):
        assert feature["gap_id"] == k + 1 and feature["gap_area"] == polygons.area[k]
        assert feature["kind"] == "gap"
        assert (feature["chm_sd"] is None) == bool(np.isnan(columns["chm_sd"][k]))
        expected = polygons.parts(k + 1)
        assert [len(rings) for rings in feature["parts"]] == [len(rings) for rings in expected]
        for got, want in zip(feature["parts"], expected):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        org, code = db.execute("SELECT organization, organization_coordsys_id FROM gpkg_spatial_ref_sys "
                               "WHERE srs_id = 2193").fetchone()
        assert (org, code) == ("EPSG", 2193)
        extent = db.execute("SELECT min_x, min_y, max_x, max_y FROM gpkg_contents").fetchone()
    np.testing.assert_allclose(extent, [*polygons.coords.min(0), *polygons.coords.max(0)])


def test_geometry_blobs_headers_envelopes_and_an_empty_gap():
    shell, triangle = np.array([[0.0, 0], [2, 0], [2, 3], [0, 3]]), np.array([[5.0, 5], [6, 5], [6, 6]])
    polygons = GapPolygons(area=np.zeros(3), perimeter=np.zeros(3), centroid=np.zeros((3, 2)),
                           label_point=np.zeros((3, 2)), coords=np.vstack([shell, triangle, triangle + 1]),
                           ring_start=np.array([0, 4, 7, 10]), ring_gap=np.array([1, 1, 3]),
                           ring_part=np.array([1, 2, 3]))      # gap 1: two parts; gap 2: no pixels
    blobs = geometry_blobs(polygons, 32721)
    assert [blob[:4] for blob in blobs] == [b"GP\x00\x03", b"GP\x00\x13", b"GP\x00\x03"]  # bit 4: empty
    assert all(int.from_bytes(blob[4:8], "little", signed=True) == 32721 for blob in blobs)
    np.testing.assert_array_equal(np.frombuffer(blobs[0][8:40], "<f8"), [0, 6, 0, 6])   # minx maxx miny maxy
    assert np.isnan(np.frombuffer(blobs[1][8:40], "<f8")).all() and parse_blob(blobs[1]) == []
    np.testing.assert_array_equal(np.frombuffer(blobs[2][8:40], "<f8"), [6, 7, 6, 7])
    for g, blob in enumerate(blobs, 1):
        got, want = parse_blob(blob), polygons.parts(g)
        assert [len(rings) for rings in got] == [len(rings) for rings in want]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a[0], b[0])              # closed rings, first vertex repeated
    assert len(b"".join(blobs)) == 3 * 49 + 2 * 9 + 4 * 2 + 16 * (5 + 4) + 9 + 4 + 16 * 4


def test_geojson_round_trip(tmp_path):
    labels, n = random_labels(4, level=9)
    info = geo(*labels.shape, geokeys=NZTM_KEYS)
    polygons = gap_polygons(labels, n, info)
    columns = columns_of(polygons, n)
    write_geojson(tmp_path / "gaps.geojson", polygons, columns, info.epsg)
    data = json.loads((tmp_path / "gaps.geojson").read_text())
    assert data["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::2193"
    assert len(data["features"]) == n
    for k, feature in enumerate(data["features"]):
        assert feature["geometry"]["type"] == "MultiPolygon"
        assert feature["properties"]["gap_id"] == k + 1
        assert (feature["properties"]["chm_sd"] is None) == bool(np.isnan(columns["chm_sd"][k]))
        for got, want in zip(feature["geometry"]["coordinates"], polygons.parts(k + 1)):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(np.array(a), b)


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="ogrinfo (gdal-bin) is not installed")
def test_ogrinfo_reads_the_geopackage(tmp_path):
    labels, n = random_labels(5, level=8)
    info = geo(*labels.shape, pixel=(0.5, 0.5), geokeys=NZTM_KEYS)
    polygons = gap_polygons(labels, n, info)
    path = tmp_path / "gaps.gpkg"
    write_gpkg(path, polygons, columns_of(polygons, n), info.epsg)
    summary = subprocess.run(["ogrinfo", "-so", "-al", str(path)], capture_output=True, text=True,
                             check=True).stdout
    assert f"Feature Count: {n}" in summary and "Multi Polygon" in summary
    assert 'ID["EPSG",2193]' in summary or 'AUTHORITY["EPSG","2193"]' in summary
    sql = "SELECT SUM(ST_IsValid(geom)), SUM(ABS(ST_Area(geom) - gap_area)) FROM gaps"
    check = subprocess.run(["ogrinfo", "-q", "-dialect", "sqlite", "-sql", sql, str(path)],
                           capture_output=True, text=True)
    values = [line.split("=")[1].strip() for line in check.stdout.splitlines() if "=" in line]
    if check.returncode or len(values) != 2 or values[0] in ("", "(null)"):
        pytest.skip("this GDAL has no SpatiaLite/GEOS SQL functions to check validity")
    assert int(values[0]) == n and float(values[1]) == 0      # GEOS: every MultiPolygon valid, areas exact
