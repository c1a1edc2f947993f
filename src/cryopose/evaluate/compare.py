"""Compare estimated particle poses with reference (true) poses.

The figures are those every cryopose accuracy claim is stated in: geodesic error statistics in
degrees, the fractions under 5 and 10 degrees, the mean squared chordal error (the loss the
MMSE estimator minimises) and the shift RMSE in Angstrom, after an optional global alignment
(rotation, optionally the handedness flip) and modulo an optional point group.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopose.io.errors import CryoposeInputError
from cryopose.io.star import read_star
from cryopose.so3.alignment import align_rotations
from cryopose.so3.conversions import euler_to_matrix
from cryopose.so3.distances import chordal_from_geodesic, geodesic_distance
from cryopose.so3.symmetry import point_group, symmetric_geodesic_distance

__all__ = ["ALIGN_MODES", "PoseComparison", "compare_poses", "compare_star_files"]

ALIGN_MODES = ("none", "rotation", "rotation+hand")


@dataclass
class PoseComparison:
    """Pose-accuracy figures (angles in degrees, shifts in Angstrom)."""

    n: int
    mean_deg: float
    median_deg: float
    p90_deg: float
    max_deg: float
    frac_lt_5deg: float
    frac_lt_10deg: float
    chordal_mse: float
    shift_rmse_angstrom: float | None
    align_rotation_deg: float
    hand_flipped: bool
    symmetry: str = "C1"
    align: str = "none"
    joined_by: str = "rlnImageName"
    errors_deg: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def summary(self) -> dict[str, float | int | bool | None]:
        """The JSON keys of ``cryopose compare --json``."""
        keys = (
            "n mean_deg median_deg p90_deg max_deg frac_lt_5deg frac_lt_10deg chordal_mse "
            "shift_rmse_angstrom align_rotation_deg hand_flipped"
        ).split()
        d = asdict(self)
        return {k: d[k] for k in keys}


def compare_poses(
    estimated: torch.Tensor,
    reference: torch.Tensor,
    *,
    symmetry: str = "C1",
    align: str = "none",
    estimated_shifts_angstrom: torch.Tensor | None = None,
    reference_shifts_angstrom: torch.Tensor | None = None,
) -> PoseComparison:
    """Pose errors of ``estimated`` against ``reference`` rotation matrices.

    Parameters
    ----------
    estimated, reference : torch.Tensor
        ``[n, 3, 3]`` cryopose rotation matrices (``R = A^T``), row i of each the same particle.
    symmetry : str
        Point group (``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I``): each error is the smallest
        over the symmetry-equivalent poses.
    align : {"none", "rotation", "rotation+hand"}
        Global alignment applied to ``estimated`` first (for ab-initio results, which are
        determined only up to a global rotation and, from projections, a mirror).
    estimated_shifts_angstrom, reference_shifts_angstrom : torch.Tensor, optional
        ``[n, 2]`` origins (x, y) in Angstrom; when both are given the shift RMSE is reported
        (root of the mean squared 2D origin difference).

    Returns
    -------
    PoseComparison
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align: expected one of {', '.join(ALIGN_MODES)}, got {align!r}")
    estimated = estimated.to(torch.float64)
    reference = reference.to(torch.float64)
    if estimated.shape != reference.shape or estimated.shape[-2:] != (3, 3):
        raise ValueError(
            f"rotations: expected two [n, 3, 3] tensors of equal shape, got "
            f"{tuple(estimated.shape)} and {tuple(reference.shape)}"
        )
    n = estimated.shape[0]
    if n == 0:
        raise ValueError("rotations: no particles to compare")
    group = point_group(symmetry, dtype=torch.float64)
    align_deg, flipped = 0.0, False
    if align != "none":
        result = align_rotations(
            estimated,
            reference,
            allow_flip=align == "rotation+hand",
            group=None if group.shape[0] == 1 else group,
        )
        estimated = result.apply(estimated)
        align_deg, flipped = float(result.rotation_angle_deg), bool(result.flipped)
    if group.shape[0] == 1:
        errors = geodesic_distance(estimated, reference)
    else:
        errors = symmetric_geodesic_distance(estimated, reference, group)
    deg = torch.rad2deg(errors).numpy()
    chordal_mse = float((chordal_from_geodesic(errors) ** 2).mean())
    shift_rmse = None
    if estimated_shifts_angstrom is not None and reference_shifts_angstrom is not None:
        diff = estimated_shifts_angstrom.double() - reference_shifts_angstrom.double()
        shift_rmse = float(torch.sqrt((diff**2).sum(-1).mean()))
    return PoseComparison(
        n=n,
        mean_deg=float(deg.mean()),
        median_deg=float(np.median(deg)),
        p90_deg=float(np.percentile(deg, 90)),
        max_deg=float(deg.max()),
        frac_lt_5deg=float((deg < 5).mean()),
        frac_lt_10deg=float((deg < 10).mean()),
        chordal_mse=chordal_mse,
        shift_rmse_angstrom=shift_rmse,
        align_rotation_deg=align_deg,
        hand_flipped=flipped,
        symmetry=symmetry.upper(),
        align=align,
        errors_deg=deg,
    )


_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def _poses_and_origins(path: Path) -> tuple[pd.DataFrame, bool]:
    """Particle rows with angles and, when present, origins in Angstrom (x_A, y_A columns)."""
    table = read_star(path, require_images=False)
    df = table.data
    missing = [c for c in _ANGLES if c not in df.columns]
    if missing:
        raise CryoposeInputError(
            f"{path}: missing column {missing[0]} in data_particles (expected Euler angles "
            "rlnAngleRot, rlnAngleTilt, rlnAnglePsi in degrees)"
        )
    has_origins = table.has_origins
    out = pd.DataFrame({c: df[c].to_numpy(np.float64) for c in _ANGLES})
    if has_origins:
        origins = table.origins_angstrom().numpy()
        out["x_A"], out["y_A"] = origins[:, 0], origins[:, 1]
    if "rlnImageName" in df.columns:
        out["rlnImageName"] = df["rlnImageName"].astype(str).to_numpy()
    return out, has_origins


def _normalised_image_name(name: str) -> str:
    """``"000012@Particles/a.mrcs"`` -> ``"12@a.mrcs"``: ignore zero padding and folders."""
    index, sep, stack = name.partition("@")
    if not sep:
        return name
    try:
        index = str(int(index))
    except ValueError:
        pass
    return f"{index}@{Path(stack).name}"


def compare_star_files(
    estimated_path: str | Path,
    reference_path: str | Path,
    *,
    symmetry: str = "C1",
    align: str = "none",
) -> PoseComparison:
    """Join two STAR files by ``rlnImageName`` and compare their poses.

    Rows are matched on the image name (index and stack file name, so zero padding and
    folders do not matter). When either file has no ``rlnImageName`` the rows are matched by
    order, with a warning, and the two files must have the same number of rows.

    Raises
    ------
    CryoposeInputError
        Missing file, missing angle columns, or no rows in common.
    """
    estimated_path, reference_path = Path(estimated_path), Path(reference_path)
    est, est_has_origins = _poses_and_origins(estimated_path)
    ref, ref_has_origins = _poses_and_origins(reference_path)
    if "rlnImageName" in est.columns and "rlnImageName" in ref.columns:
        est["_key"] = est["rlnImageName"].map(_normalised_image_name)
        ref["_key"] = ref["rlnImageName"].map(_normalised_image_name)
        for df, path in ((est, estimated_path), (ref, reference_path)):
            if df["_key"].duplicated().any():
                dup = df.loc[df["_key"].duplicated(), "rlnImageName"].iloc[0]
                raise CryoposeInputError(f"{path}: rlnImageName {dup!r} appears more than once")
        merged = est.merge(ref, on="_key", suffixes=("_est", "_ref"))
        if merged.empty:
            raise CryoposeInputError(
                f"{estimated_path}: no rlnImageName in common with {reference_path}"
            )
        joined_by = "rlnImageName"
    else:
        if len(est) != len(ref):
            raise CryoposeInputError(
                f"{estimated_path}: no rlnImageName column to join on and {len(est)} rows "
                f"against {len(ref)} in {reference_path}; expected equal row counts"
            )
        warnings.warn(
            "rlnImageName missing: matching particles by row order", UserWarning, stacklevel=2
        )
        merged = est.add_suffix("_est").join(ref.add_suffix("_ref"))
        joined_by = "row order"

    def rotations(suffix: str) -> torch.Tensor:
        cols = [f"{c}_{suffix}" for c in _ANGLES]
        return euler_to_matrix(torch.from_numpy(np.array(merged[cols], dtype=np.float64)))

    shifts = {}
    if est_has_origins and ref_has_origins:
        for suffix in ("est", "ref"):
            shifts[suffix] = torch.from_numpy(
                np.array(merged[[f"x_A_{suffix}", f"y_A_{suffix}"]], dtype=np.float64)
            )
    result = compare_poses(
        rotations("est"),
        rotations("ref"),
        symmetry=symmetry,
        align=align,
        estimated_shifts_angstrom=shifts.get("est"),
        reference_shifts_angstrom=shifts.get("ref"),
    )
    result.joined_by = joined_by
    if not math.isfinite(result.mean_deg):
        raise CryoposeInputError(f"{estimated_path}: non-finite Euler angles")
    return result
