"""GDAL as an oracle for reader tests: its reading of (file, band, window) as numpy arrays.

Debian's python3-gdal is built for /usr/bin/python3 and its numpy, not for the project's Python, so
the reads run in one subprocess of the first interpreter that imports osgeo.gdal (this one, else
/usr/bin/python3) and come back as .npy files. A tests-only dependency: tests skip without it.
"""
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_SCRIPT = r"""
import json, sys
import numpy as np
from osgeo import gdal
gdal.UseExceptions()
for i, (path, band, window) in enumerate(json.load(sys.stdin)["reads"]):
    out = sys.argv[1] + f"/{i}"
    try:
        ds = gdal.Open(path)
        b = ds.GetRasterBand(band)
        raw = b.ReadAsArray(*window) if window else b.ReadAsArray()
        if raw is None:
            raise RuntimeError("ReadAsArray returned None")
        if b.GetMetadataItem("PIXELTYPE", "IMAGE_STRUCTURE") == "SIGNEDBYTE":  # GDAL < 3.7: int8 as Byte
            raw = raw.view(np.int8)
        np.save(out + ".npy", raw)
    except Exception as exc:
        open(out + ".err", "w").write(f"{type(exc).__name__}: {exc}")
"""


@functools.lru_cache(maxsize=1)
def gdal_python() -> str | None:
    """An interpreter that imports osgeo.gdal and numpy, or None."""
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if python and Path(python).exists() and subprocess.run(
                [python, "-c", "from osgeo import gdal; import numpy"], capture_output=True).returncode == 0:
            return python
    return None


def gdal_reads(reads: list) -> list:
    """GDAL's raw samples for each (path, band, (xoff, yoff, xsize, ysize) or None), or its error text.

    Windows are in GDAL's order (x = column first); one subprocess reads them all.
    """
    with tempfile.TemporaryDirectory() as tmp:
        payload = json.dumps({"reads": [(str(p), b, list(w) if w else None) for p, b, w in reads]})
        done = subprocess.run([gdal_python(), "-c", _SCRIPT, tmp], input=payload, text=True,
                              capture_output=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"GDAL oracle failed: {done.stderr[-2000:]}")
        out = []
        for i in range(len(reads)):
            npy, err = Path(tmp, f"{i}.npy"), Path(tmp, f"{i}.err")
            out.append(np.load(npy) if npy.exists() else err.read_text())
        return out
