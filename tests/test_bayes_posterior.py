"""Posterior summaries: MLE, MAP, MMSE, uncertainty, shifts, symmetry (bayes.posterior)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar

from cryopose.bayes import posterior as posterior_module
from cryopose.bayes.posterior import (
    PoseEstimates,
    estimate_grid_spacing_deg,
    marginalize_shifts,
    rotation_log_posterior,
    summarize_posterior,
    top_candidates,
)
from cryopose.so3.conversions import axis_angle_to_matrix, matrix_to_rotvec, rotvec_to_matrix
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.grids import healpix_grid
from cryopose.so3.symmetry import point_group, symmetric_geodesic_distance


def rz(deg: float, dtype=torch.float64) -> torch.Tensor:
    return axis_angle_to_matrix(
        torch.tensor([0.0, 0.0, 1.0], dtype=dtype), torch.tensor(math.radians(deg), dtype=dtype)
    )


def tol(dtype: torch.dtype, f32: float, f64: float) -> float:
    return f32 if dtype == torch.float32 else f64


def chordal_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum(dim=(-1, -2))


def test_concentrated_posterior_gives_that_point_everywhere(dtype):
    grid = healpix_grid(1, dtype=dtype)
    n = len(grid)
    k = 123
    ll = torch.full((2, n, 1), -1.0e4, dtype=dtype)
    ll[:, k] = 0.0
    ll[1] = torch.where(torch.arange(n)[:, None] == k, 0.0, -math.inf).to(dtype)
    est = summarize_posterior(ll, grid)
    target = grid.matrices[k]
    for rot in (est.rotations_mle, est.rotations_map, est.rotations_mmse):
        assert torch.allclose(rot, target.expand(2, 3, 3), atol=tol(dtype, 1e-5, 1e-12))
    assert (est.index_mle == k).all() and (est.index_map == k).all()
    assert (est.expected_loss < tol(dtype, 1e-5, 1e-12)).all()
    assert torch.allclose(est.max_probability, torch.ones(2, dtype=dtype))
    assert (est.credible_radius_deg < tol(dtype, 0.1, 1e-5)).all()
    assert (est.mass_outside_20deg < 1e-6).all() and (est.map_mass_outside_20deg < 1e-6).all()
    # Evidence of a one-point posterior: log(q_k) + log-likelihood 0.
    assert torch.allclose(est.log_evidence[1], torch.tensor(-math.log(n), dtype=torch.float64))
    # Candidates: the point itself first, then distinct points at least 2 in-plane steps away.
    cand = est.top_candidates
    assert (cand[:, 0] == k).all()
    chosen = grid.matrices[cand[0, :2]]
    assert math.degrees(float(geodesic_distance(chosen[0], chosen[1]))) >= 2 * 30.0 - 1e-3
    assert (cand[1] == -1).sum() == 3  # only one point has non-zero mass in row 1


def test_two_equal_modes_midpoint_candidates_and_masses():
    a = haar(1, seed=3)[0]
    b = a @ rotvec_to_matrix(torch.tensor([0.0, math.pi / 2, 0.0], dtype=torch.float64))
    others = haar(300, seed=4)
    rotations = torch.cat([others, a[None], b[None]])
    ll = torch.full((1, rotations.shape[0]), -math.inf, dtype=torch.float64)
    ll[0, -2:] = 0.0
    est = summarize_posterior(ll, rotations, min_separation_deg=10.0)
    # Geodesic midpoint A exp(log(A^T B) / 2) = projection of (A + B) / 2.
    midpoint = a @ rotvec_to_matrix(0.5 * matrix_to_rotvec(a.T @ b))
    assert torch.allclose(est.rotations_mmse[0], midpoint, atol=1e-12)
    assert abs(float(est.mass_outside_20deg[0]) - 1.0) < 1e-12  # both modes 45 deg away
    assert abs(float(est.map_mass_outside_20deg[0]) - 0.5) < 1e-12
    assert abs(float(est.credible_radius_deg[0]) - 45.0) < 1e-6
    assert set(est.top_candidates[0, :2].tolist()) == {300, 301}
    assert (est.top_candidates[0, 2:] == -1).all()
    assert abs(float(est.max_probability[0]) - 0.5) < 1e-12


def test_credible_radius_and_cone_mass_on_known_posterior():
    r0 = haar(1, seed=5)[0]
    angles = [0.0, 10.0, -10.0, 30.0, -30.0]
    masses = torch.tensor([0.5, 0.2, 0.2, 0.05, 0.05], dtype=torch.float64)
    rotations = torch.stack([r0 @ rz(a) for a in angles])
    ll = torch.log(masses)[None]
    est = summarize_posterior(ll, rotations, credible_mass=0.9)
    assert geodesic_distance(est.rotations_mmse[0], r0) < 1e-10  # symmetric about r0
    assert abs(float(est.credible_radius_deg[0]) - 10.0) < 1e-6
    est95 = summarize_posterior(ll, rotations, credible_mass=0.95)
    assert abs(float(est95.credible_radius_deg[0]) - 30.0) < 1e-6
    assert abs(float(est.mass_outside_20deg[0]) - 0.1) < 1e-12
    loss = (masses * chordal_loss(rotations, r0)).sum()
    assert torch.allclose(est.expected_loss[0], loss)


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_loss_formula_and_mmse_is_bayes_optimal(seed, dtype):
    grid = healpix_grid(1, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    ll = (torch.randn(3, len(grid), generator=g, dtype=torch.float64) * 4).to(dtype)
    est = summarize_posterior(ll, grid)
    p = torch.exp(rotation_log_posterior(ll))  # [3, G] float64
    rot64 = grid.matrices.to(torch.float64)
    mmse = est.rotations_mmse.to(torch.float64)
    brute = (p * chordal_loss(rot64[None], mmse[:, None])).sum(1)
    assert torch.allclose(est.expected_loss.double(), brute, atol=tol(dtype, 2e-5, 1e-10))
    mean = torch.einsum("bg,gij->bij", p, rot64)
    formula = 6 - 2 * (mmse * mean).sum(dim=(1, 2))
    assert torch.allclose(brute, formula, atol=1e-10)
    # No probe rotation has lower posterior expected chordal loss than the MMSE estimate.
    nearby = mmse[:, None] @ rotvec_to_matrix(
        0.05 * torch.randn(3, 50, 3, generator=g, dtype=torch.float64)
    )
    probes = torch.cat([haar(200, seed=10 + seed), nearby.reshape(-1, 3, 3)])
    for b in range(3):
        probe_loss = (p[b] * chordal_loss(rot64[None], probes[:, None])).sum(1)
        assert float(probe_loss.min()) >= float(brute[b]) - tol(dtype, 1e-5, 1e-12)
    # The posterior maximum is the largest posterior grid probability.
    assert torch.allclose(est.max_probability.double(), p.amax(1), atol=tol(dtype, 1e-6, 1e-12))


def test_prior_moves_map_and_mmse_uniform_prior_changes_nothing():
    grid = healpix_grid(2)
    rot = grid.matrices
    prior_mean = haar(1, seed=8)[0]
    observed = haar(1, seed=9)[0]
    ll = (-chordal_loss(rot, observed) / (2 * 0.6**2))[None]
    plain = summarize_posterior(ll, grid)
    uniform = summarize_posterior(ll, grid, log_prior=torch.zeros(len(grid)))
    assert torch.equal(plain.index_map, plain.index_mle)
    assert torch.equal(uniform.index_map, plain.index_mle)
    assert torch.allclose(uniform.rotations_mmse, plain.rotations_mmse, atol=1e-12)
    # A strong IG-like prior (log density -d^2 / (2 * 0.2^2)) about prior_mean.
    log_prior = -geodesic_distance(rot, prior_mean) ** 2 / (2 * 0.2**2)
    strong = summarize_posterior(ll, grid, log_prior=log_prior)
    assert int(strong.index_map) != int(strong.index_mle)
    assert int(strong.index_mle) == int(plain.index_mle)
    d_plain = geodesic_distance(plain.rotations_mmse, prior_mean)
    d_strong = geodesic_distance(strong.rotations_mmse, prior_mean)
    assert float(d_strong) < float(d_plain) - 0.1
    assert float(geodesic_distance(strong.rotations_map, prior_mean)) < float(
        geodesic_distance(plain.rotations_map, prior_mean)
    )


@pytest.mark.parametrize("offset", [1.0e6, -1.0e6])
def test_log_likelihood_offsets_change_nothing(offset, dtype):
    grid = healpix_grid(1, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    # Multiples of 1/16 so that adding 1e6 is exact in float32 too.
    ll = torch.round(torch.randn(4, len(grid), 3, generator=g) * 64) / 16
    shifts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0]], dtype=dtype)
    a = summarize_posterior(ll.to(dtype), grid, shifts)
    b = summarize_posterior((ll + offset).to(dtype), grid, shifts)
    for name in ("index_mle", "index_map", "top_candidates"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for name in ("rotations_mmse", "shifts_mmse_px", "expected_loss", "max_probability",
                 "credible_radius_deg", "mass_outside_20deg"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=tol(dtype, 1e-5, 1e-12))
    assert torch.allclose(b.log_evidence.double() - a.log_evidence.double(),
                          torch.full((4,), offset, dtype=torch.float64), rtol=0, atol=1e-3)


def test_huge_log_likelihood_differences_do_not_overflow(dtype):
    grid = healpix_grid(1, dtype=dtype)
    k = 77
    d2 = chordal_loss(grid.matrices, grid.matrices[k])
    ll = (-1.0e6 * d2)[None].to(dtype)  # differences of ~1e6 between neighbours
    est = summarize_posterior(ll, grid)
    for f in ("rotations_mmse", "expected_loss", "log_evidence", "credible_radius_deg"):
        assert torch.isfinite(getattr(est, f)).all()
    assert int(est.index_map) == k
    assert torch.allclose(est.rotations_mmse[0], grid.matrices[k], atol=tol(dtype, 1e-5, 1e-12))


def test_mmse_beats_mle_on_synthetic_posteriors():
    """Truth drawn from the grid (the prior is exact), observation Y = R + noise."""
    grid = healpix_grid(1)
    rot = grid.matrices
    g = torch.Generator().manual_seed(11)
    n, sigma = 600, 0.4
    truth = rot[torch.randint(0, len(grid), (n,), generator=g)]
    observed = truth + sigma * torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    ll = -chordal_loss(observed[:, None], rot[None]) / (2 * sigma**2)
    est = summarize_posterior(ll, grid)
    err_mle = chordal_loss(est.rotations_mle, truth).mean()
    err_mmse = chordal_loss(est.rotations_mmse, truth).mean()
    assert float(err_mmse) < 0.9 * float(err_mle)
    # Calibration: the mean expected loss predicts the measured mean squared chordal error.
    ratio = float(est.expected_loss.mean() / err_mmse)
    assert 0.9 < ratio < 1.1


def test_point_group_copies_do_not_collapse_the_mean(dtype):
    grid = healpix_grid(2, dtype=dtype)
    rot = grid.matrices.to(torch.float64)
    group = point_group("C4")
    r0 = haar(1, seed=21)[0]
    copies = group.transpose(-1, -2) @ r0  # g^T R0
    ll = torch.logsumexp(-chordal_loss(rot[:, None], copies[None]) / (2 * 0.15**2), dim=1)
    ll = ll[None].to(dtype)
    plain = summarize_posterior(ll, grid)
    sym = summarize_posterior(ll, grid, group="C4")
    spacing = grid.inplane_step_deg
    d_sym = math.degrees(float(symmetric_geodesic_distance(sym.rotations_mmse.double(), r0, group)))
    assert d_sym < spacing / 2
    # The plain mean of the four copies collapses to the rank-1 matrix e_z e_z^T R0: its
    # projection is arbitrary about z and its expected loss is about 6 - 2 = 4.
    assert float(sym.expected_loss) < 0.2
    assert float(plain.expected_loss) > 3.5
    assert float(sym.mass_outside_20deg) < 0.01 < 0.5 < float(plain.mass_outside_20deg)
    # Candidates are distinct modulo the group: the best is a copy of r0, none is a copy of it.
    cand = sym.top_candidates[0]
    first = grid.matrices[cand[0]].double()
    others = grid.matrices[cand[1:]].double()
    assert math.degrees(float(symmetric_geodesic_distance(first, r0, group))) < spacing
    sep = symmetric_geodesic_distance(others, first.expand_as(others), group)
    assert (torch.rad2deg(sep) >= 2 * spacing - 1e-3).all()


def test_shift_marginalisation_and_mmse_shift(dtype):
    grid = healpix_grid(0, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    n_rot, n_shift = len(grid), 5
    shifts = torch.tensor([[0, 0], [1, 0], [-1, 0], [0, 2], [0.5, -1.5]], dtype=dtype)
    ll = (torch.randn(2, n_rot, n_shift, generator=g, dtype=torch.float64) * 3).to(dtype)
    est = summarize_posterior(ll, grid, shifts)
    joint = torch.softmax(ll.double().reshape(2, -1), 1).reshape(2, n_rot, n_shift)
    p_rot = joint.sum(2)
    p_shift = joint.sum(1)
    t = tol(dtype, 2e-5, 1e-12)
    assert torch.allclose(est.shifts_mmse_px.double(), p_shift @ shifts.double(), atol=t)
    spread = (p_shift @ (shifts.double() ** 2).sum(1)) - (est.shifts_mmse_px.double() ** 2).sum(1)
    assert torch.allclose(est.shift_rms_px.double(), spread.clamp_min(0).sqrt(), atol=1e-4)
    assert torch.allclose(est.max_probability.double(), p_rot.amax(1), atol=t)
    mean = torch.einsum("bg,gij->bij", p_rot, grid.matrices.double())
    assert torch.allclose(est.expected_loss.double(),
                          6 - 2 * (est.rotations_mmse.double() * mean).sum((1, 2)), atol=t)
    flat_idx = ll.reshape(2, -1).argmax(1)
    assert torch.equal(est.index_mle, flat_idx // n_shift)
    assert torch.equal(est.shifts_mle_px, shifts[flat_idx % n_shift])
    # marginalize_shifts / rotation_log_posterior agree with the brute-force marginal.
    assert torch.allclose(
        torch.exp(rotation_log_posterior(ll)), p_rot, atol=tol(dtype, 1e-6, 1e-12)
    )
    lse = torch.logsumexp(ll.double(), 2) - math.log(n_shift)
    assert torch.allclose(marginalize_shifts(ll).double(), lse, atol=tol(dtype, 1e-5, 1e-12))
    # Per-particle shift sets [B, T, 2] equal to the shared set give the same answer.
    per = summarize_posterior(ll, grid, shifts.expand(2, n_shift, 2))
    assert torch.allclose(per.shifts_mmse_px, est.shifts_mmse_px)
    # A shift prior that excludes shift 0 moves the MAP shift off it.
    log_shift_prior = torch.tensor([-math.inf, 0, 0, 0, 0])
    excl = summarize_posterior(ll, grid, shifts, log_shift_prior=log_shift_prior)
    assert not (excl.shifts_map_px == 0).all(dim=1).any()


def test_per_particle_rotation_sets_are_equivariant(dtype):
    grid = healpix_grid(1, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    ll = (torch.randn(3, len(grid), generator=g, dtype=torch.float64) * 3).to(dtype)
    shared = summarize_posterior(ll, grid)
    q = haar(3, seed=30, dtype=dtype)
    local = q[:, None] @ grid.matrices[None]  # [B, G, 3, 3]: rotation set Q_b R_g
    per = summarize_posterior(ll, local, min_separation_deg=60.0)
    t = tol(dtype, 1e-4, 1e-10)
    assert torch.allclose(per.rotations_mmse, q @ shared.rotations_mmse, atol=t)
    assert torch.allclose(per.rotations_mle, q @ shared.rotations_mle, atol=t)
    assert torch.allclose(per.expected_loss, shared.expected_loss, atol=t)
    assert torch.allclose(per.credible_radius_deg, shared.credible_radius_deg, atol=0.1)
    assert torch.equal(per.top_candidates, shared.top_candidates)


def test_chunking_and_sparse_path_give_identical_results(monkeypatch):
    grid = healpix_grid(1)
    g = torch.Generator().manual_seed(7)
    # Mixed widths: row 0 broad (dense path), rows 1-2 sharp (sparse path).
    ll = torch.randn(3, len(grid), generator=g, dtype=torch.float64) * torch.tensor(
        [[1.0], [60.0], [200.0]], dtype=torch.float64
    )
    whole = summarize_posterior(ll, grid, group="D2")
    monkeypatch.setattr(posterior_module, "_CHUNK_ELEMENTS", 1)
    rows = summarize_posterior(ll, grid, group="D2")
    parts = PoseEstimates.concatenate([summarize_posterior(ll[i : i + 1], grid, group="D2")
                                       for i in range(3)])
    for other in (rows, parts):
        assert torch.allclose(other.rotations_mmse, whole.rotations_mmse, atol=1e-12)
        assert torch.allclose(other.credible_radius_deg, whole.credible_radius_deg, atol=1e-4)
        assert torch.equal(other.top_candidates, whole.top_candidates)


@pytest.mark.parametrize("group", [None, "C2"])
@pytest.mark.parametrize("widths", [(1.0, 60.0, 200.0), (0.5, 0.5, 0.5)])
def test_grid_plus_extra_points_equal_the_materialised_rotation_sets(group, widths, monkeypatch):
    # ([G0, 3, 3] shared, [B, E, 3, 3] per particle) must summarise exactly like the
    # concatenated per-particle rotation sets [B, G0 + E, 3, 3], on the dense and the sparse
    # path, with shifts, a prior, quadrature weights, a point group and several chunks
    grid = healpix_grid(1, dtype=torch.float64)
    b, e, t = 3, 7, 2
    g = torch.Generator().manual_seed(11)
    extra = haar(b * e, seed=31).reshape(b, e, 3, 3)
    n = len(grid) + e
    ll = torch.randn(b, n, t, generator=g, dtype=torch.float64) * torch.tensor(widths)[:, None,
                                                                                   None]
    ll[:, len(grid) + 2] += 5.0  # an extra point holds the MAP
    shifts = torch.tensor([[0.0, 0.0], [1.0, -0.5]], dtype=torch.float64)
    lq = torch.log(torch.rand(b, n, generator=g, dtype=torch.float64) + 0.1)
    lq[0, 5] = -math.inf  # a removed grid point
    lp = torch.randn(b, n, generator=g, dtype=torch.float64) * 0.3
    full = torch.cat([grid.matrices.expand(b, -1, -1, -1), extra], dim=1)
    kwargs = dict(log_prior=lp, log_quadrature_weights=lq, group=group, min_separation_deg=40.0)
    monkeypatch.setattr(posterior_module, "_CHUNK_ELEMENTS", 2 * n * 9)
    reference = summarize_posterior(ll, full, shifts, **kwargs)
    mixed = summarize_posterior(ll, (grid.matrices, extra), shifts, **kwargs)
    for name in ("rotations_mle", "rotations_map", "rotations_mmse", "shifts_mmse_px",
                 "expected_loss", "max_probability", "credible_radius_deg",
                 "mass_outside_20deg", "log_evidence"):
        torch.testing.assert_close(getattr(mixed, name), getattr(reference, name), rtol=0,
                                   atol=1e-10, msg=name)
    for name in ("top_candidates", "index_mle", "index_map"):
        assert torch.equal(getattr(mixed, name), getattr(reference, name)), name
    assert bool((reference.index_map >= len(grid)).any())  # the extra gather path is used
    with pytest.raises(ValueError, match="rotations"):
        summarize_posterior(ll, (grid.matrices, extra[:, :-1]), shifts)


@pytest.mark.parametrize("group", [None, "D2"])
def test_top_candidates_equal_the_summary_candidates(group):
    grid = healpix_grid(1, dtype=torch.float64)
    g = torch.Generator().manual_seed(12)
    ll = torch.randn(4, len(grid), 3, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 5.0, 30.0, 200.0], dtype=torch.float64)[:, None, None]
    shifts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    lp = torch.randn(len(grid), generator=g, dtype=torch.float64)
    full = summarize_posterior(ll, grid, shifts, log_prior=lp, group=group, n_candidates=3)
    light = top_candidates(ll, grid, log_prior=lp, group=group, n_candidates=3)
    assert torch.equal(light, torch.where(full.top_candidates < 0, full.top_candidates[:, :1],
                                          full.top_candidates))
    # a prior that forbids the best candidate moves it
    lp2 = lp.clone()
    lp2[light[:, 0]] = -math.inf
    moved = top_candidates(ll, grid, log_prior=lp2, group=group, n_candidates=3)
    assert not bool((moved[:, 0] == light[:, 0]).any())
    bad = ll.clone()
    bad[2] = -math.inf
    with pytest.raises(ValueError, match="particle 2"):
        top_candidates(bad, grid, n_candidates=3)


def test_grid_spacing_estimate_matches_healpix_steps():
    for order, step in ((1, 30.0), (2, 15.0)):
        spacing = estimate_grid_spacing_deg(healpix_grid(order).matrices)
        assert 0.6 * step < spacing <= 1.05 * step


def test_bad_inputs_raise_one_clear_error():
    grid = healpix_grid(0)
    ll = torch.zeros(2, len(grid))
    with pytest.raises(ValueError, match="rotations"):
        summarize_posterior(ll, grid.matrices[:10])
    with pytest.raises(ValueError, match="shifts_px"):
        summarize_posterior(torch.zeros(2, len(grid), 3), grid)
    with pytest.raises(ValueError, match="log_prior"):
        summarize_posterior(ll, grid, log_prior=torch.zeros(5))
    bad = ll.clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="particle 1"):
        summarize_posterior(bad, grid)
    with pytest.raises(ValueError, match="particle 0"):
        summarize_posterior(torch.full((1, len(grid)), -math.inf), grid)
    with pytest.raises(ValueError, match="credible_mass"):
        summarize_posterior(ll, grid, credible_mass=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_credible_radius_numba_rows_equal_the_torch_histogram(dtype, monkeypatch):
    # broad posteriors take the dense path, where the CPU runs the fused numba kernel
    grid = healpix_grid(1, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    ll = (torch.randn(6, len(grid), generator=g, dtype=torch.float64)
          * torch.tensor([[0.3], [1.0], [2.0], [3.0], [0.0], [1.5]], dtype=torch.float64)).to(dtype)
    for mass in (0.5, 0.9):
        fast = summarize_posterior(ll, grid, credible_mass=mass)
        monkeypatch.setenv("CRYOPOSE_NUMBA", "0")
        slow = summarize_posterior(ll, grid, credible_mass=mass)
        monkeypatch.delenv("CRYOPOSE_NUMBA")
        # same bins, so the same radius (a point on a bin edge may round to either side)
        assert torch.allclose(fast.credible_radius_deg, slow.credible_radius_deg, atol=0.05)
        assert torch.allclose(fast.mass_outside_20deg, slow.mass_outside_20deg,
                              atol=tol(dtype, 1e-5, 1e-10))
    # a flat posterior: 90 % of the mass needs a radius near the top of the range
    assert float(fast.credible_radius_deg[4]) > 100.0
