"""Geodesic and chordal distances, Procrustes projection."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar

from cryopose import so3


@pytest.mark.parametrize(
    "angle", [0.0, 1e-7, 1e-4, 0.3, 1.0, 2.0, math.pi - 1e-4, math.pi - 1e-6, math.pi]
)
def test_geodesic_known_angles(angle, dtype):
    r1 = haar(50, 0, dtype)
    g = torch.Generator().manual_seed(1)
    axes = torch.randn(50, 3, generator=g, dtype=dtype)
    delta = so3.axis_angle_to_matrix(axes, torch.full((50,), angle, dtype=dtype))
    r2 = r1 @ delta
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    got = so3.geodesic_distance(r1, r2)
    assert (got - angle).abs().max() < tol
    # left multiplication gives the same angle (bi-invariance)
    assert (so3.geodesic_distance(delta @ r1, r1) - angle).abs().max() < tol
    # quaternion form agrees, with either sign of the quaternion
    q1, q2 = so3.matrix_to_quaternion(r1), so3.matrix_to_quaternion(r2)
    assert (so3.quaternion_geodesic_distance(q1, -q2) - angle).abs().max() < tol
    # chordal = 2 sqrt 2 sin(theta/2)
    chord = so3.chordal_distance(r1, r2)
    assert (chord - so3.chordal_from_geodesic(torch.tensor(angle, dtype=dtype))).abs().max() < 1e-5


def test_geodesic_symmetric_and_triangle():
    a, b, c = haar(500, 2), haar(500, 3), haar(500, 4)
    dab, dba = so3.geodesic_distance(a, b), so3.geodesic_distance(b, a)
    assert torch.allclose(dab, dba, atol=1e-12)
    assert (so3.geodesic_distance(a, c) <= dab + so3.geodesic_distance(b, c) + 1e-12).all()
    assert so3.geodesic_distance(a, a).max() < 1e-12


def test_pairwise_blocks_match_elementwise():
    a, b = haar(37, 5), haar(23, 6)
    full = so3.pairwise_geodesic_distance(a, b, block_size=8)
    direct = so3.geodesic_distance(a[:, None], b[None, :])
    assert full.shape == (37, 23)
    assert (full - direct).abs().max() < 1e-12
    seen = torch.zeros(37, 23, dtype=torch.bool)
    for rows, cols, block in so3.pairwise_geodesic_blocks(a, b, block_size=10):
        assert block.shape[0] <= 10 and block.shape[1] <= 10
        seen[rows, cols] = True
    assert seen.all()
    # self-distances: symmetric with a zero diagonal, accurate near 0
    self_d = so3.pairwise_geodesic_distance(a)
    assert self_d.diagonal().abs().max() < 1e-7 and torch.allclose(self_d, self_d.T, atol=1e-12)


def test_project_to_so3(dtype):
    r = haar(200, 7, dtype)
    # projection of a rotation is itself; of a scaled, slightly perturbed rotation is close
    assert so3.geodesic_distance(so3.project_to_so3(r), r).max() < 1e-5
    assert so3.geodesic_distance(so3.project_to_so3(3.0 * r), r).max() < 1e-5
    g = torch.Generator().manual_seed(8)
    m = torch.randn(200, 3, 3, generator=g, dtype=dtype)
    p = so3.project_to_so3(m)
    eye = torch.eye(3, dtype=dtype)
    assert (p @ p.transpose(-1, -2) - eye).abs().max() < 1e-5
    assert (torch.linalg.det(p) - 1).abs().max() < 1e-5  # never a reflection, even when det(m) < 0
    # it is the Frobenius-nearest rotation: no random rotation is closer
    others = haar(2000, 9, dtype)
    best = torch.linalg.matrix_norm(m[:5, None] - others[None]).min(dim=1).values
    assert (torch.linalg.matrix_norm(m[:5] - p[:5]) <= best + 1e-5).all()
    # posterior-mean use: the mean of rotations tightly spread about r0 projects back near r0
    r0 = haar(1, 10, dtype)[0]
    spread = so3.axis_angle_to_matrix(
        torch.randn(1000, 3, generator=g, dtype=dtype), torch.full((1000,), 0.05, dtype=dtype)
    )
    mean = (r0 @ spread).mean(0)
    assert so3.geodesic_distance(so3.project_to_so3(mean), r0) < 0.01
