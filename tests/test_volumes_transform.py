"""Resampling (Fourier crop / pad, box crop / pad) and point-group symmetrisation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar

from cryopose.io.errors import CryoposeInputError
from cryopose.volumes import resample_volume, symmetrise


def _gaussian(shape, px, centre=(1.3, -0.7, 2.1), sigma=5.0, dtype=torch.float64):
    """Gaussian blob sampled at (i - n//2) * px; centre is (x, y, z) in Angstrom."""
    axes = [(torch.arange(n, dtype=dtype) - n // 2) * px for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    cx, cy, cz = centre
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))


def _fft_crop(volume: torch.Tensor, n_out: int) -> torch.Tensor:
    """Reference Fourier crop of a cubic volume to an odd size (no Nyquist ambiguity)."""
    n = volume.shape[-1]
    spectrum = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume)))
    start = n // 2 - n_out // 2
    cut = spectrum[start : start + n_out, start : start + n_out, start : start + n_out]
    out = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(cut))).real
    return out * (n_out / n) ** 3


def test_same_pixel_and_box_is_identity(dtype):
    v = torch.randn(2, 9, 10, 11, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resample_volume(v, 1.7), v)


@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("factor", [2, 3])
def test_fourier_pad_then_crop_is_identity(n, factor, dtype):
    v = torch.randn(2, n, n, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    up = resample_volume(v, 1.0, 1.0 / factor)
    assert up.shape == (2, factor * n, factor * n, factor * n) and up.dtype == dtype
    # Original samples are kept (band-limited interpolation passes through them) ...
    c, cu = n // 2, factor * n // 2
    sub = up[..., cu - factor * c :: factor, cu - factor * c :: factor, cu - factor * c :: factor]
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(sub[..., :n, :n, :n], v, atol=tol)
    # ... and cropping back recovers the input.
    assert torch.allclose(resample_volume(up, 1.0 / factor, 1.0, n), v, atol=tol)


@pytest.mark.parametrize(("n", "n_out"), [(33, 11), (30, 15), (32, 21)])
def test_integer_ratio_downsampling_equals_fft_crop(n, n_out):
    v = torch.randn(n, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = resample_volume(v, 1.0, n / n_out)
    assert got.shape == (n_out,) * 3
    assert torch.allclose(got, _fft_crop(v, n_out), atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "px_in", "px_out", "box_out", "holds_all"),
    [
        ((40, 40, 40), 1.5, 1.0, None, True),  # finer, same physical box
        ((41, 41, 41), 1.5, 2.3, None, True),  # coarser, non-integer ratio
        ((40, 40, 40), 1.5, 1.1, 35, False),  # finer and cropped
        ((33, 33, 33), 2.0, 1.7, 64, True),  # finer and zero-padded
        ((36, 37, 38), 1.2, 1.2, (30, 45, 39), False),  # box only, mixed parities
    ],
)
def test_resampled_gaussian_matches_analytic_samples(
    shape, px_in, px_out, box_out, holds_all, dtype
):
    v = _gaussian(shape, px_in, sigma=4.0, dtype=dtype)
    out = resample_volume(v, px_in, px_out, box_out)
    expected_shape = (
        tuple(round(n * px_in / px_out) for n in shape)
        if box_out is None
        else ((box_out,) * 3 if isinstance(box_out, int) else box_out)
    )
    assert out.shape == expected_shape and out.dtype == dtype
    ref = _gaussian(expected_shape, px_out, sigma=4.0, dtype=dtype)
    assert (out - ref).abs().max() < (1e-4 if dtype == torch.float32 else 2e-5)
    if holds_all:  # integral (sum * px^3) preserved when both boxes hold the blob
        assert float(out.sum()) * px_out**3 == pytest.approx(float(v.sum()) * px_in**3, rel=1e-4)


@pytest.mark.parametrize("n", [20, 21])
def test_box_change_alone_is_centred_real_space_crop_and_pad(n):
    v = torch.randn(n, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for n_out in (12, 13, 27, 28):
        out = resample_volume(v, 1.0, 1.0, n_out)
        ref = torch.zeros(n_out, n_out, n_out, dtype=torch.float64)
        # voxel i of the input is at i - n//2, voxel j of the output at j - n_out//2.
        lo_in = max(0, n // 2 - n_out // 2)
        lo_out = max(0, n_out // 2 - n // 2)
        size = min(n - lo_in, n_out - lo_out)
        s_in, s_out = slice(lo_in, lo_in + size), slice(lo_out, lo_out + size)
        ref[s_out, s_out, s_out] = v[s_in, s_in, s_in]
        assert torch.allclose(out, ref, atol=1e-12)


def test_resample_rejects_bad_arguments():
    v = torch.zeros(4, 4, 4)
    with pytest.raises(CryoposeInputError, match="pixel_size_out"):
        resample_volume(v, 1.0, 0.0)
    with pytest.raises(CryoposeInputError, match="box_out"):
        resample_volume(v, 1.0, 1.0, (4, 4))
    with pytest.raises(CryoposeInputError, match="volume"):
        resample_volume(torch.zeros(4, 4), 1.0)


def _rz(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _cyclic_z(order: int) -> torch.Tensor:
    return torch.stack([_rz(2 * math.pi * k / order) for k in range(order)])


def _d2() -> torch.Tensor:
    return torch.stack(
        [torch.diag(torch.tensor(d, dtype=torch.float64)) for d in ((1, 1, 1), (1, -1, -1),
                                                                    (-1, 1, -1), (-1, -1, 1))]
    )


@pytest.mark.parametrize("n", [16, 17])
def test_c4_about_z_is_exact_and_acts_in_the_xy_plane(n, dtype):
    g = torch.Generator().manual_seed(n)
    v = torch.rand(2, n, n, n, dtype=dtype, generator=g)
    sym = symmetrise(v, _cyclic_z(4))
    assert sym.shape == v.shape and sym.dtype == dtype
    c = n // 2
    # 90 degrees about z about voxel c: (x, y) -> (-y, x), i.e. sym[z, c + x, c - y] = sym[z, y, x]
    idx = torch.arange(1, n) if n % 2 == 0 else torch.arange(n)  # stay inside for even n
    y, x = torch.meshgrid(idx, idx, indexing="ij")
    rotated = sym[..., :, c + (x - c), c - (y - c)]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(rotated, sym[..., :, y, x], atol=tol)
    # A point at x = +2 spreads to (x, y) = (0, +-2), (-2, 0) in its own z plane only.
    point = torch.zeros(n, n, n, dtype=dtype)
    point[c, c, c + 2] = 1.0
    spread = symmetrise(point, _cyclic_z(4))
    for zyx in ((c, c, c + 2), (c, c + 2, c), (c, c - 2, c), (c, c, c - 2)):
        assert float(spread[zyx]) == pytest.approx(0.25)
    assert float(spread.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [16, 17])
def test_d2_is_invariant_under_axis_flips(n):
    v = torch.rand(n, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sym = symmetrise(v, _d2())
    s = slice(1, n) if n % 2 == 0 else slice(0, n)  # flips about voxel n//2 stay inside
    inner = sym[s, s, s]
    # 2-fold about x: (x, y, z) -> (x, -y, -z) flips the z and y array axes.
    assert torch.allclose(inner.flip(0).flip(1), inner, atol=1e-12)
    assert torch.allclose(inner.flip(0).flip(2), inner, atol=1e-12)
    assert torch.allclose(inner.flip(1).flip(2), inner, atol=1e-12)


def test_generic_group_symmetrised_blob_matches_analytic_average():
    # C3 about a tilted axis: V_sym(x) = mean_g G(g x - c) = mean_g G(x - g^T c). Off-grid
    # rotations need interpolation, so the match holds to trilinear accuracy.
    q = haar(1, seed=11)[0]
    group = q @ _cyclic_z(3) @ q.T
    n, px, sigma = 40, 1.0, 4.0
    centre = torch.tensor([6.0, -3.0, 4.0], dtype=torch.float64)
    v = _gaussian((n, n, n), px, tuple(centre.tolist()), sigma)
    sym = symmetrise(v, group)
    ref = sum(_gaussian((n, n, n), px, tuple((g.T @ centre).tolist()), sigma) for g in group) / 3
    assert float((sym - ref).abs().max()) < 0.02 * float(ref.max())
    # Symmetrising again changes the (already symmetric) map only by interpolation error.
    again = symmetrise(sym, group)
    assert float((again - sym).abs().max()) < 0.02 * float(sym.max())


def test_symmetrise_with_relion_point_group_keeps_a_symmetric_map():
    point_group = pytest.importorskip("cryopose.so3.symmetry").point_group
    group = point_group("D3")
    n = 32
    centre = torch.tensor([5.0, 2.0, 3.0], dtype=torch.float64)
    ref = sum(_gaussian((n, n, n), 1.0, tuple((g @ centre).tolist()), 4.0) for g in group)
    out = symmetrise(ref, group)
    assert float((out - ref).abs().max()) < 0.02 * float(ref.max())


def test_symmetrise_rejects_bad_group():
    with pytest.raises(CryoposeInputError, match="group_matrices"):
        symmetrise(torch.zeros(4, 4, 4), torch.eye(3))
