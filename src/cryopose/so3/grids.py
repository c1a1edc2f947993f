"""Grids on SO(3): RELION-style HEALPix grids, their covering radius, local grids.

HEALPix grid of order k
-----------------------
``12 * 4^k`` viewing directions (HEALPix ``Nside = 2^k`` pixel centres, **NEST** ordering)
times ``6 * 2^k`` in-plane angles ``psi_j = (j + inplane_phase) * 60 / 2^k`` degrees: 72, 576,
4608, 36864, 294912 rotations for k = 0..4, as in RELION and cryoDRGN. A HEALPix pixel centre
at colatitude ``theta`` and longitude ``phi`` gives RELION Euler angles ``rot = phi``,
``tilt = theta`` and the cryopose matrix ``R = Rz(rot) Ry(tilt) Rz(psi)``, whose third column
``R e_z`` (the beam direction in the reference frame) is that pixel's unit vector.

NEST ordering is used because it is hierarchical: the four order-``k + 1`` children of
direction ``d`` at order ``k`` are directions ``4 d .. 4 d + 3``, which coarse-to-fine
searches (RELION's oversampling, branch-and-bound) rely on. RING ordering would give the same
set of directions in a different order.

Rotations are stored direction-major: flat index ``d * n_inplane + j``, so
``grid.matrices_by_direction()[d, j] == base[d] @ Rz(psi_j)`` with ``base[d]`` the matrix at
``psi = 0``. A function of the in-plane angle at fixed direction is therefore a contiguous,
equally spaced, periodic row, ready for an FFT over ``j``.

Quadrature weights
------------------
Equal weights ``1 / N``. Haar measure in ZYZ Euler angles is
``sin(tilt) d(rot) d(tilt) d(psi) / (8 pi^2)``, i.e. (area on the sphere of the viewing
direction) x (uniform measure on psi). HEALPix pixels have exactly equal areas and the psi
samples are equally spaced, so every grid point owns a cell (pixel x psi interval) of Haar
measure exactly ``1 / N``; the equal-weight rule is the midpoint-type rule on those cells. It
integrates trigonometric polynomials in psi of degree < ``6 * 2^k`` exactly, and its error on
smooth functions falls ~4x per order (tested against Haar moments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryopose.so3.conversions import euler_to_matrix, matrix_to_quaternion
from cryopose.so3.random import random_rotations

__all__ = [
    "SO3Grid",
    "healpix_grid",
    "covering_radius",
    "LocalGridOffsets",
    "local_grid_offsets",
    "local_grid",
]


@dataclass(frozen=True)
class SO3Grid:
    """A product grid on SO(3): viewing directions x equally spaced in-plane angles.

    Attributes
    ----------
    matrices : torch.Tensor
        ``[n_directions * n_inplane, 3, 3]`` cryopose rotation matrices, direction-major.
    euler_deg : torch.Tensor
        ``[n_directions * n_inplane, 3]`` RELION ``(rot, tilt, psi)`` in degrees
        (rot in [0, 360), tilt in [0, 180], psi in [0, 360)).
    weights : torch.Tensor
        ``[n_directions * n_inplane]`` quadrature weights w.r.t. normalised Haar measure
        (sum 1).
    order : int
        HEALPix order ``k`` (``Nside = 2^k``).
    n_directions : int
        Number of viewing directions (``12 * 4^k``).
    n_inplane : int
        Number of in-plane angles (``6 * 2^k``).
    """

    matrices: torch.Tensor
    euler_deg: torch.Tensor
    weights: torch.Tensor
    order: int
    n_directions: int
    n_inplane: int

    def __len__(self) -> int:
        return self.n_directions * self.n_inplane

    @property
    def inplane_step_deg(self) -> float:
        """Spacing of the in-plane angles in degrees (``360 / n_inplane``)."""
        return 360.0 / self.n_inplane

    @property
    def directions(self) -> torch.Tensor:
        """``[n_directions, 3]`` unit viewing directions ``R e_z`` in the reference frame."""
        return self.matrices_by_direction()[:, 0, :, 2]

    def index(
        self, direction: int | torch.Tensor, inplane: int | torch.Tensor
    ) -> int | torch.Tensor:
        """Flat rotation index of (direction index, in-plane index): ``d * n_inplane + j``."""
        return direction * self.n_inplane + inplane

    def unravel(self, index: int | torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        """(direction index, in-plane index) of a flat rotation index."""
        return index // self.n_inplane, index % self.n_inplane

    def matrices_by_direction(self) -> torch.Tensor:
        """``[n_directions, n_inplane, 3, 3]`` view of :attr:`matrices`."""
        return self.matrices.reshape(self.n_directions, self.n_inplane, 3, 3)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SO3Grid:
        """Copy of the grid with tensors on ``device`` and/or in ``dtype``."""
        return SO3Grid(
            matrices=self.matrices.to(device=device, dtype=dtype),
            euler_deg=self.euler_deg.to(device=device, dtype=dtype),
            weights=self.weights.to(device=device, dtype=dtype),
            order=self.order,
            n_directions=self.n_directions,
            n_inplane=self.n_inplane,
        )


# HEALPix base faces: ring index (in units of nside) and longitude index of each face's corner.
_FACE_RING = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
_FACE_PHI = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])


def _compress_bits(v: np.ndarray) -> np.ndarray:
    """Keep the even bits of ``v`` (bit 2i -> bit i): de-interleaves a NEST pixel index."""
    v = v & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    return (v | (v >> 16)) & 0x00000000FFFFFFFF


def _healpix_nest_angles(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Colatitude ``theta`` and longitude ``phi`` (radians) of every HEALPix pixel centre in
    NEST order (Gorski et al. 2005, ApJ 622:759, the pix2ang_nest algorithm); equal to
    ``healpy.pix2ang(nside, pix, nest=True)`` (pinned by a test) without importing healpy,
    whose import (astropy, matplotlib) costs about a second of start-up."""
    pix = np.arange(12 * nside * nside, dtype=np.int64)
    face, within = np.divmod(pix, nside * nside)
    ix, iy = _compress_bits(within), _compress_bits(within >> 1)
    ring = _FACE_RING[face] * nside - ix - iy - 1  # 1 .. 4 nside - 1, north to south
    north, south = ring < nside, ring > 3 * nside
    nr = np.where(north, ring, np.where(south, 4 * nside - ring, nside))
    z = np.where(
        north, 1.0 - nr.astype(np.float64) ** 2 / (3.0 * nside * nside),
        np.where(south, nr.astype(np.float64) ** 2 / (3.0 * nside * nside) - 1.0,
                 (2 * nside - ring) * 2.0 / (3.0 * nside)),
    )
    shift = np.where(north | south, 0, (ring - nside) & 1)
    jp = (_FACE_PHI[face] * nr + ix - iy + 1 + shift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, np.where(jp < 1, jp + 4 * nside, jp))
    phi = (jp - (shift + 1) * 0.5) * (0.5 * math.pi / nr)
    # in the polar caps theta = arcsin((nr / nside) sqrt((6 - (nr / nside)^2) / 9)): arccos(z)
    # loses precision as z -> 1
    cap = north | south
    sin_cap = nr / nside * np.sqrt((6.0 - nr.astype(np.float64) ** 2 / (nside * nside)) / 9.0)
    theta = np.where(cap, np.where(north, np.arcsin(np.minimum(sin_cap, 1.0)),
                                   math.pi - np.arcsin(np.minimum(sin_cap, 1.0))),
                     np.arccos(np.clip(z, -1.0, 1.0)))
    return theta, phi


def healpix_grid(
    order: int,
    *,
    inplane_phase: float = 0.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> SO3Grid:
    """RELION-style HEALPix grid on SO(3) of the given order.

    Parameters
    ----------
    order : int
        HEALPix order ``k >= 0``: ``12 * 4^k`` directions (NEST order) and ``6 * 2^k``
        in-plane angles (step ``60 / 2^k`` degrees).
    inplane_phase : float
        In-plane angles are ``(j + inplane_phase) * step``; 0 (default) gives RELION's
        ``psi = 0, step, ...``; 0.5 gives cryoDRGN-style half-step offsets, whose order-
        ``k + 1`` angles split each order-``k`` interval symmetrically.
    dtype, device
        Of the returned tensors (angles and matrices are computed in float64, then cast).

    Returns
    -------
    SO3Grid
        ``72 * 8^k`` rotations with equal weights.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order: expected a non-negative int HEALPix order, got {order!r}")
    nside = 2**order
    n_directions = 12 * nside * nside
    n_inplane = 6 * nside
    theta, phi = _healpix_nest_angles(nside)
    step = 360.0 / n_inplane
    psi = (np.arange(n_inplane) + float(inplane_phase)) * step
    psi = np.mod(psi, 360.0)
    rot = np.repeat(np.degrees(phi), n_inplane)
    tilt = np.repeat(np.degrees(theta), n_inplane)
    psi_all = np.tile(psi, n_directions)
    euler = torch.from_numpy(np.stack([rot, tilt, psi_all], axis=-1))
    matrices = euler_to_matrix(euler)
    n = n_directions * n_inplane
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return SO3Grid(
        matrices=matrices.to(dtype=dtype, device=device),
        euler_deg=euler.to(dtype=dtype, device=device),
        weights=weights.to(dtype=dtype, device=device),
        order=order,
        n_directions=n_directions,
        n_inplane=n_inplane,
    )


def _nearest_abs_dot(probes: torch.Tensor, grid_q: torch.Tensor, grid_block: int) -> torch.Tensor:
    """max_j |<p_i, q_j>| for probe quaternions p (blocked over the grid)."""
    best = torch.zeros(probes.shape[0], dtype=probes.dtype, device=probes.device)
    for j0 in range(0, grid_q.shape[0], grid_block):
        block = (probes @ grid_q[j0 : j0 + grid_block].T).abs()
        best = torch.maximum(best, block.amax(dim=1))
    return best


def _nearest_angle(
    probes_q: torch.Tensor, grid_q: torch.Tensor, probe_block: int, grid_block: int
) -> torch.Tensor:
    out = []
    for i0 in range(0, probes_q.shape[0], probe_block):
        dots = _nearest_abs_dot(probes_q[i0 : i0 + probe_block], grid_q, grid_block)
        out.append(2.0 * torch.acos(dots.clamp(max=1.0)))
    return torch.cat(out)


def covering_radius(
    matrices: torch.Tensor,
    n_probe: int = 100_000,
    seed: int = 0,
    *,
    n_refine: int = 8,
    block_elements: int = 1 << 22,
) -> float:
    """Estimate the covering radius of a set of rotations (radians).

    The covering radius is ``max over R in SO(3) of min_j angle(R, G_j)``. It is estimated by
    ``n_probe`` Haar-random probes (seeded), followed by ``n_refine`` rounds of random local
    ascent from the 32 worst-covered probes (perturbations of shrinking size, kept when they
    move further from the grid). The result is a lower bound on the true covering radius that
    tightens as ``n_probe`` grows.

    Nearest neighbours use ``|<p, q>|`` of unit quaternions (``angle = 2 acos |<p, q>|``),
    computed in blocks of at most ``block_elements`` products, so memory is bounded.

    Parameters
    ----------
    matrices : torch.Tensor
        ``[..., 3, 3]`` grid rotations (flattened). float64 recommended.
    n_probe : int
        Number of random probe rotations.
    seed : int
        Seed of the probes and the refinement.
    n_refine : int
        Rounds of local ascent (0 disables it).
    block_elements : int
        Maximum number of probe-grid products held at once.

    Returns
    -------
    float
        Covering radius in radians (at most pi).
    """
    if matrices.ndim < 2 or tuple(matrices.shape[-2:]) != (3, 3) or matrices.numel() == 0:
        raise ValueError(
            f"matrices: expected a non-empty [..., 3, 3] tensor, got shape {tuple(matrices.shape)}"
        )
    if n_probe < 1:
        raise ValueError(f"n_probe: expected a positive integer, got {n_probe}")
    dtype, device = matrices.dtype, matrices.device
    grid_q = matrix_to_quaternion(matrices.reshape(-1, 3, 3))
    m = grid_q.shape[0]
    grid_block = min(m, block_elements)
    probe_block = max(1, block_elements // grid_block)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    probes = random_rotations(n_probe, generator=generator, dtype=dtype, device=device)
    probes_q = matrix_to_quaternion(probes)
    angles = _nearest_angle(probes_q, grid_q, probe_block, grid_block)
    n_keep = min(32, n_probe)
    n_candidates = 64
    best_angle, idx = torch.topk(angles, n_keep)
    best_q = probes_q[idx]
    scale = 0.5 * float(best_angle[0])
    for _ in range(n_refine):
        # small random rotations as quaternions (axis * sin(a/2), cos(a/2)), a ~ scale
        noise = torch.randn(n_keep, n_candidates, 3, generator=generator, dtype=torch.float64)
        half = 0.5 * scale * noise
        norm = torch.linalg.vector_norm(half, dim=-1, keepdim=True).clamp_min(1e-300)
        dq = torch.cat([torch.sin(norm) * half / norm, torch.cos(norm)], dim=-1)
        dq = dq.to(dtype=dtype, device=device)
        cand = _quat_multiply(best_q[:, None, :], dq).reshape(-1, 4)
        cand_angle = _nearest_angle(cand, grid_q, probe_block, grid_block)
        cand_angle = cand_angle.reshape(n_keep, n_candidates)
        top_angle, top_idx = cand_angle.max(dim=1)
        better = top_angle > best_angle
        new_q = cand.reshape(n_keep, n_candidates, 4)[torch.arange(n_keep, device=device), top_idx]
        best_q = torch.where(better[:, None], new_q, best_q)
        best_angle = torch.where(better, top_angle, best_angle)
        scale *= 0.6
    return min(float(best_angle.max()), math.pi)


def _quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of scalar-last quaternions (broadcasting)."""
    ax, ay, az, aw = a.unbind(-1)
    bx, by, bz, bw = b.unbind(-1)
    return torch.stack(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ],
        dim=-1,
    )


@dataclass(frozen=True)
class LocalGridOffsets:
    """Offsets ``D`` of a local grid (applied as ``R_center @ D``).

    ``D = Rz(azimuth) Ry(tilt) Rz(inplane - azimuth)``: the viewing direction is tilted by
    ``tilt`` towards ``azimuth`` (particle frame) by the minimal rotation, then the image is
    turned in-plane by ``inplane``.

    Attributes
    ----------
    matrices : torch.Tensor
        ``[n_directions * n_inplane, 3, 3]`` offset rotations, direction-major.
    tilt_deg, azimuth_deg, inplane_deg : torch.Tensor
        ``[n_directions * n_inplane]`` offset parameters in degrees.
    n_directions, n_inplane : int
        Sizes of the two factors; direction 0 is the centre's own viewing direction.
    center_index : int
        Flat index of the identity offset.
    """

    matrices: torch.Tensor
    tilt_deg: torch.Tensor
    azimuth_deg: torch.Tensor
    inplane_deg: torch.Tensor
    n_directions: int
    n_inplane: int
    center_index: int


def _cap_directions(cone_half_angle_deg: float, step_deg: float) -> tuple[list, list]:
    """(tilt, azimuth) in degrees of polar rings covering a spherical cap at ~step spacing."""
    n_rings = int(math.floor(cone_half_angle_deg / step_deg + 1e-9))
    tilts, azimuths = [0.0], [0.0]
    for ring in range(1, n_rings + 1):
        tilt = ring * step_deg
        circumference = 360.0 * math.sin(math.radians(tilt))
        n_on_ring = max(1, round(circumference / step_deg))
        if tilt >= 180.0 - 1e-9:
            n_on_ring = 1
        stagger = 0.5 * (ring % 2)
        for i in range(n_on_ring):
            tilts.append(tilt)
            azimuths.append((i + stagger) * 360.0 / n_on_ring)
    return tilts, azimuths


def _inplane_offsets(inplane_range_deg: float, step_deg: float) -> list[float]:
    if inplane_range_deg >= 180.0 - 1e-9:
        n = max(1, round(360.0 / step_deg))
        offsets = [k * 360.0 / n for k in range(n)]
        offsets = [o - 360.0 if o > 180.0 + 1e-9 else o for o in offsets]
        return sorted(offsets)
    n_side = int(math.floor(inplane_range_deg / step_deg + 1e-9))
    return [k * step_deg for k in range(-n_side, n_side + 1)]


def local_grid_offsets(
    cone_half_angle_deg: float,
    inplane_range_deg: float,
    step_deg: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LocalGridOffsets:
    """Offset rotations of a local grid: a cap of viewing directions x in-plane offsets.

    Viewing directions lie on polar rings at tilts ``0, step, 2 step, ... <= cone`` (the
    centre first), ring ``r`` holding ``round(360 sin(r step) / step)`` equally spaced azimuths
    (odd rings staggered by half a spacing), so neighbouring directions are ~``step`` apart.
    In-plane offsets are ``-K step, ..., 0, ..., K step`` with ``K step <= inplane_range``
    (``inplane_range >= 180`` gives ``round(360 / step)`` offsets over the full circle).

    Parameters
    ----------
    cone_half_angle_deg : float
        Maximum angle (degrees) between a grid viewing direction and the centre's.
    inplane_range_deg : float
        Maximum absolute in-plane offset (degrees).
    step_deg : float
        Target spacing (degrees), > 0.
    dtype, device
        Of the returned tensors.

    Returns
    -------
    LocalGridOffsets
    """
    for name, value in (
        ("cone_half_angle_deg", cone_half_angle_deg),
        ("inplane_range_deg", inplane_range_deg),
    ):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite angle >= 0 degrees, got {value}")
    if cone_half_angle_deg > 180.0:
        raise ValueError(
            f"cone_half_angle_deg: expected at most 180 degrees, got {cone_half_angle_deg}"
        )
    if not math.isfinite(step_deg) or step_deg <= 0:
        raise ValueError(f"step_deg: expected a positive angle in degrees, got {step_deg}")
    tilts, azimuths = _cap_directions(cone_half_angle_deg, step_deg)
    inplane = _inplane_offsets(inplane_range_deg, step_deg)
    n_dir, n_inp = len(tilts), len(inplane)
    tilt = torch.tensor(tilts, dtype=torch.float64).repeat_interleave(n_inp)
    azimuth = torch.tensor(azimuths, dtype=torch.float64).repeat_interleave(n_inp)
    inp = torch.tensor(inplane, dtype=torch.float64).repeat(n_dir)
    matrices = euler_to_matrix(torch.stack([azimuth, tilt, inp - azimuth], dim=-1))
    return LocalGridOffsets(
        matrices=matrices.to(dtype=dtype, device=device),
        tilt_deg=tilt.to(dtype=dtype, device=device),
        azimuth_deg=azimuth.to(dtype=dtype, device=device),
        inplane_deg=inp.to(dtype=dtype, device=device),
        n_directions=n_dir,
        n_inplane=n_inp,
        center_index=inplane.index(0.0),
    )


def local_grid(
    center_rotation: torch.Tensor,
    cone_half_angle_deg: float,
    inplane_range_deg: float,
    step_deg: float,
) -> torch.Tensor:
    """Local grid of rotations around each centre rotation.

    ``R = R_center @ D`` for the offsets ``D`` of :func:`local_grid_offsets`: the viewing
    direction ``R e_z`` is within ``cone_half_angle_deg`` of ``R_center e_z``, and the in-plane
    angle differs by at most ``inplane_range_deg`` from the centre's (measured after the
    minimal rotation carrying one viewing direction to the other). In RELION terms
    ``A = D^T A_center``: the perturbation acts in the particle (image) frame. The identity
    offset (the centre itself) is at flat index ``local_grid_offsets(...).center_index``.

    Parameters
    ----------
    center_rotation : torch.Tensor
        ``[..., 3, 3]`` centre rotations.
    cone_half_angle_deg, inplane_range_deg, step_deg : float
        See :func:`local_grid_offsets` (degrees).

    Returns
    -------
    torch.Tensor
        ``[..., n_directions * n_inplane, 3, 3]`` rotations (dtype and device of the centres),
        direction-major.
    """
    if center_rotation.ndim < 2 or tuple(center_rotation.shape[-2:]) != (3, 3):
        raise ValueError(
            f"center_rotation: expected a [..., 3, 3] tensor, got shape "
            f"{tuple(center_rotation.shape)}"
        )
    offsets = local_grid_offsets(
        cone_half_angle_deg,
        inplane_range_deg,
        step_deg,
        dtype=center_rotation.dtype,
        device=center_rotation.device,
    )
    return center_rotation[..., None, :, :] @ offsets.matrices
