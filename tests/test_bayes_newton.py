"""Gauss-Newton pose polishing, the projector's gradient, and the Laplace cubature."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.bayes.newton import (
    _merge_starts,
    band_schedule,
    gauss_newton_poses,
    laplace_cubature,
)
from cryopose.bayes.scoring import ReferenceScorer
from cryopose.imaging import Projector
from cryopose.so3.conversions import matrix_to_rotvec, rotvec_to_matrix
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.grids import healpix_grid
from cryopose.so3.random import random_rotations


def _blob_volume(n: int, dtype: torch.dtype) -> torch.Tensor:
    """An asymmetric cluster of Gaussian blobs (no rotational symmetry)."""
    ax = torch.arange(n, dtype=dtype) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    centres = [(0.0, 0.0, 0.0, 1.0), (4.0, -2.0, 1.0, 0.7), (-3.0, 3.0, -2.0, 0.5),
               (1.0, 5.0, 3.0, 0.4), (-1.0, -4.0, 4.0, 0.6)]
    vol = torch.zeros(n, n, n, dtype=dtype)
    for cx, cy, cz, a in centres:
        vol += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 1.6**2))
    return vol


@pytest.mark.parametrize("n", [32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projector_gradient_matches_the_analytic_transform(n, dtype):
    # v = exp(-|x - c|^2 / 2 s^2): V(q) = A exp(-2 pi^2 s^2 |q|^2 / N^2 - 2 pi i q.c / N)
    s = 2.0
    c = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)  # (x, y, z)
    ax = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    v = torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    projector = Projector(v.to(dtype))
    q = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    values, gradient = projector.sample_with_gradient(q.to(dtype))
    amp = v.sum() * torch.exp(-2 * math.pi**2 * s * s * (q**2).sum(-1) / n**2)
    expected = amp * torch.exp(-2j * math.pi * (q @ c) / n)
    expected_grad = expected[:, None] * (-4 * math.pi**2 * s * s * q / n**2 - 2j * math.pi * c / n)
    assert values.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    assert (values - expected).abs().max() < 0.01 * expected.abs().max()

    # The gradient is the derivative of the trilinear interpolant (piecewise bilinear): its
    # least-squares gain against the true derivative is 1 within 1% and its rms error ~10%
    # (first-order in the half-pixel spacing of the padded grid); swapping two axes (a
    # convention slip) gives a gain of -0.36 and an rms error of 165%.
    def gain_and_rms(g):
        g, e = g.to(torch.complex128).reshape(-1), expected_grad.reshape(-1)
        gain = torch.vdot(e, g) / torch.vdot(e, e)
        return complex(gain), float(((g - e).abs().pow(2).mean() / e.abs().pow(2).mean()).sqrt())

    gain, rms = gain_and_rms(gradient)
    assert abs(gain - 1.0) < 0.015 and rms < 0.15
    gain, rms = gain_and_rms(gradient[:, [1, 0, 2]])
    assert abs(gain - 1.0) > 0.5 and rms > 1.0


@pytest.mark.parametrize("n", [32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projector_gradient_is_the_derivative_of_the_values(n, dtype):
    # Inside a cell of the padded grid the interpolant is linear along each axis, so a central
    # difference of the returned values equals the returned gradient exactly (to rounding).
    vol = _blob_volume(n, torch.float64).to(dtype)
    projector = Projector(vol)
    g = torch.Generator().manual_seed(1)
    q = (torch.rand(400, 3, generator=g, dtype=torch.float64) - 0.5) * n * 0.9
    cell = q * (projector.padded_box / n)
    eps_padded = 1e-3
    frac = cell - torch.floor(cell)
    inside = ((frac > 2 * eps_padded) & (frac < 1 - 2 * eps_padded)).all(-1)
    q = q[inside].to(dtype)
    eps = eps_padded * n / projector.padded_box
    _, gradient = projector.sample_with_gradient(q)
    scale = float(gradient.abs().max())
    tol = 1e-9 if dtype == torch.float64 else 3e-2
    for axis in range(3):
        step = torch.zeros(3, dtype=dtype)
        step[axis] = eps
        plus, _ = projector.sample_with_gradient(q + step)
        minus, _ = projector.sample_with_gradient(q - step)
        numeric = (plus - minus) / (2 * eps)
        assert float((numeric - gradient[:, axis]).abs().max()) < tol * scale


@pytest.mark.parametrize("n", [32, 33])
def test_gradient_table_values_equal_the_slices_and_vanish_outside(n):
    # the channels-last gather must interpolate exactly as the slices' grid_sample path
    vol = _blob_volume(n, torch.float64)
    projector = Projector(vol)
    rot = random_rotations(3, generator=2, dtype=torch.float64)
    slices = projector.slices(rot)  # [3, N, N // 2 + 1]
    ky = torch.arange(n, dtype=torch.float64) - n // 2
    kx = torch.arange(n // 2 + 1, dtype=torch.float64)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    inside = gx**2 + gy**2 < (n / 2) ** 2
    q = rot[:, None, :, 0] * gx[inside][None, :, None] + rot[:, None, :, 1] * gy[inside][
        None, :, None
    ]
    values, _ = projector.sample_with_gradient(q)
    torch.testing.assert_close(values, slices[:, inside], rtol=0, atol=1e-10)
    far = torch.tensor([[3.0 * n, 0, 0], [0, -2.0 * n, 0.5]], dtype=torch.float64)
    values, gradient = projector.sample_with_gradient(far)
    assert values.abs().max() == 0 and gradient.abs().max() == 0


def test_band_schedule_starts_coarse_and_ends_full():
    bands = band_schedule(7.5, 64)
    assert bands[0] == pytest.approx(1.0 / math.radians(7.5))
    finite = [b for b in bands if math.isfinite(b)]
    # 7.6, 10.8, 15.3, 21.6, 30.6 (< 32), then the full band twice
    assert finite == pytest.approx([bands[0] * math.sqrt(2.0) ** i for i in range(5)])
    assert bands[len(finite):] == [math.inf] * 2
    assert band_schedule(7.5, 64, full_iterations=2, growth=2.0)[3:] == [math.inf] * 3
    with pytest.raises(ValueError, match="start_error_deg"):
        band_schedule(0.0, 64)
    with pytest.raises(ValueError, match="growth"):
        band_schedule(7.5, 64, growth=1.0)


@pytest.mark.parametrize("n", [32, 33])
def test_gauss_newton_recovers_noiseless_poses(n):
    torch.manual_seed(0)
    vol = _blob_volume(n, torch.float64)
    scorer = ReferenceScorer(vol, 4.0, dtype=torch.float64)
    truth = random_rotations(6, generator=1, dtype=torch.float64)
    images = Projector(vol).images(truth)
    g = torch.Generator().manual_seed(2)
    axis = torch.randn(6, 3, generator=g, dtype=torch.float64)
    start = truth @ rotvec_to_matrix(axis / axis.norm(dim=-1, keepdim=True) * math.radians(6.0))
    res = gauss_newton_poses(scorer, images, None, 1e-4, start[:, None], start_error_deg=6.0)
    err = torch.rad2deg(geodesic_distance(res.rotations[:, 0], truth))
    assert err.max() < 0.02
    # the value is the scorer's own log-likelihood at the result
    exact = scorer.score_rotations(images, None, 1e-4, res.rotations)[:, 0, 0]
    assert torch.allclose(res.log_likelihood[:, 0], exact, rtol=1e-9, atol=1e-6)
    # H is positive definite and its inverse predicts the curvature of the log-likelihood
    h = res.hessian[:, 0]
    assert (torch.linalg.eigvalsh(h) > 0).all()
    delta = torch.tensor([0.002, -0.001, 0.0015], dtype=torch.float64)
    moved = res.rotations[:, 0] @ rotvec_to_matrix(delta)
    drop = exact - scorer.score_rotations(images, None, 1e-4, moved[:, None])[:, 0, 0]
    predicted = 0.5 * torch.einsum("i,bij,j->b", delta, h, delta)
    assert torch.allclose(drop, predicted, rtol=0.1)


def test_merge_starts_greedy_by_value_and_pruning():
    eye = torch.eye(3, dtype=torch.float64)
    small = rotvec_to_matrix(torch.tensor([0.0, 0.0, math.radians(0.5)], dtype=torch.float64))
    far = rotvec_to_matrix(torch.tensor([math.radians(40.0), 0.0, 0.0], dtype=torch.float64))
    # image 0: starts 0 and 2 share a basin (0.5 deg apart, 2 is better), 1 is far away
    # image 1: all distinct; start 2 is hopeless (upper bound 30 nats below the best)
    rot = torch.stack([torch.stack([eye, far, small]), torch.stack([eye, far, far @ far])])
    ll = torch.tensor([[1.0, 0.0, 2.0], [5.0, 4.0, -30.0]], dtype=torch.float64)
    shifts = torch.zeros(2, 3, 2, dtype=torch.float64)
    kept, alias = _merge_starts(rot, ll, shifts, math.radians(1.0))
    assert torch.nonzero(kept).reshape(-1).tolist() == [1, 2, 3, 4, 5]
    assert alias.tolist() == [2, 1, 2, 3, 4, 5]
    kept, alias = _merge_starts(rot, ll, shifts, math.radians(1.0), upper=ll + 1.0,
                                prune_nats=20.0)
    assert torch.nonzero(kept).reshape(-1).tolist() == [1, 2, 3, 4]
    assert alias.tolist() == [2, 1, 2, 3, 4, 3]  # the hopeless start takes the best's result
    # different shifts never merge
    shifted = shifts.clone()
    shifted[0, 2] = 1.0
    kept, _ = _merge_starts(rot, ll, shifted, math.radians(1.0))
    assert bool(kept.all())
    # no radius: pruning only; a dead start is never kept nor a survivor
    alive = torch.tensor([[True, True, False], [True, True, True]])
    kept, alias = _merge_starts(rot, ll, shifts, None, alive=alive)
    assert torch.nonzero(kept).reshape(-1).tolist() == [0, 1, 3, 4, 5]
    assert alias[[0, 1, 3, 4, 5]].tolist() == [0, 1, 3, 4, 5]


def _noiseless_blob_case(n_images: int, seed: int):
    """float64 scorer of a 32-px blob, random true poses and their noiseless images."""
    vol = _blob_volume(32, torch.float64)
    scorer = ReferenceScorer(vol, 4.0, dtype=torch.float64)
    truth = random_rotations(n_images, generator=seed, dtype=torch.float64)
    return scorer, truth, Projector(vol).images(truth)


def test_gauss_newton_merged_and_pruned_starts_return_the_best_result():
    scorer, truth, images = _noiseless_blob_case(4, 7)
    g = torch.Generator().manual_seed(8)
    axis = torch.nn.functional.normalize(torch.randn(4, 3, 3, generator=g,
                                                     dtype=torch.float64), dim=-1)
    # starts 0 and 1: 5 deg from the truth (same basin); start 2: 90 deg away (hopeless)
    angles = torch.tensor([5.0, 5.0, 90.0], dtype=torch.float64).deg2rad()[None, :, None]
    starts = truth[:, None] @ rotvec_to_matrix(axis * angles)
    full = gauss_newton_poses(scorer, images, None, 1e-3, starts, start_error_deg=6.0,
                              merge=False, prune_nats=None)
    fast = gauss_newton_poses(scorer, images, None, 1e-3, starts, start_error_deg=6.0)
    best = full.log_likelihood.argmax(dim=1)
    rows = torch.arange(4)
    # the best polished result is unchanged ...
    assert torch.allclose(fast.log_likelihood.max(1).values, full.log_likelihood[rows, best],
                          rtol=1e-9, atol=1e-6)
    err = torch.rad2deg(geodesic_distance(fast.rotations[rows, fast.log_likelihood.argmax(1)],
                                          truth))
    assert err.max() < 0.02
    # ... and the hopeless start, never polished at the full band, returns the result of the
    # start that was best when it was dropped (both basin starts reach the same mode here)
    same = [torch.equal(fast.rotations[i, 2], fast.rotations[i, 0])
            or torch.equal(fast.rotations[i, 2], fast.rotations[i, 1]) for i in range(4)]
    assert all(same)
    assert torch.allclose(fast.log_likelihood[:, 2], fast.log_likelihood.max(1).values,
                          rtol=1e-9, atol=1e-3)
    assert bool((full.log_likelihood[:, 2] < full.log_likelihood.max(1).values - 20).all())


def test_gauss_newton_with_shift_and_ctf_is_calibrated():
    # SNR-limited: the spread of the errors matches tr(H^-1) (the Laplace posterior width)
    n = 32
    vol = _blob_volume(n, torch.float64)
    projector = Projector(vol)
    scorer = ReferenceScorer(vol, 4.0, dtype=torch.float64)
    b = 48
    truth = random_rotations(b, generator=3, dtype=torch.float64)
    shifts = torch.tensor([[1.5, -0.5]], dtype=torch.float64).expand(b, 2)
    from cryopose.imaging import ctf_2d, irfft2_centred, phase_shift_fourier
    ctf = ctf_2d(defocus_u_angstrom=15000.0, defocus_v_angstrom=14000.0, defocus_angle_deg=20.0,
                 voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=4.0,
                 box=n, dtype=torch.float64)
    clean_ft = phase_shift_fourier(projector.slices(truth), 1.5, -0.5, n)
    clean = irfft2_centred(clean_ft * ctf, n)
    sigma = 0.6 * clean.std()
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4),
                                        dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    axis = torch.randn(b, 3, generator=g, dtype=torch.float64)
    start = truth @ rotvec_to_matrix(axis / axis.norm(dim=-1, keepdim=True) * math.radians(4.0))
    res = gauss_newton_poses(scorer, noisy, ctf[None], float(sigma) ** 2, start[:, None],
                             shifts[:, None], start_error_deg=4.0)
    err2 = geodesic_distance(res.rotations[:, 0], truth) ** 2
    predicted = torch.diagonal(torch.linalg.inv(res.hessian[:, 0]), dim1=-2, dim2=-1).sum(-1)
    ratio = float(err2.mean() / predicted.mean())
    assert 0.6 < ratio < 1.6  # 48 chi^2_3-like draws: ~+-25% (2 sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_laplace_cubature_integrates_a_gaussian_mode(dtype):
    g = torch.Generator().manual_seed(0)
    centre = random_rotations(1, generator=g, dtype=torch.float64)[0]
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = (a @ a.T + 0.5 * torch.eye(3, dtype=torch.float64)) * math.radians(4.0) ** 2
    hessian = torch.linalg.inv(cov)
    points, log_w, sigma_max = laplace_cubature(centre.to(dtype), hessian.to(dtype))
    assert points.shape == (7, 3, 3) and log_w.shape == (7,)
    assert float(sigma_max) == pytest.approx(math.sqrt(float(torch.linalg.eigvalsh(cov)[-1])),
                                             rel=1e-4)
    # f(R) = exp(-w^T H w / 2) with R = centre exp(w): the rule is exact for this integrand
    w = matrix_to_rotvec(centre.T @ points.double())
    f = torch.exp(-0.5 * torch.einsum("pi,ij,pj->p", w, hessian, w))
    integral = float((log_w.double().exp() * f).sum())
    # reference: the same integral on a fine Haar quadrature (HEALPix order 4, 294,912 points)
    grid = healpix_grid(4, dtype=torch.float64)
    wg = matrix_to_rotvec(centre.T @ grid.matrices)
    fg = torch.exp(-0.5 * torch.einsum("pi,ij,pj->p", wg, hessian, wg))
    reference = float((grid.weights * fg).sum())
    assert integral == pytest.approx(reference, rel=0.03)
    # first and second moments of w: 0 and the covariance (degree <= 3 is exact)
    p = (log_w.double().exp() * f) / integral
    assert torch.allclose((p[:, None] * w).sum(0), torch.zeros(3, dtype=torch.float64),
                          atol=1e-6)
    second = torch.einsum("p,pi,pj->ij", p, w, w)
    assert torch.allclose(second, cov, rtol=0.02, atol=1e-7)


def test_second_chance_keeps_a_start_better_than_its_polished_result():
    # A continuation that ended far from a start whose own (exact) value is higher is redone
    # at the full band from the start; results already above their start are left alone.
    from cryopose.bayes.estimate import _second_chance
    from cryopose.bayes.newton import NewtonResult

    scorer, truth, images = _noiseless_blob_case(2, 3)
    g = torch.Generator().manual_seed(4)
    axis = torch.nn.functional.normalize(torch.randn(2, 3, generator=g, dtype=torch.float64),
                                         dim=-1)
    starts = (truth @ rotvec_to_matrix(axis * math.radians(2.0)))[:, None]  # [2, 1, 3, 3]
    exact = scorer.score_rotations(images, None, 1e-3, starts[:, 0, None])[:, 0, 0]
    far = truth @ rotvec_to_matrix(axis * math.radians(60.0))
    far_ll = scorer.score_rotations(images, None, 1e-3, far[:, None])[:, 0, 0]
    at_truth = scorer.score_rotations(images, None, 1e-3, truth[:, None])[:, 0, 0]
    # image 0: the "result" is the far pose (below its start); image 1: the truth (above it)
    res = NewtonResult(rotations=torch.stack([far[0], truth[1]])[:, None],
                       hessian=torch.eye(3, dtype=torch.float64).expand(2, 1, 3, 3).clone(),
                       log_likelihood=torch.stack([far_ll[0], at_truth[1]])[:, None])
    assert float(far_ll[0]) < float(exact[0]) < float(at_truth[0])
    out = _second_chance(scorer, images, None, 1e-3, starts, None, exact[:, None], res)
    assert float(geodesic_distance(out.rotations[0, 0], truth[0])) < math.radians(0.2)
    assert float(out.log_likelihood[0, 0]) > float(exact[0])
    assert bool(torch.linalg.eigvalsh(out.hessian[0, 0]).min() > 0)
    assert torch.equal(out.rotations[1], res.rotations[1])
    assert torch.equal(out.log_likelihood[1], res.log_likelihood[1])


@pytest.mark.parametrize("n", [24, 25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_terms_equal_the_torch_terms(n, dtype):
    # log-likelihood, gradient and Gauss-Newton Hessian of (image, start) pairs, with a CTF,
    # per-pair shifted data and a band limit (a prefix of the radius-sorted points)
    from cryopose.bayes._newton_kernel import gauss_newton_terms
    from cryopose.bayes.newton import _terms_torch
    from cryopose.imaging import ctf_2d

    vol = _blob_volume(n, dtype)
    scorer = ReferenceScorer(vol, 4.0, dtype=dtype)
    b, k = 3, 2
    truth = random_rotations(b, generator=1, dtype=dtype)
    images = Projector(vol).images(truth)
    images = images + 0.3 * images.std() * torch.randn(
        images.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    ctf = ctf_2d(defocus_u_angstrom=12000.0, defocus_v_angstrom=11000.0, defocus_angle_deg=30.0,
                 voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=4.0,
                 box=n, dtype=dtype)
    y, c, w, _ = scorer._prepare(images, ctf[None].expand(b, -1, -1), 0.5)
    m = scorer._tmask
    radius = torch.sqrt(scorer._kx**2 + scorer._ky**2)
    order = torch.argsort(radius, stable=True)
    kx, ky = scorer._kx[order], scorer._ky[order]
    y_all, w_all, c_all = y[:, m][:, order], w[:, m][:, order], c[:, m][:, order]
    rot = (truth[:, None] @ random_rotations(b * k, generator=3, dtype=dtype).reshape(b, k, 3, 3)
           ).reshape(b * k, 3, 3)
    owner = torch.arange(b).repeat_interleave(k)
    phase = 0.3 * torch.randn(b * k, kx.shape[0], generator=torch.Generator().manual_seed(4),
                              dtype=dtype)
    data_r = y_all.real[owner] * torch.cos(phase) - y_all.imag[owner] * torch.sin(phase)
    data_i = y_all.real[owner] * torch.sin(phase) + y_all.imag[owner] * torch.cos(phase)
    rows = torch.arange(b * k)
    for n_band in (kx.shape[0], int((radius <= n / 5).sum())):
        fast = gauss_newton_terms(scorer.projector, rot, data_r, data_i, rows, w_all, c_all,
                                  owner, kx, ky, n_band)
        ref = _terms_torch(scorer.projector, rot, data_r[:, :n_band], data_i[:, :n_band],
                           w_all[owner, :n_band], c_all[owner, :n_band], kx[:n_band],
                           ky[:n_band])
        tol = 1e-10 if dtype == torch.float64 else 2e-4
        for got, want in zip(fast, ref, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            assert float((got - want).abs().max()) <= tol * float(want.abs().max())
    # no CTF: the kernel's c = 1 branch
    fast = gauss_newton_terms(scorer.projector, rot, data_r, data_i, rows, w_all, None, owner,
                              kx, ky, kx.shape[0])
    ref = _terms_torch(scorer.projector, rot, data_r, data_i, w_all[owner], None, kx, ky)
    for got, want in zip(fast, ref, strict=True):
        assert float((got - want).abs().max()) <= tol * float(want.abs().max())


def test_gauss_newton_backends_agree_and_numba_is_thread_independent():
    scorer, truth, images = _noiseless_blob_case(4, 11)
    g = torch.Generator().manual_seed(12)
    axis = torch.nn.functional.normalize(torch.randn(4, 2, 3, generator=g, dtype=torch.float64),
                                         dim=-1)
    starts = truth[:, None] @ rotvec_to_matrix(axis * math.radians(5.0))
    shifts = torch.tensor([0.5, -0.25], dtype=torch.float64).expand(4, 2, 2)
    runs = {}
    threads = torch.get_num_threads()
    try:
        for backend, n_threads in (("torch", 2), ("numba", 1), ("numba", 2)):
            torch.set_num_threads(n_threads)
            runs[backend, n_threads] = gauss_newton_poses(
                scorer, images, None, 1e-3, starts, shifts, start_error_deg=6.0,
                backend=backend)
    finally:
        torch.set_num_threads(threads)
    one, two, ref = runs["numba", 1], runs["numba", 2], runs["torch", 2]
    assert torch.equal(one.rotations, two.rotations) and torch.equal(one.hessian, two.hessian)
    assert torch.equal(one.log_likelihood, two.log_likelihood)
    assert float(geodesic_distance(two.rotations, ref.rotations).max()) < 1e-7
    assert torch.allclose(two.log_likelihood, ref.log_likelihood, rtol=1e-9, atol=1e-6)
    assert torch.allclose(two.hessian, ref.hessian, rtol=1e-7)
    with pytest.raises(ValueError, match="backend"):
        gauss_newton_poses(scorer, images, None, 1e-3, starts, backend="fortran")
