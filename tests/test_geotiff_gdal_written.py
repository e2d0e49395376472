"""Files GDAL writes (gdal_translate creation options: codecs, predictors, tiles, interleaving,
photometrics, bit depths, sparse, BigTIFF, big-endian) read exactly as GDAL reads them, or refused
with a RasterError naming the file; the plain and common ones must be read."""
import shutil
import subprocess

import numpy as np
import pytest

from lib.core.errors import RasterError
from lib.geoio.geotiff_read import read_raster
from tests.gdal_oracle import gdal_python, gdal_reads
from tests.test_geotiff_differential import expected

pytestmark = [pytest.mark.skipif(shutil.which("gdal_translate") is None or gdal_python() is None,
                                 reason="GDAL (Debian gdal-bin and python3-gdal) not installed"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TYPES = ["Byte", "Int16", "UInt16", "Int32", "UInt32", "Float32", "Float64", "Int64", "UInt64"]
VARIANTS = {  # name: (gdal_translate options, must be read)
    **{f"{t}_{c}": (["-ot", t, "-co", f"COMPRESS={c}"], True) for t in TYPES for c in ("NONE", "LZW", "DEFLATE")},
    "packbits": (["-ot", "Int16", "-co", "COMPRESS=PACKBITS"], True),
    "lzma_tiled": (["-co", "COMPRESS=LZMA", "-co", "TILED=YES", "-co", "BLOCKXSIZE=64", "-co", "BLOCKYSIZE=32"], True),
    "lzw_pred2_int": (["-ot", "Int32", "-co", "COMPRESS=LZW", "-co", "PREDICTOR=2"], True),
    "lzw_pred2_float": (["-co", "COMPRESS=LZW", "-co", "PREDICTOR=2"], True),
    "deflate_pred3_tiled": (["-ot", "Float64", "-co", "COMPRESS=DEFLATE", "-co", "PREDICTOR=3",
                             "-co", "TILED=YES", "-co", "BLOCKXSIZE=32", "-co", "BLOCKYSIZE=48"], True),
    "strips_of_7": (["-co", "BLOCKYSIZE=7", "-co", "COMPRESS=LZW", "-co", "PREDICTOR=3"], True),
    "bigtiff_big_endian": (["-co", "BIGTIFF=YES", "-co", "ENDIANNESS=BIG", "-co", "COMPRESS=DEFLATE",
                            "-co", "PREDICTOR=3"], True),
    "float16": (["-co", "NBITS=16", "-co", "COMPRESS=DEFLATE"], True),
    "signed_byte": (["-ot", "Byte", "-co", "PIXELTYPE=SIGNEDBYTE", "-scale", "450", "700", "-120", "120"], True),
    "miniswhite": (["-ot", "Byte", "-co", "PHOTOMETRIC=MINISWHITE"], True),
    "sparse": (["-a_nodata", "-9999", "-co", "SPARSE_OK=TRUE", "-co", "TILED=YES", "-co", "BLOCKXSIZE=16",
                "-co", "BLOCKYSIZE=16", "-srcwin", "-40", "-40", "300", "250"], True),
    "rgb_pixel": (["-ot", "Byte", "-b", "1", "-b", "1", "-b", "1", "-co", "PHOTOMETRIC=RGB",
                   "-co", "INTERLEAVE=PIXEL", "-co", "COMPRESS=LZW", "-co", "PREDICTOR=2"], True),
    "rgb_band": (["-ot", "UInt16", "-b", "1", "-b", "1", "-b", "1", "-co", "INTERLEAVE=BAND",
                  "-co", "COMPRESS=DEFLATE", "-co", "TILED=YES"], True),
    "zstd": (["-co", "COMPRESS=ZSTD"], False),
    "lerc": (["-co", "COMPRESS=LERC"], False),
    "jpeg": (["-ot", "Byte", "-co", "COMPRESS=JPEG"], False),
    "ycbcr_jpeg": (["-ot", "Byte", "-b", "1", "-b", "1", "-b", "1", "-co", "COMPRESS=JPEG",
                    "-co", "PHOTOMETRIC=YCBCR"], False),
    "cmyk": (["-ot", "Byte", "-b", "1", "-b", "1", "-b", "1", "-b", "1", "-co", "PHOTOMETRIC=CMYK"], False),
    "nbits_12": (["-ot", "UInt16", "-co", "NBITS=12"], False),
    "nbits_1": (["-ot", "Byte", "-co", "NBITS=1", "-scale", "450", "700", "0", "1"], False),
}


def test_gdal_written_files_read_as_gdal_does(tmp_path, real_data):
    source = real_data / "wellington_DTM.tif"
    paths = {}
    for name, (options, _) in VARIANTS.items():
        paths[name] = tmp_path / f"{name}.tif"
        subprocess.run(["gdal_translate", "-q", *options, str(source), str(paths[name])], check=True,
                       capture_output=True)
    theirs = dict(zip(VARIANTS, gdal_reads([(paths[name], 1, None) for name in VARIANTS])))
    refused = []
    for name, (options, must_read) in VARIANTS.items():
        try:
            got, info = read_raster(paths[name], band=1)
        except RasterError as exc:
            assert str(paths[name]) in str(exc)
            refused.append(name)
            continue
        nodata = None if info.nodata is None else repr(info.nodata)
        np.testing.assert_array_equal(got, expected(theirs[name], nodata), err_msg=name)
    assert [n for n in refused if VARIANTS[n][1]] == [], "common GDAL files refused"
    assert sorted(refused) == sorted(n for n, (_, must) in VARIANTS.items() if not must)
