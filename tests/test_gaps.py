"""ForestGapR-style gaps: area filter, numbering, nodata, statistics, CSV, the R package's published
example on ALS_CHM_DUC.tif, and gaps.py end to end."""
import csv
import io
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import gaps
from lib.gaps.components import label_components
from lib.core.errors import ConfigError, DataError
from lib.gaps.masks import (IGNORE, ROUNDED_COLUMNS, STAT_COLUMNS, gap_labels, gap_masks, gap_stats, round_like_r,
                      threshold_tag, write_gap_table)
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_raster
from lib.geoio.geotiff_write import write_raster

# ForestGapR README, GapStats(getForestGaps(ALS_CHM_DUC, threshold = 10, size = c(5, 1000))):
# gap_id gap_area chm_max chm_min chm_mean chm_sd chm_gini chm_range (R rounds to 2 decimals)
DUC_GAPSTATS = """
1 34 9.22 1.09 5.12 2.61 0.30 8.13 | 2 6 8.17 6.06 7.40 0.74 0.06 2.11
3 5 9.96 7.42 8.85 1.23 0.08 2.54 | 4 32 9.91 4.42 8.12 1.69 0.12 5.49
5 11 9.83 6.23 8.48 1.09 0.07 3.60 | 6 44 9.72 1.92 7.31 1.60 0.12 7.80
7 6 9.88 8.81 9.49 0.40 0.02 1.07 | 8 6 9.07 3.10 7.02 2.96 0.22 5.97
9 10 9.52 2.86 8.03 2.22 0.13 6.66 | 10 18 9.90 2.74 5.06 2.18 0.23 7.16
11 13 9.91 1.75 5.47 2.94 0.31 8.16 | 12 10 9.92 3.75 7.77 2.27 0.16 6.17
13 66 9.94 0.99 5.31 2.91 0.32 8.95 | 14 7 10.00 5.83 7.41 1.53 0.12 4.17
15 12 9.65 5.61 7.97 1.43 0.10 4.04 | 16 7 8.64 5.64 7.67 0.97 0.07 3.00
17 21 8.42 0.40 6.02 2.23 0.20 8.02 | 18 6 7.39 3.37 5.03 1.82 0.21 4.02
19 5 9.07 4.91 7.74 1.65 0.12 4.16 | 20 36 9.90 2.10 6.62 2.45 0.21 7.80
21 5 9.71 8.43 9.19 0.57 0.04 1.28 | 22 12 9.83 7.42 8.39 0.85 0.06 2.41
23 15 9.25 7.81 8.56 0.48 0.03 1.44 | 24 27 9.43 0.26 2.37 2.55 0.56 9.17
25 5 4.54 2.43 3.78 0.80 0.12 2.11 | 26 7 9.98 6.34 8.40 1.07 0.07 3.64
27 25 9.76 3.78 7.67 1.13 0.07 5.98 | 28 6 9.49 4.92 7.23 1.56 0.13 4.57
29 22 9.76 3.78 5.96 1.97 0.18 5.98 | 30 6 5.73 2.69 4.46 1.28 0.17 3.04
31 7 9.41 7.72 8.44 0.56 0.04 1.69 | 32 57 9.89 1.97 5.70 2.62 0.26 7.92
33 38 9.68 0.25 4.58 2.07 0.24 9.43 | 34 8 9.83 4.88 6.55 1.54 0.13 4.95
35 6 9.66 8.26 9.16 0.48 0.03 1.40
"""
# Same README, GapSPDF x, y printed to 7 digits, for the gaps that are one polygon (4-connected): that
# README predates terra and took sp's label point (largest part) for multi-part gaps (11, 13); terra's
# centroids, which GapSPDF uses now, are area-weighted over all parts, as gap_stats' x, y.
DUC_CENTROIDS = {1: (173088.7, 9673197), 10: (173044.2, 9673143), 12: (173182.0, 9673138),
                 14: (173179.9, 9673132)}


def geo(height, width, pixel=(1.0, 1.0), origin=(500_000.0, 4_000_000.0)) -> GeoInfo:
    return GeoInfo(height=height, width=width, pixel_size=pixel, origin=origin)


def random_chm(seed, shape=(48, 64), nodata_fraction=0.05) -> np.ndarray:
    """Smooth-ish float32 canopy with holes: gaps of many sizes at thresholds 8-20 m."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 30, (shape[0] // 4 + 1, shape[1] // 4 + 1))
    chm = np.kron(coarse, np.ones((4, 4)))[:shape[0], :shape[1]] + rng.normal(0, 3, shape)
    chm[rng.random(shape) < nodata_fraction] = np.nan
    return chm.astype(np.float32)


def test_threshold_tag():
    tags = [threshold_tag(t) for t in (10, 10.0, 2.5, 0.25, 15.75)]
    assert tags == ["10m", "10m", "2.5m", "0.25m", "15.75m"]


def test_area_bounds_are_inclusive():
    chm = np.full((5, 20), 30.0, np.float32)
    chm[1:3, 1:3] = 1.0      # 4 px
    chm[1:2, 6:11] = 1.0     # 5 px
    chm[1:3, 13:16] = 1.0    # 6 px

    def sizes(lo, hi, px=1.0):
        return sorted(np.bincount(gap_labels(chm, 10, lo, hi, px)[0].ravel())[1:])

    assert sizes(5, 5) == [5]
    assert sizes(4, 6) == [4, 5, 6]
    assert sizes(4.5, 5.5) == [5]
    assert sizes(1.25, 1.25, px=0.25) == [5]          # 5 px x 0.25 m² = 1.25 m², both bounds inclusive
    assert sizes(7, 100) == []


def test_threshold_is_inclusive_and_exact_for_float32():
    chm = np.array([[9.0, 10.0, 10.5, np.nan]], np.float32)
    assert (gap_labels(chm, 10, 0, 100, 1.0)[0] > 0).tolist() == [[True, True, False, False]]
    # float32(10.1) > 10.1 as reals: R compares in double and does not count it as a gap.
    values = np.float32(10.1) + np.arange(-3, 4, dtype=np.float32) * np.finfo(np.float32).eps * 8
    chm = values.reshape(1, -1).astype(np.float32)
    for threshold in (10.1, float(np.float32(10.1)), 10.1 + 1e-7, 10.099999):
        got = gap_labels(np.kron(chm, np.ones((1, 2), np.float32)), threshold, 0, 100, 1.0)[0] > 0
        expected = np.kron(chm.astype(np.float64) <= threshold, np.ones((1, 2), bool))
        np.testing.assert_array_equal(got, expected)


def test_gaps_are_renumbered_in_scan_order_after_filtering():
    chm = np.full((6, 9), 25.0, np.float32)
    chm[0, 0] = 2.0                         # 1 px: dropped by min area 2
    chm[0, 5:7] = 2.0                       # first kept gap in scan order
    chm[3:5, 1:3] = 2.0                     # second
    chm[4, 7] = chm[5, 6] = 2.0             # third: diagonal neighbours are one gap
    labels, n = gap_labels(chm, 5, 2, 100, 1.0)
    assert n == 3
    assert labels[0, 5] == 1 and labels[3, 1] == 2 and labels[4, 7] == labels[5, 6] == 3
    assert labels[0, 0] == 0


@pytest.mark.parametrize("seed", range(4))
def test_gap_labels_match_direct_filter_of_components(seed):
    chm = random_chm(seed)
    threshold, lo, hi, px = 12.0, 1.5, 40.0, 0.75
    labels, n = gap_labels(chm, threshold, lo, hi, px)
    candidates, m = label_components(chm <= threshold, 8)
    expected = np.zeros_like(candidates)
    kept = 0
    for k in range(1, m + 1):
        pixels = candidates == k
        if lo <= pixels.sum() * px <= hi:
            kept += 1
            expected[pixels] = kept
    assert n == kept > 0
    np.testing.assert_array_equal(labels, expected)


def flood_patches(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """terra::patches(directions=8) by a plain flood fill (an independent reference for small arrays): ids
    1..n in raster-scan order of each patch's first pixel."""
    labels, n = np.zeros(mask.shape, np.int64), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start], todo = n, [start]
        while todo:
            r, c = todo.pop()
            for rr in range(max(r - 1, 0), min(r + 2, mask.shape[0])):
                for cc in range(max(c - 1, 0), min(c + 2, mask.shape[1])):
                    if mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = n
                        todo.append((rr, cc))
    return labels, n


def get_forest_gaps_reference(chm, threshold, size, res_m):
    """getForestGaps step by step: NA and > threshold out, 8-connected patches, area = count x res²,
    drop area < size[0] or > size[1], patches again (ids in scan order)."""
    patches, _ = flood_patches(np.nan_to_num(chm, nan=np.inf) <= threshold)
    area = np.bincount(patches.ravel())[patches] * res_m ** 2
    kept = (patches > 0) & (area >= size[0]) & (area <= size[1])
    return flood_patches(kept)


@pytest.mark.parametrize("res_m", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_gap_labels_match_get_forest_gaps_steps(seed, res_m):
    chm = random_chm(seed, shape=(37, 53), nodata_fraction=0.08)
    chm[0, :5] = chm[-1, -4:] = 1.0                                # gaps on the border
    chm[8:16, 18:26] = 30.0
    chm[[10, 11, 12, 13], [20, 21, 22, 23]] = 2.0                  # joined only through corners
    below = np.nan_to_num(chm, nan=np.inf) <= 12
    sizes = np.unique(np.bincount(label_components(below, 8)[0].ravel())[1:])
    lo, hi = sizes[1] * res_m ** 2, sizes[-2] * res_m ** 2         # bounds equal to real gap areas
    expected, k = get_forest_gaps_reference(chm, 12, (lo, hi), res_m)
    labels, n = gap_labels(chm, 12, lo, hi, res_m * res_m)
    assert n == k > 3
    np.testing.assert_array_equal(labels, expected)
    counts = np.bincount(labels.ravel())[1:]
    assert counts.min() == sizes[1] and counts.max() == sizes[-2]  # both bounds inclusive
    assert labels[10, 20] == labels[13, 23] > 0


def test_nodata_is_never_gap_and_separates_gaps():
    chm = np.full((4, 7), 1.0, np.float32)
    chm[:, 3] = np.nan
    labels, n = gap_labels(chm, 5, 1, 100, 1.0)
    assert n == 2 and (labels[:, 3] == 0).all()
    all_nan = np.full((3, 3), np.nan, np.float32)
    assert gap_labels(all_nan, 5, 0, 100, 1.0)[1] == 0


def test_gap_masks_values_nodata_and_nesting():
    chm = random_chm(11)
    thresholds = [8.0, 12.0, 20.0]
    masks = gap_masks(chm, thresholds, 0, np.inf, 1.0)
    assert masks.shape == (3,) + chm.shape and masks.dtype == np.uint8
    nodata = np.isnan(chm)
    assert (masks[:, nodata] == IGNORE).all()
    assert set(np.unique(masks[:, ~nodata])) <= {0, 1}
    for k, t in enumerate(thresholds):
        np.testing.assert_array_equal(masks[k][~nodata] == 1, chm[~nodata] <= t)
    valid = masks[:, ~nodata]
    assert (valid[0] <= valid[1]).all() and (valid[1] <= valid[2]).all()   # no size limit: nested
    bounded = gap_masks(chm, thresholds, 3, 30, 1.0)
    for k, t in enumerate(thresholds):
        labels, _ = gap_labels(chm, t, 3, 30, 1.0)
        np.testing.assert_array_equal(bounded[k][~nodata], (labels > 0)[~nodata])


def test_pixel_area_scales_with_bounds():
    chm = random_chm(5)
    labels, n = gap_labels(chm, 15, 4, 50, 1.0)
    labels_q, n_q = gap_labels(chm, 15, 1, 12.5, 0.25)
    assert n == n_q and np.array_equal(labels, labels_q)


def gini_by_mean_difference(x: np.ndarray) -> float:
    """Finite-sample Gini: sum |xi - xj| / (2 (n - 1) sum x)."""
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * (len(x) - 1) * x.sum())


@pytest.mark.parametrize("seed", range(3))
def test_gap_stats_match_per_gap_numpy(seed):
    chm = random_chm(seed, shape=(40, 56))
    info = geo(*chm.shape, pixel=(0.5, 2.0), origin=(1000.0, 5000.0))
    labels, n = gap_labels(chm, 14, 0, 60, info.pixel_area)
    stats = gap_stats(labels, n, chm, info)
    assert list(stats) == list(STAT_COLUMNS) and all(len(v) == n for v in stats.values())
    np.testing.assert_array_equal(stats["gap_id"], np.arange(1, n + 1))
    assert (stats["gap_area"] == 0).sum() == 0
    singles = 0
    for k in range(1, n + 1):
        rows, cols = np.nonzero(labels == k)
        z = chm[rows, cols].astype(np.float64)
        x, y = info.xy_of(rows, cols)
        i = k - 1
        assert stats["gap_area"][i] == len(z) * 1.0
        assert stats["chm_max"][i] == z.max() and stats["chm_min"][i] == z.min()   # not rounded
        assert stats["chm_range"][i] == round_like_r(z.max() - z.min(), 2)
        assert stats["chm_mean"][i] == round_like_r(z.mean(), 2)
        np.testing.assert_allclose([stats["x"][i], stats["y"][i]], [x.mean(), y.mean()], rtol=1e-12)
        if len(z) == 1:
            singles += 1
            assert np.isnan(stats["chm_sd"][i]) and np.isnan(stats["chm_gini"][i])
        else:
            assert stats["chm_sd"][i] == round_like_r(z.std(ddof=1), 2)
            assert stats["chm_gini"][i] == round_like_r(gini_by_mean_difference(z), 2)
    assert singles > 0 and n > 10
    for name in ROUNDED_COLUMNS:                                   # R's round(, 2): whole hundredths
        finite = stats[name][np.isfinite(stats[name])]
        np.testing.assert_array_equal(finite, np.round(finite * 100) / 100)


def test_round_like_r_matches_r_on_decimal_ties():
    """R >= 4 round(x, d) picks the decimal neighbour nearer to the double x; np.round scales first."""
    x = np.array([0.15, 2.675, 1.005, 0.125, 0.135, 0.285, 5.125, -0.15, -2.675, 7.0, np.nan, 1e17 + 8])
    digits_1 = round_like_r(x[[0, 7]], 1)
    assert digits_1.tolist() == [0.1, -0.1]                        # R: round(0.15, 1) = 0.1
    assert np.round(0.15, 1) == 0.2                                # the trap this avoids
    got = round_like_r(x, 2)
    expected = [0.15, 2.67, 1.0, 0.12, 0.14, 0.28, 5.12, -0.15, -2.67, 7.0, np.nan, 1e17 + 8]
    np.testing.assert_array_equal(got, expected)


def test_gap_stats_without_gaps():
    chm = np.full((4, 4), 30.0, np.float32)
    labels, n = gap_labels(chm, 10, 1, 100, 1.0)
    stats = gap_stats(labels, n, chm, geo(4, 4))
    assert n == 0 and all(len(v) == 0 for v in stats.values())


def test_write_gap_table_round_trip(tmp_path):
    chm = random_chm(2)
    info = geo(*chm.shape)
    labels, n = gap_labels(chm, 14, 0, 60, 1.0)
    stats = gap_stats(labels, n, chm, info)
    path = tmp_path / "gaps_14m.csv"
    path.write_text("stale")
    write_gap_table(path, stats)
    assert [p.name for p in tmp_path.iterdir()] == ["gaps_14m.csv"]          # no temp file left
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(STAT_COLUMNS) and len(rows) == n + 1
    table = np.array(rows[1:], dtype=object).T
    for name, column in zip(STAT_COLUMNS, table):
        nan = np.isnan(stats[name].astype(np.float64))
        assert list(column[nan]) == ["NA"] * int(nan.sum())
        np.testing.assert_allclose(column[~nan].astype(np.float64), stats[name][~nan], rtol=0, atol=5e-7)
    assert "NA" in table[STAT_COLUMNS.index("chm_sd")]


def test_bad_inputs_raise_project_errors():
    chm = np.ones((3, 3), np.float32)
    with pytest.raises(DataError, match="2-D float"):
        gap_labels(np.ones((2, 3, 3), np.float32), 10, 1, 10, 1.0)
    with pytest.raises(DataError, match="2-D float"):
        gap_labels(np.ones((3, 3), np.int16), 10, 1, 10, 1.0)
    with pytest.raises(ConfigError, match="min_area_m2=10"):
        gap_labels(chm, 10, 10, 1, 1.0)
    with pytest.raises(DataError, match="pixel area"):
        gap_labels(chm, 10, 1, 10, 0.0)


def test_forestgapr_example_on_ducke(real_data):
    chm, info = read_raster(real_data / "ALS_CHM_DUC.tif")
    labels, n = gap_labels(chm, 10, 5, 1000, info.pixel_area)
    stats = gap_stats(labels, n, chm, info)
    assert n == 35 and stats["gap_area"].max() == 66
    published = np.array(DUC_GAPSTATS.replace("|", "\n").split(), float).reshape(-1, 8)
    for j, name in enumerate(STAT_COLUMNS[:8]):                  # rounded as GapStats: equal as printed
        unrounded = name in ("chm_max", "chm_min")                   # printed to 2 decimals by R
        np.testing.assert_allclose(stats[name], published[:, j], rtol=0, atol=0.005 + 1e-6 if unrounded else 1e-9,
                                   err_msg=name)
    for gap_id, (x, y) in DUC_CENTROIDS.items():
        assert label_components(labels == gap_id, 4)[1] == 1
        assert abs(stats["x"][gap_id - 1] - x) <= 0.05 + 1e-6      # printed as 173088.7
        assert abs(stats["y"][gap_id - 1] - y) <= 0.5 + 1e-6       # printed as 9673197
    assert gap_labels(chm, 10, 1, 10_000, info.pixel_area)[1] == 131


def run_script(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = gaps.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_gaps_script_end_to_end(tmp_path):
    chm = np.round(np.clip(random_chm(9, shape=(50, 60)), 0, None) * 64) / 64  # multiples of 1/64: DSM - DTM exact
    info = geo(*chm.shape, pixel=(0.5, 0.5))
    terrain = np.round(np.linspace(400, 650, chm.size)).astype(np.float32).reshape(chm.shape)
    write_raster(tmp_path / "chm.tif", chm, info)
    write_raster(tmp_path / "dsm.tif", chm + terrain, info)
    write_raster(tmp_path / "dtm.tif", terrain, info)
    code, out, err = run_script(["--chm", tmp_path / "chm.tif", "--thresholds", 10, 12.5,
                                 "--min-area", 1, "--max-area", 20, "--out", tmp_path / "out"])
    assert code == 0 and err == ""
    assert "10m:" in out and "12.5m:" in out
    for threshold in (10, 12.5):
        labels, n = gap_labels(chm, threshold, 1, 20, info.pixel_area)
        written, written_info = read_raster(tmp_path / "out" / f"gaps_{threshold_tag(threshold)}.tif")
        assert written_info.origin == info.origin and written_info.pixel_size == info.pixel_size
        np.testing.assert_array_equal(np.nan_to_num(written, nan=0), labels)   # 0 is declared nodata
        lines = (tmp_path / "out" / f"gaps_{threshold_tag(threshold)}.csv").read_text().splitlines()
        assert len(lines) == n + 1 and f"{n} gaps" in out
    # CHM = DSM - DTM on sloping terrain: the terrain changes nothing
    code, _, _ = run_script(["--dsm", tmp_path / "dsm.tif", "--dtm", tmp_path / "dtm.tif",
                             "--thresholds", 10, "--out", tmp_path / "pair"])
    from_pair, _ = read_raster(tmp_path / "pair" / "gaps_10m.tif")
    labels, n = gap_labels(chm, 10, 1, 10_000, info.pixel_area)
    assert code == 0
    np.testing.assert_array_equal(np.nan_to_num(from_pair), labels)
    write_gap_table(tmp_path / "expected.csv", gap_stats(labels, n, chm, info))
    assert (tmp_path / "pair" / "gaps_10m.csv").read_text() == (tmp_path / "expected.csv").read_text()


def test_gaps_script_reports_errors(tmp_path):
    code, out, err = run_script(["--chm", tmp_path / "missing.tif", "--thresholds", 10, "--out", tmp_path])
    assert code == 2 and err.startswith("error: ") and "missing.tif" in err
    chm = random_chm(1)
    write_raster(tmp_path / "chm.tif", chm, geo(*chm.shape))
    code, _, err = run_script(["--chm", tmp_path / "chm.tif", "--thresholds", 10, "--min-area", 9,
                               "--max-area", 3, "--out", tmp_path / "out"])
    assert code == 2 and "min_area_m2=9" in err


def test_gaps_script_estimates_the_ground_without_a_dtm(tmp_path):
    """The DSM-only paths (the ground filter by default, the opening with --ground-window): on flat ground
    with pits to it, each finds the DTM's gaps."""
    rng = np.random.default_rng(3)
    chm = np.full((96, 96), 25.0, np.float32) + rng.uniform(-2, 2, (96, 96)).astype(np.float32)
    chm[20:30, 40:52] = 0.5                                         # gaps that reach the ground
    chm[60:63, 10:14] = 1.0
    chm[::17, ::19] = 0.0                                           # LiDAR pits: the opening finds the ground
    terrain = np.full(chm.shape, 120.0, np.float32)
    info = geo(*chm.shape)
    write_raster(tmp_path / "dsm.tif", chm + terrain, info)
    write_raster(tmp_path / "dtm.tif", terrain, info)
    runs = {}
    for name, extra in (("dtm", ["--dtm", tmp_path / "dtm.tif"]), ("opening", ["--ground-window", 41]),
                        ("filter", [])):
        code, out, err = run_script(["--dsm", tmp_path / "dsm.tif", *extra, "--thresholds", 5,
                                     "--min-area", 4, "--out", tmp_path / name])
        assert code == 0, err
        runs[name], _ = read_raster(tmp_path / name / "gaps_5m.tif")
    truth = np.nan_to_num(runs["dtm"]) > 0
    assert truth.sum() == 10 * 12 + 3 * 4
    for name in ("opening", "filter"):
        found = np.nan_to_num(runs[name]) > 0
        assert (found & truth).sum() / (found | truth).sum() > 0.95, name


def test_gaps_script_ground_window_errors(tmp_path):
    chm = random_chm(2)
    write_raster(tmp_path / "dsm.tif", chm + 100, geo(*chm.shape, pixel=(2.0, 2.0)))
    write_raster(tmp_path / "chm.tif", chm, geo(*chm.shape))
    for argv, message in ((["--ground-window", 0], "must be > 0"),
                          (["--ground-window", 51, "--dtm", tmp_path / "chm.tif"], "not allowed with")):
        with pytest.raises(SystemExit), redirect_stderr(io.StringIO()) as err:
            gaps.main([str(a) for a in ["--dsm", tmp_path / "dsm.tif", "--thresholds", 5, "--out", tmp_path / "o",
                                        *argv]])
        assert message in err.getvalue()
    with pytest.raises(SystemExit), redirect_stderr(io.StringIO()) as err:
        gaps.main([str(a) for a in ["--chm", tmp_path / "chm.tif", "--ground-window", 51, "--thresholds", 5,
                                    "--out", tmp_path / "o"]])
    assert "--dtm and --ground-window need --dsm" in err.getvalue()
    code, _, err = run_script(["--dsm", tmp_path / "dsm.tif", "--ground-window", 5, "--thresholds", 5,
                               "--out", tmp_path / "o"])
    assert code == 2 and "under 3 pixels" in err and "dsm.tif" in err
