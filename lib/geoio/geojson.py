"""JSON outputs of the gap analysis: GeoJSON gap polygons and strict-JSON summaries, written atomically.

GeoJSON coordinates stay in the raster's CRS (no projection library to go to WGS 84), so the file
carries the 2008-style "crs" member naming the EPSG code, which GDAL and QGIS read. Shells run
counter-clockwise and holes clockwise, as RFC 7946 asks.
"""
import json
import math
from pathlib import Path

import numpy as np

from lib.core.atomic import write_text


def write_geojson(path, polygons, columns: dict[str, np.ndarray], epsg: int | None) -> None:
    """One MultiPolygon Feature per gap with `columns` as properties (NaN as null)."""
    features = [{"type": "Feature", "properties": props,
                 "geometry": {"type": "MultiPolygon",
                              "coordinates": [[ring.tolist() for ring in rings] for rings in parts]}}
                for parts, props in polygons.features(columns)]
    collection = {"type": "FeatureCollection", "name": Path(path).stem}
    if epsg:
        collection["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{int(epsg)}"}}
    collection["features"] = features
    write_json(path, collection, indent=None)


def write_json(path, obj, indent: int | None = 2) -> None:
    """Strict JSON (NaN and infinities as null, numpy values as plain ones), atomically."""
    path = Path(path)
    text = json.dumps(_plain(obj), indent=indent, separators=None if indent else (",", ":"), allow_nan=False)
    write_text(path, text + "\n")


def _plain(obj):
    """Recursively: numpy scalars and arrays -> Python, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
