"""The particle table: one row per particle with RELION 3.1 labels, whatever the source file.

A :class:`ParticleTable` holds

* ``data``: a ``pandas.DataFrame``, one row per particle, columns named by RELION labels
  without the leading underscore (``rlnImageName``, ``rlnAngleRot``, ``rlnDefocusU``...),
  with the optics-group fields (``rlnImagePixelSize``, ``rlnVoltage``...) copied onto every
  particle. Unknown columns are kept and written back.
* ``optics``: one row per optics group (``rlnOpticsGroup`` 1, 2, ...). This is what
  :func:`cryopose.io.star.write_star` writes to ``data_optics``.
* ``image_root``: the folder that relative paths in ``rlnImageName`` are resolved against
  (the STAR or .cs file's folder unless told otherwise).

Units: angles in degrees (RELION ``rot, tilt, psi``, ZYZ), origins and defoci in Angstrom,
voltage in kV, Cs in mm, phase shift in degrees, B-factor in Angstrom^2. Image indices from
``rlnImageName`` are RELION's **1-based** indices; :class:`ParticleImages` converts them to the
0-based indices of :class:`cryopose.io.mrc.ParticleStack`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopose.io.errors import CryoposeInputError, input_error
from cryopose.so3.conversions import euler_to_matrix, matrix_to_euler

__all__ = [
    "ParticleTable",
    "ParticleImages",
    "read_particles",
    "make_particle_table",
    "split_image_names",
    "assign_optics_groups",
    "IMAGE_NAME",
    "OPTICS_GROUP",
    "EULER_LABELS",
    "ORIGIN_LABELS",
    "CTF_LABELS",
    "OPTICS_LABELS",
]

PathType = str | PathLike[str]
IndexLike = int | Sequence[int] | np.ndarray | torch.Tensor | slice | None

IMAGE_NAME = "rlnImageName"
OPTICS_GROUP = "rlnOpticsGroup"
EULER_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst")
#: Labels that belong to an optics group when a file carries them per particle (RELION 3.0,
#: cryoSPARC); they define the groups and move to ``data_optics`` on write.
OPTICS_LABELS = (
    "rlnOpticsGroupName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
)
#: ``ctf_params`` key -> (RELION label, default when the column is absent or None if required).
CTF_LABELS: dict[str, tuple[str, float | None]] = {
    "defocus_u_angstrom": ("rlnDefocusU", None),
    "defocus_v_angstrom": ("rlnDefocusV", None),
    "defocus_angle_deg": ("rlnDefocusAngle", 0.0),
    "voltage_kv": ("rlnVoltage", None),
    "spherical_aberration_mm": ("rlnSphericalAberration", None),
    "amplitude_contrast": ("rlnAmplitudeContrast", None),
    "phase_shift_deg": ("rlnPhaseShift", 0.0),
    "bfactor_angstrom2": ("rlnCtfBfactor", 0.0),
    "scale": ("rlnCtfScalefactor", 1.0),
    "pixel_size_angstrom": ("rlnImagePixelSize", None),
}


def split_image_names(names: pd.Series, source: PathType | None = None) -> tuple[np.ndarray, list]:
    """Split ``rlnImageName`` values ``"index@path"`` into 1-based indices and paths.

    A name without ``@`` is a single-image file (index 1).

    Parameters
    ----------
    names : pandas.Series
        ``rlnImageName`` strings.
    source : str or PathLike, optional
        File named in error messages.

    Returns
    -------
    indices : numpy.ndarray
        ``int64`` RELION indices (1-based).
    paths : list of str
        Image file paths as written (not resolved).
    """
    indices = np.empty(len(names), dtype=np.int64)
    paths: list[str] = []
    for row, name in enumerate(names.astype(str).tolist()):
        head, at, tail = name.partition("@")
        path = tail if at else head
        try:
            index = int(head) if at else 1
        except ValueError:
            index = 0
        if index < 1 or not path:
            raise input_error(
                source,
                f"rlnImageName {name!r} in row {row + 1}: expected 'index@path' with a "
                "1-based integer index",
            )
        indices[row] = index
        paths.append(path)
    return indices, paths


def assign_optics_groups(data: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Number optics groups from per-particle optics columns (RELION 3.0 / cryoSPARC input).

    Groups are the distinct combinations of the :data:`OPTICS_LABELS` columns present (plus
    ``rlnOpticsGroup`` itself if it is already there), numbered 1, 2, ... in order of first
    appearance; names are ``opticsGroup<k>`` unless a name column exists.

    Parameters
    ----------
    data : pandas.DataFrame
        Particles with optics fields per particle.

    Returns
    -------
    data : pandas.DataFrame
        Copy with ``rlnOpticsGroup`` (and ``rlnOpticsGroupName``) set.
    optics : pandas.DataFrame
        One row per group.
    """
    data = data.copy()
    keys = [c for c in (OPTICS_GROUP, *OPTICS_LABELS) if c in data.columns]
    if keys and len(data):
        group = data.groupby(keys, sort=False, dropna=False).ngroup().to_numpy() + 1
    else:
        group = np.ones(len(data), dtype=np.int64)
    data[OPTICS_GROUP] = group.astype(np.int64)
    if "rlnOpticsGroupName" not in data.columns:
        data["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in group]
    columns = [OPTICS_GROUP] + [c for c in OPTICS_LABELS if c in data.columns]
    optics = data[columns].drop_duplicates(OPTICS_GROUP).sort_values(OPTICS_GROUP)
    return data, optics.reset_index(drop=True)


def _as_numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu").to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


@dataclass
class ParticleTable:
    """Particles with RELION 3.1 labels and optics merged per particle (see module docs).

    Attributes
    ----------
    data : pandas.DataFrame
        One row per particle.
    optics : pandas.DataFrame
        One row per optics group; authoritative for ``data_optics`` when writing.
    image_root : pathlib.Path or None
        Folder for relative image paths (``None``: the current directory).
    source : pathlib.Path or None
        File the table was read from (for messages).
    """

    data: pd.DataFrame
    optics: pd.DataFrame
    image_root: Path | None = None
    source: Path | None = field(default=None)

    # ---- size and presence -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.data)

    @property
    def n_optics_groups(self) -> int:
        """Number of optics groups."""
        return len(self.optics)

    @property
    def has_poses(self) -> bool:
        """True when all three Euler angle columns are present."""
        return all(c in self.data.columns for c in EULER_LABELS)

    @property
    def has_origins(self) -> bool:
        """True when ``rlnOriginXAngst`` and ``rlnOriginYAngst`` are present."""
        return all(c in self.data.columns for c in ORIGIN_LABELS)

    @property
    def has_ctf(self) -> bool:
        """True when every required CTF column (defocus U/V, voltage, Cs, w) is present."""
        return all(
            label in self.data.columns
            for label, default in CTF_LABELS.values()
            if default is None and label != "rlnImagePixelSize"
        )

    def _where(self) -> str:
        return str(self.source) if self.source is not None else "particle table"

    def _column(self, label: str) -> pd.Series:
        if label not in self.data.columns:
            raise input_error(self._where(), f"missing column {label} in data_particles")
        return self.data[label]

    def _tensor(
        self, labels: Sequence[str], dtype: torch.dtype, device: torch.device | str | None
    ) -> torch.Tensor:
        array = np.stack([self._column(c).to_numpy(dtype=np.float64) for c in labels], axis=-1)
        array = np.array(array, copy=True)  # pandas may hand out read-only views
        return torch.from_numpy(array).to(device=device, dtype=dtype)

    # ---- optics ------------------------------------------------------------------------
    def _single(self, label: str, what: str) -> float:
        values = self._column(label).to_numpy(dtype=np.float64)
        if values.size == 0:
            if label in self.optics.columns and len(self.optics):
                values = self.optics[label].to_numpy(dtype=np.float64)
            else:
                raise input_error(self._where(), f"no particles; {what} ({label}) is unknown")
        unique = np.unique(values)
        if unique.size != 1:
            raise input_error(
                self._where(),
                f"{label} differs between optics groups ({', '.join(map(str, unique[:5]))}); "
                "expected a single value (use the per-particle column)",
            )
        return float(unique[0])

    @property
    def pixel_size(self) -> float:
        """Pixel size in Angstrom shared by all particles (``rlnImagePixelSize``)."""
        return self._single("rlnImagePixelSize", "the pixel size")

    @property
    def box(self) -> int:
        """Image side in pixels shared by all particles (``rlnImageSize``)."""
        return int(self._single("rlnImageSize", "the box size"))

    def pixel_sizes(self) -> np.ndarray:
        """Per-particle pixel sizes in Angstrom, ``[n]``."""
        return self._column("rlnImagePixelSize").to_numpy(dtype=np.float64)

    # ---- poses -------------------------------------------------------------------------
    def euler_angles_deg(
        self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``[n, 3]`` RELION ``(rot, tilt, psi)`` in degrees."""
        return self._tensor(EULER_LABELS, dtype, device)

    def rotations(
        self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``[n, 3, 3]`` cryopose matrices ``R = A.T`` (``cryopose.so3.euler_to_matrix``)."""
        return euler_to_matrix(self.euler_angles_deg(dtype=dtype, device=device))

    def origins_angstrom(
        self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``[n, 2]`` ``(rlnOriginXAngst, rlnOriginYAngst)`` in Angstrom; zeros when absent.

        RELION's sign: the particle centre is at ``box // 2 - origin / pixel_size``; shifting
        the image by ``+origin`` centres it.
        """
        if not self.has_origins:
            return torch.zeros(len(self), 2, dtype=dtype, device=device)
        return self._tensor(ORIGIN_LABELS, dtype, device)

    def ctf_params(
        self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-particle CTF parameters as ``[n]`` tensors.

        Keys: ``defocus_u_angstrom``, ``defocus_v_angstrom`` (positive = underfocus),
        ``defocus_angle_deg``, ``voltage_kv``, ``spherical_aberration_mm``,
        ``amplitude_contrast``, ``phase_shift_deg``, ``bfactor_angstrom2``, ``scale`` and
        ``pixel_size_angstrom``. Optional columns default to 0 (angle, phase shift, B-factor)
        or 1 (scale); a missing required column raises :class:`CryoposeInputError`.
        """
        out: dict[str, torch.Tensor] = {}
        n = len(self)
        for key, (label, default) in CTF_LABELS.items():
            if label in self.data.columns:
                values = np.array(self.data[label].to_numpy(dtype=np.float64), copy=True)
            elif default is not None:
                values = np.full(n, default, dtype=np.float64)
            else:
                self._column(label)  # raises the named error
            out[key] = torch.from_numpy(values).to(device=device, dtype=dtype)
        return out

    # ---- images ------------------------------------------------------------------------
    def image_paths_and_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Resolved image file of each particle and its **1-based** RELION index.

        Returns
        -------
        paths : numpy.ndarray
            ``[n]`` object array of ``str`` paths (relative names joined to ``image_root``;
            equal paths share one string object).
        indices : numpy.ndarray
            ``[n]`` ``int64`` 1-based indices into those files.
        """
        indices, raw = split_image_names(self._column(IMAGE_NAME), self._where())
        resolved: dict[str, str] = {}
        for name in set(raw):
            resolved[name] = self._resolve(name)
        paths = np.empty(len(raw), dtype=object)
        paths[:] = [resolved[p] for p in raw]
        return paths, indices

    def _resolve(self, name: str) -> str:
        """Relative names: the STAR file's folder (``image_root``) first; when the file is not
        there but exists relative to the working directory, that one, as RELION resolves
        paths from its project folder (``Extract/job012/...`` in ``Refine3D/job020/x.star``)."""
        if os.path.isabs(name) or self.image_root is None:
            return os.path.normpath(name)
        joined = os.path.normpath(os.path.join(os.fspath(self.image_root), name))
        if not os.path.exists(joined) and os.path.exists(name):
            return os.path.abspath(name)
        return joined

    # ---- derived tables ----------------------------------------------------------------
    def copy(self) -> ParticleTable:
        """Deep copy of the data frames."""
        return ParticleTable(self.data.copy(), self.optics.copy(), self.image_root, self.source)

    def subset(self, rows: IndexLike) -> ParticleTable:
        """Table of the given **0-based** rows (optics restricted to the groups still used)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu").numpy()
        data = self.data.iloc[rows if rows is not None else slice(None)].reset_index(drop=True)
        optics = self.optics
        if OPTICS_GROUP in data.columns and OPTICS_GROUP in optics.columns:
            optics = optics[optics[OPTICS_GROUP].isin(set(data[OPTICS_GROUP]))]
        return ParticleTable(data, optics.reset_index(drop=True), self.image_root, self.source)

    def with_poses(
        self,
        rotations: torch.Tensor,
        origins_angstrom: torch.Tensor | np.ndarray | None = None,
    ) -> ParticleTable:
        """Copy with the Euler angles (and optionally origins) replaced.

        Parameters
        ----------
        rotations : torch.Tensor
            ``[n, 3, 3]`` cryopose matrices ``R``; stored as RELION angles (degrees) via
            ``cryopose.so3.matrix_to_euler`` in float64.
        origins_angstrom : tensor or array, optional
            ``[n, 2]`` ``(x, y)`` origins in Angstrom (RELION sign).
        """
        n = len(self)
        if rotations.shape != (n, 3, 3):
            raise CryoposeInputError(
                f"{self._where()}: rotations have shape {tuple(rotations.shape)}; "
                f"expected ({n}, 3, 3)"
            )
        angles = matrix_to_euler(rotations.detach().to("cpu", torch.float64)).numpy()
        out = self.copy()
        for i, label in enumerate(EULER_LABELS):
            out.data[label] = angles[:, i]
        if origins_angstrom is not None:
            origins = _as_numpy(origins_angstrom)
            if origins.shape != (n, 2):
                raise CryoposeInputError(
                    f"{self._where()}: origins have shape {origins.shape}; expected ({n}, 2)"
                )
            for i, label in enumerate(ORIGIN_LABELS):
                out.data[label] = origins[:, i]
        return out


def relative_image_names(table: ParticleTable, folder: PathType) -> list[str]:
    """``rlnImageName`` values ``"%06d@path"`` with paths relative to ``folder``."""
    indices, raw = split_image_names(table.data[IMAGE_NAME], table._where())
    folder_abs = os.path.abspath(folder)
    mapping = {
        name: os.path.relpath(os.path.abspath(table._resolve(name)), folder_abs)
        for name in set(raw)
    }
    return [f"{i:06d}@{mapping[p]}" for i, p in zip(indices.tolist(), raw, strict=True)]


def read_particles(path: PathType, *, image_root: PathType | None = None) -> ParticleTable:
    """Read a particle file by extension: ``.star`` (RELION) or ``.cs`` (cryoSPARC).

    Parameters
    ----------
    path : str or PathLike
        Particle file.
    image_root : str or PathLike, optional
        Folder for relative image paths; default the file's folder.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        from cryopose.io.star import read_star

        return read_star(path, image_root=image_root)
    if suffix == ".cs":
        from cryopose.io.cryosparc import read_cryosparc

        return read_cryosparc(path, image_root=image_root)
    raise input_error(path, f"unknown particle file type {suffix!r}; expected .star or .cs")


def make_particle_table(
    stack_path: PathType,
    n_particles: int,
    *,
    pixel_size_angstrom: float,
    box: int,
    rotations: torch.Tensor | None = None,
    origins_angstrom: torch.Tensor | np.ndarray | None = None,
    ctf: dict[str, torch.Tensor | np.ndarray | float] | None = None,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    first_index: int = 1,
) -> ParticleTable:
    """A one-optics-group table for consecutive images of one stack (e.g. simulated data).

    Particle ``i`` (0-based row) refers to RELION image ``first_index + i`` (1-based).

    Parameters
    ----------
    stack_path : str or PathLike
        The ``.mrcs`` file (resolved against the current directory when relative).
    n_particles : int
        Number of images.
    pixel_size_angstrom : float
        Pixel size in Angstrom.
    box : int
        Image side in pixels.
    rotations : torch.Tensor, optional
        ``[n, 3, 3]`` cryopose matrices.
    origins_angstrom : tensor or array, optional
        ``[n, 2]`` origins in Angstrom (RELION sign).
    ctf : dict, optional
        Per-particle values keyed like :meth:`ParticleTable.ctf_params` (``defocus_u_angstrom``,
        ``defocus_v_angstrom``, ``defocus_angle_deg``, ``phase_shift_deg``,
        ``bfactor_angstrom2``, ``scale``); scalars broadcast.
    voltage_kv, spherical_aberration_mm, amplitude_contrast : float
        Optics-group values.
    first_index : int
        RELION (1-based) index of the first image, for tables built chunk by chunk.
    """
    n = int(n_particles)
    if int(first_index) < 1:
        raise CryoposeInputError(f"first_index {first_index}: expected a 1-based index >= 1")
    stack = os.path.abspath(stack_path)
    first = int(first_index)
    data = pd.DataFrame({IMAGE_NAME: [f"{i:06d}@{stack}" for i in range(first, first + n)]})
    data[OPTICS_GROUP] = np.ones(n, dtype=np.int64)
    optics = pd.DataFrame(
        {
            OPTICS_GROUP: [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [float(voltage_kv)],
            "rlnSphericalAberration": [float(spherical_aberration_mm)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
            "rlnImagePixelSize": [float(pixel_size_angstrom)],
            "rlnImageSize": [int(box)],
            "rlnImageDimensionality": [2],
        }
    )
    for column in optics.columns[1:]:
        data[column] = np.repeat(optics[column].to_numpy(), n)
    if ctf:
        for key, value in ctf.items():
            if key not in CTF_LABELS or key in (
                "voltage_kv",
                "spherical_aberration_mm",
                "amplitude_contrast",
                "pixel_size_angstrom",
            ):
                raise CryoposeInputError(f"ctf key {key!r}: not a per-particle CTF field")
            data[CTF_LABELS[key][0]] = np.broadcast_to(_as_numpy(value), (n,)).copy()
    table = ParticleTable(data, optics, image_root=None, source=None)
    if rotations is not None:
        table = table.with_poses(rotations, origins_angstrom)
    elif origins_angstrom is not None:
        origins = _as_numpy(origins_angstrom).reshape(n, 2)
        for i, label in enumerate(ORIGIN_LABELS):
            table.data[label] = origins[:, i]
    return table


class ParticleImages:
    """Read particle images of a table by row, keeping a few stacks memory-mapped.

    Parameters
    ----------
    table : ParticleTable
    check_box : bool
        Check each stack's box against ``rlnImageSize`` when that column exists.
    max_open : int
        Number of stacks kept open (least recently used are closed).
    """

    def __init__(self, table: ParticleTable, *, check_box: bool = True, max_open: int = 64):
        from cryopose.io.mrc import ParticleStack  # noqa: F401  (import check)

        self.table = table
        self._paths, self._indices = table.image_paths_and_indices()
        self._boxes = (
            table.data["rlnImageSize"].to_numpy(dtype=np.int64)
            if check_box and "rlnImageSize" in table.data.columns
            else None
        )
        self._open: OrderedDict[str, object] = OrderedDict()
        self._max_open = max(1, int(max_open))

    def __len__(self) -> int:
        return len(self._indices)

    def __enter__(self) -> ParticleImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open stack."""
        while self._open:
            _, stack = self._open.popitem()
            stack.close()

    def _stack(self, path: str):
        from cryopose.io.mrc import ParticleStack

        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        stack = ParticleStack(path)
        self._open[path] = stack
        if len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return stack

    def read(
        self,
        rows: IndexLike = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Images of the given **0-based table rows**, ``[n, box, box]``.

        RELION's 1-based ``rlnImageName`` index ``k`` is read as stack index ``k - 1``.
        """
        from cryopose.io.mrc import check_box

        n = len(self)
        if rows is None:
            rows = np.arange(n)
        elif isinstance(rows, slice):
            rows = np.arange(n)[rows]
        elif isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu").numpy()
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise input_error(self.table._where(), f"row index out of range for {n} particles")
        out: torch.Tensor | None = None
        paths = self._paths[rows]
        for path in dict.fromkeys(paths.tolist()):
            where = np.flatnonzero(paths == path)
            stack = self._stack(path)
            if self._boxes is not None:
                for expected in np.unique(self._boxes[rows[where]]):
                    check_box(stack, int(expected))
            one_based = self._indices[rows[where]]
            if one_based.max() > len(stack):
                bad = int(one_based[one_based > len(stack)][0])
                raise input_error(
                    path,
                    f"image index {bad} (1-based, from rlnImageName in {self.table._where()}) "
                    f"is past the end of the stack of {len(stack)} images",
                )
            images = stack.read(one_based - 1, dtype=dtype, device=device)
            if out is None:
                out = torch.empty((rows.size, *images.shape[1:]), dtype=dtype, device=images.device)
            out[torch.from_numpy(where).to(images.device)] = images
        if out is None:
            box = self._boxes[0] if self._boxes is not None and n else 0
            out = torch.empty((0, box, box), dtype=dtype, device=device)
        return out
