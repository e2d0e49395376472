"""lib/geoio/cog.py: the Cloud-Optimized layout checked byte by byte with tifffile, and by gdalinfo where
GDAL is installed (Debian gdal-bin)."""
import shutil
import struct
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import tifffile

from lib.core.errors import RasterError
from lib.geoio.cog import GHOST, CogWriter, overview_shapes, to_cog, write_cog
from lib.geoio.geotiff_read import read_info, read_raster
from lib.geoio.geotiff_write import write_raster
from tests.test_scene_windows import INFO


def cog_layout(path):
    """(pages' shapes, [(offsets, counts)] per page, IFD offsets, pages' pixels (integer rasters only: tifffile
    needs imagecodecs for the floating-point predictor)) of a TIFF file."""
    with tifffile.TiffFile(path) as tif:
        return ([p.shape for p in tif.pages], [(list(p.dataoffsets), list(p.databytecounts)) for p in tif.pages],
                [p.offset for p in tif.pages], [p.asarray() for p in tif.pages if p.dtype.kind in "ui"])


@pytest.mark.parametrize("dtype, nodata", [(np.uint8, 255), (np.float32, float("nan"))])
def test_cog_has_gdal_layout_overviews_and_the_data(tmp_path, dtype, nodata):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3, (700, 1100)).astype(dtype)
    info = replace(INFO, height=700, width=1100)
    path = tmp_path / "map.tif"
    with CogWriter(path, info, dtype, nodata) as out:
        for row0 in range(0, 700, 97):                       # blocks that straddle tile rows
            out.write(row0, data[row0:row0 + 97])
    raw = path.read_bytes()
    assert raw[8:8 + len(GHOST)] == GHOST and b"LAYOUT=IFDS_BEFORE_DATA" in GHOST
    shapes, tiles, ifds, pages = cog_layout(path)
    assert shapes == overview_shapes(700, 1100) == [(700, 1100), (350, 550), (175, 275), (88, 138)]
    for level, page in enumerate(pages):                     # each overview: every 2^l-th row and column
        np.testing.assert_array_equal(page, data[::2 ** level, ::2 ** level])
    starts = [min(o) for o, _ in tiles]
    assert max(ifds) < min(starts)                           # every IFD before any tile data
    assert starts == sorted(starts, reverse=True)            # smallest overview's tiles first
    for offsets, counts in tiles:
        assert offsets == sorted(offsets)                    # row-major within a level
        for offset, count in zip(offsets, counts):           # leader: the size; trailer: last 4 bytes again
            assert struct.unpack("<I", raw[offset - 4:offset])[0] == count
            assert raw[offset + count:offset + count + 4] == raw[offset + count - 4:offset + count]
    back, back_info = read_raster(path)
    np.testing.assert_array_equal(back, data.astype(np.float32))
    assert (back_info.origin, back_info.geokeys) == (info.origin, info.geokeys)
    np.testing.assert_equal(read_info(path).nodata, nodata)


def test_cog_of_one_tile_has_no_overview_and_missing_rows_fail(tmp_path):
    info = replace(INFO, height=40, width=30)
    write_cog(tmp_path / "small.tif", np.ones((40, 30), np.uint8), info, nodata=255)
    assert cog_layout(tmp_path / "small.tif")[0] == [(40, 30)]
    with pytest.raises(RasterError, match="only 10 of 40 rows"):
        with CogWriter(tmp_path / "short.tif", info, np.uint8) as out:
            out.write(0, np.ones((10, 30), np.uint8))
    assert not (tmp_path / "short.tif").exists() and not list(tmp_path.glob(".*"))


def test_to_cog_rewrites_a_plain_geotiff_in_place(tmp_path):
    info = replace(INFO, height=300, width=520)
    data = np.arange(300 * 520, dtype=np.float32).reshape(300, 520) % 7
    data[5, 5] = np.nan
    write_raster(tmp_path / "m.tif", np.where(np.isnan(data), 255, data).astype(np.uint8), info, nodata=255)
    to_cog(tmp_path / "m.tif", np.uint8, 255)
    assert cog_layout(tmp_path / "m.tif")[0] == [(300, 520), (150, 260), (75, 130)]
    np.testing.assert_array_equal(read_raster(tmp_path / "m.tif")[0], data)


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="GDAL (Debian gdal-bin) is not installed")
def test_gdalinfo_reads_a_cog_with_overviews_crs_and_nodata(tmp_path):
    info = replace(INFO, height=600, width=700)
    write_cog(tmp_path / "m.tif", (np.arange(600 * 700) % 3).reshape(600, 700).astype(np.uint8), info, nodata=255)
    text = subprocess.run(["gdalinfo", str(tmp_path / "m.tif")], capture_output=True, text=True, check=True).stdout
    assert "LAYOUT=COG" in text and "Overviews: 350x300, 175x150" in text
    assert "NoData Value=255" in text and "2193" in text and "Block=256x256" in text
