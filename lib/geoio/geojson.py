"""GeoJSON gap polygons, written atomically as strict JSON.

GeoJSON coordinates stay in the raster's CRS (no projection library to go to WGS 84), so the file
carries the 2008-style "crs" member naming the EPSG code, which GDAL and QGIS read. Shells run
counter-clockwise and holes clockwise, as RFC 7946 asks.
"""
from pathlib import Path

import numpy as np

from lib.core.atomic import write_json


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
