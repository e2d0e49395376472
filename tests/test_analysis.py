"""Gap statistics against direct computations (zeta sums, likelihood grids, distance matrices, sampled
circle arcs, per-pixel change rules), ForestGapR's published figures on ALS_CHM_DUC.tif, and
gaps.py --analysis / --chm-later / --gap-map end to end, edge cases included."""
import csv
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import gaps
from lib.gaps import analysis
from lib.gaps.masks import gap_labels
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_raster
from lib.geoio.geotiff_write import write_raster

# ForestGapR on ALS_CHM_DUC.tif, threshold 10 m, areas 1-10,000 m² (GapSizeFDist; GapsSpatPattern calls
# spatstat's clarkevans.test with its default correction = "none")
DUC = {"n_gaps": 131, "lambda_asner": 1.6955, "lambda_hanel": 2.0307, "clark_evans_r": 0.844}
# ForestGapR README, GapsSpatPattern on ALS_CHM_CAU_2012/2014, threshold 10 m, size c(1, 1000):
# "Clark-Evans test, No edge correction, Z-test": R and two-sided p
CAU_CLARK_EVANS = {"ALS_CHM_CAU_2012": (0.89312, 0.001022), "ALS_CHM_CAU_2014": (1.0596, 0.2688)}
CAU_2012_5_TO_1000_R = 1.088   # ForestGapR 0.1.8, GapsSpatPattern on CAU 2012, 10 m, size c(5, 1000)
# R's ?optimize example: optimize(function(x) x^2*(print(x)-1), lower = 0, upper = 10) prints these
# evaluation points (7 significant digits) and returns $minimum 0.6666728
R_OPTIMIZE_TRACE = [3.81966, 6.18034, 2.36068, 2.077939, 1.505823, 0.9306496, 0.9196752, 0.772905,
                    0.4776816, 0.6491436, 0.656315, 0.6653777, 0.6667786, 0.6666728, 0.6666321, 0.6667135]
APERY = 1.2020569031595942                                     # zeta(3)


def test_zeta_known_values_and_direct_sums():
    expected = [math.pi ** 2 / 6, APERY, math.pi ** 4 / 90]
    np.testing.assert_allclose(analysis.zeta([2, 3, 4]), expected, rtol=1e-14)
    k = np.arange(1, 200_001, dtype=np.float64)
    for s in (1.0001, 1.3, 2.5, 7.0, 20.0):                    # partial sum + integral tail + half term
        m = k[-1]
        direct = np.sum(k ** -s) + m ** (1 - s) / (s - 1) - 0.5 * m ** -s
        np.testing.assert_allclose(analysis.zeta(s), direct, rtol=1e-11)


def test_zeta_matches_scipy_when_present():
    special = pytest.importorskip("scipy.special")
    s = np.linspace(1.0001, 20, 500)
    np.testing.assert_allclose(analysis.zeta(s), special.zeta(s), rtol=1e-14)


def test_lambda_asner_is_the_likelihood_minimum():
    rng = np.random.default_rng(0)
    areas = np.ceil(rng.pareto(0.9, 300) + 1)
    grid = np.linspace(1.0001, 20, 400_001)
    nll = grid * np.log(areas).sum() + len(areas) * np.log(analysis.zeta(grid))
    assert abs(analysis.lambda_asner(areas) - grid[np.argmin(nll)]) < 2e-4     # optimize's tolerance
    assert analysis.lambda_asner(np.ones(5)) == pytest.approx(20, abs=2e-4)   # all 1 m²: upper bound
    assert math.isnan(analysis.lambda_asner([]))


def test_r_optimize_replays_r_evaluation_by_evaluation():
    points = []

    def f(x):
        points.append(x)
        return x * x * (x - 1)

    minimum = analysis.r_optimize(f, 0, 10)
    assert [float(f"{x:.7g}") for x in points] == R_OPTIMIZE_TRACE
    assert float(f"{minimum:.7g}") == 0.6666728


def test_lambda_asner_is_where_r_optimize_stops_not_the_exact_minimum():
    rng = np.random.default_rng(3)
    areas = np.ceil(rng.pareto(0.8, 200) + 1)

    def deviance(lam):                                          # ForestGapR's objective, in R's form
        return 2 * np.sum(-np.log(areas ** -lam / analysis.zeta(lam)))

    assert analysis.lambda_asner(areas) == analysis.r_optimize(deviance, 1.0001, 20)
    grid = np.linspace(1.0001, 20, 2_000_001)
    exact = grid[np.argmin(grid * np.log(areas).sum() + len(areas) * np.log(analysis.zeta(grid)))]
    assert 1e-7 < abs(analysis.lambda_asner(areas) - exact) < 1e-4


def test_lambda_hanel_formula_and_edge_cases():
    areas = np.array([2.0, 3, 5, 8, 13, 40])
    assert analysis.lambda_hanel(areas) == pytest.approx(1 + 6 / np.log(areas / 2).sum(), rel=1e-15)
    assert math.isnan(analysis.lambda_hanel([4.0, 4.0]))        # one size: infinite estimate
    assert math.isnan(analysis.lambda_hanel([]))


def test_size_frequency_bins_like_cut():
    areas = np.array([1, 1, 2, 2.5, 3, 7, 0.25])
    sizes, counts = analysis.size_frequency(areas)
    assert sizes.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert counts.tolist() == [3, 1, 2, 0, 0, 0, 1]            # (k - 1, k]: 0.25 -> 1, 2.5 -> 3
    assert analysis.size_frequency([])[1].size == 0


def test_size_frequency_drops_gaps_above_the_last_whole_break():
    """cut(x, seq(0, max(x), 1)): breaks end at floor(max), so a 10.25 m² largest gap is in no class."""
    sizes, counts = analysis.size_frequency([0.25, 1.0, 2.5, 9.75, 10.0, 10.25, 10.25])
    assert sizes.tolist() == list(range(1, 11))
    assert counts.tolist() == [2, 0, 1, 0, 0, 0, 0, 0, 0, 2] and counts.sum() == 5
    assert analysis.size_frequency([0.25, 0.5])[0].size == 0     # max < 1: no class at all


def test_clark_evans_against_distance_matrix():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (57, 2)) * [1, 0.6]
    window = (0, 100, 0, 60)
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    mean_nn, n, area = d.min(1).mean(), len(xy), 6000
    z = (mean_nn - 0.5 / math.sqrt(n / area)) / (0.26136 / math.sqrt(n * n / area))   # textbook SE
    ce = analysis.clark_evans(xy, window, "none")
    assert ce["r"] == pytest.approx(mean_nn / (0.5 / math.sqrt(n / area)), rel=1e-12)
    assert ce["z"] == pytest.approx(z, rel=1e-4)
    assert ce["p"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(abs(z) / math.sqrt(2)))), rel=1e-3)
    assert analysis.clark_evans(xy, window) == ce                      # "none" is the default, as spatstat's
    # the option: Donnelly (1978) expected distance for a rectangle of perimeter 320 m
    donnelly = 0.5 / math.sqrt(n / area) + (0.0514 + 0.0412 / math.sqrt(n)) * 320 / n
    ce = analysis.clark_evans(xy, window, "donnelly")
    assert ce["r"] == pytest.approx(mean_nn / donnelly, rel=1e-12) and ce["correction"] == "Donnelly"
    assert ce["z"] == pytest.approx((mean_nn - donnelly) / (0.26136 / math.sqrt(n * n / area)), rel=1e-4)
    assert (ce["r_donnelly"], ce["p_donnelly"]) == (ce["r"], ce["p"])
    assert ce["r_none"] == pytest.approx(mean_nn / (0.5 / math.sqrt(n / area)), rel=1e-12)
    with pytest.raises(ValueError, match="Donnelly"):
        analysis.clark_evans(xy, window, "guard")


@pytest.mark.parametrize("case", ["clustered", "collinear", "duplicates"])
def test_nearest_neighbour_against_distance_matrix(case):
    rng = np.random.default_rng(5)
    if case == "clustered":                                     # dense clusters + far loners: several rounds
        clusters = [rng.normal(c, 0.5, (40, 2)) for c in ((0, 0), (50, 80))]
        xy = np.vstack(clusters + [[[500, -300]], [[-900, 5]]])
    elif case == "collinear":
        xy = np.stack([rng.uniform(0, 1000, 60), np.full(60, 3.0)], 1)
    else:
        xy = np.repeat(rng.uniform(0, 10, (15, 2)), 2, axis=0)
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(analysis.nearest_neighbour(xy), d.min(1), rtol=1e-12)


def test_clark_evans_square_lattice_and_small_patterns():
    cells = (np.stack(np.meshgrid(np.arange(10), np.arange(8)), -1).reshape(-1, 2) + 0.5) * 3.0
    assert analysis.clark_evans(cells, (0, 30, 0, 24), "none")["r"] == pytest.approx(2.0)   # nn a, 1 / a² per m²
    for xy in (np.zeros((0, 2)), np.array([[1.0, 1.0]])):
        ce = analysis.clark_evans(xy, (0, 10, 0, 10))
        assert math.isnan(ce["r"]) and math.isnan(ce["p"])


def test_ripley_weight_against_sampled_circle():
    rng = np.random.default_rng(2)
    window = (0.0, 40.0, 0.0, 30.0)
    xy = rng.uniform([0, 0], [40, 30], (300, 2))
    d = rng.uniform(0.1, 7.5, 300)                              # up to a quarter of the short side
    angle = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    px = xy[:, :1] + d[:, None] * np.cos(angle)
    py = xy[:, 1:] + d[:, None] * np.sin(angle)
    share = ((px >= 0) & (px <= 40) & (py >= 0) & (py <= 30)).mean(1)
    np.testing.assert_allclose(analysis._ripley_weight(xy, d, window), 1 / share, rtol=2e-3)


def test_ripley_k_against_pair_counts():
    rng = np.random.default_rng(3)
    window = (0.0, 50.0, 0.0, 50.0)
    xy = rng.uniform(10, 40, (80, 2))                           # >= 10 m from every side
    radii = np.linspace(0, 10, 41)                              # no edge correction needed up to 10 m
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    pairs = (d[None] <= radii[:, None, None]).sum((1, 2))
    np.testing.assert_allclose(analysis.ripley_k(xy, window, radii), 2500 * pairs / (80 * 79), rtol=1e-12)
    assert np.isnan(analysis.ripley_k(xy[:1], window, radii)).all()


def test_ripley_k_with_edge_correction_against_all_pairs():
    rng = np.random.default_rng(6)
    window = (100.0, 160.0, 0.0, 40.0)
    xy = rng.uniform([100, 0], [160, 40], (70, 2))
    radii = analysis.ripley_radii(70, window)
    i, j = np.nonzero(~np.eye(70, dtype=bool))                 # every ordered pair
    d = np.hypot(*(xy[i] - xy[j]).T)
    w = analysis._ripley_weight(xy[i], d, window)
    expected = [(w * (d <= r)).sum() * 2400 / (70 * 69) for r in radii]
    np.testing.assert_allclose(analysis.ripley_k(xy, window, radii), expected, rtol=1e-12)


def test_ripley_envelope_is_seeded_and_brackets_theory():
    rng = np.random.default_rng(4)
    window = (0.0, 100.0, 0.0, 100.0)
    xy = rng.uniform(0, 100, (60, 2))
    a = analysis.ripley_envelope(xy, window, n_simulations=19, seed=7)
    b = analysis.ripley_envelope(xy, window, n_simulations=19, seed=7)
    c = analysis.ripley_envelope(xy, window, n_simulations=19, seed=8)
    np.testing.assert_array_equal(a["k_lo"], b["k_lo"])
    assert not np.array_equal(a["k_hi"], c["k_hi"])
    assert a["r"][-1] == 25 and len(a["r"]) == 513             # spatstat's default: a quarter of the side
    assert (a["k_lo"] <= a["k_hi"]).all() and (a["l_lo"] <= a["l_hi"]).all()
    mid = slice(100, None)                                      # CSR K = pi r² lies inside the envelope
    assert ((a["k_lo"][mid] <= a["k_theo"][mid]) & (a["k_theo"][mid] <= a["k_hi"][mid])).mean() > 0.95
    np.testing.assert_allclose(a["l"] ** 2 * math.pi, a["k"])
    none = analysis.ripley_envelope(xy, window, n_simulations=0)
    assert np.isnan(none["k_lo"]).all() and np.isnan(none["l_hi"]).all()
    np.testing.assert_array_equal(none["k"], a["k"])
    sparse = analysis.ripley_envelope(xy[:1], window, n_simulations=5, seed=0)   # sims with 0-3 points
    assert np.isnan(sparse["k"]).all()
    assert (np.isnan(sparse["k_lo"]) | (sparse["k_lo"] <= sparse["k_hi"])).all()


def test_published_duc_figures(real_data):
    chm, info = read_raster(real_data / "ALS_CHM_DUC.tif")
    labels, n = gap_labels(chm, 10, 1, 10_000, info.pixel_area)
    summary = analysis.summarize_gap_map(labels, n, info)
    assert summary["n_gaps"] == DUC["n_gaps"]
    assert summary["lambda_asner"] == pytest.approx(DUC["lambda_asner"], abs=1e-3)
    assert summary["lambda_hanel"] == pytest.approx(DUC["lambda_hanel"], abs=1e-3)
    assert summary["clark_evans_r"] == pytest.approx(DUC["clark_evans_r"], abs=5e-4)
    assert summary["clark_evans_correction"] == "none" and summary["clark_evans_r_none"] == summary["clark_evans_r"]
    assert summary["clark_evans_r_donnelly"] < summary["clark_evans_r"]   # Donnelly expects longer distances
    assert summary["gap_area_m2"] == (labels > 0).sum() * info.pixel_area


@pytest.mark.parametrize("name", sorted(CAU_CLARK_EVANS))
def test_published_cauaxi_clark_evans(real_data, name):
    """The README's uncorrected figures; 2012 has 8 gaps whose two largest parts tie in area, where the
    label point sp picks depends on GEOS's ring order: agreement to 3 decimals there."""
    chm, info = read_raster(real_data / f"{name}.tif")
    labels, n = gap_labels(chm, 10, 1, 1000, info.pixel_area)
    polygons = analysis.gap_polygons(labels, n, info)
    ce = analysis.clark_evans(polygons.label_point, analysis.window_of(info), "none")
    r, p = CAU_CLARK_EVANS[name]
    assert ce["r"] == pytest.approx(r, abs=5e-5 if name.endswith("2014") else 5e-4)
    assert ce["p"] == pytest.approx(p, rel=5e-4 if name.endswith("2014") else 0.05)


def test_published_cauaxi_clark_evans_from_5_m2(real_data, tmp_path):
    """gaps.py's default figure is ForestGapR's; --clark-evans-correction donnelly is the option."""
    chm = real_data / "ALS_CHM_CAU_2012.tif"
    base = ["--chm", chm, "--thresholds", 10, "--min-area", 5, "--max-area", 1000, "--analysis", "--simulations", 0]
    code, _, err = run(base + ["--out", tmp_path / "none"])
    assert code == 0, err
    none = json.loads((tmp_path / "none" / "analysis_10m.json").read_text())
    assert none["clark_evans_r"] == pytest.approx(CAU_2012_5_TO_1000_R, abs=5e-4)
    code, out, err = run(base + ["--out", tmp_path / "donnelly", "--clark-evans-correction", "donnelly"])
    assert code == 0 and "Donnelly edge correction; 1.088 uncorrected as ForestGapR" in out, err
    donnelly = json.loads((tmp_path / "donnelly" / "analysis_10m.json").read_text())
    assert donnelly["clark_evans_r"] == none["clark_evans_r_donnelly"] < none["clark_evans_r"]
    assert donnelly["clark_evans_p"] == none["clark_evans_p_donnelly"]


def test_gap_change_classes_on_a_hand_made_pair():
    before = np.zeros((6, 12), np.int32)
    after = np.zeros_like(before)
    before[0, 0:2] = 1                     # closes
    before[2, 0:2] = 2; after[2, 0:3] = 1  # expands by one pixel
    before[4, 0:3] = 3; after[4, 0:2] = 2  # shrinks by one pixel
    before[0, 6:8] = 4; after[0, 6:8] = 3  # unchanged
    after[3, 9:11] = 4                     # new
    change = analysis.gap_change(before, 4, after, 4)
    assert [analysis.GAP_CLASSES[k] for k in change["class2"]] == ["expanded", "shrunk", "unchanged", "new"]
    assert change["closed1"].tolist() == [True, False, False, False]
    px = change["pixels"]
    assert px[3, 9:11].tolist() == [1, 1] and px[2, 2] == 2 and px[2, 0] == 3 and px[4, 2] == 4
    assert px[0, 0:2].tolist() == [5, 5] and px[0, 6:8].tolist() == [3, 3] and px[5].sum() == 0
    s = analysis.change_summary(change, [2, 2, 3, 2], [3, 2, 2, 2], 0.5)
    assert s["new_gap_pixels"] == 3 and s["new_gap_area_m2"] == 1.5
    assert s["area_m2"] == {"new": 1.0, "expanded": 0.5, "stable": 3.0, "regrown": 0.5, "closed": 1.0}
    assert s["gaps"]["closed"] == {"count": 1, "area_m2": 2.0} and s["gaps"]["new"]["count"] == 1


@pytest.mark.parametrize("seed", range(3))
def test_gap_change_pixels_follow_the_rules(seed):
    rng = np.random.default_rng(seed)
    chm1, chm2 = rng.uniform(0, 20, (2, 40, 50)).astype(np.float32)
    l1, n1 = gap_labels(chm1, 5, 2, 30, 1.0)
    l2, n2 = gap_labels(chm2, 5, 2, 30, 1.0)
    change = analysis.gap_change(l1, n1, l2, n2)
    px, g1, g2 = change["pixels"], l1 > 0, l2 > 0
    np.testing.assert_array_equal(np.isin(px, (1, 2)), g2 & ~g1)          # GapChangeDec's new-gap pixels
    np.testing.assert_array_equal(px == 3, g1 & g2)
    np.testing.assert_array_equal(np.isin(px, (4, 5)), g1 & ~g2)
    for j in range(1, n2 + 1):                                           # per gap, directly
        mine = l2 == j
        kind = analysis.GAP_CLASSES[change["class2"][j - 1]]
        assert (kind == "new") == (not (mine & g1).any())
        assert (kind == "expanded") == ((mine & g1).any() and (mine & ~g1).any())
    for i in range(1, n1 + 1):
        assert change["closed1"][i - 1] == (not ((l1 == i) & g2).any())


# ----------------------------------------------------------------------------- gaps.py end to end
def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = gaps.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_gaps_analysis_on_duc(real_data, tmp_path):
    code, out, _ = run(["--chm", real_data / "ALS_CHM_DUC.tif", "--thresholds", 10, "--min-area", 1,
                        "--max-area", 10000, "--out", tmp_path, "--analysis", "--simulations", 19])
    assert code == 0 and "Clark-Evans R 0.844 (p = 0.00066, no edge correction, as ForestGapR; Donnelly 0.813)" in out
    result = json.loads((tmp_path / "analysis_10m.json").read_text())
    for key, value in DUC.items():
        assert result[key] == pytest.approx(value, abs=5e-4)
    assert result["clark_evans_p"] == result["clark_evans_p_none"] and result["clark_evans_correction"] == "none"
    for name in ("gaps_10m.gpkg", "gaps_10m.geojson", "size_freq_10m.png", "size_freq_10m.csv",
                 "ripley_10m.png", "ripley_10m.csv", "quicklook_10m.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader((tmp_path / "size_freq_10m.csv").open()))
    assert sum(int(r["frequency"]) for r in rows) == 131
    assert len(json.loads((tmp_path / "gaps_10m.geojson").read_text())["features"]) == 131


def test_gaps_change_between_surveys(real_data, tmp_path):
    a, b = real_data / "ALS_CHM_CAU_2012.tif", real_data / "ALS_CHM_CAU_2014.tif"
    code, out, _ = run(["--chm", a, "--chm-later", b, "--thresholds", 10, "--out", tmp_path])
    assert code == 0
    summary = json.loads((tmp_path / "change_10m.json").read_text())
    chm1, info = read_raster(a)
    chm2, _ = read_raster(b)
    g1 = gap_labels(chm1, 10, 1, 10000, 1.0)[0] > 0
    g2 = gap_labels(chm2, 10, 1, 10000, 1.0)[0] > 0
    assert summary["new_gap_pixels"] == int((g2 & ~g1).sum()) > 0
    classes, _ = read_raster(tmp_path / "change_10m.tif")
    for k, name in analysis.PIXEL_CLASSES.items():
        assert summary["area_m2"][name] == np.sum(classes == k)
    table = list(csv.DictReader((tmp_path / "change_10m.csv").open()))
    assert sum(r["change"] == "closed" for r in table) == summary["gaps"]["closed"]["count"]


def test_change_on_different_grids_fails_clearly(real_data, tmp_path):
    code, _, err = run(["--chm", real_data / "ALS_CHM_DUC.tif", "--chm-later",
                        real_data / "ALS_CHM_CAU_2014.tif", "--thresholds", 10, "--out", tmp_path])
    assert code == 2 and "not on the same grid" in err and "shape" in err


def small_geo(height, width):
    return GeoInfo(height=height, width=width, pixel_size=(1.0, 1.0), origin=(1000.0, 2000.0))


@pytest.mark.parametrize("case", ["none", "one", "one_pixel", "nodata"])
def test_gaps_analysis_edge_cases(tmp_path, case):
    chm = np.full((20, 24), 30.0, np.float32)
    if case == "one":
        chm[5:8, 5:9] = 2.0
    if case in ("one_pixel", "nodata"):
        chm[2, 2] = chm[10, 15] = chm[17, 3] = 2.0                # one-pixel gaps: no sd, equal sizes
    if case == "nodata":
        chm[:, 12:] = np.nan
    write_raster(tmp_path / "chm.tif", chm, small_geo(*chm.shape))
    code, _, err = run(["--chm", tmp_path / "chm.tif", "--thresholds", 10, "--out", tmp_path / "out",
                        "--analysis", "--simulations", 5])
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "analysis_10m.json").read_text())
    expected_n = {"none": 0, "one": 1, "one_pixel": 3, "nodata": 2}[case]
    assert result["n_gaps"] == expected_n
    if expected_n < 2:
        assert result["clark_evans_r"] is None and result["lambda_hanel"] is None
    if case in ("one_pixel", "nodata"):
        assert result["lambda_hanel"] is None and result["lambda_asner"] == pytest.approx(20, abs=2e-4)
        assert result["clark_evans_r"] is not None
    features = json.loads((tmp_path / "out" / "gaps_10m.geojson").read_text())["features"]
    assert len(features) == expected_n
    assert (tmp_path / "out" / "ripley_10m.png").exists()


def test_gap_map_gives_the_same_analysis(real_data, tmp_path):
    chm, info = read_raster(real_data / "ALS_CHM_DUC.tif")
    labels, _ = gap_labels(chm, 10, 1, 10000, 1.0)
    gap_map = (labels > 0).astype(np.uint8)
    gap_map[:3, :3] = 255                                       # nodata corner, as predict.py writes it
    write_raster(tmp_path / "gaps_10m.tif", gap_map, info, nodata=255)
    code, _, err = run(["--gap-map", tmp_path / "gaps_10m.tif", "--out", tmp_path / "pred", "--analysis",
                        "--simulations", 5])
    assert code == 0, err
    masked = np.where(gap_map == 255, np.nan, chm)
    reference = analysis.summarize_gap_map(*gap_labels(masked, 10, 1, 10000, 1.0), info)
    result = json.loads((tmp_path / "pred" / "analysis_10m.json").read_text())
    for key in ("n_gaps", "lambda_asner", "lambda_hanel", "clark_evans_r"):
        assert result[key] == pytest.approx(reference[key], rel=1e-12)
    code, _, err = run(["--gap-map", tmp_path / "gaps_10m.tif", "--out", tmp_path])
    assert code == 2 and "overwrite" in err
