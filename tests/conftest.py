"""Shared fixtures: the real rasters beside the repository, skipped when absent."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def real_data() -> Path:
    """Folder of the shared real rasters; skips the test when it is not beside the repo."""
    if not (REAL_DATA / "ALS_CHM_DUC.tif").exists():
        pytest.skip(f"real rasters not found at {REAL_DATA}")
    return REAL_DATA
