"""Tests for reading a cache entry's arrays back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_fedseg.data.cache_entry import AxialSlices


def test_axial_slices_read_contiguous_blocks_and_name_a_truncated_file(tmp_path: Path) -> None:
    array = np.asfortranarray(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5))
    np.save(tmp_path / "a.npy", array)
    reader = AxialSlices.open(tmp_path / "a.npy")
    assert reader.shape == (2, 3, 4, 5) and reader.dtype == np.float32
    for z in range(5):
        np.testing.assert_array_equal(reader.read(z), array[..., z])
    with pytest.raises(IndexError, match=r"Slice 5 is outside 0\.\.4"):
        reader.read(5)
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:-10])
    with pytest.raises(OSError, match=r"a\.npy is truncated: slice 4 needs 96 bytes, got 86"):
        reader.read(4)
    np.save(tmp_path / "c.npy", np.ascontiguousarray(array))
    with pytest.raises(ValueError, match="expected a Fortran-ordered array"):
        AxialSlices.open(tmp_path / "c.npy")
