"""cryoSPARC ``.cs`` particle files (numpy structured arrays) -> :class:`ParticleTable`.

Field mapping (``docs/conventions.md``, "Files"):

===============================  ==============================================================
cryoSPARC field                  particle table (RELION 3.1 label)
===============================  ==============================================================
``blob/path``, ``blob/idx``      ``rlnImageName = "%06d@path" % (idx + 1)`` (idx is 0-based);
                                 a leading ``>`` (cryoSPARC's project-relative marker) is
                                 removed and the path is resolved against ``image_root``
``blob/psize_A``                 ``rlnImagePixelSize`` (Angstrom)
``blob/shape``                   ``rlnImageSize`` (pixels; must be square)
``ctf/df1_A``, ``ctf/df2_A``     ``rlnDefocusU``, ``rlnDefocusV`` (Angstrom)
``ctf/df_angle_rad``             ``rlnDefocusAngle`` (degrees)
``ctf/phase_shift_rad``          ``rlnPhaseShift`` (degrees)
``ctf/accel_kv``                 ``rlnVoltage`` (kV)
``ctf/cs_mm``                    ``rlnSphericalAberration`` (mm)
``ctf/amp_contrast``             ``rlnAmplitudeContrast``
``ctf/bfactor``                  ``rlnCtfBfactor`` (Angstrom^2)
``ctf/scale``                    ``rlnCtfScalefactor``
``alignments3D/pose``            rotation vector of RELION's ``A``: ``R = A.T`` via
                                 ``cryosparc_pose_to_matrix``, then ``rlnAngleRot/Tilt/Psi``
``alignments3D/shift``           ``rlnOriginX/YAngst = shift * blob/psize_A`` (pixels of the
                                 ``blob/shape`` box; same sign as RELION's origin, the pyem
                                 ``csparc2star`` convention -- an assumption, see the docs)
``location/micrograph_path``     ``rlnMicrographName``
===============================  ==============================================================

Optics groups are the distinct (``ctf/exp_group_id``, voltage, Cs, amplitude contrast, pixel
size, box) combinations, numbered 1, 2, ... in order of first appearance. Other cryoSPARC
fields (uid, 2D alignments, class posteriors...) are not carried over.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopose.io.errors import input_error, require_file
from cryopose.io.particles import (
    EULER_LABELS,
    IMAGE_NAME,
    ORIGIN_LABELS,
    ParticleTable,
    assign_optics_groups,
)
from cryopose.so3.conversions import cryosparc_pose_to_matrix, matrix_to_euler

__all__ = ["read_cryosparc", "load_cs", "cryosparc_to_dataframe"]

PathType = str | PathLike[str]

_REQUIRED = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A")
_SCALAR_MAP = {
    "ctf/accel_kv": ("rlnVoltage", 1.0),
    "ctf/cs_mm": ("rlnSphericalAberration", 1.0),
    "ctf/amp_contrast": ("rlnAmplitudeContrast", 1.0),
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0),
    "ctf/scale": ("rlnCtfScalefactor", 1.0),
}


def load_cs(path: PathType) -> np.ndarray:
    """Load a ``.cs`` file as a numpy structured array (no pickles).

    Raises
    ------
    CryoposeInputError
        Missing file or not a numpy structured array.
    """
    require_file(path, "cryoSPARC file")
    try:
        array = np.load(os.fspath(path), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        message = " ".join(str(err).split())
        raise input_error(
            path, f"unreadable .cs file; expected a numpy .npy array ({message})"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.names is None or array.ndim != 1:
        raise input_error(path, "not a cryoSPARC table; expected a 1D numpy structured array")
    return array


def _as_float64(values: np.ndarray) -> np.ndarray:
    """float32 fields -> float64 holding their shortest decimal (15301.1, not 15301.099609375).

    The float64 value rounds back to the same float32, so nothing is lost, and the STAR text
    written from it is what a person (or pyem) would write.
    """
    values = np.asarray(values)
    if values.dtype != np.float32:
        return values.astype(np.float64)
    unique, inverse = np.unique(values, return_inverse=True)
    return unique.astype(str).astype(np.float64)[inverse].reshape(values.shape)


def _text(values: np.ndarray) -> list[str]:
    out = []
    for v in values.tolist():
        s = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        out.append(s[1:] if s.startswith(">") else s)
    return out


def cryosparc_to_dataframe(array: np.ndarray, source: PathType | None = None) -> pd.DataFrame:
    """Convert a cryoSPARC particle array to a per-particle frame with RELION labels.

    Parameters
    ----------
    array : numpy.ndarray
        Structured array as loaded by :func:`load_cs`.
    source : str or PathLike, optional
        File named in error messages.

    Returns
    -------
    pandas.DataFrame
        Per-particle columns (optics fields included, no ``rlnOpticsGroup`` yet).
    """
    names = set(array.dtype.names or ())
    for field in _REQUIRED:
        if field not in names:
            raise input_error(source, f"missing field {field}")
    shape = np.asarray(array["blob/shape"]).reshape(len(array), -1)
    if shape.shape[1] != 2 or (shape[:, 0] != shape[:, 1]).any():
        raise input_error(source, "blob/shape has non-square images; expected [box, box]")
    psize = _as_float64(array["blob/psize_A"])
    if not (np.isfinite(psize).all() and (psize > 0).all()):
        raise input_error(source, "blob/psize_A must be positive and finite (Angstrom)")
    index0 = np.asarray(array["blob/idx"], dtype=np.int64)
    paths = _text(np.asarray(array["blob/path"]))
    data = pd.DataFrame(
        {IMAGE_NAME: [f"{i + 1:06d}@{p}" for i, p in zip(index0.tolist(), paths, strict=True)]}
    )
    if "location/micrograph_path" in names:
        data["rlnMicrographName"] = _text(np.asarray(array["location/micrograph_path"]))
    if "ctf/exp_group_id" in names:
        data["_exp_group"] = np.asarray(array["ctf/exp_group_id"], dtype=np.int64)
    for field, (label, factor) in _SCALAR_MAP.items():
        if field in names:
            values = _as_float64(array[field])
            data[label] = values * factor if factor != 1.0 else values
    if "alignments3D/pose" in names:
        pose = torch.from_numpy(_as_float64(array["alignments3D/pose"]))
        angles = matrix_to_euler(cryosparc_pose_to_matrix(pose.reshape(-1, 3))).numpy()
        for i, label in enumerate(EULER_LABELS):
            data[label] = angles[:, i]
    if "alignments3D/shift" in names:
        shift = _as_float64(array["alignments3D/shift"]).reshape(-1, 2)
        for i, label in enumerate(ORIGIN_LABELS):
            data[label] = shift[:, i] * psize
    data["rlnImagePixelSize"] = psize
    data["rlnImageSize"] = shape[:, 0].astype(np.int64)
    data["rlnImageDimensionality"] = np.int64(2)
    return data


def read_cryosparc(path: PathType, *, image_root: PathType | None = None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file into a :class:`ParticleTable`.

    Parameters
    ----------
    path : str or PathLike
        The ``.cs`` file.
    image_root : str or PathLike, optional
        Folder that ``blob/path`` is relative to; default the ``.cs`` file's folder.

    Returns
    -------
    ParticleTable
    """
    path = Path(path)
    data = cryosparc_to_dataframe(load_cs(path), path)
    # The exposure group joins the optics-group keys; groups are then renumbered 1, 2, ...
    data = data.rename(columns={"_exp_group": "rlnOpticsGroup"})
    data, optics = assign_optics_groups(data)
    root = Path(image_root) if image_root is not None else path.parent
    return ParticleTable(data=data, optics=optics, image_root=root, source=path)
