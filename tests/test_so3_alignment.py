"""Global alignment of estimated poses onto reference poses (rotation, flip, point group)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar

from cryopose.so3.alignment import align_rotations, flip_handedness
from cryopose.so3.conversions import rotvec_to_matrix
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.symmetry import (
    canonical_representative,
    point_group,
    symmetric_geodesic_distance,
)

TOL_DEG = 0.01


def angle_deg(a, b):
    return math.degrees(float(geodesic_distance(a.double(), b.double())))


def perturb(rotations, sigma_deg, seed):
    """Right-multiply by small rotations with Gaussian rotation vectors (sigma per axis)."""
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(rotations.shape[0], 3, generator=g, dtype=torch.float64)
    noise = rotvec_to_matrix(vec * math.radians(sigma_deg)).to(rotations.dtype)
    return rotations @ noise


def test_global_rotation_acts_on_the_left():
    """A rotated map V'(x) = V(Q x) has poses R' with R = Q R' (Gaussian-blob projection check)."""
    dtype = torch.float64
    centres = torch.tensor([[0.9, 0.2, 0.5], [-0.4, 0.3, -0.6], [0.1, -0.8, 0.2]], dtype=dtype)
    q = haar(1, 40, dtype)[0]
    rotated_centres = centres @ q  # V'(x) = V(Q x) has its blobs at Q^T c
    pose = haar(1, 41, dtype)[0]

    def blob_xy(pose_, centres_):  # image of int V(R u) dz is centred at the (x, y) of R^T c
        return (centres_ @ pose_)[:, :2]

    # the particle seen at pose R in V is seen at R' = Q^T R in V'
    assert torch.allclose(blob_xy(pose, centres), blob_xy(q.T @ pose, rotated_centres))
    result = align_rotations(q.T @ haar(50, 42, dtype), haar(50, 42, dtype))
    assert angle_deg(result.rotation, q) < 1e-9


def test_recovers_known_rotation_noise_free(dtype):
    ref = haar(3000, 0, dtype)
    q = haar(1, 1, dtype)[0]
    est = q.T @ ref
    result = align_rotations(est, ref)
    assert angle_deg(result.rotation, q) < TOL_DEG
    assert not result.flipped and result.group_indices is None
    assert result.rotation.dtype == dtype and result.rotation.shape == (3, 3)
    assert result.errors_rad.max() < (1e-5 if dtype == torch.float32 else 1e-12)
    assert abs(result.rotation_angle_deg - angle_deg(q, torch.eye(3, dtype=dtype))) < 1e-3
    assert torch.allclose(result.apply(est), ref, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert (result.weights > 0.5).all()


def test_recovers_known_rotation_with_small_noise(dtype):
    ref = haar(20000, 2, dtype)
    q = haar(1, 3, dtype)[0]
    est = perturb(q.T @ ref, 0.2, seed=4)
    result = align_rotations(est, ref)
    assert angle_deg(result.rotation, q) < TOL_DEG
    # the per-particle errors are the noise: mean of a Maxwell(0.2 deg) is 0.319 deg
    assert abs(math.degrees(float(result.errors_rad.double().mean())) - 0.319) < 0.01


def test_recovers_flip_and_rotation(dtype):
    ref = haar(3000, 5, dtype)
    q = haar(1, 6, dtype)[0]
    mirrored = flip_handedness(q.T @ ref)  # the ab-initio map is the mirror image
    result = align_rotations(mirrored, ref, allow_flip=True)
    assert result.flipped
    assert angle_deg(result.rotation, q) < TOL_DEG
    assert result.errors_rad.max() < (1e-5 if dtype == torch.float32 else 1e-12)
    # mirrored input without allow_flip cannot be aligned; unmirrored input is not flipped
    assert align_rotations(mirrored, ref).errors_rad.median() > 0.1
    assert not align_rotations(q.T @ ref, ref, allow_flip=True).flipped


def test_flip_is_an_involution_with_the_documented_sign_pattern():
    r = haar(10, 7)
    j = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(flip_handedness(r), j @ r @ j)
    assert torch.equal(flip_handedness(flip_handedness(r)), r)


@pytest.mark.parametrize("noise_deg", [0.0, 0.5])
def test_robust_to_twenty_percent_outliers(noise_deg, dtype):
    n = 5000
    ref = haar(n, 8, dtype)
    q = haar(1, 9, dtype)[0]
    est = q.T @ ref
    if noise_deg:
        est = perturb(est, noise_deg, seed=10)
    outliers = torch.zeros(n, dtype=torch.bool)
    outliers[torch.randperm(n, generator=torch.Generator().manual_seed(11))[: n // 5]] = True
    est[outliers] = haar(int(outliers.sum()), 12, dtype)
    result = align_rotations(est, ref, allow_flip=True)
    assert not result.flipped
    assert angle_deg(result.rotation, q) < TOL_DEG
    if noise_deg == 0.0:
        assert result.errors_rad[~outliers].max() < (1e-5 if dtype == torch.float32 else 1e-10)
    assert result.weights[~outliers].median() > 0.5
    assert result.weights[outliers].median() < 0.01
    # the plain least-squares solution is pulled by the outliers
    plain = align_rotations(est, ref, robust=False)
    assert angle_deg(plain.rotation, q) > 0.05
    assert (plain.weights == 1).all()


@pytest.mark.parametrize("symbol", ["D7", "I"])
def test_recovers_rotation_up_to_point_group(symbol, dtype):
    n = 4000
    g = point_group(symbol, dtype=dtype)
    ref = haar(n, 13, dtype)
    q = haar(1, 14, dtype)[0]
    which = torch.randint(0, g.shape[0], (n,), generator=torch.Generator().manual_seed(15))
    est = q.T @ g[which].transpose(-1, -2) @ ref  # each particle matches up to its own g_i
    result = align_rotations(est, ref, group=symbol)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert math.degrees(float(symmetric_geodesic_distance(result.rotation, q, g))) < TOL_DEG
    assert result.errors_rad.max() < tol
    # the matched g_i reproduce the data: g_i^T ref_i = Q est_i
    matched = g[result.group_indices].transpose(-1, -2) @ ref
    assert (matched - result.rotation @ est).abs().max() < 10 * tol
    # Q is returned as the coset element closest to the identity
    canonical = canonical_representative(result.rotation, g)
    assert (canonical - result.rotation).abs().max() < tol
    # ignoring the symmetry leaves most particles far off
    assert align_rotations(est, ref).errors_rad.median() > 0.3


def test_point_group_with_outliers_noise_and_flip():
    dtype = torch.float32
    n = 5000
    g = point_group("I", dtype=dtype)
    ref = haar(n, 16, dtype)
    q = haar(1, 17, dtype)[0]
    which = torch.randint(0, 60, (n,), generator=torch.Generator().manual_seed(18))
    est = flip_handedness(perturb(q.T @ g[which].transpose(-1, -2) @ ref, 0.3, seed=19))
    est[: n // 5] = haar(n // 5, 20, dtype)
    result = align_rotations(est, ref, group="I", allow_flip=True)
    assert result.flipped
    assert math.degrees(float(symmetric_geodesic_distance(result.rotation, q, g))) < TOL_DEG


def test_leading_shape_determinism_and_seed():
    ref = haar(600, 21).reshape(20, 30, 3, 3)
    q = haar(1, 22)[0]
    est = q.T @ ref
    est.view(-1, 3, 3)[:100] = haar(100, 23)
    first = align_rotations(est, ref, group="C3", seed=5)
    second = align_rotations(est, ref, group="C3", seed=5)
    assert first.errors_rad.shape == (20, 30) and first.weights.shape == (20, 30)
    assert first.group_indices.shape == (20, 30)
    assert torch.equal(first.rotation, second.rotation)
    assert torch.equal(first.errors_rad, second.errors_rad)


def test_fixed_scale_and_errors_definition():
    ref = haar(1000, 24)
    q = haar(1, 25)[0]
    est = perturb(q.T @ ref, 1.0, seed=26)
    result = align_rotations(est, ref, scale_deg=3.0)
    assert result.scale_rad == pytest.approx(math.radians(3.0))
    # errors_rad is the geodesic distance between Q est_i and ref_i
    assert torch.allclose(result.errors_rad, geodesic_distance(result.apply(est), ref))


def test_bad_input_raises_value_error():
    r = haar(10, 27)
    with pytest.raises(ValueError, match="reference"):
        align_rotations(r, r[:5])
    with pytest.raises(ValueError, match="estimated"):
        align_rotations(torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="estimated"):
        align_rotations(r[:0], r[:0])
    with pytest.raises(ValueError, match="n_iter"):
        align_rotations(r, r, n_iter=0)
    with pytest.raises(ValueError, match="scale_deg"):
        align_rotations(r, r, scale_deg=-1.0)
    with pytest.raises(ValueError, match="point group symbol"):
        align_rotations(r, r, group="Q7")


@pytest.mark.slow
def test_million_rotations_exact():
    """Accuracy at scale (timing is measured by bench/bench_so3.py, never asserted here)."""
    dtype = torch.float32
    n = 1_000_000
    ref = haar(n, 28, dtype)
    q = haar(1, 29, dtype)[0]
    est = q.T @ ref
    est[: n // 5] = haar(n // 5, 30, dtype)
    result = align_rotations(est, ref)
    assert angle_deg(result.rotation, q) < TOL_DEG
