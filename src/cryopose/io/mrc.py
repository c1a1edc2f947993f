"""MRC volumes and particle stacks (adapter around ``mrcfile``).

Conventions (``docs/conventions.md``, "Files"):

* Volumes are ``[z, y, x]`` arrays, images ``[y, x]``, stacks ``[n, y, x]``.
* Pixel sizes are in Angstrom and come from the header's ``voxel_size``; a header value of 0
  means "not set" and is returned as ``None``.
* Indices into a :class:`ParticleStack` are **0-based**. RELION's ``rlnImageName``
  (``"index@path"``) counts from 1; the conversion happens in :mod:`cryopose.io.particles`.
* Files are written in MRC mode 2 (float32) to a temporary name in the destination folder and
  renamed when complete, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import torch
from mrcfile.dtypes import HEADER_DTYPE

from cryopose.io.errors import CryoposeInputError, input_error, require_file
from cryopose.io.files import publish, temp_path

__all__ = [
    "VolumeData",
    "read_volume",
    "write_volume",
    "write_stack",
    "ParticleStack",
    "MrcsWriter",
    "MrcHeaderInfo",
    "read_mrc_header",
    "check_box",
]

PathType = str | PathLike[str]


class VolumeData(NamedTuple):
    """A density map read from an MRC file.

    Attributes
    ----------
    data : torch.Tensor
        ``[z, y, x]`` cubic volume.
    pixel_size_angstrom : float or None
        Voxel size in Angstrom from the header; ``None`` when the header says 0 (unset).
    """

    data: torch.Tensor
    pixel_size_angstrom: float | None


class MrcHeaderInfo(NamedTuple):
    """Summary of an MRC header (no voxel data read).

    Attributes
    ----------
    shape : tuple of int
        ``(nz, ny, nx)`` as stored.
    mode : int
        MRC data mode (2 = float32).
    pixel_size_angstrom : float or None
        Header voxel size in Angstrom (x axis), ``None`` when 0.
    is_image_stack : bool
        True for ``ispg == 0`` with ``nz > 1``, for ``.mrcs`` files, or when ``nz`` differs
        from ``nx`` (a volume must be cubic, so such a file can only be a stack).
    """

    shape: tuple[int, int, int]
    mode: int
    pixel_size_angstrom: float | None
    is_image_stack: bool


def _open(path: PathType, *, mmap: bool) -> mrcfile.mrcfile.MrcFile:
    """Open an MRC file read-only, tolerating legacy headers (no ``MAP`` id, odd stamps)."""
    require_file(path, "MRC file")
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            handle = opener(os.fspath(path), mode="r", permissive=True)
    except (ValueError, OSError, EOFError) as err:
        raise input_error(path, f"unreadable MRC header ({err})") from None
    if handle.data is None:
        handle.close()
        raise input_error(path, "unreadable MRC header (unknown mode or data size mismatch)")
    return handle


def _pixel_size(path: PathType, voxel_size: np.recarray) -> float | None:
    sizes = [float(voxel_size.x), float(voxel_size.y), float(voxel_size.z)]
    if all(s == 0.0 for s in sizes):
        return None
    if not all(np.isfinite(s) and s >= 0 for s in sizes):
        raise input_error(path, f"header voxel_size {sizes} must be finite and >= 0 Angstrom")
    nonzero = [s for s in sizes if s > 0]
    if max(nonzero) - min(nonzero) > 1e-4 * max(nonzero):
        raise input_error(path, f"header voxel_size {sizes} is anisotropic; expected equal sizes")
    return sizes[0] if sizes[0] > 0 else nonzero[0]


def read_mrc_header(path: PathType) -> MrcHeaderInfo:
    """Read an MRC header (memory-mapped; no voxel data is loaded).

    Parameters
    ----------
    path : str or PathLike
        ``.mrc`` or ``.mrcs`` file.

    Returns
    -------
    MrcHeaderInfo
    """
    with _open(path, mmap=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        stack = (
            mrc.is_image_stack()
            or os.fspath(path).lower().endswith(".mrcs")
            or (shape[0] > 1 and shape[0] != shape[2])
        )
        return MrcHeaderInfo(shape, int(h.mode), _pixel_size(path, mrc.voxel_size), bool(stack))


def read_volume(
    path: PathType,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    require_pixel_size: bool = False,
) -> VolumeData:
    """Read a cubic density map.

    Parameters
    ----------
    path : str or PathLike
        MRC file holding one 3D volume.
    dtype : torch.dtype
        Output dtype (float32 or float64).
    device : torch.device or str, optional
        Output device.
    require_pixel_size : bool
        Raise when the header's voxel size is 0 (unset) instead of returning ``None``.

    Returns
    -------
    VolumeData
        ``data`` as ``[z, y, x]`` and ``pixel_size_angstrom`` from the header.

    Raises
    ------
    CryoposeInputError
        Missing file, unreadable header, an image stack, a non-cubic or non-finite volume.
    """
    with _open(path, mmap=False) as mrc:
        if mrc.is_image_stack() or mrc.data.ndim != 3:
            raise input_error(
                path, f"data has shape {tuple(mrc.data.shape)}; expected a 3D volume [z, y, x]"
            )
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        array = np.array(mrc.data, dtype=np_dtype, copy=True)
        pixel_size = _pixel_size(path, mrc.voxel_size)
    if len(set(array.shape)) != 1:
        raise input_error(path, f"volume shape {array.shape} is not cubic; expected [n, n, n]")
    if not np.isfinite(array).all():
        n_bad = int((~np.isfinite(array)).sum())
        raise input_error(path, f"volume has {n_bad} non-finite voxels (NaN or Inf)")
    if require_pixel_size and pixel_size is None:
        raise input_error(path, "header voxel_size is 0; expected the pixel size in Angstrom")
    data = torch.from_numpy(array).to(device=device, dtype=dtype)
    return VolumeData(data, pixel_size)


def _as_float32_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu").numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_pixel_size(pixel_size: float) -> float:
    pixel_size = float(pixel_size)
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise CryoposeInputError(f"pixel_size {pixel_size}: expected a positive number (Angstrom)")
    return pixel_size


def _label(mrc: mrcfile.mrcfile.MrcFile) -> None:
    """One fixed header label (mrcfile's default carries a timestamp, so equal data would give
    different bytes; cryopose promises same seed, same bytes)."""
    from cryopose import __version__

    mrc.header.label[0] = f"Created by cryopose {__version__}".encode().ljust(80)
    mrc.header.nlabl = 1


def _write_atomic(
    path: PathType, data: np.ndarray, pixel_size: float, *, image_stack: bool
) -> None:
    path = Path(path)
    pixel_size = _check_pixel_size(pixel_size)
    tmp = temp_path(path)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if image_stack:
                mrc.set_image_stack()
            else:
                mrc.set_volume()
            mrc.voxel_size = pixel_size
            _label(mrc)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_volume(path: PathType, volume: torch.Tensor | np.ndarray, pixel_size: float) -> None:
    """Write a 3D volume as MRC mode 2 (float32), atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination (overwritten if it exists).
    volume : torch.Tensor or numpy.ndarray
        ``[z, y, x]`` array (any real dtype; stored as float32).
    pixel_size : float
        Voxel size in Angstrom, written to the header's ``voxel_size``.
    """
    data = _as_float32_numpy(volume)
    if data.ndim != 3:
        raise CryoposeInputError(f"{path}: volume has shape {data.shape}; expected [z, y, x]")
    _write_atomic(path, data, pixel_size, image_stack=False)


def write_stack(path: PathType, images: torch.Tensor | np.ndarray, pixel_size: float) -> None:
    """Write ``[n, y, x]`` images as an MRC image stack (``ispg = 0``, mode 2), atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination, conventionally ``.mrcs`` (overwritten if it exists).
    images : torch.Tensor or numpy.ndarray
        ``[n, y, x]`` (or a single ``[y, x]`` image).
    pixel_size : float
        Pixel size in Angstrom.
    """
    data = _as_float32_numpy(images)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise CryoposeInputError(f"{path}: images have shape {data.shape}; expected [n, y, x]")
    _write_atomic(path, data, pixel_size, image_stack=True)


class ParticleStack:
    """A memory-mapped stack of particle images; only the requested images are read.

    Indices are **0-based** (RELION's 1-based ``index@path`` is converted by the caller).
    Use as a context manager or call :meth:`close`.

    Parameters
    ----------
    path : str or PathLike
        ``.mrcs`` (or ``.mrc``) file holding ``[n, y, x]`` square images. A single 2D image
        counts as a stack of one.

    Attributes
    ----------
    path : pathlib.Path
    box : int
        Image side in pixels.
    pixel_size_angstrom : float or None
        Header pixel size (often unset or wrong in particle stacks: the STAR file's value is
        authoritative).
    """

    def __init__(self, path: PathType) -> None:
        self.path = Path(path)
        self._mrc = _open(path, mmap=True)
        data = self._mrc.data
        if data.ndim == 2:
            data = data[None]
        self._data = data
        n, ny, nx = data.shape
        if ny != nx:
            self._mrc.close()
            raise input_error(path, f"images are {ny} x {nx} pixels; expected square images")
        self.box = int(nx)
        self.pixel_size_angstrom = _pixel_size(path, self._mrc.voxel_size)

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def __enter__(self) -> ParticleStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the memory map."""
        self._mrc.close()

    def read(
        self,
        indices: int | Sequence[int] | np.ndarray | torch.Tensor | slice | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Read images by **0-based** index.

        Parameters
        ----------
        indices : int, sequence of int, array, tensor, slice or None
            0-based image indices (any order, repeats allowed); ``None`` reads all.
        dtype, device
            Output dtype and device.

        Returns
        -------
        torch.Tensor
            ``[n, box, box]`` images (``n = 1`` for a scalar index).

        Raises
        ------
        CryoposeInputError
            An index is negative or past the end of the stack.
        """
        n = len(self)
        if indices is None:
            idx = np.arange(n)
        elif isinstance(indices, slice):
            idx = np.arange(n)[indices]
        else:
            if isinstance(indices, torch.Tensor):
                indices = indices.detach().to("cpu").numpy()
            idx = np.atleast_1d(np.asarray(indices))
            if idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise input_error(self.path, f"image indices have dtype {idx.dtype}; expected int")
            idx = idx.astype(np.int64).reshape(-1)
        if idx.size:
            bad = idx[(idx < 0) | (idx >= n)]
            if bad.size:
                raise input_error(
                    self.path,
                    f"image index {int(bad[0])} (0-based; {int(bad[0]) + 1} as a RELION "
                    f"index) is past the end of the stack of {n} images",
                )
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        if idx.size > 1 and np.all(np.diff(idx) == 1):
            block = self._data[int(idx[0]) : int(idx[-1]) + 1]
        else:
            block = self._data[idx]
        array = np.array(block, dtype=np_dtype, copy=True)
        return torch.from_numpy(array).to(device=device, dtype=dtype)


def check_box(stack: ParticleStack, reference_box: int, reference: str = "rlnImageSize") -> None:
    """Raise when a stack's box differs from the expected one.

    Parameters
    ----------
    stack : ParticleStack
    reference_box : int
        Expected side in pixels.
    reference : str
        Where the expected value comes from (named in the message).
    """
    if int(stack.box) != int(reference_box):
        raise input_error(
            stack.path,
            f"stack box {stack.box} px differs from the reference box {int(reference_box)} px "
            f"({reference})",
        )


class MrcsWriter:
    """Stream images into a new ``.mrcs`` stack in sequential chunks.

    The file is pre-allocated (memory-mapped) under a temporary name in the destination
    folder; :meth:`close` checks that exactly ``n_total`` images were written, sets the header
    statistics, and renames it to ``path``. On error (or :meth:`abort`) the temporary file is
    removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or PathLike
        Destination stack.
    box : int
        Image side in pixels.
    pixel_size : float
        Pixel size in Angstrom.
    n_total : int
        Number of images that will be written.

    Examples
    --------
    >>> with MrcsWriter("out.mrcs", box=64, pixel_size=1.5, n_total=1000) as w:  # doctest: +SKIP
    ...     for chunk in chunks:  # each [k, 64, 64]
    ...         w.write(chunk)
    """

    def __init__(self, path: PathType, box: int, pixel_size: float, n_total: int) -> None:
        self.path = Path(path)
        self.box = int(box)
        self.n_total = int(n_total)
        if self.box < 1 or self.n_total < 1:
            raise CryoposeInputError(
                f"{path}: box {box} and n_total {n_total} must both be positive integers"
            )
        pixel_size = _check_pixel_size(pixel_size)
        self.n_written = 0
        self._sum = 0.0
        self._sum_sq = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._tmp = temp_path(self.path)
        try:
            # A header made by mrcfile for a one-image stack, patched to n_total images at
            # close; the images are appended with plain writes (no memory map, so resident
            # memory stays flat however large the stack: pages written are not held).
            with mrcfile.new(self._tmp, overwrite=True) as mrc:
                mrc.set_data(np.zeros((1, self.box, self.box), dtype=np.float32))
                mrc.set_image_stack()
                mrc.voxel_size = pixel_size
                _label(mrc)
            with open(self._tmp, "rb") as handle:
                self._header = np.frombuffer(handle.read(1024), dtype=HEADER_DTYPE).copy()
            if int(self._header["nsymbt"][0]) != 0:  # pragma: no cover - mrcfile never adds one
                raise CryoposeInputError(f"{path}: unexpected extended header")
            self._file = open(self._tmp, "r+b")  # noqa: SIM115 - closed in close()/abort()
            self._file.truncate(1024)
            self._file.seek(1024)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._open = True

    def __enter__(self) -> MrcsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, images: torch.Tensor | np.ndarray) -> None:
        """Append ``[k, box, box]`` images (or one ``[box, box]`` image) after the last ones."""
        if not self._open:
            raise CryoposeInputError(f"{self.path}: writer is closed")
        chunk = _as_float32_numpy(images)
        if chunk.ndim == 2:
            chunk = chunk[None]
        if chunk.ndim != 3 or chunk.shape[1:] != (self.box, self.box):
            raise CryoposeInputError(
                f"{self.path}: chunk has shape {chunk.shape}; expected [k, {self.box}, {self.box}]"
            )
        k = chunk.shape[0]
        if self.n_written + k > self.n_total:
            raise CryoposeInputError(
                f"{self.path}: writing {k} more images would exceed n_total = {self.n_total}"
            )
        self._file.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
        if k:
            as64 = chunk.astype(np.float64)
            self._sum += float(as64.sum())
            self._sum_sq += float(np.square(as64).sum())
            self._min = min(self._min, float(chunk.min()))
            self._max = max(self._max, float(chunk.max()))
        self.n_written += k

    def close(self) -> None:
        """Finish the file: check the count, write header statistics, flush and rename."""
        if not self._open:
            return
        if self.n_written != self.n_total:
            self.abort()
            raise CryoposeInputError(
                f"{self.path}: {self.n_written} images written; expected n_total = {self.n_total}"
            )
        try:
            count = self.n_total * self.box * self.box
            mean = self._sum / count
            header = self._header
            header["nz"] = self.n_total
            header["dmin"] = np.float32(self._min)
            header["dmax"] = np.float32(self._max)
            header["dmean"] = np.float32(mean)
            header["rms"] = np.float32(np.sqrt(max(self._sum_sq / count - mean * mean, 0.0)))
            self._file.seek(0)
            self._file.write(header.tobytes())
            self._file.close()
            self._open = False
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the partially written file."""
        if self._open:
            try:
                self._file.close()
            finally:
                self._open = False
        self._tmp.unlink(missing_ok=True)
