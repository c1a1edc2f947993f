"""Rotation priors: uniform, isotropic Gaussian, empirical (EM) prior, spec parsing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar

from cryopose.bayes import priors as priors_module
from cryopose.bayes.posterior import summarize_posterior
from cryopose.bayes.priors import (
    EmpiricalPrior,
    IsoGaussianPrior,
    UniformPrior,
    parse_prior,
)
from cryopose.io.errors import CryoposeInputError
from cryopose.so3.conversions import euler_to_matrix, rotvec_to_matrix
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.distributions import (
    iso_gaussian_log_density,
    sample_iso_gaussian,
    smoothed_histogram,
)
from cryopose.so3.grids import healpix_grid


def chordal_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum(dim=(-1, -2))


def test_uniform_and_iso_gaussian_log_densities(dtype):
    rot = haar(50, seed=1, dtype=dtype)
    assert torch.equal(UniformPrior().log_prior(rot), torch.zeros(50, dtype=dtype))
    mean = haar(1, seed=2, dtype=torch.float64)[0]
    prior = IsoGaussianPrior(0.3, mean)
    expected = iso_gaussian_log_density(rot, mean.to(dtype), 0.3)
    got = prior.log_prior(rot)
    assert got.dtype == dtype and torch.allclose(got, expected)
    # Normalised w.r.t. Haar: the mean of the density over Haar samples is about 1.
    many = haar(20000, seed=3)
    assert abs(float(torch.exp(IsoGaussianPrior(1.0).log_prior(many)).mean()) - 1.0) < 0.05


def test_parse_prior_specs():
    assert isinstance(parse_prior("uniform"), UniformPrior)
    ig = parse_prior("iso-gaussian:0.3")
    assert isinstance(ig, IsoGaussianPrior) and ig.eta == 0.3
    assert torch.allclose(ig.mean, torch.eye(3, dtype=torch.float64))
    ig2 = parse_prior("iso-gaussian:0.5@30,60,-20")
    mean = euler_to_matrix(torch.tensor([30.0, 60.0, -20.0], dtype=torch.float64))
    assert torch.allclose(ig2.mean, mean)
    emp = parse_prior("empirical")
    assert isinstance(emp, EmpiricalPrior) and emp.requires_fit and not emp.is_fitted
    assert parse_prior("empirical:0.2").kernel_eta == 0.2
    with pytest.raises(ValueError, match="not fitted"):
        emp.log_prior(torch.eye(3))
    for bad in ("gaussian", "iso-gaussian:abc", "iso-gaussian:-1", "empirical:x", "poses.txt"):
        with pytest.raises(CryoposeInputError, match="spec"):
            parse_prior(bad)


def test_smoothing_kernel_is_mass_preserving_and_matches_iso_gaussian():
    """n steps of the truncated kernel reproduce IG(eta) smoothing of a point mass."""
    grid = healpix_grid(2)
    matrices, q, spacing_deg, _ = priors_module._grid_parts(grid)
    eta = 2.0 * math.radians(spacing_deg)
    n_steps = math.ceil((eta / math.radians(spacing_deg)) ** 2)
    kernel = priors_module._smoothing_kernel(matrices, q, eta / math.sqrt(n_steps))
    column_sums = torch.sparse.sum(kernel, dim=0).to_dense()
    assert torch.allclose(column_sums, torch.ones(len(grid), dtype=torch.float64))
    k = 1234
    mass = torch.zeros(len(grid), dtype=torch.float64)
    mass[k] = 1.0
    for _ in range(n_steps):
        mass = (kernel @ mass[:, None])[:, 0]
    reference = smoothed_histogram(matrices[k : k + 1], grid, eta)
    assert float((mass - reference).abs().sum()) < 0.1  # total-variation distance < 0.05
    # The spread about the point: mean angle close to IG(eta)'s.
    d = geodesic_distance(matrices, matrices[k])
    assert abs(float((mass * d).sum()) / float((reference * d).sum()) - 1.0) < 0.05


@pytest.fixture(scope="module")
def iso_gaussian_data():
    """600 rotations from IG(0.3) about a known mean, observed as Y = R + noise (sigma 0.9)."""
    grid = healpix_grid(2)
    mean = euler_to_matrix(torch.tensor([30.0, 60.0, -20.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    n, sigma = 600, 0.9
    truth = sample_iso_gaussian(n, 0.3, mean, generator=g, dtype=torch.float64)
    observed = truth + sigma * torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    ll = -chordal_loss(observed[:, None], grid.matrices[None]) / (2 * sigma**2)
    return grid, mean, truth, ll


def test_empirical_prior_learns_the_orientation_distribution(iso_gaussian_data):
    grid, mean, truth, ll = iso_gaussian_data
    prior = EmpiricalPrior.fit(ll, grid, n_iter=12)
    assert prior.is_fitted and prior.log_prior_grid.shape == (len(grid),)
    masses = prior.masses
    assert abs(float(masses.sum()) - 1.0) < 1e-12
    d = geodesic_distance(grid.matrices, mean)
    near = d < 0.6
    # Uniform would put 1.1% of the mass within 0.6 rad of the mean.
    assert float(masses[near].sum()) > 10 * float(near.double().mean())
    assert float(d[masses.argmax()]) < 0.3
    # Floor: no grid point below floor x uniform density.
    assert float(prior.log_prior_grid.min()) >= math.log(prior.floor) - 1e-12
    # EM increases the marginal likelihood of the data.
    assert prior.history[-1] > prior.history[0] + 0.5
    # The learned prior improves the MMSE estimate over the uniform prior.
    log_prior = prior.log_prior(grid.matrices)
    assert torch.equal(log_prior, prior.log_prior_grid)
    uniform = summarize_posterior(ll, grid)
    learned = summarize_posterior(ll, grid, log_prior=log_prior)
    err_uniform = float(chordal_loss(uniform.rotations_mmse, truth).mean())
    err_learned = float(chordal_loss(learned.rotations_mmse, truth).mean())
    assert err_learned < 0.5 * err_uniform


@pytest.fixture(scope="module")
def small_data():
    """Order-1 grid (576 points) and 200 noisy observations of Haar rotations."""
    grid = healpix_grid(1)
    g = torch.Generator().manual_seed(1)
    observed = haar(200, seed=40) + 0.8 * torch.randn(200, 3, 3, generator=g, dtype=torch.float64)
    ll = -chordal_loss(observed[:, None], grid.matrices[None]) / (2 * 0.8**2)
    return grid, ll


def test_empirical_prior_input_forms_agree(small_data):
    grid, ll = small_data
    a = EmpiricalPrior.fit(ll, grid, n_iter=3, tol=0.0)
    b = EmpiricalPrior.fit([ll[:70], ll[70:]], grid, n_iter=3, tol=0.0)
    c = EmpiricalPrior.fit(lambda: iter([ll[:150], ll[150:]]), grid, n_iter=3, tol=0.0)
    # [N, G, T] with identical shifts marginalises to the same rotation likelihoods.
    d = EmpiricalPrior.fit(ll[:, :, None].expand(-1, -1, 3), grid, n_iter=3, tol=0.0)
    e = parse_prior("empirical").learn(ll, grid)
    for other in (b, c, d):
        assert torch.allclose(other.log_prior_grid, a.log_prior_grid, atol=1e-10)
    assert e.is_fitted and e.kernel_eta == pytest.approx(math.radians(grid.inplane_step_deg))
    with pytest.raises(ValueError, match="log_likelihood"):
        EmpiricalPrior.fit(ll[:, :10], grid, n_iter=1)


def test_empirical_log_prior_off_grid_uses_the_cell(small_data):
    grid, ll = small_data
    prior = EmpiricalPrior.fit(ll[:100], grid, n_iter=2)
    index = torch.arange(0, len(grid), 7)
    g = torch.Generator().manual_seed(5)
    # Perturbations well inside a cell (an eighth of the spacing) keep the cell.
    small = rotvec_to_matrix(
        torch.randn(index.numel(), 3, generator=g, dtype=torch.float64)
        * math.radians(grid.inplane_step_deg) / 16
    )
    moved = grid.matrices[index] @ small
    same = prior.cell_index(moved) == index
    assert float(same.double().mean()) > 0.9
    # Generic grids (a tensor of rotations) use the nearest grid point.
    generic = EmpiricalPrior.fit(ll[:100], grid.matrices, n_iter=2)
    nearest = generic.cell_index(moved)
    d_near = geodesic_distance(grid.matrices[nearest], moved)
    d_all = geodesic_distance(grid.matrices[None], moved[:, None]).amin(dim=1)
    assert torch.allclose(d_near, d_all, atol=1e-12)
    values = generic.log_prior(moved.to(torch.float32))
    assert values.dtype == torch.float32 and values.shape == (index.numel(),)
