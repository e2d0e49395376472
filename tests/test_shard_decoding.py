"""lib/data/shards.py fast paths against the standard library: ustar headers vs tarfile, .npy vs np.load."""
import io
import tarfile

import numpy as np
import pytest

from lib.core.errors import ShardError
from lib.data.shards import _any_header, _load_npy, _plain_header


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("name,size", [("k.dsm.npy", 0), ("site00_r00001_c00002.mask_2.5m.npy", 262272),
                                       ("x" * 100, 7), ("é.json", 8**11 - 1)])
def test_plain_header_agrees_with_tarfile(fmt, name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    block = info.tobuf(format=fmt, encoding="utf-8", errors="strict")[:512]
    expected = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    fast = _plain_header(block)
    assert fast is None or fast == (expected.name, expected.size, expected.type)
    if fmt == tarfile.USTAR_FORMAT:
        assert fast is not None  # what ShardWriter writes takes the fast path
    assert _any_header(block, "t.tar", "-") == (expected.name, expected.size, expected.type)


def test_corrupt_header_falls_back_and_is_named():
    info = tarfile.TarInfo("k.dsm.npy")
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    block[5] ^= 1  # the stored checksum no longer matches
    assert _plain_header(bytes(block)) is None
    with pytest.raises(ShardError, match=r"t\.tar: bad tar header after member 'prev'"):
        _any_header(bytes(block), "t.tar", "prev")


def npy(array: np.ndarray, version=None) -> bytearray:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return bytearray(buf.getvalue())


@pytest.mark.parametrize("array", [np.arange(12, dtype="<f4").reshape(3, 4), np.arange(6, dtype=">i2"),
                                   np.asfortranarray(np.eye(3, 5, dtype=np.uint8)), np.float64(2.5),
                                   np.zeros((0, 4), np.float32), np.array([True, False])])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_load_npy_equals_np_load(array, version):
    data = npy(array, version)
    got = _load_npy(data)
    expected = np.load(io.BytesIO(bytes(data)))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert got.flags.writeable  # torch.from_numpy needs it


def test_load_npy_refuses_objects_and_short_data():
    with pytest.raises(ValueError, match="pickles are refused|Object arrays"):
        _load_npy(npy_object())
    with pytest.raises(ValueError, match="data bytes, the header says"):
        _load_npy(npy(np.zeros(10, np.float32))[:-4])


def npy_object() -> bytearray:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return bytearray(buf.getvalue())
