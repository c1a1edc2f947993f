"""Conversions between rotation representations, all batched over any leading shape.

Convention (see ``docs/conventions.md``): a cryopose rotation matrix ``R`` is the transpose
of RELION's ``A = Euler_angles2matrix(rot, tilt, psi)``::

    R = A.T = Rz(rot) @ Ry(tilt) @ Rz(psi)

with active right-handed rotations ``Rz``, ``Ry``. ``R`` maps particle-frame coordinates
(detector x, y and beam z) to reference-volume coordinates, so the central slice of a
projection at pose ``R`` samples the volume's Fourier transform at ``R @ (kx, ky, 0)``. This
is also the convention of scipy/roma intrinsic ``"ZYZ"``, ASPIRE and torch-fourier-slice.
cryoSPARC's ``alignments3D/pose`` rotation vectors and cryoDRGN's ``pose.pkl`` matrices encode
``A`` and are transposed here on the way in and out.

Unit quaternions are scalar-last, ``(x, y, z, w)`` (roma and scipy order), with ``w >= 0``
returned by :func:`matrix_to_quaternion`.
"""

from __future__ import annotations

import torch


def _roma():
    """roma, imported on first use: it imports ``torch._dynamo`` (~2 s), which commands that
    never convert through it (``reconstruct``, ``fsc``) should not pay at start-up."""
    import roma

    return roma

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "quaternion_to_matrix",
    "rotvec_to_matrix",
    "matrix_to_rotvec",
    "cryosparc_pose_to_matrix",
    "matrix_to_cryosparc_pose",
    "relion_matrix_to_matrix",
    "matrix_to_relion_matrix",
    "axis_angle_to_matrix",
]


def _rz(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(*angle.shape, 3, 3)


def _ry(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, z, s, z, o, z, -s, z, c], dim=-1).reshape(*angle.shape, 3, 3)


def euler_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles to cryopose rotation matrices.

    Parameters
    ----------
    angles_deg : torch.Tensor
        ``[..., 3]`` tensor of ``(rot, tilt, psi)`` in degrees (``rlnAngleRot``,
        ``rlnAngleTilt``, ``rlnAnglePsi``), ZYZ.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` matrices ``R = A.T = Rz(rot) Ry(tilt) Rz(psi)``, where ``A`` is
        RELION's ``Euler_angles2matrix``.
    """
    angles = torch.deg2rad(angles_deg)
    return _rz(angles[..., 0]) @ _ry(angles[..., 1]) @ _rz(angles[..., 2])


def _wrap_deg(angle_rad: torch.Tensor) -> torch.Tensor:
    """Radians to degrees wrapped into (-180, 180]."""
    deg = torch.rad2deg(torch.atan2(torch.sin(angle_rad), torch.cos(angle_rad)))
    return torch.where(deg <= -180.0, deg + 360.0, deg)


def matrix_to_euler(matrix: torch.Tensor) -> torch.Tensor:
    """Cryopose rotation matrices to RELION Euler angles ``(rot, tilt, psi)`` in degrees.

    ``tilt`` is in [0, 180]; ``rot`` and ``psi`` in (-180, 180]. At gimbal lock (``tilt`` = 0
    or 180 degrees) only ``rot + psi`` (or ``rot - psi``) is defined; ``rot`` is then 0, as in
    RELION. The formulas take every combination from the best-conditioned entries, so
    ``euler_to_matrix(matrix_to_euler(R))`` reproduces ``R`` to a few machine epsilons for all
    tilts, including ones just off 0 and 180 degrees.

    Parameters
    ----------
    matrix : torch.Tensor
        ``[..., 3, 3]`` rotation matrices ``R = A.T``.

    Returns
    -------
    torch.Tensor
        ``[..., 3]`` angles in degrees.
    """
    r = matrix
    sin_tilt = 0.5 * (
        torch.hypot(r[..., 0, 2], r[..., 1, 2]) + torch.hypot(r[..., 2, 0], r[..., 2, 1])
    )
    tilt = torch.atan2(sin_tilt, r[..., 2, 2])
    # rot from the third column; atan2(0, 0) = 0 gives RELION's rot = 0 at gimbal lock.
    rot = torch.atan2(r[..., 1, 2], r[..., 0, 2])
    # rot + psi from the upper-left block scaled by (1 + cos tilt): well conditioned for tilt <= 90.
    sum_angle = torch.atan2(r[..., 1, 0] - r[..., 0, 1], r[..., 0, 0] + r[..., 1, 1])
    # rot - psi scaled by (1 - cos tilt): well conditioned for tilt >= 90.
    diff_angle = torch.atan2(-(r[..., 1, 0] + r[..., 0, 1]), r[..., 1, 1] - r[..., 0, 0])
    psi = torch.where(r[..., 2, 2] >= 0, sum_angle - rot, rot - diff_angle)
    return torch.stack([_wrap_deg(rot), torch.rad2deg(tilt), _wrap_deg(psi)], dim=-1)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to unit quaternions ``(x, y, z, w)`` with ``w >= 0``.

    Parameters
    ----------
    matrix : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 4]`` scalar-last unit quaternions (roma/scipy order).
    """
    q = _roma().rotmat_to_unitquat(matrix)
    return torch.where(q[..., 3:4] < 0, -q, q)


def quaternion_to_matrix(quaternion: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(x, y, z, w)`` to rotation matrices (input is re-normalised).

    Parameters
    ----------
    quaternion : torch.Tensor
        ``[..., 4]`` scalar-last quaternions.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` rotation matrices.
    """
    q = quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)
    return _roma().unitquat_to_rotmat(q)


def rotvec_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (axis times angle in radians) to rotation matrices.

    Parameters
    ----------
    rotvec : torch.Tensor
        ``[..., 3]`` rotation vectors, radians.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` rotation matrices (Rodrigues' formula, accurate near angle 0).

    Notes
    -----
    ``R = I + a [v]x + b [v]x^2`` with ``a = sin t / t``, ``b = (1 - cos t) / t^2``, ``t = |v|``
    (Taylor series below ``t = 1e-3``). Written here rather than through roma, whose import
    brings in ``torch._dynamo`` (~2 s of start-up for every command that polishes poses);
    equal to scipy's ``Rotation.from_rotvec`` to 1e-14 in float64 (pinned by a test).
    """
    v = torch.as_tensor(rotvec)
    if v.shape[-1:] != (3,):
        raise ValueError(f"rotvec: expected [..., 3] rotation vectors, got {tuple(v.shape)}")
    t2 = (v * v).sum(-1)
    t = torch.sqrt(t2)
    small = t < 1e-3
    safe = torch.where(small, torch.ones_like(t), t)
    a = torch.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - t2 / 24.0 + t2 * t2 / 720.0,
                    (1.0 - torch.cos(safe)) / (safe * safe))
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape, 3)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def matrix_to_rotvec(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to rotation vectors with angle in [0, pi] (radians).

    Parameters
    ----------
    matrix : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 3]`` rotation vectors.
    """
    return _roma().unitquat_to_rotvec(matrix_to_quaternion(matrix))


def axis_angle_to_matrix(axis: torch.Tensor, angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotation by ``angle_rad`` (radians, right-handed) about ``axis`` (normalised here).

    Parameters
    ----------
    axis : torch.Tensor
        ``[..., 3]`` axes.
    angle_rad : torch.Tensor
        ``[...]`` angles in radians (broadcast against ``axis[..., 0]``).
    """
    unit = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    return rotvec_to_matrix(unit * torch.as_tensor(angle_rad, dtype=axis.dtype)[..., None])


def matrix_to_relion_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Cryopose ``R`` to RELION's ``A = R.T`` (also cryoDRGN's ``pose.pkl`` matrices)."""
    return matrix.transpose(-1, -2)


def relion_matrix_to_matrix(relion_matrix: torch.Tensor) -> torch.Tensor:
    """RELION's (or cryoDRGN's) ``A`` to cryopose ``R = A.T``."""
    return relion_matrix.transpose(-1, -2)


def cryosparc_pose_to_matrix(pose: torch.Tensor) -> torch.Tensor:
    """cryoSPARC ``alignments3D/pose`` rotation vectors to cryopose matrices.

    cryoSPARC's pose is the rotation vector of RELION's ``A``; we return ``R = A.T``.

    Parameters
    ----------
    pose : torch.Tensor
        ``[..., 3]`` rotation vectors in radians.
    """
    return rotvec_to_matrix(pose).transpose(-1, -2)


def matrix_to_cryosparc_pose(matrix: torch.Tensor) -> torch.Tensor:
    """Cryopose matrices to cryoSPARC ``alignments3D/pose`` rotation vectors (radians)."""
    return matrix_to_rotvec(matrix.transpose(-1, -2))

