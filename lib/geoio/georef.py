"""The grid of a north-up raster (GeoInfo), its GeoTIFF tags both ways, and same-grid checks.

No tifffile here: tags come in and go out as plain {code: value} / (code, type, values), so
lib/geoio/geotiff_read.py and geotiff_write.py own the file format and this module owns what the numbers mean.
"""
import warnings
from dataclasses import dataclass, replace

import numpy as np

from lib.core.errors import RasterError

PIXEL_SCALE, TIEPOINT, TRANSFORM = 33550, 33922, 34264  # GeoTIFF tags
GEOKEYS, GEODOUBLE, GEOASCII, GDAL_NODATA = 34735, 34736, 34737, 42113
_RASTER_TYPE, _PIXEL_IS_POINT = 1025, 2  # GTRasterTypeGeoKey: tiepoint at the pixel centre
_MODEL_TYPE, _GEOGRAPHIC = 1024, 2  # GTModelTypeGeoKey: longitude/latitude
_LINEAR_UNITS, _METRE = 3076, 9001  # ProjLinearUnitsGeoKey
_WARP_HINT = "make it a north-up grid: gdalwarp -r bilinear in.tif out.tif"
_GEOREF_HINT = ("the georeferencing tags are damaged; set them again: gdal_translate -a_srs EPSG:<code>"
                " -a_ullr <ulx> <uly> <lrx> <lry> in.tif out.tif")


@dataclass(frozen=True)
class GeoInfo:
    """Grid of a north-up raster: shape, pixel size and corner origin in CRS units (metres)."""

    height: int
    width: int
    pixel_size: tuple[float, float]  # (x, y), both positive
    origin: tuple[float, float]  # (x, y) of the top-left corner of the top-left pixel
    nodata: float | None = None  # GDAL_NODATA of the file; None when absent
    geokeys: tuple[int, ...] | None = None  # raw GeoKeyDirectoryTag
    geo_double: tuple[float, ...] | None = None  # GeoDoubleParamsTag
    geo_ascii: str | None = None  # GeoAsciiParamsTag

    def geokey(self, key_id: int) -> int | None:
        """Value of an inline (short) GeoKey, or None when absent or stored in another tag."""
        keys = self.geokeys or ()
        for i in range(4, len(keys) - 3, 4):  # after the 4-short header: (id, location, count, value)
            if keys[i] == key_id and keys[i + 1] == 0:
                return keys[i + 3]
        return None

    @property
    def epsg(self) -> int | None:
        """EPSG code of the projected (or else geographic) CRS; None when unknown or user-defined."""
        code = self.geokey(3072) or self.geokey(2048)
        return code if code and code != 32767 else None

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units squared (m²)."""
        return self.pixel_size[0] * self.pixel_size[1]

    def xy_of(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """CRS coordinates (x, y) of the centres of pixels (rows, cols); any broadcastable shapes."""
        x = self.origin[0] + (np.asarray(cols) + 0.5) * self.pixel_size[0]
        y = self.origin[1] - (np.asarray(rows) + 0.5) * self.pixel_size[1]
        return x, y

    def window(self, row0: int, col0: int, height: int, width: int) -> "GeoInfo":
        """GeoInfo of the sub-grid whose top-left pixel is (row0, col0)."""
        x = self.origin[0] + col0 * self.pixel_size[0]
        y = self.origin[1] - row0 * self.pixel_size[1]
        return replace(self, height=int(height), width=int(width), origin=(x, y))

    def with_shape(self, height: int, width: int) -> "GeoInfo":
        """Same origin and pixel size, another shape (e.g. a cropped or padded output)."""
        return replace(self, height=int(height), width=int(width))


# ----------------------------------------------------------------------------- tags -> GeoInfo
_COUNTS = {PIXEL_SCALE: ("ModelPixelScale", lambda n: n >= 2, "2 or 3"),  # name, valid count, which
           TIEPOINT: ("ModelTiepoint", lambda n: n and n % 6 == 0, "6 per tiepoint"),
           TRANSFORM: ("ModelTransformation", lambda n: n == 16, "16"),
           GEODOUBLE: ("GeoDoubleParams", lambda n: n >= 1, "1 or more")}


def _numbers(tags: dict, code: int, path) -> tuple | None:
    """A georeferencing tag's values as finite floats in a valid count; None when absent."""
    if code not in tags:
        return None
    name, valid, expected = _COUNTS[code]
    value = tags[code]
    values = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else (value,)
    if not all(isinstance(v, (int, float, np.number)) and np.isfinite(v) for v in values):
        raise RasterError(f"{path}: GeoTIFF tag {name} ({code}) = {value!r:.80} is not a list of finite numbers",
                          hint=_GEOREF_HINT)
    if not valid(len(values)):
        raise RasterError(f"{path}: GeoTIFF tag {name} ({code}) has {len(values)} values; expected {expected}",
                          hint=_GEOREF_HINT)
    return tuple(float(v) for v in values)


def _geokeys(tags: dict, path) -> tuple[int, ...] | None:
    """GeoKeyDirectory as ints: a 4-short header, then 4 shorts per key (as many as it declares)."""
    if GEOKEYS not in tags:
        return None
    value = tags[GEOKEYS]
    keys = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else (value,)
    if not all(isinstance(k, (int, np.integer)) and 0 <= k < 2**16 for k in keys) \
            or len(keys) < 4 or len(keys) < 4 + 4 * keys[3]:
        raise RasterError(f"{path}: GeoTIFF tag GeoKeyDirectory ({GEOKEYS}) = {value!r:.80} is not a key"
                          f" directory (4 shorts, then 4 per key)", hint=_GEOREF_HINT)
    return tuple(int(k) for k in keys)


def _georef(tags: dict, point: bool, path) -> tuple[tuple, tuple]:
    """(pixel_size, origin) from ModelPixelScale + ModelTiepoint or ModelTransformation."""
    tiepoints, scale, m = (_numbers(tags, code, path) for code in (TIEPOINT, PIXEL_SCALE, TRANSFORM))
    tiepoints = tiepoints or ()
    if scale and len(tiepoints) >= 6:  # several tiepoints + a scale: the first (as GDAL)
        sx, sy = scale[:2]
        sy = abs(sy)  # a negative y scale is a common writer mistake; GDAL reads it as north-up too
        i, j, _, x, y, _ = tiepoints[:6]
        x, y = x - i * sx, y + j * sy
    elif m:
        if m[1] or m[4]:
            raise RasterError(f"{path}: rotated rasters are not supported (ModelTransformation {m[:8]})",
                              hint=_WARP_HINT)
        sx, sy, x, y = m[0], -m[5], m[3], m[7]
    elif len(tiepoints) > 6:
        raise RasterError(f"{path}: georeferenced by {len(tiepoints) // 6} ground control points, not by a"
                          f" pixel size and origin", hint=_WARP_HINT)
    else:  # stacklevel 4: the caller of lib.geoio.geotiff_read.read_info / read_raster
        warnings.warn(f"{path}: no georeferencing; assuming 1 m pixels at origin (0, 0)", stacklevel=4)
        return (1.0, 1.0), (0.0, 0.0)
    if not (sx > 0 and sy > 0 and np.isfinite([x, y]).all()):
        raise RasterError(f"{path}: pixel size ({sx}, {-sy}) is not north-up; expected x > 0, y < 0",
                          hint=_WARP_HINT)
    if point:  # the tiepoint names a pixel centre; GeoInfo keeps corners (as GDAL does)
        x, y = x - 0.5 * sx, y + 0.5 * sy
    return (float(sx), float(sy)), (float(x), float(y))


def _check_units(info: "GeoInfo", path) -> None:
    """RasterError for longitude/latitude grids; a warning for projected CRS units other than metres."""
    if info.geokey(_MODEL_TYPE) == _GEOGRAPHIC:
        crs = f"EPSG:{info.epsg}" if info.epsg else "user-defined"
        raise RasterError(f"{path}: the CRS is geographic ({crs}, pixel size {info.pixel_size} in degrees);"
                          f" pixel sizes and gap areas must be in metres",
                          hint="reproject it to a projected CRS in metres, e.g. gdalwarp -t_srs EPSG:32633"
                               " -r bilinear in.tif out.tif (your UTM zone)")
    unit = info.geokey(_LINEAR_UNITS)
    if unit is not None and unit != _METRE:
        warnings.warn(f"{path}: the CRS's linear unit is EPSG:{unit}, not metres (9001); pixel sizes and"
                      f" gap areas are read as metres", stacklevel=4)


def _parse_nodata(text, path) -> float | None:
    if text is None:
        return None
    try:
        return float(str(text).strip().rstrip("\0"))
    except ValueError:
        raise RasterError(f"{path}: GDAL_NODATA tag {text!r} is not a number",
                          hint="set it again: gdal_edit.py -a_nodata <value> in.tif") from None


def parse_geoinfo(tags: dict, height: int, width: int, path) -> GeoInfo:
    """GeoInfo of a `height` x `width` image from its TIFF tags {code: value}; `path` names errors."""
    ascii_ = tags.get(GEOASCII)
    if ascii_ is not None and not isinstance(ascii_, str):
        raise RasterError(f"{path}: GeoTIFF tag GeoAsciiParams ({GEOASCII}) = {ascii_!r:.80} is not text",
                          hint=_GEOREF_HINT)
    info = GeoInfo(
        height=int(height), width=int(width), pixel_size=(1.0, 1.0), origin=(0.0, 0.0),
        nodata=_parse_nodata(tags.get(GDAL_NODATA), path), geokeys=_geokeys(tags, path),
        geo_double=_numbers(tags, GEODOUBLE, path), geo_ascii=ascii_)
    pixel_size, origin = _georef(tags, info.geokey(_RASTER_TYPE) == _PIXEL_IS_POINT, path)
    info = replace(info, pixel_size=pixel_size, origin=origin)
    _check_units(info, path)
    return info


# ----------------------------------------------------------------------------- GeoInfo -> tags
def geotiff_tags(info: GeoInfo, nodata) -> list[tuple[int, int, tuple | str]]:
    """(code, TIFF type, values) of the GeoTIFF + GDAL_NODATA tags that reproduce `info`.

    The tiepoint names the first pixel's centre for PixelIsPoint rasters, its corner otherwise.
    """
    (sx, sy), (x, y) = info.pixel_size, info.origin
    if info.geokey(_RASTER_TYPE) == _PIXEL_IS_POINT:
        x, y = x + 0.5 * sx, y - 0.5 * sy
    tags = [(PIXEL_SCALE, 12, (sx, sy, 0.0)), (TIEPOINT, 12, (0.0, 0.0, 0.0, x, y, 0.0))]
    if info.geokeys:
        tags.append((GEOKEYS, 3, info.geokeys))
    if info.geo_double:
        tags.append((GEODOUBLE, 12, info.geo_double))
    if info.geo_ascii:
        tags.append((GEOASCII, 2, info.geo_ascii))
    if nodata is not None:
        value = float(nodata)
        tags.append((GDAL_NODATA, 2, str(int(value)) if value.is_integer() else repr(value)))
    return tags


# ----------------------------------------------------------------------------- grids
def check_same_grid(infos: dict[str, GeoInfo]) -> None:
    """RasterError listing every raster whose shape, pixel size, origin or CRS differs."""
    (ref_name, ref), *others = infos.items()
    problems = []
    for name, info in others:
        if (info.height, info.width) != (ref.height, ref.width):
            problems.append(f"shape: {ref_name} is {ref.height}x{ref.width}, {name} is"
                            f" {info.height}x{info.width}")
        if not np.allclose(info.pixel_size, ref.pixel_size, rtol=1e-6, atol=0):
            problems.append(f"pixel size: {ref_name} has {ref.pixel_size}, {name} has {info.pixel_size}")
        shift = np.subtract(info.origin, ref.origin)
        if np.any(np.abs(shift) > 1e-3 * np.asarray(ref.pixel_size)):
            (dx, dy), (px, py) = shift, ref.pixel_size
            problems.append(f"origin: {ref_name} at {ref.origin}, {name} at {info.origin}: off by"
                            f" {dx:+.3f} m in x ({dx / px + 0:+.2f} px), {dy:+.3f} m in y"
                            f" ({dy / py + 0:+.2f} px)")
        if ref.epsg is not None and info.epsg is not None and ref.epsg != info.epsg:
            problems.append(f"CRS: {ref_name} is EPSG:{ref.epsg}, {name} is EPSG:{info.epsg}")
    if problems:
        raise RasterError("rasters are not on the same grid:\n  " + "\n  ".join(problems),
                          hint="resample them onto one grid, e.g. gdalwarp -tr/-te or -tap")
    _warn_missing_crs(infos)


def _warn_missing_crs(infos: dict[str, GeoInfo]) -> None:
    """A raster without any CRS (no GeoKeys) beside one with a CRS cannot be checked for it: say so."""
    with_crs = [name for name, info in infos.items() if info.geokeys]
    without = [name for name, info in infos.items() if not info.geokeys]
    if with_crs and without:
        warnings.warn(f"{', '.join(without)} has no CRS but {with_crs[0]} has one: their CRSs cannot be compared, "
                      f"so they are assumed to be the same (only shape, pixel size and origin were checked); "
                      f"set it, e.g. gdal_edit.py -a_srs EPSG:<code> {without[0]}", stacklevel=3)
