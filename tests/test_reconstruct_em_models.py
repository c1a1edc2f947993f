"""cryopose.reconstruct.em_models: soft- vs hard-assignment EM without projections."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.bayes.models import rotate_image, rotate_volume, score_inplane
from cryopose.reconstruct.em_models import (
    EMInputError,
    align_to_reference,
    back_rotate_average,
    em_inplane,
    em_subtomograms,
    mmse_rotation,
    pearson_correlation,
    simulate_inplane_observations,
    simulate_subtomogram_observations,
)
from cryopose.so3 import healpix_grid

# Asymmetric blobs: (x, y, z) centre in pixels from N // 2, amplitude.
BLOBS = [((3.0, 0.0, 0.0), 1.0), ((0.0, 4.0, 1.0), 0.7), ((-2.0, -1.0, 3.0), 0.5),
         ((1.0, -3.0, -2.0), 0.8)]


def blobs(n: int, ndim: int, width: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """Analytic sum of Gaussians (independent of the code under test), ``[y, x]``/``[z, y, x]``."""
    i = torch.arange(n, dtype=torch.float64) - n // 2
    mesh = torch.meshgrid(*([i] * ndim), indexing="ij")
    out = torch.zeros((n,) * ndim, dtype=torch.float64)
    for centre, amp in BLOBS:
        r2 = sum((mesh[ndim - 1 - d] - centre[d]) ** 2 for d in range(ndim))
        out += amp * torch.exp(-r2 / (2 * width**2))
    return out.to(dtype)


def rot2(deg: torch.Tensor) -> torch.Tensor:
    t = torch.deg2rad(deg.to(torch.float64))
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def inner_fourier(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred DFT coefficients with ``|k| < N / 2 - 1.5`` (away from the interpolation edge)."""
    n = x.shape[-1]
    dims = tuple(range(-ndim, 0))
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)
    k = torch.arange(n, dtype=torch.float64) - n // 2
    r = torch.sqrt(sum(m**2 for m in torch.meshgrid(*([k] * ndim), indexing="ij")))
    return ft[..., r < n / 2 - 1.5]


def tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


@pytest.mark.parametrize("box", [16, 17])
def test_one_hot_back_rotation_undoes_the_pose_2d_and_3d(box, dtype):
    """M-step with one rotation per observation = mean of y_i(R_i^T .) (bayes.models rotations).

    Compared on Fourier coefficients with |k| < N/2 - 1.5, where the padded-grid edge (which
    rotate_image/rotate_volume read as zero) plays no part.
    """
    gen = torch.Generator().manual_seed(box)
    images = torch.randn(5, box, box, generator=gen, dtype=torch.float64).to(dtype)
    angles = torch.tensor([0.0, 33.0, 90.0, 181.5, 301.0], dtype=torch.float64)
    out = back_rotate_average(images, torch.eye(5, dtype=dtype), rot2(angles))
    ref = torch.stack(
        [rotate_image(images[i], -angles[i : i + 1].to(dtype))[0] for i in range(5)]
    ).mean(0)
    assert out.dtype == dtype and out.shape == (box, box)
    a, b = inner_fourier(out, 2), inner_fourier(ref, 2)
    assert (a - b).abs().max() <= tol(dtype) * b.abs().max()

    vols = torch.randn(3, box, box, box, generator=gen, dtype=torch.float64).to(dtype)
    rots = healpix_grid(1, dtype=dtype).matrices[[3, 100, 400]]
    out3 = back_rotate_average(vols, torch.eye(3, dtype=dtype), rots)
    ref3 = torch.stack([rotate_volume(vols[i], rots[i].T[None])[0] for i in range(3)]).mean(0)
    a, b = inner_fourier(out3, 3), inner_fourier(ref3, 3)
    assert (a - b).abs().max() <= tol(dtype) * b.abs().max()
    # Undoing the pose: a smooth blob volume observed at R comes back (not at R^T R^T).
    vol = blobs(box, 3, dtype=dtype)
    observed = rotate_volume(vol, rots[1:2])
    back = back_rotate_average(observed, torch.ones(1, 1, dtype=dtype), rots[1:2])
    assert float(pearson_correlation(back, vol)) > 0.99


@pytest.mark.parametrize("box", [16, 17])
def test_uniform_weights_give_the_rotational_average(box, dtype):
    """Uniform posterior = rotational average of the mean observation (linearity)."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(4, box, box, generator=gen, dtype=torch.float64)
    k = torch.fft.fftfreq(box, dtype=torch.float64)
    smooth = (k[:, None] ** 2 + k[None, :] ** 2) < 0.2**2  # smooth images
    images = torch.fft.ifft2(torch.fft.fft2(noise) * smooth).real
    i = torch.arange(box, dtype=torch.float64) - box // 2
    disk = torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * (box / 6) ** 2))
    images = (images * disk).to(dtype)  # nothing in the corners, which rotations cut off
    angles = torch.arange(12, dtype=torch.float64) * 30.0
    weights = torch.full((4, 12), 1.0 / 12, dtype=dtype)
    out = back_rotate_average(images, weights, rot2(angles))
    mean = images.mean(0)
    ref = rotate_image(mean, -angles.to(dtype)).mean(0)
    a, b = inner_fourier(out, 2), inner_fourier(ref, 2)
    assert (a - b).abs().max() <= tol(dtype) * b.abs().max()
    # ... which is invariant under the grid's rotations (here: 30 degrees) up to interpolation.
    turned = rotate_image(out, torch.tensor([30.0], dtype=dtype))[0]
    assert float(pearson_correlation(turned, out)) > 0.99
    assert float(pearson_correlation(out, mean)) < 0.8  # and differs from the plain mean


@pytest.mark.parametrize("box", [16, 17])
def test_hard_step_is_the_soft_step_with_a_one_hot_posterior(box, dtype):
    truth = blobs(box, 2, dtype=dtype)
    images, _ = simulate_inplane_observations(truth, 40, 0.5, angles_deg=24, seed=11)
    initial = rotate_image(truth, torch.tensor([4.0], dtype=dtype))[0]
    hard = em_inplane(images, initial, 0.5, 24, assignment="hard", n_iterations=1)
    scores = score_inplane(images, initial, 0.5, torch.arange(24, dtype=dtype) * 15.0)
    one_hot = torch.nn.functional.one_hot(scores.argmax(-1), 24).to(dtype)
    manual = back_rotate_average(images, one_hot, rot2(torch.arange(24) * 15.0))
    assert torch.allclose(hard.estimates[1], manual, atol=tol(dtype), rtol=0)
    soft = em_inplane(images, initial, 0.5, 24, assignment="soft", n_iterations=1)
    post = torch.softmax(scores.double(), -1).to(dtype)
    manual_soft = back_rotate_average(images, post, rot2(torch.arange(24) * 15.0))
    assert torch.allclose(soft.estimates[1], manual_soft, atol=10 * tol(dtype), rtol=0)
    assert not torch.allclose(soft.estimates[1], hard.estimates[1], atol=1e-3)


def test_mmse_rotation_is_the_rounded_posterior_mean_2d_and_3d():
    # 2D: equal mass at 10 and 50 degrees -> 30 degrees; a point mass -> that rotation.
    grid2 = rot2(torch.tensor([10.0, 50.0, 200.0]))
    post = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    out = mmse_rotation(post, grid2)
    assert torch.allclose(out[0], rot2(torch.tensor([30.0]))[0], atol=1e-12)
    assert torch.allclose(out[1], grid2[2], atol=1e-12)
    # 3D: two rotations about z at +-20 degrees, weights 0.7 / 0.3: the answer is about z at
    # atan2(0.7 sin 20 - 0.3 sin 20, cos 20) (the in-plane block's rounded mean).
    t = math.radians(20.0)
    about_z = torch.zeros(2, 3, 3, dtype=torch.float64)
    about_z[:, 2, 2] = 1.0
    about_z[:, :2, :2] = rot2(torch.tensor([20.0, -20.0]))
    out3 = mmse_rotation(torch.tensor([[0.7, 0.3]], dtype=torch.float64), about_z)[0]
    want = math.atan2(0.4 * math.sin(t), math.cos(t))
    assert math.isclose(math.atan2(float(out3[1, 0]), float(out3[0, 0])), want, abs_tol=1e-12)
    assert torch.allclose(out3 @ out3.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(torch.linalg.det(out3)), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("box", [16, 17])
def test_mmse_step_back_rotates_each_observation_by_its_mmse_rotation(box, dtype):
    """With a point-mass posterior the MMSE step is the hard step; in general it is the
    average of the observations each back-rotated (off the grid) by its MMSE rotation."""
    truth = blobs(box, 2, dtype=dtype)
    images, _ = simulate_inplane_observations(truth, 30, 0.5, angles_deg=24, seed=12)
    initial = rotate_image(truth, torch.tensor([4.0], dtype=dtype))[0]
    angles = torch.arange(24, dtype=dtype) * 15.0
    scores = score_inplane(images, initial, 0.5, angles)
    post = torch.softmax(scores.double(), -1)
    point = mmse_rotation(post, rot2(angles))
    theta = torch.rad2deg(torch.atan2(point[:, 1, 0], point[:, 0, 0]))
    # back-rotating y_i by R_i^T = rotating it by -theta_i (rotate_image's convention).
    pairs = zip(images, theta.to(dtype), strict=True)
    manual = torch.stack([rotate_image(y, -a[None])[0] for y, a in pairs])
    r = em_inplane(images, initial, 0.5, 24, assignment="mmse", n_iterations=1)
    got, want = inner_fourier(r.estimates[1], 2), inner_fourier(manual.mean(0), 2)
    assert float((got - want).abs().max() / want.abs().max()) < 10 * tol(dtype)
    assert (theta.remainder(15.0) - 0.0).abs().max() > 0.5  # off the grid somewhere
    hard = em_inplane(images, initial, 0.5, 24, assignment="hard", n_iterations=1)
    assert not torch.allclose(r.estimates[1], hard.estimates[1], atol=1e-3)


@pytest.mark.parametrize("box", [16, 17])
def test_high_snr_soft_and_hard_converge_to_the_truth_2d(box, dtype):
    truth = blobs(box, 2, dtype=dtype)
    power = float((truth**2).mean())
    sigma2 = power / 5.0  # SNR 5
    images, _ = simulate_inplane_observations(truth, 300, sigma2, angles_deg=36, seed=5)
    # Start from a blurred, 20-degree-turned copy: EM must find the structure and the frame.
    initial = rotate_image(blobs(box, 2, width=2.5, dtype=dtype), torch.tensor([20.0]))[0]
    finals = {}
    for assignment in ("soft", "mmse", "hard"):
        r = em_inplane(images, initial, sigma2, 36, assignment=assignment, n_iterations=15,
                       truth=truth)
        aligned, _ = align_to_reference(r.final, truth)
        err = float((aligned - truth).norm() / truth.norm())
        assert err < 0.12, (assignment, err)
        assert r.final.dtype == dtype
        assert r.log_likelihood[-1] > r.log_likelihood[0]
        assert r.truth_correlation.shape == (r.n_iterations + 1,)
        finals[assignment] = aligned
    diff = max(float((finals[a] - finals["hard"]).norm() / truth.norm()) for a in ("soft", "mmse"))
    assert diff < 0.02


def test_soft_em_log_likelihood_increases():
    """EM's ascent property (up to the lattice interpolation's non-unitarity)."""
    truth = blobs(20, 2)
    sigma2 = float((truth**2).mean()) / 0.3
    images, _ = simulate_inplane_observations(truth, 300, sigma2, angles_deg=36, seed=9)
    initial = blobs(20, 2, width=3.0)
    r = em_inplane(images, initial, sigma2, 36, n_iterations=10, tolerance=0.0)
    ll = r.log_likelihood
    assert ll[-1] - ll[0] > 10.0
    assert torch.all(ll[1:] - ll[:-1] > -1e-6 * ll.abs().max())


@pytest.mark.parametrize("box", [12, 13])
def test_high_snr_3d_soft_and_hard_recover_the_volume(box):
    truth = blobs(box, 3, dtype=torch.float32)
    grid = healpix_grid(0, dtype=torch.float32)
    sigma2 = float((truth**2).mean()) / 2.0
    subs, _ = simulate_subtomogram_observations(truth, 60, sigma2, grid=grid, seed=1)
    initial = blobs(box, 3, width=2.2, dtype=torch.float32)
    finals = []
    for assignment in ("soft", "mmse", "hard"):
        r = em_subtomograms(subs, initial, sigma2, grid, assignment=assignment,
                            n_iterations=4, truth=truth)
        assert r.truth_correlation[-1] > 0.97
        assert r.truth_correlation[-1] > r.truth_correlation[0]
        finals.append(r.final)
    assert float(pearson_correlation(finals[0], finals[2])) > 0.995
    assert float(pearson_correlation(finals[1], finals[2])) > 0.995


def test_einstein_from_noise_structure_from_pure_noise():
    """Pure noise from a template: both assignments return template-like structure.

    Hard assignment's first iterate hardly depends on the template's amplitude (the argmax of
    the cross-correlation is scale-invariant) while soft assignment's shrinks with it (a
    weaker template gives a flatter posterior and more averaging).
    """
    box = 16
    noise = torch.randn(800, box, box, generator=torch.Generator().manual_seed(7),
                        dtype=torch.float64)
    first = {}
    for amplitude in (0.1, 1.0):
        template = amplitude * blobs(box, 2)
        for assignment in ("soft", "hard"):
            r = em_inplane(noise, template, 1.0, 24, assignment=assignment, n_iterations=1,
                           template=template)
            assert r.template_correlation[1] > 0.3  # model bias: structure out of noise
            first[(amplitude, assignment)] = r.estimates[1]
    hard_a, hard_b = first[(0.1, "hard")], first[(1.0, "hard")]
    assert float(pearson_correlation(hard_a, hard_b)) > 0.95
    assert 0.8 < float(hard_a.norm() / hard_b.norm()) < 1.25
    assert float(first[(0.1, "soft")].norm()) < 0.8 * float(first[(1.0, "soft")].norm())


@pytest.mark.slow
def test_low_snr_3d_soft_closer_to_the_truth_than_hard():
    box = 14
    truth = blobs(box, 3)
    grid = healpix_grid(1, dtype=torch.float64)
    sigma2 = float((truth**2).mean()) / 0.01
    subs, _ = simulate_subtomogram_observations(truth, 200, sigma2, grid=grid, seed=3)
    initial = blobs(box, 3, width=3.0)
    err = {}
    for assignment in ("soft", "hard"):
        r = em_subtomograms(subs, initial, sigma2, grid, assignment=assignment, n_iterations=8)
        aligned, _ = align_to_reference(r.final, truth, healpix_order=1)
        err[assignment] = float((aligned - truth).norm() / truth.norm())
    assert err["soft"] < err["hard"]


def test_simulation_is_seeded_and_follows_the_pose_convention():
    truth = blobs(17, 2)
    a, theta = simulate_inplane_observations(truth, 6, 0.1, angles_deg=12, seed=4)
    b, theta_b = simulate_inplane_observations(truth, 6, 0.1, angles_deg=12, seed=4)
    assert torch.equal(a, b) and torch.equal(theta, theta_b)
    assert torch.all(torch.remainder(theta, 30.0) == 0)
    clean, theta = simulate_inplane_observations(truth, 4, 0.0, seed=2)
    ref = torch.stack([rotate_image(truth, theta[i : i + 1])[0] for i in range(4)])
    x, y = inner_fourier(clean, 2), inner_fourier(ref, 2)
    assert (x - y).abs().max() < 1e-10 * y.abs().max()
    vol = blobs(12, 3)
    c3, rot = simulate_subtomogram_observations(vol, 3, 0.0, seed=2)
    ref3 = rotate_volume(vol, rot)
    x, y = inner_fourier(c3, 3), inner_fourier(ref3, 3)
    assert (x - y).abs().max() < 1e-10 * y.abs().max()
    # EM itself is deterministic.
    noisy, _ = simulate_inplane_observations(truth, 30, 1.0, angles_deg=12, seed=4)
    r1 = em_inplane(noisy, truth, 1.0, 12, n_iterations=2)
    r2 = em_inplane(noisy, truth, 1.0, 12, n_iterations=2)
    assert torch.equal(r1.estimates, r2.estimates)


def test_align_to_reference_recovers_a_known_rotation():
    img = blobs(24, 2)
    turned = rotate_image(img, torch.tensor([-37.0], dtype=torch.float64))[0]
    aligned, angle = align_to_reference(turned, img)
    assert abs(float(angle) - 37.0) <= 0.5
    assert float(pearson_correlation(aligned, img)) > 0.999
    vol = blobs(14, 3)
    rot = healpix_grid(2, dtype=torch.float64).matrices[1234]
    seen = rotate_volume(vol, rot[None])[0]
    aligned, r = align_to_reference(seen, vol)
    # seen(R .) = vol(R_true R .) ~ vol  =>  R ~ R_true^T
    angle = torch.arccos(((torch.trace(r @ rot) - 1) / 2).clamp(-1, 1))
    assert math.degrees(float(angle)) < 4.0  # measured 3.0: a 14-px blob volume is blunt
    assert float(pearson_correlation(aligned, vol)) > 0.99


def test_bad_inputs_raise_clear_errors():
    img = blobs(16, 2)
    images = img[None].repeat(3, 1, 1)
    with pytest.raises(EMInputError, match="assignment"):
        em_inplane(images, img, 1.0, 8, assignment="medium")
    with pytest.raises(EMInputError, match="initial"):
        em_inplane(images, blobs(15, 2), 1.0, 8)
    with pytest.raises(EMInputError, match="sigma2"):
        em_inplane(images, img, -1.0, 8)
    with pytest.raises(EMInputError, match="weights"):
        back_rotate_average(images, torch.ones(3, 5, dtype=img.dtype), rot2(torch.zeros(4)))
    with pytest.raises(EMInputError, match="grid"):
        em_subtomograms(blobs(8, 3)[None], blobs(8, 3), 1.0, torch.eye(3))
    with pytest.raises(EMInputError, match="truth"):
        em_inplane(images, img, 1.0, 8, truth=blobs(8, 2))
    with pytest.raises(ValueError):  # EMInputError is a ValueError
        simulate_inplane_observations(img, 0, 1.0)
