"""A disk cache of preprocessed volumes, so each NIfTI case is decoded and normalized once.

Each case gets a folder ``<cache_dir>/<case_id>-<key>/`` holding

* ``image.npy``: float32 ``[C, x, y, Z]``, z-scored and centre-cropped, stored in Fortran order
  so that an axial slice ``image[..., z]`` is one contiguous block of the memory map;
* ``labels.npy``: uint8 ``[x, y, Z]`` raw BraTS labels, same order (absent without a
  segmentation);
* ``outside.npy``: int16 ``[N, 4]`` rows ``(x, y, z, label)`` of the tumour voxels outside the
  crop (absent when there are none), so metrics can score the full, uncropped grid;
* ``meta.json``: shapes, crop, voxel spacing, per-slice brain/tumour flags and the labels
  present. It is written last and marks the entry complete.

Every case is validated when it is built (:func:`~lightning_fedseg.data.validation.load_case`,
the checks of ``data check``): a bad case raises
:class:`~lightning_fedseg.data.validation.BadCaseError` before anything is written, so an entry
exists only for a case that passed, and passing is remembered with the entry.

The key hashes the source files (resolved path, size, ``mtime_ns``), the preprocessing settings
(modalities, crop size, label convention, reorientation) and :data:`CACHE_VERSION`: editing a
NIfTI file, changing a setting or bumping the version gives a new entry, never a stale one.
Every file is written to a temporary file in the same folder, flushed, fsynced and moved into
place with :func:`os.replace`, so an interrupted run leaves at most an entry without
``meta.json``, which is rebuilt, never trusted; a failed build removes the folder it created.

The default location is ``$LIGHTNING_FEDSEG_CACHE`` or ``~/.cache/lightning_fedseg/preprocessed``
(``$XDG_CACHE_HOME`` is honoured), never the data folder, which may be read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.cache_entry import IMAGE_FILE, LABELS_FILE, META_FILE, OUTSIDE_FILE, AxialSlices, CachedCase
from lightning_fedseg.data.cases import Case, CaseReference
from lightning_fedseg.data.conventions import LabelConvention, Modality
from lightning_fedseg.data.nifti import open_nifti
from lightning_fedseg.data.orientation import to_canonical, voxel_spacing
from lightning_fedseg.data.preprocess import (
    centre_crop_slices,
    preprocess_volume,
    resolve_crop_size,
)
from lightning_fedseg.data.validation import load_case

__all__ = [
    "CACHE_ENV",
    "CACHE_VERSION",
    "AxialSlices",
    "CachedCase",
    "VolumeCache",
    "default_cache_dir",
]

CACHE_VERSION = 2
"""Bump whenever preprocessing changes what is written, so old entries are not reused."""

CACHE_ENV = "LIGHTNING_FEDSEG_CACHE"
"""Environment variable overriding the default cache folder."""


def default_cache_dir() -> Path:
    """The default cache folder.

    ``$LIGHTNING_FEDSEG_CACHE`` when set, else ``lightning_fedseg/preprocessed`` under
    ``$XDG_CACHE_HOME`` or ``~/.cache``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_fedseg" / "preprocessed"


def _fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a same-folder temporary file, fsync, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_npy(path: Path, array: npt.NDArray[Any]) -> None:
    fortran = np.asfortranarray(array)
    _atomic_write(path, lambda handle: np.save(handle, fortran, allow_pickle=False))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1).encode()

    def write(handle: IO[bytes]) -> None:
        handle.write(text)

    _atomic_write(path, write)


class VolumeCache:
    """Preprocessed, memory-mapped volumes keyed by source files and settings.

    Args:
        cache_dir: the cache folder (created on first write); ``None`` for
            :func:`default_cache_dir`.
        modalities: the channels, in order.
        crop_size: the centre crop (``None``: 128 for 240-wide volumes, else none).
        label_convention: the labels segmentations are validated against.
        reorient: reorient every case to RAS before preprocessing (else a case whose third voxel
            axis is not inferior-superior is refused).

    Example:
        >>> cache = VolumeCache("/tmp/cache", ["flair"], crop_size=32)
        >>> cache.settings()
        {'version': 2, 'modalities': ['flair'], 'crop_size': 32, 'label_convention': 'brats', 'reorient': False}
    """

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        modalities: Sequence[Modality | str] = (Modality.FLAIR,),
        crop_size: int | None = None,
        label_convention: LabelConvention | str = LabelConvention.BRATS,
        reorient: bool = False,
    ) -> None:
        if not modalities:
            raise ValueError("Expected `modalities` to name at least one modality, but got none.")
        if crop_size is not None and (isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1):
            raise ValueError(f"Expected `crop_size` to be a positive integer, but got {crop_size}.")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.modalities = tuple(Modality(m) for m in modalities)
        self.crop_size = crop_size
        self.label_convention = LabelConvention(label_convention)
        self.reorient = bool(reorient)

    def settings(self) -> dict[str, Any]:
        """The preprocessing settings that enter every key."""
        return {
            "version": CACHE_VERSION,
            "modalities": [m.value for m in self.modalities],
            "crop_size": self.crop_size,
            "label_convention": self.label_convention.value,
            "reorient": self.reorient,
        }

    def _sources(self, case: Case) -> list[Path]:
        missing = [m.value for m in self.modalities if m not in case.images]
        if missing:
            raise FileNotFoundError(f"Case {case.case_id} in {case.folder} has no {', '.join(missing)} image.")
        return [case.images[m] for m in self.modalities]

    def key(self, case: Case) -> str:
        """The hash identifying ``case`` under the current settings and source files."""
        sources = self._sources(case)
        payload = {
            "settings": self.settings(),
            "case_id": case.case_id,
            "images": [_fingerprint(p) for p in sources],
            "seg": None if case.seg is None else _fingerprint(case.seg),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def entry_dir(self, case: Case) -> Path:
        """The folder of ``case``'s entry (whether or not it exists)."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", case.case_id)
        return self.cache_dir / f"{safe}-{self.key(case)}"

    def lookup(self, case: Case) -> CachedCase | None:
        """The complete entry of ``case``, or ``None`` when missing, partial or stale."""
        directory = self.entry_dir(case)
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != directory.name.rsplit("-", 1)[-1] or meta.get("settings") != (self.settings()):
            return None
        if not (directory / IMAGE_FILE).is_file():
            return None
        if meta["has_labels"] and not (directory / LABELS_FILE).is_file():
            return None
        return CachedCase.from_meta(directory, meta)

    def get(self, case: Case) -> CachedCase:
        """The entry of ``case``, building it first when needed (the only NIfTI read)."""
        return self.lookup(case) or self.build(case)

    def build(self, case: Case) -> CachedCase:
        """Check, read, preprocess and write ``case``; ``meta.json`` is written last.

        Raises:
            BadCaseError: the case fails validation (nothing is written); the message names every
                problem and file.
            ValueError: the volumes cannot be preprocessed; the message names the case folder.
        """
        directory = self.entry_dir(case)
        loaded = load_case(case, self.modalities, self.label_convention, self.reorient)
        labels_present: list[int] = []
        if loaded.seg is not None:
            labels_present = [int(v) for v in np.unique(loaded.seg)]
            if labels_present and (labels_present[0] < 0 or labels_present[-1] > 255):
                raise ValueError(f"{case.seg}: labels {labels_present} are outside the BraTS range 0..255.")
        try:
            volume = preprocess_volume(loaded.image, loaded.seg, self.crop_size)
        except ValueError as err:
            raise ValueError(f"Cannot preprocess {case.case_id} in {case.folder}: {err}") from err
        outside = None if loaded.seg is None else _outside_crop(loaded.seg, volume.crop)
        created = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _save_npy(directory / IMAGE_FILE, volume.image)
            if volume.labels is not None:
                _save_npy(directory / LABELS_FILE, volume.labels)
            if outside is not None and len(outside):
                _save_npy(directory / OUTSIDE_FILE, outside)
            meta = {
                "key": directory.name.rsplit("-", 1)[-1],
                "settings": self.settings(),
                "case_id": case.case_id,
                "image_shape": list(volume.image.shape),
                "full_shape": list(volume.full_shape),
                "crop": [[c.start, c.stop] for c in volume.crop],
                "spacing": list(loaded.spacing),
                "reoriented": loaded.reoriented,
                "outside_voxels": 0 if outside is None else len(outside),
                "brain_slices": volume.brain_slices.astype(int).tolist(),
                "tumour_slices": None if volume.tumour_slices is None else volume.tumour_slices.astype(int).tolist(),
                "labels_present": labels_present,
                "reference_path": str(self._sources(case)[0]),
                "seg_path": None if case.seg is None else str(case.seg),
                "has_labels": volume.labels is not None,
            }
            _write_json(directory / META_FILE, meta)
            _fsync_dir(directory)
        except BaseException:
            if created:  # leave nothing half-written
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return CachedCase.from_meta(directory, meta)

    def reference(self, case: Case) -> CaseReference:
        """The :class:`CaseReference` of ``case``, from the cache or the NIfTI header alone."""
        cached = self.lookup(case)
        if cached is not None:
            return cached.reference()
        path = self._sources(case)[0]
        image = open_nifti(path)
        shape = tuple(int(s) for s in image.shape)
        if len(shape) != 3:
            raise ValueError(f"Expected a 3D volume in {path}, but its shape is {shape}.")
        affine = np.asarray(image.affine, dtype=np.float64)
        if self.reorient:  # the shape and spacing of the reoriented grid, from the header alone
            canonical, affine = to_canonical(np.empty(shape, dtype=bool), affine)
            shape = canonical.shape
        full_shape = (shape[0], shape[1], shape[2])
        size = resolve_crop_size(self.crop_size, (shape[0], shape[1]))
        crop = centre_crop_slices((shape[0], shape[1]), size)
        return CaseReference(path, full_shape, crop, voxel_spacing(affine), self.reorient)

    def tumour_volume(self, case: Case) -> int:
        """Number of non-zero segmentation voxels of ``case``, remembered in a small file.

        Reads only the segmentation (never the images), once per segmentation file.
        """
        if case.seg is None:
            raise ValueError(f"Case {case.case_id} in {case.folder} has no segmentation.")
        key = hashlib.sha256(json.dumps(_fingerprint(case.seg)).encode()).hexdigest()[:24]
        path = self.cache_dir / "tumour_volumes" / f"{key}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads(path.read_text())["voxels"])
        try:
            voxels = int(np.count_nonzero(np.asanyarray(open_nifti(case.seg).dataobj)))
        except Exception as err:
            raise OSError(f"Cannot read {case.seg}: {err}") from err
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"seg": str(case.seg), "voxels": voxels})
        return voxels


def _outside_crop(seg: npt.NDArray[np.integer], crop: tuple[slice, slice]) -> npt.NDArray[np.int16]:
    """Rows ``(x, y, z, label)`` of the non-zero labels outside the in-plane crop."""
    outside = seg != 0
    outside[crop[0], crop[1], :] = False
    coords = np.nonzero(outside)
    return np.stack([*coords, seg[coords]], axis=1).astype(np.int16)
