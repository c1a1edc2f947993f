"""PlaneSampler: values of a real image's DFT at off-grid frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.imaging import rfft2_centred
from cryopose.imaging.plane import PlaneSampler


def _blob_images(n: int, dtype: torch.dtype, b: int = 3) -> torch.Tensor:
    """Smooth off-centre Gaussian blobs (their DFT is band-limited well inside Nyquist)."""
    g = torch.Generator().manual_seed(5)
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64) - n // 2,
                          torch.arange(n, dtype=torch.float64) - n // 2, indexing="ij")
    out = []
    for _ in range(b):
        cx, cy = (torch.rand(2, generator=g, dtype=torch.float64) - 0.5) * n / 3
        s = 1.5 + torch.rand((), generator=g, dtype=torch.float64) * 1.5
        out.append(torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2)))
    return torch.stack(out).to(dtype)


def _dtft(images: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Exact sum_x f(x) exp(-2 pi i k . x / N), x relative to pixel (N // 2, N // 2)."""
    n = images.shape[-1]
    off = torch.arange(n, dtype=torch.float64) - n // 2
    ex = torch.exp(-2j * math.pi * kx.double().reshape(-1, 1) * off / n)  # [Q, N]
    ey = torch.exp(-2j * math.pi * ky.double().reshape(-1, 1) * off / n)
    v = torch.einsum("byx,qy,qx->bq", images.double().to(torch.complex128), ey, ex)
    return v.reshape(images.shape[0], *kx.shape)


def _points(n: int, n_r: int = 6, n_q: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    rad = torch.rand(n_r, n_q, generator=g, dtype=torch.float64) * (n / 2) * 0.99
    phi = torch.rand(n_r, n_q, generator=g, dtype=torch.float64) * 2 * math.pi
    return rad * torch.cos(phi), rad * torch.sin(phi)


@pytest.mark.parametrize("n", [32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_match_the_exact_transform(n: int, dtype: torch.dtype) -> None:
    # Bilinear reads of the 2x padded, gridding-corrected transform against the exact DTFT at
    # random off-grid frequencies (all angles, up to Nyquist): 0.9 % of the peak for these
    # blobs; without the sinc^2 correction 2.8 %, with a wrong phase origin or mirror O(1).
    images = _blob_images(n, dtype)
    kx, ky = _points(n)
    sampler = PlaneSampler(n, kx.to(dtype), ky.to(dtype))
    got = sampler.sample(sampler.table(rfft2_centred(images).to(
        torch.complex64 if dtype == torch.float32 else torch.complex128)))
    want = _dtft(images, kx, ky)
    assert got.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    err = (got.to(torch.complex128) - want).abs().max() / want.abs().max()
    assert float(err) < 1.5e-2


@pytest.mark.parametrize("n", [16, 17])
def test_friedel_mates_and_pairing(n: int) -> None:
    # k and -k read mirrored cells of a Hermitian table: exact conjugates, including points
    # whose cells wrap past the Nyquist row or touch the kx = 0 column from either side.
    images = _blob_images(n, torch.float64) + 0.1 * torch.randn(
        3, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kx, ky = _points(n)
    kx = torch.cat([kx, torch.tensor([[0.0, -0.2, 0.3, n / 2 - 0.1, -(n / 2) + 0.05, 0.0,
                                        1e-9, -1e-9, 2.0, -2.0]], dtype=torch.float64)])
    ky = torch.cat([ky, torch.tensor([[n / 2 - 0.2, 1.0, -1.5, 0.0, 0.3, -(n / 2) + 0.1, 3.0,
                                        -3.0, n / 2 - 0.01, -(n / 2) + 0.01]],
                                      dtype=torch.float64)])
    spec = rfft2_centred(images)
    fwd, back = PlaneSampler(n, kx, ky), PlaneSampler(n, -kx, -ky)
    table = fwd.table(spec)
    a, b = fwd.sample(table), back.sample(table)
    torch.testing.assert_close(b, a.conj(), rtol=0, atol=1e-12)
    w = torch.rand(3, kx.shape[0], generator=torch.Generator().manual_seed(4),
                   dtype=torch.float64)
    paired = fwd.sample(table, w, paired=True)
    torch.testing.assert_close(paired[..., : kx.shape[1]], a * w[..., None])
    torch.testing.assert_close(paired[..., kx.shape[1]:], (a * w[..., None]).conj())
    torch.testing.assert_close(fwd.sample_real(table, w), (a * w[..., None]).real)


@pytest.mark.parametrize("n", [20, 21])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_and_torch_paths_agree(n: int, dtype: torch.dtype, monkeypatch) -> None:
    images = _blob_images(n, dtype) + 0.2 * torch.randn(
        3, n, n, generator=torch.Generator().manual_seed(6), dtype=dtype)
    kx, ky = _points(n)
    sampler = PlaneSampler(n, kx.to(dtype), ky.to(dtype))
    table = sampler.table(rfft2_centred(images))
    w = torch.rand(3, kx.shape[0], generator=torch.Generator().manual_seed(7), dtype=dtype)
    fast = sampler.sample(table, w, paired=True), sampler.sample_real(table, w)
    monkeypatch.setenv("CRYOPOSE_NUMBA", "0")
    slow = sampler.sample(table, w, paired=True), sampler.sample_real(table, w)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for f, s in zip(fast, slow, strict=True):
        assert f.dtype == s.dtype
        scale = float(s.abs().max())
        assert float((f - s).abs().max()) <= tol * scale


def test_bad_input_is_rejected() -> None:
    kx, ky = _points(16)
    with pytest.raises(ValueError, match="Nyquist"):
        PlaneSampler(16, kx + 8.5, ky)
    with pytest.raises(ValueError, match=r"\[R, Q\]"):
        PlaneSampler(16, kx.reshape(-1), ky.reshape(-1))
    sampler = PlaneSampler(16, kx, ky)
    with pytest.raises(ValueError, match="spectrum"):
        sampler.table(torch.zeros(2, 16, 16, dtype=torch.complex64))
    table = sampler.table(torch.zeros(2, 16, 9, dtype=torch.complex128))
    with pytest.raises(ValueError, match="weight"):
        sampler.sample(table, torch.ones(2, 3, dtype=torch.float64))
    # the numba reads use precomputed flat offsets into [2N, N + 1] tables: other shapes are
    # refused on both paths, never read out of bounds
    for bad in (table[:, :-1], table[:, :, :-1], table.real):
        with pytest.raises(ValueError, match="table"):
            sampler.sample(bad)
        with pytest.raises(ValueError, match="table"):
            sampler.sample_real(bad)


def test_thread_count_does_not_change_the_samples() -> None:
    # one image per thread, in a fixed order: bitwise the same with 1 and 2 threads
    images = _blob_images(24, torch.float32, b=5)
    kx, ky = _points(24)
    sampler = PlaneSampler(24, kx.float(), ky.float())
    table = sampler.table(rfft2_centred(images))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sampler.sample(table, paired=True), sampler.sample_real(table)
        torch.set_num_threads(2)
        two = sampler.sample(table, paired=True), sampler.sample_real(table)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
