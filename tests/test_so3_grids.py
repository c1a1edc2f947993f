"""HEALPix SO(3) grids, quadrature weights, covering radius, local grids."""

from __future__ import annotations

import math

import healpy
import numpy as np
import pytest
import torch

from cryopose.so3.conversions import euler_to_matrix, matrix_to_euler
from cryopose.so3.distances import geodesic_distance, pairwise_geodesic_distance
from cryopose.so3.grids import (
    covering_radius,
    healpix_grid,
    local_grid,
    local_grid_offsets,
)
from cryopose.so3.random import random_rotations, random_unit_vectors

F64 = torch.float64


def _rz(deg: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(deg)
    return euler_to_matrix(torch.stack([z, z, deg], dim=-1))


# ---------------------------------------------------------------------------------------------
# HEALPix grid structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order, n_rot, step",
    [(0, 72, 60.0), (1, 576, 30.0), (2, 4608, 15.0), (3, 36864, 7.5), (4, 294912, 3.75)],
)
def test_healpix_counts_match_relion(order, n_rot, step):
    grid = healpix_grid(order, dtype=torch.float32)
    assert len(grid) == n_rot == grid.matrices.shape[0] == grid.euler_deg.shape[0]
    assert grid.n_directions == 12 * 4**order and grid.n_inplane == 6 * 2**order
    assert grid.inplane_step_deg == step
    assert grid.matrices.dtype == torch.float32 and grid.weights.dtype == torch.float32


@pytest.mark.parametrize("order", [0, 1, 2])
def test_healpix_grid_matches_healpy_nest_and_relion_euler(order, dtype):
    grid = healpix_grid(order, dtype=dtype)
    nside = 2**order
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    # viewing direction R e_z is healpy's NEST pixel vector (pins healpy's convention to ours)
    vec = np.stack(healpy.pix2vec(nside, np.arange(grid.n_directions), nest=True), axis=-1)
    torch.testing.assert_close(grid.directions, torch.from_numpy(vec).to(dtype), atol=tol, rtol=0)
    # Euler angles are RELION's (rot = phi, tilt = theta, psi = j * step) and give the matrices
    theta, phi = healpy.pix2ang(nside, np.arange(grid.n_directions), nest=True)
    euler = grid.euler_deg.reshape(grid.n_directions, grid.n_inplane, 3).double()
    torch.testing.assert_close(euler[:, 0, 0], torch.from_numpy(np.degrees(phi)), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        euler[:, 0, 1], torch.from_numpy(np.degrees(theta)), atol=1e-4, rtol=0
    )
    psi = torch.arange(grid.n_inplane, dtype=F64) * grid.inplane_step_deg
    torch.testing.assert_close(euler[:, :, 2], psi.expand(grid.n_directions, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(euler_to_matrix(grid.euler_deg), grid.matrices, atol=tol, rtol=0)


def test_healpix_nest_hierarchy():
    """NEST: the children 4d..4d+3 of order-k direction d are nearest to d among order k."""
    coarse, fine = healpix_grid(1), healpix_grid(2)
    cos = fine.directions @ coarse.directions.T
    parent = cos.argmax(dim=1)
    assert torch.equal(parent, torch.arange(fine.n_directions) // 4)


def test_direction_inplane_indexing():
    grid = healpix_grid(1)
    by_dir = grid.matrices_by_direction()
    assert by_dir.shape == (48, 12, 3, 3)
    # flat index <-> (direction, in-plane) round trip
    flat = torch.arange(len(grid))
    d, j = grid.unravel(flat)
    assert torch.equal(grid.index(d, j), flat)
    assert grid.index(5, 7) == 5 * 12 + 7
    assert torch.equal(by_dir[5, 7], grid.matrices[grid.index(5, 7)])
    # every row is one base matrix turned in-plane by j * step (FFT-ready structure)
    psi = torch.arange(grid.n_inplane, dtype=F64) * grid.inplane_step_deg
    expected = by_dir[:, :1] @ _rz(psi)[None]
    torch.testing.assert_close(by_dir, expected, atol=1e-12, rtol=0)


def test_inplane_phase_half_step():
    grid = healpix_grid(1, inplane_phase=0.5)
    psi = grid.euler_deg.reshape(48, 12, 3)[0, :, 2]
    torch.testing.assert_close(psi, (torch.arange(12, dtype=F64) + 0.5) * 30.0)


def test_grid_rotations_are_distinct():
    grid = healpix_grid(1)
    dist = pairwise_geodesic_distance(grid.matrices)
    dist.fill_diagonal_(math.inf)
    # nearest neighbours are roughly one in-plane step (30 degrees) apart, none coincide
    assert math.radians(20.0) < float(dist.min()) <= math.radians(30.0) + 1e-9


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_bad_order_raises(bad):
    with pytest.raises(ValueError, match="order"):
        healpix_grid(bad)


# ---------------------------------------------------------------------------------------------
# Quadrature weights: equal weights reproduce Haar integrals, error shrinking with the order
# ---------------------------------------------------------------------------------------------


def _haar_moments(grid):
    r, w = grid.matrices, grid.weights
    trace = r.diagonal(dim1=-2, dim2=-1).sum(-1)
    # E[tr(R)^n] under Haar = multiplicity of the trivial representation in V^(x)n:
    # the Riordan numbers 0, 1, 1, 3 for n = 1..4
    exact = {1: 0.0, 2: 1.0, 3: 1.0, 4: 3.0}
    trace_err = [float((w * trace**n).sum()) - e for n, e in exact.items()]
    # E[R_ij R_kl] = delta_ik delta_jl / 3
    second = torch.einsum("n,nij,nkl->ijkl", w, r, r)
    eye = torch.eye(3, dtype=F64)
    second_err = float((second - torch.einsum("ik,jl->ijkl", eye, eye) / 3.0).abs().max())
    # E[R_22^4] = E[cos(tilt)^4] = 1/5
    r22_err = float((w * r[:, 2, 2] ** 4).sum()) - 0.2
    return trace_err, second_err, r22_err


def test_weights_equal_and_sum_to_one(dtype):
    grid = healpix_grid(2, dtype=dtype)
    assert abs(float(grid.weights.sum()) - 1.0) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert float(grid.weights.max() - grid.weights.min()) == 0.0


def test_equal_weights_reproduce_haar_integrals():
    errors = [_haar_moments(healpix_grid(k)) for k in range(4)]
    for k, (trace_err, second_err, r22_err) in enumerate(errors):
        assert abs(trace_err[0]) < 1e-12  # E[tr R] = 0 exactly (in-plane sum vanishes)
        if k > 0:
            prev_trace, prev_second, prev_r22 = errors[k - 1]
            # second-order rule: errors fall ~4x per order (check at least 3x)
            for now, before in zip(trace_err[1:], prev_trace[1:], strict=True):
                assert abs(now) < abs(before) / 3.0
            assert second_err < prev_second / 3.0
            assert abs(r22_err) < abs(prev_r22) / 3.0
    trace_err, second_err, r22_err = errors[3]
    assert max(abs(e) for e in trace_err) < 6e-3 and second_err < 1e-3 and abs(r22_err) < 1e-3


# ---------------------------------------------------------------------------------------------
# Covering radius
# ---------------------------------------------------------------------------------------------


def _ball_volume(radius: float) -> float:
    """Normalised Haar measure of a geodesic ball of the given radius (radians)."""
    return (radius - math.sin(radius)) / math.pi


def _volume_lower_bound(n: int) -> float:
    """Smallest r with n * vol(ball(r)) >= 1: no n-point set covers SO(3) with a smaller r."""
    lo, hi = 0.0, math.pi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if n * _ball_volume(mid) < 1 else (lo, mid)
    return hi


def test_covering_radius_of_identity_is_pi():
    assert covering_radius(torch.eye(3, dtype=F64)[None], n_probe=2000, seed=0) > math.pi - 1e-3


def test_covering_radius_matches_brute_force():
    """Blocked nearest neighbour (tiny blocks) = dense geodesic distances, same probes."""
    grid = healpix_grid(0)
    estimate = covering_radius(grid.matrices, n_probe=500, seed=4, n_refine=0, block_elements=100)
    probes = random_rotations(500, generator=torch.Generator().manual_seed(4), dtype=F64)
    dense = pairwise_geodesic_distance(probes, grid.matrices).min(dim=1).values.max()
    assert abs(estimate - float(dense)) < 1e-6


def test_healpix_covering_radius_halves_per_order(dtype):
    radii = [
        covering_radius(healpix_grid(k, dtype=dtype).matrices, n_probe=5000, seed=0)
        for k in range(3)
    ]
    # measured (5000 probes + refinement): 0.890, 0.486, 0.242 rad
    for k, radius in enumerate(radii):
        assert radius >= _volume_lower_bound(72 * 8**k)
    assert 0.8 < radii[0] < 1.0
    for coarse, fine in zip(radii[:-1], radii[1:], strict=True):
        assert 1.7 < coarse / fine < 2.3
    # the same grid probed with another seed gives nearly the same estimate
    other = covering_radius(healpix_grid(1, dtype=dtype).matrices, n_probe=5000, seed=1)
    assert abs(other - radii[1]) < 0.05 * radii[1]


@pytest.mark.slow
def test_healpix_covering_radius_order3():
    radius = covering_radius(healpix_grid(3).matrices, n_probe=20_000, seed=0)
    coarser = covering_radius(healpix_grid(2).matrices, n_probe=20_000, seed=0)
    assert 1.7 < coarser / radius < 2.3  # measured 0.121 rad


def test_covering_radius_bad_input():
    with pytest.raises(ValueError, match="matrices"):
        covering_radius(torch.zeros(0, 3, 3))
    with pytest.raises(ValueError, match="n_probe"):
        covering_radius(torch.eye(3)[None], n_probe=0)


# ---------------------------------------------------------------------------------------------
# Local grids
# ---------------------------------------------------------------------------------------------


def _offset_parameters(centres: torch.Tensor, rotations: torch.Tensor):
    """(viewing-direction angle, in-plane offset) in degrees of rotations relative to centres."""
    delta = centres[..., None, :, :].transpose(-1, -2) @ rotations
    tilt = torch.rad2deg(torch.acos(delta[..., 2, 2].clamp(-1, 1)))
    euler = matrix_to_euler(delta)
    inplane = torch.remainder(euler[..., 0] + euler[..., 2] + 180.0, 360.0) - 180.0
    return tilt, inplane


@pytest.mark.parametrize(
    "cone, inplane_range, step", [(10.0, 6.0, 2.0), (7.0, 0.0, 1.5), (20.0, 9.0, 3.0)]
)
def test_local_grid_bounds_and_centre(cone, inplane_range, step, dtype):
    centres = random_rotations((2, 3), generator=21, dtype=dtype)
    grid = local_grid(centres, cone, inplane_range, step)
    offsets = local_grid_offsets(cone, inplane_range, step)
    assert grid.shape == (2, 3, offsets.n_directions * offsets.n_inplane, 3, 3)
    assert grid.dtype == dtype
    tol_deg = 0.05 if dtype == torch.float32 else 1e-6
    tilt, inplane = _offset_parameters(centres.double(), grid.double())
    assert float(tilt.max()) <= cone + tol_deg
    assert float(inplane.abs().max()) <= inplane_range + tol_deg
    angle = torch.rad2deg(geodesic_distance(grid.double(), centres.double()[..., None, :, :]))
    assert float(angle.max()) <= cone + inplane_range + tol_deg
    # the cone and the in-plane range are used up to the last whole step
    assert float(tilt.max()) > cone - step - tol_deg
    assert float(inplane.max()) > inplane_range - step - tol_deg
    # the centre is included at centre_index
    centre = grid[..., offsets.center_index, :, :]
    torch.testing.assert_close(
        centre, centres, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0
    )
    # the offset parameters recorded in LocalGridOffsets are the measured ones
    torch.testing.assert_close(tilt[0, 0], offsets.tilt_deg, atol=tol_deg * 10, rtol=0)
    torch.testing.assert_close(inplane[0, 0], offsets.inplane_deg, atol=tol_deg * 10, rtol=0)


def test_local_grid_spacing_is_step():
    step = 2.0
    offsets = local_grid_offsets(12.0, 4.0, step)
    # in-plane offsets are multiples of the step
    inplane = offsets.inplane_deg.reshape(offsets.n_directions, offsets.n_inplane)[0]
    torch.testing.assert_close(inplane, torch.arange(-2, 3, dtype=F64) * step)
    # directions: nearest-neighbour spacing ~ step
    dirs = offsets.matrices.reshape(offsets.n_directions, offsets.n_inplane, 3, 3)[:, 0, :, 2]
    cos = (dirs @ dirs.T).clamp(-1, 1)
    nn = torch.rad2deg(torch.acos(cos.fill_diagonal_(-1).max(dim=1).values))
    assert 0.8 * step < float(nn.min()) and float(nn.max()) < 1.25 * step
    # directions cover the cap: random directions inside it are within one step of the grid
    probes = random_unit_vectors(5000, generator=3, dtype=F64)
    probes = probes[probes[:, 2] > math.cos(math.radians(12.0))]
    nearest = torch.rad2deg(torch.acos((probes @ dirs.T).clamp(-1, 1).max(dim=1).values))
    assert probes.shape[0] > 20 and float(nearest.max()) < step


def test_local_grid_full_inplane_circle_has_no_duplicates():
    offsets = local_grid_offsets(0.0, 180.0, 30.0)
    assert offsets.n_directions == 1 and offsets.n_inplane == 12
    dist = pairwise_geodesic_distance(offsets.matrices)
    dist.fill_diagonal_(math.inf)
    torch.testing.assert_close(dist.min(), torch.tensor(math.radians(30.0), dtype=F64))
    assert float(offsets.inplane_deg.min()) > -180.0 and float(offsets.inplane_deg.max()) <= 180.0


def test_local_grid_bad_input():
    with pytest.raises(ValueError, match="step_deg"):
        local_grid_offsets(10.0, 5.0, 0.0)
    with pytest.raises(ValueError, match="cone_half_angle_deg"):
        local_grid_offsets(-1.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="center_rotation"):
        local_grid(torch.eye(2), 10.0, 5.0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cuda = torch.device("cuda")
    grid = healpix_grid(1, device=cuda)
    assert grid.matrices.device.type == "cuda"
    torch.testing.assert_close(grid.matrices.cpu(), healpix_grid(1).matrices)
    radius_cpu = covering_radius(healpix_grid(0).matrices, n_probe=1000, seed=0)
    radius_cuda = covering_radius(healpix_grid(0, device=cuda).matrices, n_probe=1000, seed=0)
    assert abs(radius_cpu - radius_cuda) < 1e-9
    centres = random_rotations(4, generator=0, dtype=F64)
    local = local_grid(centres.to(cuda), 6.0, 4.0, 2.0)
    assert local.device.type == "cuda"
    torch.testing.assert_close(local.cpu(), local_grid(centres, 6.0, 4.0, 2.0))
