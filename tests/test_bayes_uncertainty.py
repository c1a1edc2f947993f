"""Issue 4 "Must show" on simulated images: the uncertainty is informative, and a prior helps.

Slow (each test well under 2 minutes on 2 cores): ribosome particles from the embedded default
map, 64 px, 5 A/px, CTF, the ``cryopose estimate`` defaults (grid order 3, Gauss-Newton +
Laplace finish from 3 starts).

* Uncertainty (uniform poses, SNR 0.014, where a large share of MLE errors exceed 20 degrees --
  the regime where MLE's median error crosses 15-45 degrees; below it almost every particle is
  lost, above it almost none): Spearman(expected loss, true MMSE error) >= 0.5, and discarding
  the 25 % with the largest expected loss gives at least half the median-error drop of the
  oracle that discards the 25 % largest true errors. A loss that ignored the posterior spread
  (e.g. the MAP's own probability only), or rows mixed up between particles, fails these.
* Calibration (mean expected chordal loss / measured mean squared chordal error): in a wide
  band and within 0.7-1.3 (grid order 2 with the earlier grid-only refinement gave ~0.45: the
  grid missed the true mode of ~half the lost particles, see bench/README.md).
* Prior (seed Fig. 2; poses from IG(0.3) about ROT,TILT,PSI = 30,60,90 deg, SNR 0.012): mean
  squared chordal error of MMSE with the matching prior < MMSE with the uniform prior <= MLE;
  the empirical prior (learned from the same particles) also beats the uniform prior.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cryopose.bayes.estimate import EstimateConfig, estimate_poses
from cryopose.io import read_particles, read_volume
from cryopose.simulate import SimulationConfig, simulate_particles
from cryopose.so3.distances import geodesic_distance

pytestmark = pytest.mark.slow

IG_PRIOR = "iso-gaussian:0.3@30,60,90"


def _simulate(folder, n: int, snr: float, poses: str, seed: int):
    config = SimulationConfig(
        n=n, box=64, pixel_size_angstrom=5.0, snr=snr, ctf=True, poses=poses, seed=seed
    )
    simulate_particles(config, folder)
    return read_particles(folder / "particles.star"), read_volume(folder / "reference.mrc")


def _estimate(table, volume, prior: str = "uniform"):
    config = EstimateConfig(prior=prior, batch_size=64)
    return estimate_poses(table, volume.data, volume.pixel_size_angstrom, config).estimates


def _errors_deg(estimated: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    return np.degrees(geodesic_distance(estimated.double(), truth.double()).numpy())


def _squared_chordal(error_deg: np.ndarray) -> np.ndarray:
    # ||R - R'||_F^2 = 8 sin^2(theta / 2)
    return 8.0 * np.sin(np.radians(error_deg) / 2.0) ** 2


def _discard_fraction(score: np.ndarray, error_deg: np.ndarray) -> float:
    keep = len(error_deg) - len(error_deg) // 4
    full = np.median(error_deg)
    by_score = np.median(error_deg[np.argsort(score, kind="stable")[:keep]])
    oracle = np.median(np.sort(error_deg)[:keep])
    assert full > oracle
    return float((full - by_score) / (full - oracle))


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uncertainty")
    table, volume = _simulate(folder, 64, 0.014, "uniform", seed=3)
    estimates = _estimate(table, volume)
    truth = table.rotations()
    return estimates, _errors_deg(estimates.rotations_mle, truth), _errors_deg(
        estimates.rotations_mmse, truth
    )


def test_regime_has_substantial_mle_errors(uniform_run):
    _, err_mle, _ = uniform_run
    lost = float(np.mean(err_mle > 20.0))
    assert 0.15 <= lost <= 0.85, f"fraction of MLE errors > 20 deg: {lost:.2f}"


def test_expected_loss_ranks_true_error(uniform_run):
    estimates, _, err = uniform_run
    loss = estimates.expected_loss.double().numpy()
    rho = spearmanr(loss, err).statistic
    assert rho >= 0.5, f"Spearman(expected loss, error) = {rho:.3f}"
    # a shuffled score (rows of other particles) carries no information
    shuffled = np.random.default_rng(0).permutation(loss)
    assert abs(spearmanr(shuffled, err).statistic) < 0.3


def test_discarding_uncertain_particles_approaches_oracle(uniform_run):
    estimates, _, err = uniform_run
    for score in (
        estimates.expected_loss.double().numpy(),
        estimates.credible_radius_deg.double().numpy(),
    ):
        fraction = _discard_fraction(score, err)
        assert fraction >= 0.5, f"discard drop / oracle drop = {fraction:.2f}"


def test_calibration_in_band(uniform_run):
    estimates, _, err = uniform_run
    ratio = estimates.expected_loss.double().mean().item() / _squared_chordal(err).mean()
    # measured 0.4-0.6 (over-confident); a loss off by a factor 2 or in other units leaves this
    assert 0.25 <= ratio <= 1.5, f"calibration {ratio:.3f}"


def test_calibration_near_one(uniform_run):
    estimates, _, err = uniform_run
    ratio = estimates.expected_loss.double().mean().item() / _squared_chordal(err).mean()
    assert 0.7 <= ratio <= 1.3, f"calibration {ratio:.3f}"


@pytest.fixture(scope="module")
def ig_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    # SNR 0.012: MLE mean squared chordal error 1.70, uniform MMSE 1.51, matching prior 0.08
    # (measured 2026-12-02; at 0.016 the MLE error, 0.67, was too small for the guard below)
    table, volume = _simulate(folder, 64, 0.012, "iso-gaussian:0.3@30,60,90", seed=5)
    estimates = _estimate(table, volume, "uniform")
    truth = table.rotations()
    mse_mle = _squared_chordal(_errors_deg(estimates.rotations_mle, truth)).mean()
    mse_uniform = _squared_chordal(_errors_deg(estimates.rotations_mmse, truth)).mean()
    return table, volume, truth, mse_mle, mse_uniform


def test_uniform_mmse_no_worse_than_mle(ig_data):
    *_, mse_mle, mse_uniform = ig_data
    assert mse_mle > 1.0, "SNR too high: MLE errors should be substantial"
    assert mse_uniform <= mse_mle, f"MMSE (uniform) {mse_uniform:.3f} > MLE {mse_mle:.3f}"


def test_matching_prior_beats_uniform(ig_data):
    table, volume, truth, _, mse_uniform = ig_data
    estimates = _estimate(table, volume, IG_PRIOR)
    mse = _squared_chordal(_errors_deg(estimates.rotations_mmse, truth)).mean()
    assert mse < 0.5 * mse_uniform, f"matching prior {mse:.3f} vs uniform {mse_uniform:.3f}"


def test_empirical_prior_beats_uniform(ig_data):
    table, volume, truth, _, mse_uniform = ig_data
    estimates = _estimate(table, volume, "empirical")
    mse = _squared_chordal(_errors_deg(estimates.rotations_mmse, truth)).mean()
    assert mse < mse_uniform, f"empirical prior {mse:.3f} vs uniform {mse_uniform:.3f}"
