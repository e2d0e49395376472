"""GeoPackage (OGC 12-128, v1.3) of gap polygons with the standard library's sqlite3, and a reader.

One feature table of MULTIPOLYGONs: GPKG geometry blobs ("GP" header, SRS id, xy envelope) holding
little-endian WKB. The CRS row carries the EPSG code from the GeoTIFF keys; its definition is
"undefined" (no projection database here), which GDAL resolves from the EPSG code.
"""
import sqlite3
from contextlib import closing
import struct
from pathlib import Path

import numpy as np

from lib.core.atomic import replacing
from lib.core.errors import DataError

APPLICATION_ID, USER_VERSION = 0x47504B47, 10300        # "GPKG", version 1.3.0
_WGS84 = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG",'
          '"7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",'
          '0.0174532925199433,AUTHORITY["EPSG","9122"]],AUTHORITY["EPSG","4326"]]')
_SCHEMA = """
CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT NOT NULL, srs_id INTEGER PRIMARY KEY,
  organization TEXT NOT NULL, organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL,
  description TEXT);
CREATE TABLE gpkg_contents (table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL,
  identifier TEXT UNIQUE, description TEXT DEFAULT '',
  last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE, srs_id INTEGER,
  CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id));
CREATE TABLE gpkg_geometry_columns (table_name TEXT NOT NULL, column_name TEXT NOT NULL,
  geometry_type_name TEXT NOT NULL, srs_id INTEGER NOT NULL, z TINYINT NOT NULL, m TINYINT NOT NULL,
  CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name),
  CONSTRAINT uk_gc_table_name UNIQUE (table_name),
  CONSTRAINT fk_gc_tn FOREIGN KEY (table_name) REFERENCES gpkg_contents(table_name),
  CONSTRAINT fk_gc_srs FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys (srs_id));
"""
_WKB_POLYGON, _WKB_MULTIPOLYGON = 3, 6
_REQUIRED_SRS = [  # (srs_name, srs_id, organization, organization_coordsys_id, definition, description)
    ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", "undefined cartesian coordinate system"),
    ("Undefined geographic SRS", 0, "NONE", 0, "undefined", "undefined geographic coordinate system"),
    ("WGS 84 geodetic", 4326, "EPSG", 4326, _WGS84, "longitude/latitude in decimal degrees on WGS 84")]


def write_gpkg(path, polygons, columns: dict[str, np.ndarray], epsg: int | None,
               crs_name: str | None = None, table: str = "gaps") -> None:
    """Write GapPolygons with one attribute column per entry of `columns` (int, float or str), atomically.

    epsg None writes the GeoPackage's "undefined Cartesian" CRS (srs_id -1).
    """
    with GpkgWriter(path, epsg, crs_name) as gpkg:
        gpkg.append(table, polygons, columns)


class GpkgWriter:
    """A GeoPackage of several feature tables (layers), features appended in batches; atomic on close.

    with GpkgWriter(path, epsg) as gpkg:
        gpkg.append("gaps_2m", polygons, columns)   # any number of times, per layer
    """

    def __init__(self, path, epsg: int | None, crs_name: str | None = None):
        self.srs_id, self.extents, self._created = int(epsg) if epsg else -1, {}, set()
        self._replacing = replacing(Path(path))
        tmp = self._replacing.__enter__()
        self.db = sqlite3.connect(tmp)
        self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self.db.execute(f"PRAGMA user_version = {USER_VERSION}")
        self.db.executescript(_SCHEMA)
        rows = list(_REQUIRED_SRS)
        if self.srs_id not in (-1, 0, 4326):
            rows.append((crs_name or f"EPSG:{self.srs_id}", self.srs_id, "EPSG", self.srs_id, "undefined",
                         f"EPSG:{self.srs_id} from the GeoTIFF keys"))
        self.db.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", rows)

    def layer(self, table: str) -> None:
        """Declare a layer, so that it exists (empty) even when no feature is appended to it."""
        self.extents.setdefault(table, None)

    def append(self, table: str, polygons, columns: dict) -> None:
        """Features of GapPolygons with their attribute columns; the table is created on first use."""
        if table not in self._created:
            self._create(table, columns)
        marks = ", ".join("?" * (len(columns) + 1))
        names = ", ".join(f'"{name}"' for name in ["geom", *columns])
        values = polygons.attribute_lists(columns)
        self.db.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})',
                            zip(geometry_blobs(polygons, self.srs_id), *values.values()))
        xy = polygons.coords
        if len(xy):
            box = (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
            old = self.extents.get(table)
            self.extents[table] = box if old is None else (*np.minimum(old[:2], box[:2]), *np.maximum(old[2:], box[2:]))

    def _create(self, table: str, columns: dict) -> None:
        types = {name: _sql_type(np.asarray(values)) for name, values in columns.items()}
        fields = "".join(f', "{name}" {kind}' for name, kind in types.items())
        self.db.execute(f'CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, '
                        f'geom MULTIPOLYGON{fields})')
        self._created.add(table)
        self.extents.setdefault(table, None)

    def close(self) -> None:
        """The gpkg_contents rows (with each layer's extent) and geometry column rows; then into place."""
        for table, extent in self.extents.items():
            if table not in self._created:
                self.db.execute(f'CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, '
                                f'geom MULTIPOLYGON)')
            self.db.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, min_x, min_y, max_x, "
                            "max_y, srs_id) VALUES (?, 'features', ?, ?, ?, ?, ?, ?)",
                            (table, table, *map(_plain, extent or (None,) * 4), self.srs_id))
            self.db.execute("INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', 'MULTIPOLYGON', ?, 0, 0)",
                            (table, self.srs_id))
        self.db.commit()
        self.db.close()
        self._replacing.__exit__(None, None, None)

    def abort(self, exc) -> None:
        self.db.close()
        self._replacing.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


_HEADER = np.dtype([("magic", "S2"), ("version", "u1"), ("flags", "u1"), ("srs_id", "<i4"), ("envelope", "<f8", 4),
                    ("order", "u1"), ("type", "<u4"), ("count", "<u4")])      # GP header + WKB MultiPolygon head
_POLYGON = np.dtype([("order", "u1"), ("type", "<u4"), ("count", "<u4")])      # packed: 9 bytes


def geometry_blobs(polygons, srs_id: int) -> list[bytes]:
    """GPKG geometry of each gap of GapPolygons: "GP", version 0, flags (little-endian, xy envelope; bit 4:
    empty), srs id, envelope (min x, max x, min y, max y), WKB MultiPolygon of its parts, rings closed.

    Built in bulk, as thousands of features per band would cost Python work each: one byte buffer in which
    the fixed-size headers go to their offsets and the vertices, in order, fill the bytes between them.
    """
    n, start, gap, part = len(polygons), polygons.ring_start, polygons.ring_gap, polygons.ring_part
    new_part = np.r_[True, (gap[1:] != gap[:-1]) | (part[1:] != part[:-1])][:len(gap)]
    part_of_ring = np.cumsum(new_part) - 1                                 # (R,)
    part_gap = gap[new_part]                                                # (P,) gap id of each part
    ring_n = (np.diff(start) + 1).astype("<u4")                             # (R,) vertices of each closed ring
    ring_bytes = 4 + 16 * ring_n.astype(np.int64)                           # count + vertices
    part_bytes = _POLYGON.itemsize + np.bincount(part_of_ring, ring_bytes, len(part_gap)).astype(np.int64)
    # everything before an item is whole: the headers of its gap and those before, and the earlier parts
    gap_at = np.r_[0, np.cumsum(_HEADER.itemsize + np.bincount(part_gap - 1, part_bytes, n).astype(np.int64))]
    part_at = _HEADER.itemsize * part_gap + np.cumsum(part_bytes) - part_bytes
    ring_at = (_HEADER.itemsize * gap + _POLYGON.itemsize * (part_of_ring + 1) + np.cumsum(ring_bytes)
               - ring_bytes)

    head = np.zeros(n, _HEADER)
    head["magic"], head["srs_id"], head["order"], head["type"] = b"GP", srs_id, 1, _WKB_MULTIPOLYGON
    head["count"] = np.bincount(part_gap - 1, minlength=n)
    first = start[np.searchsorted(gap, np.arange(1, n + 1))]               # (n,) each gap's first vertex
    full = first < start[np.searchsorted(gap, np.arange(1, n + 1), "right")]
    head["flags"] = np.where(full, 0b0000_0011, 0b0001_0011)
    head["envelope"] = np.nan
    if full.any():
        x, y, at = polygons.coords[:, 0], polygons.coords[:, 1], first[full]
        head["envelope"][full] = np.stack([np.minimum.reduceat(x, at), np.maximum.reduceat(x, at),
                                           np.minimum.reduceat(y, at), np.maximum.reduceat(y, at)], 1)
    polygon = np.zeros(len(part_gap), _POLYGON)
    polygon["order"], polygon["type"] = 1, _WKB_POLYGON
    polygon["count"] = np.bincount(part_of_ring, minlength=len(part_gap))

    buf = np.empty(gap_at[-1], np.uint8)
    is_head = np.zeros(len(buf), bool)
    for at, items in ((gap_at[:-1], head), (part_at, polygon), (ring_at, ring_n)):
        index = (at[:, None] + np.arange(items.itemsize)).ravel()
        buf[index], is_head[index] = items.view(np.uint8), True
    closed = np.insert(np.arange(start[-1]), start[1:], start[:-1])        # each ring's vertices, then its first
    buf[~is_head] = np.ascontiguousarray(polygons.coords[closed], "<f8").view(np.uint8).ravel()
    data = buf.tobytes()
    return [data[a:b] for a, b in zip(gap_at[:-1].tolist(), gap_at[1:].tolist())]


def read_gpkg(path, table: str | None = None) -> tuple[int, list[dict]]:
    """(srs_id, features) of a GeoPackage feature table; a feature: its columns + "parts" (rings (k, 2))."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT table_name, column_name, srs_id FROM gpkg_geometry_columns").fetchall()
        match = [row for row in rows if table in (None, row[0])]
        if not match:
            raise DataError(f"{path}: no feature table {table!r}; found {[row[0] for row in rows]}")
        name, column, srs_id = match[0]
        cursor = db.execute(f'SELECT * FROM "{name}"')
        names = [d[0] for d in cursor.description]
        features = []
        for row in cursor:
            feature = dict(zip(names, row))
            feature["parts"] = parse_blob(feature.pop(column), path)
            features.append(feature)
    return srs_id, features


def parse_blob(blob: bytes, path="geometry") -> list[list[np.ndarray]]:
    """GPKG blob of a little- or big-endian (Multi)Polygon -> [[ring (k, 2)], ...]."""
    if blob[:2] != b"GP":
        raise DataError(f"{path}: geometry blob does not start with 'GP' (found {blob[:2]!r})")
    envelope_doubles = {0: 0, 1: 4, 2: 6, 3: 6, 4: 8}.get((blob[3] >> 1) & 7)
    if envelope_doubles is None:
        raise DataError(f"{path}: invalid envelope code {(blob[3] >> 1) & 7} in a geometry blob")
    view = memoryview(blob)[8 + 8 * envelope_doubles:]
    order = "<" if view[0] == 1 else ">"
    kind, count = struct.unpack_from(order + "II", view, 1)
    if kind == _WKB_POLYGON:
        return [_polygon(view, 0)[0]]
    if kind != _WKB_MULTIPOLYGON:
        raise DataError(f"{path}: WKB geometry type {kind}; expected Polygon (3) or MultiPolygon (6)")
    parts, at = [], 9
    for _ in range(count):
        rings, at = _polygon(view, at)
        parts.append(rings)
    return parts


def _polygon(view, at: int) -> tuple[list[np.ndarray], int]:
    """WKB Polygon at offset `at` -> (rings, offset after it)."""
    order = "<" if view[at] == 1 else ">"
    (count,) = struct.unpack_from(order + "I", view, at + 5)
    at, rings = at + 9, []
    for _ in range(count):
        (k,) = struct.unpack_from(order + "I", view, at)
        xy = np.frombuffer(view[at + 4:at + 4 + 16 * k], order + "f8")
        rings.append(xy.reshape(k, 2).astype(np.float64))
        at += 4 + 16 * k
    return rings, at


def _sql_type(values: np.ndarray) -> str:
    return {"i": "INTEGER", "u": "INTEGER", "b": "INTEGER", "f": "REAL"}.get(values.dtype.kind, "TEXT")


def _plain(value):
    return None if value is None else float(value)
