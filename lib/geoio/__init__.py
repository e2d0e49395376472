"""Raster and vector I/O: GeoTIFF read/write and codecs, georeference, resampling, GeoPackage, GeoJSON, PNG."""
