"""Tests of cryopose.bayes.scoring: exact likelihood, in-plane FFT path, shifts, chunking."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from cryopose.bayes.scoring import ReferenceScorer, shift_grid
from cryopose.imaging import ctf_2d, irfft2_centred, phase_shift_fourier
from cryopose.so3.grids import healpix_grid


def blob_volume(n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """An asymmetric volume of Gaussian blobs well inside the box."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    for _ in range(12):
        c = (torch.rand(3, generator=g) - 0.5) * n * 0.45
        w = 1.0 + 1.5 * torch.rand(1, generator=g)
        a = 0.5 + torch.rand(1, generator=g)
        vol += a * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * w**2))
    return vol.to(dtype)


def make_ctf(b: int, n: int, px: float, dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    du = 8000 + 6000 * torch.rand(b, generator=g, dtype=torch.float64)
    return ctf_2d(
        defocus_u_angstrom=du, defocus_v_angstrom=du - 800, defocus_angle_deg=35.0,
        voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=px,
        box=n, dtype=dtype,
    )


@pytest.mark.parametrize("n", [32, 33])
def test_dense_loglik_equals_real_space_residual(n: int, dtype: torch.dtype) -> None:
    px = 4.0
    sc = ReferenceScorer(blob_volume(n, dtype), px, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    b = 3
    rot = healpix_grid(1, dtype=dtype).matrices[torch.randint(0, 576, (b,), generator=g)]
    ctf = make_ctf(b, n, px, dtype)
    shifts = torch.tensor([[1.5, -2.25], [0.0, 0.0], [-3.0, 1.0]], dtype=dtype)
    s2 = 0.7
    y = torch.randn(b, n, n, generator=g, dtype=torch.float64).to(dtype)
    ll = sc.score_rotations(y, ctf, s2, rot, shifts)  # [B, B, T]
    for i in range(b):
        for t in range(3):
            # template of pose i with CTF and shift t, built with the imaging layer
            ft = phase_shift_fourier(sc.projector.slices(rot[i]) * ctf[i], shifts[t, 0],
                                     shifts[t, 1], n)
            x = irfft2_centred(ft, n)
            expected = -((y[i] - x) ** 2).sum() / (2 * s2)
            tol = 1e-9 if dtype == torch.float64 else 2e-4
            assert abs(float(ll[i, i, t]) - float(expected)) <= tol * abs(float(expected))


def test_coloured_sigma_and_band_limit_match_explicit_sum() -> None:
    n, px = 24, 3.0
    sc = ReferenceScorer(blob_volume(n), px, max_frequency_angstrom=9.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, n, n, generator=g, dtype=torch.float64)
    sigma2 = 0.5 + torch.rand(2, n // 2 + 1, generator=g, dtype=torch.float64)
    rot = healpix_grid(0, dtype=torch.float64).matrices[:5]
    ll = sc.score_rotations(y, None, sigma2, rot)[..., 0]
    # explicit full-plane sum
    full = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(y, dim=(-2, -1))), dim=(-2, -1))
    i = torch.arange(n, dtype=torch.float64) - n // 2
    rad = torch.sqrt(i[:, None] ** 2 + i[None, :] ** 2)
    shell = rad.round().long().clamp(max=n // 2)
    band = rad <= n * px / 9.0
    for j in range(5):
        x = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(
            sc.projector.images(rot[j]), dim=(-2, -1))), dim=(-2, -1))
        for b in range(2):
            r = (full[b] - x).abs() ** 2 / (2 * n * n * sigma2[b][shell])
            assert float(ll[b, j]) == pytest.approx(-float(r[band].sum()), rel=1e-10)


@pytest.mark.parametrize("n", [32, 33])
def test_inplane_fft_agrees_with_dense(n: int) -> None:
    px = 4.0
    sc = ReferenceScorer(blob_volume(n, torch.float32), px)
    grid = healpix_grid(1, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    b = 6
    idx = torch.randint(0, len(grid), (b,), generator=g)
    ctf = make_ctf(b, n, px, torch.float32)
    y = irfft2_centred(sc.projector.slices(grid.matrices[idx]) * ctf, n)
    s2 = float(y.var())
    y = y + torch.randn(y.shape, generator=g) * math.sqrt(s2) * 0.5
    dense = sc.score_grid(y, ctf, s2, grid, inplane_fft=False)[..., 0]
    fast = sc.score_grid(y, ctf, s2, grid)[..., 0]
    assert fast.shape == dense.shape == (b, len(grid))
    agree = 0
    for i in range(b):
        d, f = dense[i].double(), fast[i].double()
        spread = float(d.max() - d.min())
        err = float(((d - d.mean()) - (f - f.mean())).abs().max())
        assert err < 0.08 * spread
        assert spearmanr(d.numpy(), f.numpy()).correlation > 0.97
        agree += int(d.argmax() == f.argmax())
    assert agree >= b - 1


def _with_inplane_count(grid, n_p: int):
    """The grid's viewing directions with ``n_p`` equally spaced in-plane angles."""
    from cryopose.so3.conversions import euler_to_matrix
    from cryopose.so3.grids import SO3Grid

    dirs = grid.euler_deg.double().reshape(grid.n_directions, grid.n_inplane, 3)[:, 0]
    euler = dirs[:, None].repeat(1, n_p, 1)
    euler[..., 2] = torch.arange(n_p, dtype=torch.float64) * (360.0 / n_p)
    euler = euler.reshape(-1, 3)
    return SO3Grid(matrices=euler_to_matrix(euler).float(), euler_deg=euler.float(),
                   weights=torch.full((euler.shape[0],), 1.0 / euler.shape[0]), order=grid.order,
                   n_directions=grid.n_directions, n_inplane=n_p)


@pytest.mark.parametrize(("n_inplane", "dtype"), [(None, torch.float32), (37, torch.float32),
                                                 (None, torch.float64)])
def test_inplane_fft_with_shifts_and_ctf_agrees_with_dense(n_inplane, dtype) -> None:
    # Several shifts: the norm term (shift-independent, CTF-weighted, conjugated into the
    # half-spectrum bins when 2e mod P > P / 2) is added to every shift's bins.
    n, px = 32, 4.0
    sc = ReferenceScorer(blob_volume(n, dtype), px, dtype=dtype)
    grid = healpix_grid(1, dtype=torch.float32)
    if n_inplane is not None:  # odd in-plane count: bins 0 .. P // 2, no Nyquist bin
        grid = _with_inplane_count(grid, n_inplane)
    g = torch.Generator().manual_seed(11)
    b = 4
    idx = torch.randint(0, len(grid), (b,), generator=g)
    ctf = make_ctf(b, n, px, dtype)
    y = irfft2_centred(sc.projector.slices(grid.matrices[idx]) * ctf, n)
    y = torch.roll(y, (1, -1), dims=(-2, -1))
    s2 = float(y.var())
    y = y + torch.randn(y.shape, generator=g) * math.sqrt(s2) * 0.5
    shifts = shift_grid(4.0, 4.0, px)  # 5 shifts of one pixel
    dense = sc.score_grid(y, ctf, s2, grid, shifts, inplane_fft=False).double()
    fast = sc.score_grid(y, ctf, s2, grid, shifts)
    assert fast.dtype == dtype
    fast = fast.double()
    assert fast.shape == dense.shape == (b, len(grid), shifts.shape[0])
    for i in range(b):
        d, f = dense[i].reshape(-1), fast[i].reshape(-1)
        err = float(((d - d.mean()) - (f - f.mean())).abs().max())
        assert err < 0.08 * float(d.max() - d.min())
        assert spearmanr(d.numpy(), f.numpy()).correlation > 0.97
    best = fast.reshape(b, -1).argmax(dim=1)
    assert torch.equal(best, dense.reshape(b, -1).argmax(dim=1))  # same rotation and shift
    assert bool((best % shifts.shape[0] != 0).all())  # (the images are shifted)


@pytest.mark.parametrize("inplane_fft", [False, True])
def test_true_pose_has_max_loglik_on_noiseless_data(inplane_fft: bool) -> None:
    n, px = 32, 4.0
    sc = ReferenceScorer(blob_volume(n, torch.float32), px)
    grid = healpix_grid(1, inplane_phase=0.5, dtype=torch.float32)
    idx = torch.tensor([3, 100, 333, 575])
    y = sc.projector.images(grid.matrices[idx])
    ll = sc.score_grid(y, None, 1.0, grid, inplane_fft=inplane_fft)[..., 0]
    assert torch.equal(ll.argmax(dim=1), idx)


def test_shift_search_recovers_integer_shift() -> None:
    n, px = 33, 4.0
    sc = ReferenceScorer(blob_volume(n, torch.float32), px)
    grid = healpix_grid(0, dtype=torch.float32)
    shifts = shift_grid(12.0, 4.0, px)  # 1-pixel steps, radius 3 px
    y = sc.projector.images(grid.matrices[[10, 40]])
    y = torch.stack([torch.roll(y[0], (2, -1), dims=(0, 1)),  # +2 px in y, -1 px in x
                     torch.roll(y[1], (0, 3), dims=(0, 1))])
    for fast in (False, True):
        ll = sc.score_grid(y, None, 1.0, grid, shifts, inplane_fft=fast)
        best = ll.reshape(2, -1).argmax(dim=1)
        g_idx, t_idx = best // shifts.shape[0], best % shifts.shape[0]
        assert g_idx.tolist() == [10, 40]
        assert shifts[t_idx].tolist() == [[-1.0, 2.0], [3.0, 0.0]]


def test_polar_path_without_numba_gives_the_same_scores(monkeypatch) -> None:
    # CUDA runs the torch code of the image-side reads (grid_sample): same values to rounding
    n, px = 24, 4.0
    sc = ReferenceScorer(blob_volume(n, torch.float32), px)
    grid = healpix_grid(1, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3, n, n, generator=g)
    ctf = make_ctf(3, n, px, torch.float32)
    fast = sc.score_grid(y, ctf, 1.0, grid, shift_grid(4.0, 4.0, px))
    monkeypatch.setenv("CRYOPOSE_NUMBA", "0")
    slow = ReferenceScorer(blob_volume(n, torch.float32), px).score_grid(
        y, ctf, 1.0, grid, shift_grid(4.0, 4.0, px))
    spread = float(fast.amax() - fast.amin())
    assert float((fast - slow).abs().max()) < 1e-5 * spread + 1e-3


def test_repeated_zero_shifts_give_the_unshifted_scores() -> None:
    n, px = 16, 4.0
    sc = ReferenceScorer(blob_volume(n, torch.float32), px)
    grid = healpix_grid(1, dtype=torch.float32)
    y = torch.randn(3, n, n, generator=torch.Generator().manual_seed(1))
    one = sc.score_grid(y, None, 1.0, grid)
    two = sc.score_grid(y, None, 1.0, grid, torch.zeros(2, 2))
    assert two.shape == (3, len(grid), 2)
    torch.testing.assert_close(two, one.expand(-1, -1, 2), rtol=1e-5, atol=1e-2)


def test_shift_grid_is_a_disk_with_zero_first() -> None:
    s = shift_grid(10.0, 2.5, 2.0)
    assert s[0].tolist() == [0.0, 0.0]
    assert float(s.norm(dim=1).max()) <= 5.0 + 1e-9
    assert s.shape[0] == 49  # lattice points (i, j) * 2.5 A with i^2 + j^2 <= 16
    assert shift_grid(0.0, 1.0, 1.0).shape == (1, 2)
    with pytest.raises(ValueError, match="step_angstrom"):
        shift_grid(5.0, 0.0, 1.0)


def test_chunking_gives_identical_results() -> None:
    n, px = 24, 4.0
    vol = blob_volume(n, torch.float32)
    grid = healpix_grid(1, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(5, n, n, generator=g)
    ctf = make_ctf(5, n, px, torch.float32)
    shifts = shift_grid(4.0, 4.0, px)
    big = ReferenceScorer(vol, px, max_chunk_bytes=1 << 34)
    small = ReferenceScorer(vol, px, max_chunk_bytes=1 << 18)
    for fast in (False, True):
        a = big.score_grid(y, ctf, 1.0, grid, shifts, inplane_fft=fast)
        b = small.score_grid(y, ctf, 1.0, grid, shifts, inplane_fft=fast)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    per = torch.stack([grid.matrices[:50], grid.matrices[50:100]] + [grid.matrices[:50]] * 3)
    a = big.score_rotations(y, ctf, 1.0, per)
    b = small.score_rotations(y, ctf, 1.0, per)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(a[0, :, 0], big.score_rotations(y[:1], ctf[:1], 1.0,
                                                               grid.matrices[:50])[0, :, 0])


def test_float32_output_and_bad_input() -> None:
    n = 16
    sc = ReferenceScorer(blob_volume(n, torch.float64), 4.0)  # computes in float32
    ll = sc.score_grid(torch.randn(2, n, n), None, 1.0, healpix_grid(0))
    assert ll.dtype == torch.float32 and ll.shape == (2, 72, 1)
    with pytest.raises(ValueError, match="sigma2"):
        sc.score_grid(torch.randn(2, n, n), None, torch.ones(5), healpix_grid(0))
    with pytest.raises(ValueError, match="images"):
        sc.score_grid(torch.randn(2, n, n + 1), None, 1.0, healpix_grid(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    n, px = 32, 4.0
    vol = blob_volume(n, torch.float32)
    grid = healpix_grid(1, dtype=torch.float32)
    y = torch.randn(4, n, n, generator=torch.Generator().manual_seed(0))
    cpu = ReferenceScorer(vol, px).score_grid(y, None, 1.0, grid)
    gpu = ReferenceScorer(vol.cuda(), px).score_grid(y.cuda(), None, 1.0, grid.to("cuda"))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-2)


def test_polar_templates_vanish_beyond_each_ring_band() -> None:
    # The in-plane GEMM skips, for each angular frequency m, the rings whose band is below m:
    # exact only if those template coefficients are zero, and useful only if the outer ones
    # are not.
    n = 32
    sc = ReferenceScorer(blob_volume(n, torch.float32), 4.0)
    grid = healpix_grid(1, dtype=torch.float32)
    n_phi = sc._polar_n_phi(grid.n_inplane)
    tcross, _ = sc._polar_templates(sc._grid_base(grid)[0], n_phi)  # [M+1, R, D] complex
    m1, n_r = tcross.shape[0], tcross.shape[1]
    band = (sc._ring_samples(n_phi) - 1) // 2
    assert band.shape == (n_r,) and bool((band[1:] >= band[:-1]).all())
    assert int(band[0]) < sc._m_max <= int(band[-1])  # inner rings are band-limited
    per_ring = tcross.abs().amax(dim=2)  # [M+1, R]
    m = torch.arange(m1)[:, None]
    assert float(per_ring[m > band[None, :]].max()) == 0.0
    assert bool((per_ring[m <= band[None, :]] > 0).float().mean() > 0.99)


def test_inplane_fft_with_an_odd_inplane_count_agrees_with_dense() -> None:
    # 37 in-plane angles: the common angular sampling must be an even multiple of 37 (148, not
    # 111: the image side samples half of each ring and mirrors it).
    n, px = 32, 4.0
    sc = ReferenceScorer(blob_volume(n, torch.float32), px)
    n_p = 37
    grid = _with_inplane_count(healpix_grid(1, dtype=torch.float32), n_p)
    n_phi = sc._polar_n_phi(n_p)
    assert n_phi == 148 and 2 * sc._m_max + 2 <= 111
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(grid), (4,), generator=g)
    y = irfft2_centred(sc.projector.slices(grid.matrices[idx]), n)
    s2 = float(y.var())
    y = y + torch.randn(y.shape, generator=g) * math.sqrt(s2) * 0.5
    dense = sc.score_grid(y, None, s2, grid, inplane_fft=False)[..., 0].double()
    fast = sc.score_grid(y, None, s2, grid)[..., 0].double()
    for i in range(4):
        d, f = dense[i], fast[i]
        err = float(((d - d.mean()) - (f - f.mean())).abs().max())
        assert err < 0.08 * float(d.max() - d.min())
        assert spearmanr(d.numpy(), f.numpy()).correlation > 0.97
    assert torch.equal(fast.argmax(dim=1), idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_norm_term_from_ctf_parameters(dtype) -> None:
    # |C|^2 evaluated from the parameters at the polar points instead of interpolated from
    # the CTF grid: the same scores to a small fraction of their range, the same argmax as the
    # dense path; parameters that do not describe the CTF change them (they are used).
    from cryopose.imaging import ctf_from_params

    n, px, b = 32, 4.0, 4
    sc = ReferenceScorer(blob_volume(n, dtype), px, dtype=dtype)
    grid = healpix_grid(1, dtype=torch.float32)
    g = torch.Generator().manual_seed(12)
    du = 8000 + 6000 * torch.rand(b, generator=g, dtype=torch.float64)
    params = {
        "defocus_u_angstrom": du, "defocus_v_angstrom": du - 700,
        "defocus_angle_deg": torch.full((b,), 25.0, dtype=torch.float64),
        "voltage_kv": torch.full((b,), 300.0, dtype=torch.float64),
        "spherical_aberration_mm": torch.full((b,), 2.7, dtype=torch.float64),
        "amplitude_contrast": torch.full((b,), 0.1, dtype=torch.float64),
        "phase_shift_deg": torch.zeros(b, dtype=torch.float64),
        "bfactor_angstrom2": torch.full((b,), 40.0, dtype=torch.float64),
        "scale": torch.full((b,), 0.8, dtype=torch.float64),
        "pixel_size_angstrom": torch.full((b,), px, dtype=torch.float64),
    }
    ctf = ctf_from_params(params, n).to(dtype)
    idx = torch.randint(0, len(grid), (b,), generator=g)
    y = irfft2_centred(sc.projector.slices(grid.matrices[idx]) * ctf, n)
    s2 = float(y.var())
    y = y + torch.randn(y.shape, generator=g, dtype=dtype) * math.sqrt(s2) * 0.5
    dense = sc.score_grid(y, ctf, s2, grid, inplane_fft=False).double()
    table = sc.score_grid(y, ctf, s2, grid).double()
    exact = sc.score_grid(y, ctf, s2, grid, ctf_params=params)
    assert exact.dtype == dtype
    exact = exact.double()
    span = float(dense.max() - dense.min())
    assert float((exact - table).abs().max()) < 0.01 * span
    assert float((exact - dense).abs().max()) < 0.03 * span
    assert torch.equal(exact.reshape(b, -1).argmax(1), dense.reshape(b, -1).argmax(1))
    wrong = dict(params, defocus_u_angstrom=du + 3000, defocus_v_angstrom=du + 2300)
    moved = sc.score_grid(y, ctf, s2, grid, ctf_params=wrong).double()
    assert float((moved - exact).abs().max()) > 0.05 * span
    with pytest.raises(ValueError, match="without ctf"):
        sc.score_grid(y, None, s2, grid, ctf_params=params)
    with pytest.raises(ValueError, match="one per image"):
        sc.score_grid(y, ctf, s2, grid, ctf_params={k: v[:2] for k, v in params.items()})
