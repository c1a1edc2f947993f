"""Uniform and isotropic Gaussian distributions on SO(3); kernel-density histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from cryopose.so3.conversions import axis_angle_to_matrix, matrix_to_rotvec
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.distributions import (
    CLOSED_FORM_MAX_ETA,
    haar_angle_cdf,
    haar_angle_density,
    iso_gaussian_angle_cdf,
    iso_gaussian_angle_density,
    iso_gaussian_angle_log_density,
    iso_gaussian_angle_std,
    iso_gaussian_log_density,
    iso_gaussian_log_kernel,
    sample_iso_gaussian,
    smoothed_histogram,
    uniform_log_density,
)
from cryopose.so3.grids import healpix_grid
from cryopose.so3.random import random_rotations

F64 = torch.float64
N_KS = 20_000


def _angles(rotations: torch.Tensor) -> np.ndarray:
    eye = torch.eye(3, dtype=rotations.dtype)
    return geodesic_distance(rotations, eye).double().numpy()


def _density_quad(eta: float, upper: float = math.pi) -> float:
    def f(w: float) -> float:
        return float(iso_gaussian_angle_density(torch.tensor(w, dtype=F64), eta))

    points = [k * eta for k in (0.5, 1, 2, 4, 8) if k * eta < upper]
    value, _ = integrate.quad(f, 0.0, upper, points=points or None, limit=200, epsabs=1e-13)
    return value


def _series_reference(w: np.ndarray, eta: float, l_max: int = 400) -> np.ndarray:
    """S(w) straight from the character series (test's own numpy transcription)."""
    ell = np.arange(l_max + 1)[:, None]
    terms = (2 * ell + 1) * np.exp(-ell * (ell + 1) * eta**2 / 2)
    return (terms * np.sin((ell + 0.5) * w) / np.sin(w / 2)).sum(0)


# ---------------------------------------------------------------------------------------------
# Haar
# ---------------------------------------------------------------------------------------------


def test_haar_angle_density_and_cdf():
    value, _ = integrate.quad(lambda w: float(haar_angle_density(torch.tensor(w))), 0, math.pi)
    assert abs(value - 1.0) < 1e-7
    w = torch.linspace(0, math.pi, 7, dtype=F64)
    torch.testing.assert_close(haar_angle_density(w), (1 - torch.cos(w)) / math.pi)
    assert float(haar_angle_cdf(torch.tensor(math.pi, dtype=F64))) == pytest.approx(1.0)


def test_uniform_log_density_is_zero(dtype):
    r = random_rotations((4, 5), generator=0, dtype=dtype)
    out = uniform_log_density(r)
    assert out.shape == (4, 5) and out.dtype == dtype and bool((out == 0).all())


# ---------------------------------------------------------------------------------------------
# IG angle density: normalisation, series vs closed form, small and large eta
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.05, 0.1, 0.5, 2.0, 10.0])
def test_iso_gaussian_angle_density_integrates_to_one(eta):
    assert abs(_density_quad(eta) - 1.0) < 1e-8


def test_series_matches_reference_transcription():
    w = np.linspace(0.01, math.pi, 50)
    for eta in (0.3, 1.0, 2.0):
        ours = iso_gaussian_log_kernel(torch.from_numpy(w), eta, method="series").numpy()
        np.testing.assert_allclose(np.exp(ours), _series_reference(w, eta), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "eta, rtol",
    [(0.5, 1e-7), (0.7, 1e-10), (CLOSED_FORM_MAX_ETA, 1e-12), (1.5, 1e-7), (1.65, 1e-6)],
)
def test_closed_form_agrees_with_series(eta, rtol):
    """Closed form and series agree to 1e-6 up to eta ~ 1.66 (threshold used: eta < 1)."""
    w = torch.linspace(0.0, math.pi, 1001, dtype=F64)
    closed = iso_gaussian_log_kernel(w, eta, method="closed_form")
    series = iso_gaussian_log_kernel(w, eta, method="series")
    assert float((torch.exp(closed - series) - 1).abs().max()) < rtol


def test_closed_form_differs_from_series_at_large_eta():
    """The three-image closed form is not used above the threshold for a reason."""
    w = torch.linspace(0.0, math.pi, 101, dtype=F64)
    closed = iso_gaussian_log_kernel(w, 2.0, method="closed_form")
    series = iso_gaussian_log_kernel(w, 2.0, method="series")
    assert float((torch.exp(closed - series) - 1).abs().max()) > 1e-5


def test_closed_form_agrees_with_series_in_bulk_for_small_eta():
    eta = 0.1
    w = torch.linspace(0.0, 6 * eta, 200, dtype=F64)
    closed = iso_gaussian_log_kernel(w, eta, method="closed_form")
    series = iso_gaussian_log_kernel(w, eta, method="series")
    assert float((closed - series).abs().max()) < 1e-9


def test_auto_is_continuous_across_threshold():
    w = torch.linspace(0.0, math.pi, 101, dtype=F64)
    below = iso_gaussian_log_kernel(w, CLOSED_FORM_MAX_ETA - 1e-10)
    above = iso_gaussian_log_kernel(w, CLOSED_FORM_MAX_ETA)
    assert float((below - above).abs().max()) < 1e-8


@pytest.mark.parametrize("eta", [1e-4, 1e-3, 0.01, 0.3, 1.5])
def test_log_kernel_stable_at_small_angles(eta):
    w = torch.tensor([0.0, 1e-14, 1e-10, 1e-7, 1e-5], dtype=F64)
    out = iso_gaussian_log_kernel(w, eta)
    assert bool(torch.isfinite(out).all())
    # S(0) = sum (2l + 1)^2 exp(-l (l + 1) eps); for small eps ~ sqrt(pi) eps^-1.5 exp(eps / 4)
    eps = eta**2 / 2
    if eta < 0.5:
        s0 = 0.5 * math.log(math.pi) - 1.5 * math.log(eps) + eps / 4
    else:
        ell = np.arange(200)
        s0 = math.log(((2 * ell + 1) ** 2 * np.exp(-ell * (ell + 1) * eps)).sum())
    assert abs(float(out[0]) - s0) < 1e-10
    # smooth in w: log S(w) ~ log S(0) - w^2 / (4 eps) near 0 (Gaussian tail of heat kernel)
    assert float((out - out[0]).abs().max()) < (1e-5) ** 2 / eps + 1e-12


def test_log_kernel_finite_far_from_mean_for_tiny_eta():
    out = iso_gaussian_log_kernel(torch.tensor([0.5, math.pi], dtype=F64), 1e-3)
    assert bool(torch.isfinite(out).all())
    # Gaussian tail: log S(w) ~ log S(0) - w^2 / (4 eps)
    assert float(out[0]) == pytest.approx(22.3353 - 0.25 / (4 * 5e-7), rel=1e-6)


def test_angle_std_small_eta():
    """Maxwell limit: std = sqrt(3 - 8 / pi) eta = 0.673 eta (0.067 rad at eta = 0.1)."""
    assert iso_gaussian_angle_std(0.1) == pytest.approx(0.0673, abs=5e-4)
    assert iso_gaussian_angle_std(0.01) == pytest.approx(
        math.sqrt(3 - 8 / math.pi) * 0.01, rel=1e-3
    )
    w = torch.linspace(1e-4, 0.1, 50, dtype=F64)
    maxwell = stats.maxwell(scale=0.01).pdf(w.numpy())
    np.testing.assert_allclose(
        iso_gaussian_angle_density(w, 0.01).numpy(), maxwell, rtol=2e-3, atol=1e-6
    )


def test_large_eta_is_uniform(dtype):
    r = random_rotations(1000, generator=2, dtype=dtype)
    log_p = iso_gaussian_log_density(r, torch.eye(3, dtype=dtype), 10.0)
    assert log_p.dtype == dtype and float(log_p.abs().max()) < 1e-6
    w = torch.linspace(0, math.pi, 20, dtype=F64)
    torch.testing.assert_close(
        iso_gaussian_angle_density(w, 10.0), haar_angle_density(w), atol=1e-10, rtol=0
    )
    # Haar angle: E[w] = pi/2 + 2/pi, E[w^2] = pi^2/3 + 2, so Var = pi^2/12 - 4/pi^2
    haar_std = math.sqrt(math.pi**2 / 12 - 4 / math.pi**2)
    assert iso_gaussian_angle_std(10.0) == pytest.approx(haar_std, rel=1e-6)


def test_angle_log_density_matches_density():
    w = torch.linspace(0.01, 3.0, 30, dtype=F64)
    log_f = iso_gaussian_angle_log_density(w, 0.4)
    expected = torch.log((1 - torch.cos(w)) / math.pi) + iso_gaussian_log_kernel(w, 0.4)
    torch.testing.assert_close(log_f, expected)
    assert float(iso_gaussian_angle_log_density(torch.tensor(0.0), 0.4)) == -math.inf


def test_bad_eta_and_method_raise():
    with pytest.raises(ValueError, match="eta"):
        iso_gaussian_log_kernel(torch.tensor([0.1]), 0.0)
    with pytest.raises(ValueError, match="eta"):
        iso_gaussian_log_kernel(torch.tensor([0.1]), float("nan"))
    with pytest.raises(ValueError, match="method"):
        iso_gaussian_log_kernel(torch.tensor([0.1]), 0.5, method="fast")


# ---------------------------------------------------------------------------------------------
# IG density on rotations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0])
def test_density_integrates_to_one_against_haar(eta):
    """Importance check: E_Haar[p(R)] = 1 for a density w.r.t. normalised Haar measure."""
    n = 100_000
    r = random_rotations(n, generator=31, dtype=F64)
    mean = random_rotations((), generator=32, dtype=F64)
    p = torch.exp(iso_gaussian_log_density(r, mean, eta))
    standard_error = float(p.std()) / math.sqrt(n)
    assert abs(float(p.mean()) - 1.0) < 4 * standard_error


def test_log_density_invariances(dtype):
    r = random_rotations(200, generator=41, dtype=dtype)
    mean = random_rotations(200, generator=42, dtype=dtype)
    q = random_rotations((), generator=43, dtype=dtype)
    eta = 0.3
    base = iso_gaussian_log_density(r, mean, eta)
    assert base.shape == (200,) and base.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    for left, right in [(q @ r, q @ mean), (r @ q, mean @ q), (q @ r @ q.T, q @ mean @ q.T)]:
        torch.testing.assert_close(
            iso_gaussian_log_density(left, right, eta), base, atol=tol, rtol=0
        )
    # symmetric in its two arguments, maximal at the mean
    torch.testing.assert_close(iso_gaussian_log_density(mean, r, eta), base, atol=tol, rtol=0)
    at_mean = iso_gaussian_log_density(mean, mean, eta)
    assert bool((at_mean >= base).all())


def test_log_density_at_mean_small_eta(dtype):
    """Near the mean the density is finite and follows the Gaussian profile even for eta = 1e-3."""
    eta = 1e-3
    mean = random_rotations((), generator=5, dtype=F64)
    angles = torch.tensor([0.0, 1e-4, 1e-3, 3e-3], dtype=F64)
    r = mean @ axis_angle_to_matrix(torch.tensor([[0.0, 0.6, 0.8]], dtype=F64).expand(4, 3), angles)
    log_p = iso_gaussian_log_density(r.to(dtype), mean.to(dtype), eta).double()
    eps = eta**2 / 2
    expected = 0.5 * math.log(math.pi) - 1.5 * math.log(eps) + eps / 4 - angles**2 / (4 * eps)
    tol = 0.5 if dtype == torch.float32 else 1e-6  # float32 angles are good to ~1e-7 rad
    torch.testing.assert_close(log_p, expected, atol=tol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.1, 0.5, 2.0])
def test_sampler_kolmogorov_smirnov(eta):
    r = sample_iso_gaussian(N_KS, eta, generator=123, dtype=F64)
    w = _angles(r)
    cdf = lambda x: iso_gaussian_angle_cdf(torch.from_numpy(np.asarray(x)), eta).numpy()  # noqa: E731
    assert stats.kstest(w, cdf).pvalue > 0.01
    # the tabulated CDF is the integral of the density (independent quadrature)
    for upper in [u for u in (0.5 * eta, eta, 2 * eta, 3 * eta) if u < math.pi] + [math.pi]:
        quad = _density_quad(eta, upper)
        assert abs(float(iso_gaussian_angle_cdf(torch.tensor(upper, dtype=F64), eta)) - quad) < 1e-9


@pytest.mark.parametrize("eta_1, eta_2", [(0.1, 0.2), (0.4, 0.3)])
def test_sampler_heat_kernel_convolution(eta_1, eta_2):
    """IG(eta1) composed with IG(eta2) is IG(sqrt(eta1^2 + eta2^2)) (heat semigroup)."""
    a = sample_iso_gaussian(N_KS, eta_1, generator=1, dtype=F64)
    b = sample_iso_gaussian(N_KS, eta_2, generator=2, dtype=F64)
    eta = math.hypot(eta_1, eta_2)
    w = _angles(a @ b)
    cdf = lambda x: iso_gaussian_angle_cdf(torch.from_numpy(np.asarray(x)), eta).numpy()  # noqa: E731
    assert stats.kstest(w, cdf).pvalue > 0.01

    # a width convention off by sqrt(2) would be rejected
    def cdf_wrong(x):
        return iso_gaussian_angle_cdf(torch.from_numpy(np.asarray(x)), eta * math.sqrt(2)).numpy()

    assert stats.kstest(w, cdf_wrong).pvalue < 1e-6


def test_sampler_large_eta_is_haar():
    w = _angles(sample_iso_gaussian(N_KS, 10.0, generator=9, dtype=F64))
    assert stats.kstest(w, lambda x: (x - np.sin(x)) / math.pi).pvalue > 0.01


def test_sampler_axis_isotropic_and_mean(dtype):
    mean = random_rotations((), generator=3, dtype=dtype)
    r = sample_iso_gaussian((100, 50), 0.3, mean, generator=4, dtype=dtype)
    assert r.shape == (100, 50, 3, 3) and r.dtype == dtype
    # samples are mean @ E, with E the identity-mean sample of the same seed
    e = sample_iso_gaussian((100, 50), 0.3, generator=4, dtype=F64)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(r, (mean.double() @ e).to(dtype), atol=tol, rtol=0)
    # rotation vectors of E are isotropic: mean ~ 0, covariance ~ c I
    v = matrix_to_rotvec(e.reshape(-1, 3, 3))
    cov = v.T @ v / v.shape[0]
    assert float(v.mean(0).abs().max()) < 0.01
    off_diag = cov - torch.diag(torch.diagonal(cov))
    assert float(off_diag.abs().max()) < 0.1 * float(cov.diagonal().mean())
    assert float(cov.diagonal().std() / cov.diagonal().mean()) < 0.05


def test_sampler_reproducible(dtype):
    a = sample_iso_gaussian(500, 0.2, generator=8, dtype=dtype)
    b = sample_iso_gaussian(500, 0.2, generator=torch.Generator().manual_seed(8), dtype=dtype)
    c = sample_iso_gaussian(500, 0.2, generator=9, dtype=dtype)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        a.transpose(-1, -2) @ a, torch.eye(3, dtype=dtype).expand_as(a), atol=tol, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# Smoothed histogram
# ---------------------------------------------------------------------------------------------


def test_histogram_peaked_at_grid_point(dtype):
    grid = healpix_grid(1, dtype=dtype)
    target = 123
    rotations = grid.matrices[target].expand(10, 3, 3)
    p = smoothed_histogram(rotations, grid, kernel_eta=0.1)
    assert p.shape == (len(grid),) and p.dtype == dtype
    assert abs(float(p.sum()) - 1) < 1e-5
    assert int(p.argmax()) == target and float(p[target]) > 0.99
    # a very narrow kernel is still finite (log-space evaluation)
    narrow = smoothed_histogram(rotations, grid, kernel_eta=1e-3)
    assert bool(torch.isfinite(narrow).all()) and float(narrow[target]) == pytest.approx(1.0)


def test_histogram_of_uniform_rotations_is_flat():
    grid = healpix_grid(1)
    rotations = random_rotations(5000, generator=51, dtype=F64)
    p = smoothed_histogram(rotations, grid, kernel_eta=0.5)
    # Monte Carlo relative std per grid point: sqrt(S_{eta^2}(0) / n) ~ 5.5 %
    relative = p * len(grid)
    assert 0.7 < float(relative.min()) and float(relative.max()) < 1.3
    assert float(relative.std()) < 0.1


def test_histogram_weights_blocks_and_reference():
    grid = healpix_grid(0)
    a = sample_iso_gaussian(30, 0.2, grid.matrices[3], generator=1, dtype=F64)
    b = sample_iso_gaussian(30, 0.2, grid.matrices[40], generator=2, dtype=F64)
    rotations = torch.cat([a, b])
    weights = torch.cat([torch.full((30,), 3.0), torch.full((30,), 1.0)]).double()
    p = smoothed_histogram(rotations, grid, 0.4, weights)
    # dense reference: sum_n a_n S(w(G_j, R_n)), normalised
    w = geodesic_distance(grid.matrices[:, None], rotations[None])
    dense = (weights * torch.exp(iso_gaussian_log_kernel(w, 0.4))).sum(1)
    torch.testing.assert_close(p, dense / dense.sum(), atol=1e-12, rtol=1e-9)
    # block size does not change the answer
    torch.testing.assert_close(
        smoothed_histogram(rotations, grid, 0.4, weights, block_size=7), p, atol=1e-14, rtol=1e-12
    )
    # weights move the mass: 3:1 between the two clusters
    assert float(p[3]) / float(p[40]) == pytest.approx(3.0, rel=0.2)


def test_histogram_bad_input():
    grid = healpix_grid(0)
    with pytest.raises(ValueError, match="weights"):
        smoothed_histogram(grid.matrices[:2], grid, 0.3, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="rotations"):
        smoothed_histogram(torch.zeros(0, 3, 3, dtype=F64), grid, 0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cuda = torch.device("cuda")
    r = sample_iso_gaussian(100, 0.3, generator=1, dtype=F64)
    r_cuda = sample_iso_gaussian(100, 0.3, generator=1, dtype=F64, device=cuda)
    assert r_cuda.device.type == "cuda"
    torch.testing.assert_close(r_cuda.cpu(), r)
    mean = torch.eye(3, dtype=F64)
    for eta in (0.3, 2.0):
        log_p = iso_gaussian_log_density(r_cuda, mean.to(cuda), eta)
        assert log_p.device.type == "cuda"
        torch.testing.assert_close(log_p.cpu(), iso_gaussian_log_density(r, mean, eta))
    grid = healpix_grid(0)
    p = smoothed_histogram(r_cuda, grid.to(cuda), 0.3)
    torch.testing.assert_close(p.cpu(), smoothed_histogram(r, grid, 0.3))
    w = torch.linspace(0, math.pi, 9, dtype=F64)
    torch.testing.assert_close(
        iso_gaussian_angle_cdf(w.to(cuda), 0.4).cpu(), iso_gaussian_angle_cdf(w, 0.4)
    )
