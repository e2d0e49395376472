"""Resampling: area average and bilinear against independent references (block means, torch's
interpolate), NaN handling, conservation on non-integer ratios, and streamed equals whole."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.core.errors import RasterError
from lib.geoio.georef import GeoInfo
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import write_raster
from lib.geoio.resample import (axis_taps, dsm_methods, needs_resampling, resample, resample_raster,
                          resampled_grid)

GRID = GeoInfo(height=0, width=0, pixel_size=(1.0, 1.0), origin=(500000.0, 4100000.0),
               geokeys=(1, 1, 0, 1, 3072, 0, 1, 32633))


def grid(h, w, pixel_m) -> GeoInfo:
    return replace(GRID, height=h, width=w, pixel_size=(pixel_m, pixel_m))


def field(h, w, seed=0) -> np.ndarray:
    return (300 + 10 * np.random.default_rng(seed).standard_normal((h, w))).astype(np.float32)


def test_area_average_equals_block_means_and_ignores_nodata():
    x = field(12, 18)
    x[0, 0] = x[4:6, 6:8] = np.nan                   # one block partly, one block wholly nodata
    out = resample(x, grid(12, 18, 0.5), resampled_grid(grid(12, 18, 0.5), 1.0), "area")
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="Mean of empty slice"):
        blocks = np.nanmean(x.reshape(6, 2, 9, 2), axis=(1, 3))
    np.testing.assert_allclose(out, blocks, rtol=1e-6)
    assert np.isnan(out[2, 3]) and np.isfinite(out[0, 0])


def test_bilinear_refinement_matches_torch_interpolate():
    x = field(9, 14, seed=1)
    out = resample(x, grid(9, 14, 2.0), resampled_grid(grid(9, 14, 2.0), 1.0), "bilinear")
    want = F.interpolate(torch.from_numpy(x)[None, None].double(), scale_factor=2, mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_bilinear_renormalises_around_nodata():
    x = np.full((4, 4), 7.0, np.float32)
    x[1, 1] = np.nan
    out = resample(x, grid(4, 4, 2.0), grid(8, 8, 1.0), "bilinear")
    assert np.all(out == 7.0)                        # every output has a valid neighbour: the constant survives
    x[:] = np.nan
    assert np.isnan(resample(x, grid(4, 4, 2.0), grid(8, 8, 1.0), "bilinear")).all()


def test_area_average_conserves_the_integral_on_a_non_integer_ratio():
    x = field(40, 28, seed=2).astype(np.float64)     # 0.75 m pixels: 30 x 21 m
    coarse = resampled_grid(grid(40, 28, 0.75), 1.0)
    assert (coarse.height, coarse.width) == (30, 21)
    out = resample(x, grid(40, 28, 0.75), coarse, "area")
    assert out.sum() * 1.0 == pytest.approx(x.sum() * 0.75 ** 2, rel=1e-6)
    idx, w = axis_taps(30, 40, 4 / 3, "area")
    np.testing.assert_allclose(w.sum(axis=1), 4 / 3)  # each output row covers 4/3 source rows


def test_nearest_picks_the_pixel_under_each_centre():
    labels = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    fine = resample(labels, grid(6, 5, 1.0), grid(12, 10, 0.5), "nearest")
    assert np.array_equal(fine, np.kron(labels, np.ones((2, 2))))
    assert np.array_equal(resample(fine, grid(12, 10, 0.5), grid(6, 5, 1.0), "nearest"), labels)


def test_grid_covers_the_extent_and_methods_follow_the_direction():
    g = resampled_grid(grid(101, 50, 0.5), 1.0)
    assert (g.height, g.width, g.pixel_size, g.origin, g.geokeys) == (51, 25, (1.0, 1.0), GRID.origin, GRID.geokeys)
    assert dsm_methods(grid(1, 1, 0.5), 1.0) == ("area", "area")
    assert dsm_methods(replace(GRID, pixel_size=(2.0, 0.5)), 1.0) == ("area", "bilinear")   # (rows, cols)
    assert needs_resampling(grid(1, 1, 0.5), 1.0) and not needs_resampling(grid(1, 1, 1.005), 1.0)
    with pytest.raises(RasterError, match="one origin"):
        resample(np.zeros((2, 2)), grid(2, 2, 1.0), replace(grid(1, 1, 2.0), origin=(0.0, 0.0)), "area")
    with pytest.raises(RasterError, match="valid methods"):
        resample(np.zeros((2, 2)), grid(2, 2, 1.0), grid(1, 1, 2.0), "cubic")


@pytest.mark.parametrize("src_m, dst_m, methods", [(0.5, 1.0, "area"), (2.0, 1.0, "bilinear"),
                                                   (1.0, 0.4, "nearest"), (1.0, 2.0, "nearest"),
                                                   (0.3, 1.0, ("area", "bilinear"))])
def test_streamed_strips_equal_the_whole_array(tmp_path, src_m, dst_m, methods):
    x = field(37, 29, seed=3)
    x[5:9, 3:20] = np.nan
    src = grid(37, 29, src_m)
    write_raster(tmp_path / "src.tif", x, src, nodata=float("nan"))
    dst = resampled_grid(src, dst_m)
    resample_raster(tmp_path / "src.tif", tmp_path / "dst.tif", dst, methods, strip_rows=5)
    got, info = read_raster(tmp_path / "dst.tif")
    np.testing.assert_array_equal(got, resample(x, src, dst, methods))
    assert (info.height, info.width, info.pixel_size, info.origin, info.epsg) == \
        (dst.height, dst.width, dst.pixel_size, dst.origin, 32633)


def test_streamed_mask_with_nodata_from_another_raster(tmp_path):
    mask = (np.random.default_rng(4).random((10, 12)) < 0.3).astype(np.uint8)
    mask[0, :] = 255
    write_raster(tmp_path / "mask.tif", mask, grid(10, 12, 1.0), nodata=255)
    like = np.zeros((20, 24), np.float32)
    like[5, 5] = np.nan
    write_raster(tmp_path / "like.tif", like, grid(20, 24, 0.5), nodata=float("nan"))
    resample_raster(tmp_path / "mask.tif", tmp_path / "fine.tif", read_info(tmp_path / "like.tif"), "nearest",
                    np.uint8, 255, nodata_like=tmp_path / "like.tif", strip_rows=3)
    want = np.kron(mask, np.ones((2, 2), np.uint8))
    want[5, 5] = 255
    got = read_raster(tmp_path / "fine.tif")[0]
    assert np.array_equal(np.nan_to_num(got, nan=255).astype(np.uint8), want)
    assert read_info(tmp_path / "fine.tif").nodata == 255
