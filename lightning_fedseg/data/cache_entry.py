"""One entry of the volume cache on disk: its files, and reading them back without holding them open.

An entry is a folder holding ``image.npy`` (float32 ``[C, x, y, Z]``), ``labels.npy`` (uint8
``[x, y, Z]``, absent without a segmentation), ``outside.npy`` (the tumour voxels outside the
crop, absent when there are none) and ``meta.json``, written last. :class:`CachedCase` is a
complete entry; :class:`AxialSlices` reads one axial slice of a Fortran-ordered array with one
``os.pread``. :mod:`~lightning_fedseg.data.cache` writes and finds the entries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.cases import CaseReference
from lightning_fedseg.data.conventions import LabelConvention
from lightning_fedseg.data.preprocess import SlicePolicy, select_slices

__all__ = ["IMAGE_FILE", "LABELS_FILE", "META_FILE", "OUTSIDE_FILE", "AxialSlices", "CachedCase"]

META_FILE = "meta.json"
IMAGE_FILE = "image.npy"
LABELS_FILE = "labels.npy"
OUTSIDE_FILE = "outside.npy"


@dataclass(frozen=True)
class AxialSlices:
    """Reads axial slices of a cached, Fortran-ordered ``[..., Z]`` ``.npy`` file on demand.

    A slice ``[..., z]`` of a Fortran-ordered array is one contiguous block, so reading it is one
    ``os.pread`` between an open and a close: no file descriptor stays open between reads,
    however many cases a dataset serves, and the page cache is used as a memory map would.

    Attributes:
        path: the ``.npy`` file.
        offset: where the array data starts.
        dtype: the element type.
        shape: the array shape, last axis ``Z``.
    """

    path: Path
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @classmethod
    def open(cls, path: Path) -> AxialSlices:
        """Parse the ``.npy`` header of ``path`` (the only time its header is read).

        Raises:
            ValueError: the array is not Fortran-ordered (not written by this cache).
        """
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(handle)
            offset = handle.tell()
        if not fortran_order and len(shape) > 1:
            raise ValueError(f"{path}: expected a Fortran-ordered array, as the cache writes them.")
        return cls(path, offset, np.dtype(dtype), tuple(int(n) for n in shape))

    def read(self, z: int) -> npt.NDArray[Any]:
        """The slice ``[..., z]`` (Fortran-ordered, writable, a copy)."""
        if not 0 <= z < self.shape[-1]:
            raise IndexError(f"Slice {z} is outside 0..{self.shape[-1] - 1} of {self.path}.")
        out = np.empty(self.shape[:-1], self.dtype, order="F")
        nbytes = out.nbytes
        fd = os.open(self.path, os.O_RDONLY)
        try:
            flat: Any = out.reshape(-1, order="A")  # a view: the array is contiguous
            got = os.preadv(fd, [memoryview(flat).cast("B")], self.offset + z * nbytes)
        finally:
            os.close(fd)
        if got != nbytes:
            raise OSError(f"{self.path} is truncated: slice {z} needs {nbytes} bytes, got {got}.")
        return out


@dataclass(frozen=True)
class CachedCase:
    """A complete cache entry; arrays are opened as read-only memory maps on demand.

    Attributes:
        case_id: the case's identifier.
        directory: the entry's folder.
        image_shape: ``(C, x, y, Z)`` of the cached image.
        full_shape: ``(X, Y, Z)`` of the original volume.
        crop: the X and Y slices the centre crop took.
        brain_slices: per z, whether the cropped slice holds brain.
        tumour_slices: per z, whether it holds a non-zero label (``None`` without labels).
        labels_present: the distinct label values of the (uncropped) segmentation.
        reference_path: the first modality's NIfTI file (affine and header for predictions).
        seg_path: the segmentation file, if any (named in label errors).
        spacing: voxel size in mm along X, Y, Z (of the reoriented volume when ``reoriented``).
        reoriented: whether the arrays were reoriented to RAS.
        outside_voxels: tumour voxels outside the crop (held in ``outside.npy``).
    """

    case_id: str
    directory: Path
    image_shape: tuple[int, int, int, int]
    full_shape: tuple[int, int, int]
    crop: tuple[slice, slice]
    brain_slices: tuple[bool, ...]
    tumour_slices: tuple[bool, ...] | None
    labels_present: tuple[int, ...]
    reference_path: Path
    seg_path: Path | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    reoriented: bool = False
    outside_voxels: int = 0

    @property
    def has_labels(self) -> bool:
        """Whether the entry holds a label map."""
        return self.tumour_slices is not None

    @property
    def num_slices(self) -> int:
        """Number of axial slices ``Z``."""
        return self.image_shape[3]

    def image(self) -> npt.NDArray[np.float32]:
        """The image ``[C, x, y, Z]`` as a read-only memory map."""
        return np.load(self.directory / IMAGE_FILE, mmap_mode="r")

    def labels(self) -> npt.NDArray[np.uint8] | None:
        """The label map ``[x, y, Z]`` as a read-only memory map, or ``None``."""
        if not self.has_labels:
            return None
        return np.load(self.directory / LABELS_FILE, mmap_mode="r")

    def image_slices(self) -> AxialSlices:
        """A reader of the image's axial slices ``[C, x, y]`` that holds no file open."""
        return AxialSlices.open(self.directory / IMAGE_FILE)

    def label_slices(self) -> AxialSlices | None:
        """A reader of the label map's axial slices ``[x, y]``, or ``None`` without labels."""
        return AxialSlices.open(self.directory / LABELS_FILE) if self.has_labels else None

    def full_labels(self) -> npt.NDArray[np.uint8] | None:
        """The label map on the full, uncropped ``(X, Y, Z)`` grid (tumour outside the crop too)."""
        labels = self.labels()
        if labels is None:
            return None
        full = self.reference().uncrop(np.asarray(labels))
        if self.outside_voxels:
            rows = np.load(self.directory / OUTSIDE_FILE).astype(np.intp)
            full[rows[:, 0], rows[:, 1], rows[:, 2]] = rows[:, 3]
        return full

    def reference(self) -> CaseReference:
        """Where predictions of this case go back to (see :class:`CaseReference`)."""
        return CaseReference(self.reference_path, self.full_shape, self.crop, self.spacing, self.reoriented)

    def slices(self, policy: SlicePolicy | str, seed: int = 0) -> npt.NDArray[np.int64]:
        """The z indices ``policy`` keeps (see :func:`select_slices`)."""
        tumour = None if self.tumour_slices is None else np.array(self.tumour_slices)
        return select_slices(policy, np.array(self.brain_slices), tumour, seed, self.case_id)

    def check_labels(self, convention: LabelConvention | str) -> None:
        """Raise a ``ValueError`` naming the segmentation file if a label is invalid."""
        convention = LabelConvention(convention)
        invalid = sorted(set(self.labels_present) - convention.valid_labels)
        if invalid:
            hint = ""
            if convention is LabelConvention.BRATS and 3 in invalid:
                hint = " HINT: BraTS 2023 and later mark enhancing tumor 3; use `brats2023`."
            raise ValueError(
                f"{self.seg_path}: labels {invalid} are not valid under label convention "
                f"{convention.value} (valid: {sorted(convention.valid_labels)}).{hint}"
            )

    @classmethod
    def from_meta(cls, directory: Path, meta: dict[str, Any]) -> CachedCase:
        """The entry in ``directory`` described by its ``meta.json`` contents."""
        (x0, x1), (y0, y1) = meta["crop"]
        tumour = meta["tumour_slices"]
        return cls(
            case_id=meta["case_id"],
            directory=directory,
            image_shape=tuple(meta["image_shape"]),
            full_shape=tuple(meta["full_shape"]),
            crop=(slice(x0, x1), slice(y0, y1)),
            brain_slices=tuple(bool(v) for v in meta["brain_slices"]),
            tumour_slices=None if tumour is None else tuple(bool(v) for v in tumour),
            labels_present=tuple(meta["labels_present"]),
            reference_path=Path(meta["reference_path"]),
            seg_path=None if meta["seg_path"] is None else Path(meta["seg_path"]),
            spacing=tuple(meta["spacing"]),
            reoriented=bool(meta["reoriented"]),
            outside_voxels=int(meta["outside_voxels"]),
        )
