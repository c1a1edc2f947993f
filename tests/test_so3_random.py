"""Haar-uniform random rotations: validity, reproducibility, uniformity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cryopose.so3.conversions import euler_to_matrix
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.random import random_rotations, random_unit_vectors, resolve_generator

N_SAMPLES = 20_000


def test_rotations_are_proper_orthogonal(dtype):
    r = random_rotations((50, 3), generator=1, dtype=dtype)
    assert r.shape == (50, 3, 3, 3) and r.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    eye = torch.eye(3, dtype=dtype)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye.expand_as(r), atol=tol, rtol=0)
    ones = torch.ones(50, 3, dtype=dtype)
    torch.testing.assert_close(torch.linalg.det(r), ones, atol=tol, rtol=0)


def test_seed_reproducible_and_generator_equivalent(dtype):
    a = random_rotations(100, generator=7, dtype=dtype)
    b = random_rotations(100, generator=7, dtype=dtype)
    c = random_rotations(100, generator=torch.Generator().manual_seed(7), dtype=dtype)
    d = random_rotations(100, generator=8, dtype=dtype)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, d)
    # float32 output is the float64 draw rounded (same seed, same rotations in both dtypes)
    a64 = random_rotations(100, generator=7, dtype=torch.float64)
    assert torch.equal(a64.to(dtype), a)


def test_generator_advances_between_calls():
    g = torch.Generator().manual_seed(3)
    first = random_rotations(10, generator=g)
    second = random_rotations(10, generator=g)
    assert not torch.allclose(first, second)


def test_shapes():
    assert random_rotations(()).shape == (3, 3)
    assert random_rotations(5).shape == (5, 3, 3)
    assert random_rotations((0, 2)).shape == (0, 2, 3, 3)


@pytest.mark.parametrize("bad", [-1, 1.5, "seed", True])
def test_bad_generator_raises(bad):
    with pytest.raises(ValueError, match="generator"):
        resolve_generator(bad)


def test_rotation_angle_has_haar_density():
    """Haar angle density (1 - cos w) / pi, CDF (w - sin w) / pi: KS test."""
    r = random_rotations(N_SAMPLES, generator=11, dtype=torch.float64)
    angle = geodesic_distance(r, torch.eye(3, dtype=torch.float64)).numpy()
    result = stats.kstest(angle, lambda w: (w - np.sin(w)) / math.pi)
    assert result.pvalue > 0.01
    # a wrong sampler, e.g. uniform Euler angles, is rejected by the same test
    gen = torch.Generator().manual_seed(1)
    euler = torch.rand(N_SAMPLES, 3, generator=gen, dtype=torch.float64)
    wrong = euler_to_matrix(euler * torch.tensor([360.0, 180.0, 360.0], dtype=torch.float64))
    wrong_angle = geodesic_distance(wrong, torch.eye(3, dtype=torch.float64)).numpy()
    assert stats.kstest(wrong_angle, lambda w: (w - np.sin(w)) / math.pi).pvalue < 1e-6


def test_first_and_second_moments_match_haar():
    """E[R] = 0 and E[R_ij R_kl] = delta_ik delta_jl / 3 under Haar."""
    r = random_rotations(N_SAMPLES, generator=12, dtype=torch.float64)
    sigma = math.sqrt(1.0 / (3.0 * N_SAMPLES))  # standard error of each mean entry
    assert float(r.mean(0).abs().max()) < 5 * sigma
    second = torch.einsum("nij,nkl->ijkl", r, r) / N_SAMPLES
    eye = torch.eye(3, dtype=torch.float64)
    expected = torch.einsum("ik,jl->ijkl", eye, eye) / 3.0
    assert float((second - expected).abs().max()) < 0.02


def test_viewing_directions_uniform_on_sphere():
    """R e_z is uniform on S^2: its z component is uniform on [-1, 1] (Archimedes)."""
    r = random_rotations(N_SAMPLES, generator=13, dtype=torch.float64)
    z = r[:, 2, 2].numpy()
    assert stats.kstest(z, stats.uniform(loc=-1, scale=2).cdf).pvalue > 0.01


def test_random_unit_vectors(dtype):
    v = random_unit_vectors(N_SAMPLES, generator=5, dtype=dtype)
    assert v.shape == (N_SAMPLES, 3) and v.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert float((torch.linalg.vector_norm(v, dim=-1) - 1).abs().max()) < tol
    assert stats.kstest(v[:, 0].double().numpy(), stats.uniform(loc=-1, scale=2).cdf).pvalue > 0.01
    assert torch.equal(v, random_unit_vectors(N_SAMPLES, generator=5, dtype=dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_rotations_as_cpu():
    r = random_rotations(100, generator=3, dtype=torch.float64, device="cuda")
    assert r.device.type == "cuda"
    assert torch.equal(r.cpu(), random_rotations(100, generator=3, dtype=torch.float64))
