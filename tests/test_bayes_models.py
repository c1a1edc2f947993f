"""cryopose.bayes.models: subtomograms (cryo-ET), 2D in-plane (SO(2)) and volume pairs."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.bayes.models import (
    SubtomogramScorer,
    align_images_2d,
    align_subtomograms,
    align_volumes,
    missing_wedge_mask,
    rotate_image,
    rotate_volume,
    score_inplane,
    summarize_angle_posterior,
)
from cryopose.imaging.projection import project
from cryopose.so3 import chordal_distance, euler_to_matrix, geodesic_distance, healpix_grid

# Asymmetric set of blobs: (x, y, z) centre in voxels from N // 2, amplitude.
BLOBS = [((3.0, 0.0, 0.0), 1.0), ((0.0, 4.0, 1.0), 0.7), ((-2.0, -1.0, 3.0), 0.5),
         ((1.0, -3.0, -2.0), 0.8)]


def gaussians_3d(n, centres, sigma=(1.5, 1.5, 1.5), dtype=torch.float64):
    """Analytic sum of Gaussians ``[z, y, x]`` (independent of the code under test)."""
    i = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    sx, sy, sz = sigma
    v = torch.zeros(n, n, n, dtype=torch.float64)
    for (cx, cy, cz), amp in centres:
        r2 = (x - cx) ** 2 / sx**2 + (y - cy) ** 2 / sy**2 + (z - cz) ** 2 / sz**2
        v += amp * torch.exp(-r2 / 2)
    return v.to(dtype)


def gaussians_2d(n, centres, sigma=1.5, dtype=torch.float64):
    i = torch.arange(n, dtype=torch.float64) - n // 2
    y, x = torch.meshgrid(i, i, indexing="ij")
    img = torch.zeros(n, n, dtype=torch.float64)
    for (cx, cy), amp in centres:
        img += amp * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return img.to(dtype)


def moved(centres, rotation):
    """Blob centres of ``V(R x)``: a blob at ``c`` appears at ``R^T c``."""
    r = rotation.to(torch.float64)
    return [((r.T @ torch.tensor(c, dtype=torch.float64)).tolist(), a) for c, a in centres]


# ---------------------------------------------------------------------------------------------
# Subtomograms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("box", [16, 17])
def test_subtomogram_convention_and_noiseless_recovery(box, dtype):
    grid = healpix_grid(1)
    truth = 123
    rotation = grid.matrices[truth]
    reference = gaussians_3d(box, BLOBS, dtype=dtype)
    # Analytic subtomogram y(x) = V(R x), not produced by the code under test.
    subtomogram = gaussians_3d(box, moved(BLOBS, rotation), dtype=dtype)
    # Same pose convention as single-particle projection: sum along z = projection at R.
    proj = project(reference.to(torch.float64), rotation[None])[0]
    corr = torch.corrcoef(torch.stack([subtomogram.sum(0).flatten().double(), proj.flatten()]))
    assert corr[0, 1] > 0.999

    est = align_subtomograms(subtomogram, reference, 1e-4, grid, dtype=dtype)
    assert int(est.index_mle[0]) == truth
    assert geodesic_distance(est.rotations_mmse[0], rotation.to(dtype)).item() < 1e-3
    assert est.expected_loss[0].item() < 1e-6

    # The transposed rotation (the other convention) is scored much worse.
    scorer = SubtomogramScorer(reference, dtype=dtype)
    both = scorer.score_rotations(subtomogram, 1e-4, torch.stack([rotation, rotation.T]))
    assert geodesic_distance(rotation, rotation.T).item() > 0.5
    assert both[0] - both[1] > 1e3


@pytest.mark.parametrize("box", [12, 13])
def test_likelihood_equals_real_space_gaussian(box):
    reference = gaussians_3d(box, [((2.0, 0.0, -1.0), 1.0), ((-1.0, 2.0, 1.0), 0.5)])
    rotations = euler_to_matrix(torch.tensor([[30.0, 50.0, 70.0], [-100.0, 120.0, 10.0]],
                                             dtype=torch.float64))
    # Band-limited to the ball: the rotated volumes from the same interpolation.
    x = rotate_volume(reference, rotations)
    observation = rotate_volume(reference, euler_to_matrix(
        torch.tensor([[5.0, 80.0, -40.0]], dtype=torch.float64)))[0]
    sigma2 = 0.37
    scorer = SubtomogramScorer(reference, dtype=torch.float64)
    ll = scorer.score_rotations(observation, sigma2, rotations, include_data_term=True)
    expected = -((observation - x) ** 2).sum((-3, -2, -1)) / (2 * sigma2)
    torch.testing.assert_close(ll, expected, rtol=1e-9, atol=1e-9)
    # Per-shell white sigma2 is the same; the data term is the same for every rotation.
    per_shell = torch.full((box // 2 + 1,), sigma2, dtype=torch.float64)
    torch.testing.assert_close(scorer.score_rotations(observation, per_shell, rotations,
                                                      include_data_term=True), ll)
    no_data = scorer.score_rotations(observation, sigma2, rotations)
    diff = ll - no_data
    assert abs(diff[0] - diff[1]) < 1e-9 and diff[0] < 0


def test_missing_wedge_mask_geometry():
    n = 16
    w = missing_wedge_mask(n, (-60.0, 60.0))
    assert w.shape == (n, n, n // 2 + 1)
    c = n // 2

    def at(kx, ky, kz):
        return w[kz + c, ky + c, kx].item()

    assert at(0, 0, 0) == 1 and at(0, 5, 0) == 1  # origin and tilt axis
    assert at(5, 0, 0) == 1 and at(4, 3, 4) == 1  # x axis, 45 degrees towards z
    assert at(0, 0, 5) == 0 and at(1, 2, 6) == 0  # z axis, ~80 degrees
    # Asymmetric range: (cos t, 0, sin t) is observed for t in range only.
    w2 = missing_wedge_mask(n, (-20.0, 50.0))
    assert w2[c + 4, c, 5].item() == 1  # +38.7 deg
    assert w2[c - 4, c, 5].item() == 0  # -38.7 deg
    wx = missing_wedge_mask(n, (-60.0, 60.0), tilt_axis="x")
    assert wx[c, c, 5].item() == 1 and wx[c + 5, c + 1, 0].item() == 0
    with pytest.raises(ValueError, match="tilt_range_deg"):
        missing_wedge_mask(n, (30.0, -30.0))


def test_missing_wedge_recovered_and_norm_term_matters():
    n = 16
    grid = healpix_grid(1)
    # A rod along z (its Fourier power lies along kz, inside the missing wedge at R = I)
    # plus two blobs that make the structure asymmetric.
    reference = (
        gaussians_3d(n, [((0.0, 0.0, 0.0), 1.0)], sigma=(1.0, 1.0, 5.0))
        + gaussians_3d(n, [((3.0, 1.0, 0.0), 0.8), ((-2.0, 3.0, 1.0), 0.6)], sigma=(1.5,) * 3)
    )
    wedge = missing_wedge_mask(n, (-60.0, 60.0), dtype=torch.float64)
    truth = 0
    subtomogram = rotate_volume(reference, grid.matrices[truth][None])
    scorer = SubtomogramScorer(reference, dtype=torch.float64)
    full = scorer.score_grid(subtomogram, 1e-2, grid, fourier_weight=wedge)[0]
    cross_only = scorer.score_grid(subtomogram, 1e-2, grid, fourier_weight=wedge,
                                   norm_term=False)[0]
    assert int(full.argmax()) == truth
    wrong = int(cross_only.argmax())
    assert wrong != truth
    assert math.degrees(geodesic_distance(grid.matrices[wrong], grid.matrices[truth])) > 20
    # The bias comes from the wedge: the wrong rotation moves power out of it.
    empty = torch.zeros_like(subtomogram)
    norms = -2 * scorer.score_grid(empty, 1e-2, grid, fourier_weight=wedge)[0]
    assert norms[wrong] > 1.2 * norms[truth]
    # Without a wedge the norm is ~constant and the cross term alone finds the truth.
    assert int(scorer.score_grid(subtomogram, 1e-2, grid, norm_term=False)[0].argmax()) == truth
    # A per-subtomogram weight gives the same scores as the shared one.
    batched = scorer.score_grid(subtomogram.expand(2, n, n, n), 1e-2, grid,
                                fourier_weight=wedge.expand(2, *wedge.shape))
    torch.testing.assert_close(batched[1], full)


def test_wedge_subtomogram_with_noise_recovers_truth(dtype):
    n = 16
    grid = healpix_grid(1, dtype=dtype)
    reference = gaussians_3d(n, BLOBS, dtype=dtype)
    wedge = missing_wedge_mask(n, (-50.0, 60.0), dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    truth = torch.tensor([10, 200, 411])
    clean = rotate_volume(reference, grid.matrices[truth])
    sigma2 = 0.2 * float((reference**2).mean())  # SNR 5 per voxel
    noisy = clean + math.sqrt(sigma2) * torch.randn(clean.shape, generator=gen).to(dtype)
    est = align_subtomograms(noisy, reference, sigma2, grid, fourier_weight=wedge, dtype=dtype)
    assert torch.equal(est.index_mle, truth)
    err = geodesic_distance(est.rotations_mmse, grid.matrices[truth])
    assert err.max().item() < math.radians(3.0)


def test_bad_inputs_raise_clear_errors():
    reference = torch.zeros(8, 8, 8)
    scorer = SubtomogramScorer(reference)
    with pytest.raises(ValueError, match="sigma2"):
        scorer.score_rotations(torch.zeros(8, 8, 8), torch.ones(3), torch.eye(3)[None])
    with pytest.raises(ValueError, match="sigma2"):
        scorer.score_rotations(torch.zeros(8, 8, 8), -1.0, torch.eye(3)[None])
    with pytest.raises(ValueError, match="fourier_weight"):
        scorer.score_rotations(torch.zeros(8, 8, 8), 1.0, torch.eye(3)[None],
                               fourier_weight=torch.ones(8, 8, 8))
    with pytest.raises(ValueError, match="box 8"):
        scorer.score_rotations(torch.zeros(9, 9, 9), 1.0, torch.eye(3)[None])
    with pytest.raises(ValueError, match="reference"):
        SubtomogramScorer(torch.zeros(8, 8, 7))


# ---------------------------------------------------------------------------------------------
# 2D in-plane
# ---------------------------------------------------------------------------------------------

BLOBS_2D = [((5.0, 0.0), 1.0), ((-3.0, 6.0), 0.8), ((-4.0, -5.0), 0.6), ((2.0, -7.0), 0.9)]


@pytest.mark.parametrize("box", [32, 33])
def test_inplane_convention_and_recovery(box, dtype):
    reference = gaussians_2d(box, BLOBS_2D, dtype=dtype)
    theta = 40.0
    rot = torch.tensor([[math.cos(math.radians(theta)), -math.sin(math.radians(theta))],
                        [math.sin(math.radians(theta)), math.cos(math.radians(theta))]],
                       dtype=torch.float64)
    # y(x) = I(R x): blob at c appears at R^T c (analytic, independent of the code).
    moved_2d = [((rot.T @ torch.tensor(c, dtype=torch.float64)).tolist(), a) for c, a in BLOBS_2D]
    image = gaussians_2d(box, moved_2d, dtype=dtype)
    est = align_images_2d(image, reference, 1e-4, 72)
    assert est.angle_mle_deg[0].item() == pytest.approx(theta)
    assert est.angle_mmse_deg[0].item() == pytest.approx(theta, abs=1e-3)
    ll = score_inplane(image, reference, 1e-4, torch.tensor([theta, -theta]))
    assert ll[0] - ll[1] > 1e3
    # rotate_image agrees with the analytic rotation.
    turned = rotate_image(reference, [theta])[0]
    assert ((turned - image).norm() / image.norm()).item() < 0.05


def test_inplane_matches_3d_projection_pose():
    # The SO(2) pose theta is the 3D pose Rz(theta) (RELION psi at rot = tilt = 0).
    n = 24
    volume = gaussians_3d(n, BLOBS)
    psi = 75.0
    reference = project(volume, torch.eye(3, dtype=torch.float64)[None])[0]
    image = project(volume, euler_to_matrix(torch.tensor([[0.0, 0.0, psi]],
                                                         dtype=torch.float64)))[0]
    est = align_images_2d(image, reference, 1e-3, 72)
    assert est.angle_mle_deg[0].item() == pytest.approx(psi)


def test_angle_posterior_analytic():
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0])
    # Two equal modes at 0 and 90 degrees, float32 with a huge offset.
    ll = torch.tensor([[1e6, 1e6, 1e6 - 200.0, 1e6 - 200.0]], dtype=torch.float32)
    est = summarize_angle_posterior(ll, angles)
    assert est.angle_mmse_deg[0].item() == pytest.approx(45.0, abs=1e-4)
    assert est.expected_loss[0].item() == pytest.approx(4 * (1 - math.sqrt(0.5)), rel=1e-5)
    assert est.max_probability[0].item() == pytest.approx(0.5)
    assert est.credible_radius_deg[0].item() == pytest.approx(45.0, abs=1e-4)
    # A prior that prefers 90 degrees moves MAP and MMSE there.
    prior = torch.tensor([0.0, 3.0, 0.0, 0.0])
    est2 = summarize_angle_posterior(ll, angles, log_prior=prior)
    assert est2.angle_map_deg[0].item() == 90.0 and est2.angle_mle_deg[0].item() == 0.0
    assert 45.0 < est2.angle_mmse_deg[0].item() < 90.0
    # Flat likelihood: the expected loss of any angle is 4 (E cos = E sin = 0).
    flat = summarize_angle_posterior(torch.zeros(1, 36), 36)
    assert flat.expected_loss[0].item() == pytest.approx(4.0, abs=1e-9)
    assert flat.log_evidence[0].item() == pytest.approx(0.0, abs=1e-12)


def test_inplane_mmse_beats_mle_at_low_snr_and_is_calibrated():
    n, n_angles, trials = 32, 72, 2000
    reference = gaussians_2d(n, BLOBS_2D, sigma=2.5)
    angles = torch.arange(n_angles, dtype=torch.float64) * (360.0 / n_angles)
    templates = rotate_image(reference, angles)
    sigma2 = float((templates**2).mean()) / 0.01  # SNR 0.01 per pixel
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, n_angles, (trials,), generator=gen)
    images = templates[truth] + math.sqrt(sigma2) * torch.randn(trials, n, n, generator=gen,
                                                                 dtype=torch.float64)
    est = align_images_2d(images, reference, sigma2, n_angles)
    true_rad = torch.deg2rad(angles[truth])

    def chordal2(estimate_deg):
        return 4.0 - 4.0 * torch.cos(torch.deg2rad(estimate_deg) - true_rad)

    loss_mle, loss_mmse = chordal2(est.angle_mle_deg), chordal2(est.angle_mmse_deg)
    gain = loss_mle - loss_mmse
    standard_error = gain.std() / math.sqrt(trials)
    # MMSE is the Bayes estimator for this loss: it must win, here by > 4 standard errors.
    assert gain.mean() > 4 * standard_error
    assert loss_mle.mean() > 1.0  # low SNR: MLE often wrong
    ratio = est.expected_loss.mean() / loss_mmse.mean()
    assert 0.85 < ratio < 1.15  # calibrated (measured 1.01)


# ---------------------------------------------------------------------------------------------
# Two noisy volumes (seed appendix C)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("box", [16, 17])
def test_align_volumes_recovers_relative_rotation(box):
    grid = healpix_grid(1)
    truth = 321
    rotation = grid.matrices[truth]
    volume_a = gaussians_3d(box, BLOBS)
    volume_b = gaussians_3d(box, moved(BLOBS, rotation))  # b(x) = a(R x), analytic
    est = align_volumes(volume_a, volume_b, 1e-5, grid)
    assert int(est.index_mle[0]) == truth
    assert geodesic_distance(est.rotations_mmse[0], rotation.float()).item() < 1e-3
    # The transposed convention would give R^T, which is far from the estimate.
    assert geodesic_distance(est.rotations_mmse[0], rotation.T.float()).item() > 0.5


def _shell_power(volume: torch.Tensor) -> torch.Tensor:
    """Signal variance per voxel in each Fourier shell (the 'tau2' of a Wiener prior)."""
    n = volume.shape[-1]
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume)))
    k = torch.arange(n, dtype=torch.float64) - n // 2
    gz, gy, gx = torch.meshgrid(k, k, k, indexing="ij")
    shell = torch.round(torch.sqrt(gx**2 + gy**2 + gz**2)).long().flatten()
    keep = shell <= n // 2
    total = torch.zeros(n // 2 + 1, dtype=torch.float64).index_add_(
        0, shell[keep], (ft.abs() ** 2).flatten()[keep])
    count = torch.zeros(n // 2 + 1, dtype=torch.float64).index_add_(
        0, shell[keep], torch.ones_like(total[0]).expand(int(keep.sum())))
    return (total / count / n**3).clamp(min=1e-12)


def test_align_volumes_noise_doubling_and_calibration():
    n, trials = 16, 200
    grid = healpix_grid(1)
    volume = gaussians_3d(n, BLOBS, sigma=(2.0,) * 3)
    gen = torch.Generator().manual_seed(1)
    truth = torch.randint(0, len(grid), (trials,), generator=gen)
    rotated = rotate_volume(volume, grid.matrices[truth])
    sigma2 = float((volume**2).mean()) / 0.05  # SNR 0.05 per voxel in each volume
    noise = math.sqrt(sigma2)
    vol_a = volume + noise * torch.randn(trials, n, n, n, generator=gen, dtype=torch.float64)
    vol_b = rotated + noise * torch.randn(trials, n, n, n, generator=gen, dtype=torch.float64)
    options = dict(max_frequency_angstrom=n / 3.0)  # |k| <= 3 Fourier voxels (fast)
    true_rot = grid.matrices[truth].float()

    def calibration(est):
        measured = (chordal_distance(est.rotations_mmse, true_rot) ** 2).mean()
        return float(est.expected_loss.mean() / measured), float(measured)

    # sigma2 (as if volume_a were a clean reference) vs the seed's 2 sigma2.
    naive, _ = calibration(align_volumes(vol_a, vol_b, sigma2 / 2, grid, sigma2_b=sigma2 / 2,
                                         **options))
    doubled, mse_flat = calibration(align_volumes(vol_a, vol_b, sigma2, grid, **options))
    assert naive < 0.5  # over-confident: expected loss well below the measured error
    assert naive < 0.7 * doubled  # doubling the variance widens the posterior
    # With the signal prior marginalised (Wiener), the posterior is calibrated.
    wiener, mse_wiener = calibration(align_volumes(
        vol_a, vol_b, sigma2, grid, signal_variance=_shell_power(volume), **options))
    assert 1 / 1.5 < wiener < 1.5
    assert mse_wiener < mse_flat


@pytest.mark.parametrize("box", [16, 17])
def test_templates_are_hermitian_up_to_the_band_edge(box):
    """Templates at theta and theta + 180 degrees sample q and -q: V(-q) = conj V(q) holds for
    every point, also between M/2 - 1 and M/2 of the padded grid (periodic neighbour)."""
    from cryopose.bayes.models import _FourierTemplates

    g = torch.Generator().manual_seed(2)
    image = torch.randn(box, box, generator=g, dtype=torch.float64)
    tpl = _FourierTemplates(image, 2, 2.0, box / 2.0)
    theta = torch.deg2rad(torch.tensor([13.0, 37.0, 71.0], dtype=torch.float64))
    rots = []
    for t in torch.cat([theta, theta + math.pi]):
        c, s = math.cos(float(t)), math.sin(float(t))
        rots.append(torch.tensor([[c, -s], [s, c]], dtype=torch.float64))
    out = tpl.sample(torch.stack(rots))
    a, b = out[:3], out[3:]
    assert float((b - a.conj()).abs().max() / a.abs().max()) < 1e-12
