"""data.raster_folder: which files make a site, and a word about those that do not."""
import warnings

import pytest

from lib.core.errors import DataError
from lib.data.site_sources import folder_sources


def _touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")  # sites load lazily: only the names matter here


def test_pairs_make_sites_and_lone_files_are_named_in_a_warning(tmp_path):
    _touch(tmp_path, "a_DSM.tif", "a_CHM.tif", "b_dsm.tiff", "b_DTM.tif", "c_CHM.tif", "d_DSM.tif", "e_DTM.tif",
           "notes.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources = folder_sources(tmp_path)
    assert [s.name for s in sources] == ["a", "b"]
    said = [str(w.message) for w in caught]
    assert len(said) == 3
    assert any("'c' skipped: c_CHM.tif without its _DSM.tif" in m and "copy it as c_DSM.tif" in m for m in said)
    lone_dsm = next(m for m in said if "'d' skipped: d_DSM.tif without its _CHM.tif or _DTM.tif" in m)
    assert "copy it as" not in lone_dsm and "predict.py maps a DSM alone" in lone_dsm  # not the lone-CHM hint
    lone_dtm = next(m for m in said if "'e' skipped: e_DTM.tif without its _DSM.tif" in m)
    assert "copy it as" not in lone_dtm


def test_a_folder_without_any_pair_is_an_error(tmp_path):
    _touch(tmp_path, "x_CHM.tif")
    with pytest.warns(UserWarning, match="'x' skipped"), pytest.raises(DataError, match="no <site>_DSM.tif"):
        folder_sources(tmp_path)
