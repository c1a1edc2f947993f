"""`estimate_poses` / `cryopose estimate`: sub-grid accuracy, output table, Bayes property."""

from __future__ import annotations

import math

import pytest
import torch
from test_simulate import blob_volume
from typer.testing import CliRunner

from cryopose.bayes.estimate import OUTPUT_COLUMNS, EstimateConfig, estimate_poses
from cryopose.cli.main import app
from cryopose.evaluate import compare_poses
from cryopose.io import read_particles, read_star
from cryopose.simulate import SimulationConfig, simulate_particles

BOX, PX = 32, 6.0


def simulated(tmp_path, snr: float, n: int, seed: int = 0, **extra):
    config = SimulationConfig(n=n, box=BOX, pixel_size_angstrom=PX, snr=snr, seed=seed, **extra)
    result, _ = simulate_particles(config, tmp_path / f"sim{snr:g}", volume=blob_volume(BOX))
    return read_particles(result.particles_star), blob_volume(BOX)


def test_local_refinement_beats_the_global_grid(tmp_path):
    table, volume = simulated(tmp_path, math.inf, 24)
    truth = table.rotations()
    coarse = estimate_poses(
        table, volume, PX, EstimateConfig(grid_order=1, local_refine=False, noise_sigma=1.0)
    )
    fine = estimate_poses(table, volume, PX, EstimateConfig(grid_order=1, noise_sigma=1.0))
    coarse_err = compare_poses(coarse.estimates.rotations_mle.double(), truth)
    fine_err = compare_poses(fine.estimates.rotations_mmse.double(), truth)
    spacing = 30.0  # order-1 in-plane step
    assert coarse_err.median_deg > spacing / 8  # the global grid alone cannot do this well
    assert fine_err.median_deg < spacing / 4  # issue 4: below a quarter of the grid spacing
    assert fine_err.max_deg < spacing / 2


@pytest.mark.parametrize("snr", [1.0, 0.2, 0.05])
@pytest.mark.parametrize("refine_levels", [0, 1])
def test_pruned_and_shared_grid_quadratures_agree(tmp_path, monkeypatch, snr, refine_levels):
    # the refined quadrature keeps only the grid points that can matter (per particle) when
    # posteriors are sharp, else shares the whole grid; a batch with both is refined in two
    # groups (sharp, then broad); every layout must give the same estimates
    from cryopose.bayes import estimate as estimate_module

    table, volume = simulated(tmp_path, snr, 12, seed=3, max_shift_angstrom=6.0)
    config = dict(grid_order=1, refine_levels=refine_levels, shift_range_angstrom=6.0,
                  shift_step_angstrom=6.0)
    layouts = []
    original = estimate_module._grid_quadrature

    def spy(*args):
        quad = original(*args)
        layouts.append(quad.grid.shape[0] > 0)
        return quad

    monkeypatch.setattr(estimate_module, "_grid_quadrature", spy)
    default = estimate_poses(table, volume, PX, EstimateConfig(**config)).estimates
    monkeypatch.setattr(estimate_module, "_grid_quadrature", lambda grid, ll, lp, keep=None: (
        estimate_module._Quadrature(grid.matrices.double(), ll.double(),
                                    torch.log(grid.weights.double()).expand(ll.shape[0], -1)
                                    .clone(), lp.double().expand(ll.shape[0], -1).clone())))
    shared = estimate_poses(table, volume, PX, EstimateConfig(**config)).estimates
    # per-particle points for sharp posteriors, the shared grid for broad ones, both at 0.2
    assert layouts == {1.0: [False], 0.2: [False, True], 0.05: [True]}[snr]
    for name in ("rotations_mmse", "rotations_map", "shifts_mmse_px", "expected_loss",
                 "credible_radius_deg", "mass_outside_20deg"):
        torch.testing.assert_close(getattr(default, name), getattr(shared, name), rtol=1e-4,
                                   atol=1e-4, msg=name)


@pytest.mark.parametrize("shifts", [False, True])
def test_a_constant_error_of_the_grid_scores_does_not_change_the_refined_posterior(
    tmp_path, monkeypatch, shifts
):
    # The refined posterior mixes the global grid's values (in-plane FFT path) with exactly
    # scored points; each image's grid values are first put on the exact scale (their offset
    # at the refinement starts removed). So a constant added to one image's grid scores, the
    # kind of error the polar path's ring quadrature makes, changes nothing; without that
    # correction it moves each grid mode's mass by e^6 against the polished modes.
    from cryopose.bayes.scoring import ReferenceScorer

    table, volume = simulated(tmp_path, 0.05, 12, seed=5, max_shift_angstrom=6.0 * shifts)
    config = EstimateConfig(grid_order=1, shift_range_angstrom=6.0 * shifts,
                            shift_step_angstrom=6.0)
    reference = estimate_poses(table, volume, PX, config).estimates
    original = ReferenceScorer.score_grid

    def offset_grid(self, images, *args, **kwargs):
        out = original(self, images, *args, **kwargs)
        return out + torch.linspace(-6.0, 6.0, images.shape[0], dtype=out.dtype)[:, None, None]

    monkeypatch.setattr(ReferenceScorer, "score_grid", offset_grid)
    moved = estimate_poses(table, volume, PX, config).estimates
    assert float(reference.mass_outside_20deg.max()) > 0.01  # (multimodal posteriors here)
    for name in ("rotations_mmse", "rotations_map", "expected_loss", "credible_radius_deg",
                 "mass_outside_20deg", "max_probability"):
        torch.testing.assert_close(getattr(moved, name), getattr(reference, name), rtol=1e-4,
                                   atol=1e-4, msg=name)


def test_output_table_keeps_columns_and_adds_uncertainty(tmp_path):
    table, volume = simulated(tmp_path, 1.0, 16, max_shift_angstrom=6.0)
    table.data["rlnMyOwnColumn"] = range(16)
    result = estimate_poses(
        table,
        volume,
        PX,
        EstimateConfig(grid_order=1, refine_levels=1, shift_range_angstrom=6.0, method="map"),
    )
    out = result.table
    assert "rlnMyOwnColumn" in out.data and list(out.data["rlnMyOwnColumn"]) == list(range(16))
    for column in OUTPUT_COLUMNS.values():
        assert column in out.data.columns
    maxprob = out.data["rlnMaxValueProbDistribution"]
    assert ((maxprob > 0) & (maxprob <= 1)).all()
    assert (out.data["rlnCryoposeExpectedLoss"] >= 0).all()
    # angles are the MAP estimate, origins follow RELION's sign (origin = -shift * px)
    est = result.estimates
    got = out.rotations()
    assert compare_poses(got, est.rotations_map.double()).max_deg < 1e-4
    expected_origins = -est.shifts_map_px.double() * PX
    assert torch.allclose(out.origins_angstrom(), expected_origins, atol=1e-6)
    # and the origins are right: the shift RMSE against the truth is below a pixel
    rmse = (out.origins_angstrom() - table.origins_angstrom()).norm(dim=-1).pow(2).mean().sqrt()
    assert rmse < PX


@pytest.mark.slow
def test_mmse_beats_mle_at_low_snr(tmp_path):
    """The Bayes property for the chordal loss (issue 4): MMSE's mean squared chordal error is
    lower than MLE's where MLE's median error exceeds the grid spacing."""
    table, volume = simulated(tmp_path, 0.02, 300, seed=3)
    result = estimate_poses(table, volume, PX, EstimateConfig(grid_order=1, local_refine=False))
    truth = table.rotations()
    mle = compare_poses(result.estimates.rotations_mle.double(), truth)
    mmse = compare_poses(result.estimates.rotations_mmse.double(), truth)
    assert mle.median_deg > 30.0
    assert mmse.chordal_mse < mle.chordal_mse


def test_cli_estimate_and_bad_input(tmp_path):
    runner = CliRunner()
    sim = tmp_path / "cli"
    result = runner.invoke(app, ["simulate", "-o", str(sim), "--model", "unused.pdb"])
    assert result.exit_code == 1 and "unused.pdb" in result.stderr  # missing model file
    config = SimulationConfig(n=8, box=BOX, pixel_size_angstrom=PX, snr=math.inf)
    simulate_particles(config, sim, volume=blob_volume(BOX))
    out = tmp_path / "est.star"
    args = [
        "estimate",
        str(sim / "particles.star"),
        "--reference",
        str(sim / "reference.mrc"),
        "-o",
        str(out),
        "--grid-order",
        "1",
        "--noise-sigma",
        "1",
    ]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert len(read_star(out)) == 8
    bad = runner.invoke(app, [*args[:-2], "--method", "median"])
    assert bad.exit_code == 1 and "--method" in bad.stderr
    bad = runner.invoke(app, [*args[:3], str(tmp_path / "missing.mrc"), *args[4:]])
    assert bad.exit_code == 1 and "missing.mrc" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_ball_replacement_numba_and_torch_remove_the_same_grid_points(monkeypatch):
    # the grid points within each active centre's radius lose their weight; the numba ball
    # test (CPU) and the batched GEMM test agree
    from cryopose.bayes.estimate import _Quadrature
    from cryopose.so3.grids import healpix_grid
    from cryopose.so3.random import random_rotations

    grid = healpix_grid(1, dtype=torch.float64).matrices
    b, k = 5, 3
    centres = random_rotations(b * k, generator=4, dtype=torch.float64).reshape(b, k, 3, 3)
    radius = torch.deg2rad(torch.tensor([[20.0, 35.0, 50.0]] * b, dtype=torch.float64))
    active = torch.tensor([[True, True, False], [True, False, True], [False, False, False],
                           [True, True, True], [False, True, True]])
    new = centres[:, :, None].expand(b, k, 2, 3, 3).reshape(b, 2 * k, 3, 3)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CRYOPOSE_NUMBA", flag)
        quad = _Quadrature(grid, torch.zeros(b, len(grid), 1, dtype=torch.float64),
                           torch.zeros(b, len(grid), dtype=torch.float64),
                           torch.zeros(b, len(grid), dtype=torch.float64))
        quad.replace_ball(centres, radius, new, torch.zeros(b, 2 * k, 1, dtype=torch.float64),
                          torch.zeros(b, 2 * k, dtype=torch.float64), active=active)
        results.append(torch.isinf(quad.log_weights[:, : len(grid)]))
    assert torch.equal(results[0], results[1])
    # reference: geodesic distance to the active centres
    dist = torch.arccos(((torch.einsum("bkij,gij->bkg", centres, grid) - 1) / 2).clamp(-1, 1))
    inside = ((dist < radius[:, :, None]) & active[:, :, None]).any(1)
    margin = ((dist - radius[:, :, None]).abs() > 1e-4).all(1)  # off the balls' edges
    assert torch.equal(results[0][margin], inside[margin]) and int(inside.sum()) > 0
    assert not bool(results[0][2].any())  # no active centre: nothing removed


def test_load_cpu_kernels_reports_whether_numba_runs(monkeypatch):
    from cryopose.bayes.estimate import load_cpu_kernels

    assert load_cpu_kernels() is True
    monkeypatch.setenv("CRYOPOSE_NUMBA", "0")
    assert load_cpu_kernels() is False
