"""prepare_data.py --preview: PNG panels of train (augmented) and val tiles."""

import numpy as np

from conftest import tiny_config
from lib.data.preview import tile_row, write_previews


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_tile_row_shows_every_threshold_and_nodata_in_red():
    dsm = np.random.default_rng(0).normal(100, 5, (16, 16)).astype(np.float32)
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[1, 4:8, 4:8] = 1
    masks[:, 0, 0] = 255
    row = tile_row(dsm, masks, 1.0)
    side = row.shape[0]
    assert row.shape[1] == 4 * side + 3 * 4  # hillshade + 3 masks, 4 px separators
    second = row[:, side + 4 + side + 4: side + 4 + 2 * side + 4]
    assert (second == 255).all(axis=2).sum() == (4 * side // 16) ** 2  # the 4x4 gap, enlarged
    assert (row[0, side + 4] == [200, 40, 40]).all()  # nodata pixel drawn red


def test_write_previews_for_train_and_val(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset)
    paths = write_previews(cfg, cfg.data.root, tmp_path, n=3)
    assert [p.name for p in paths] == ["preview_train_augmented.png", "preview_val.png"]
    for path in paths:
        width, height = _png_size(path)
        assert height > 3 * 32 and width > 5 * 32
