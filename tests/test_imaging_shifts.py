"""Fourier shifts: integer = roll, sign, round trip, RELION origin semantics."""

from __future__ import annotations

import pytest
import torch

from cryopose.imaging import (
    apply_origin,
    centre_by_origin,
    phase_shift_fourier,
    rfft2_centred,
    shift_images,
)


def gaussian_image(box: int, cx: float, cy: float, sigma: float = 2.5, dtype=torch.float64):
    """Gaussian centred at pixel (x = box // 2 + cx, y = box // 2 + cy)."""
    i = torch.arange(box, dtype=dtype) - box // 2
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))


def centroid(img: torch.Tensor) -> tuple[float, float]:
    box = img.shape[-1]
    i = torch.arange(box, dtype=img.dtype)
    total = img.sum()
    return float((img.sum(0) * i).sum() / total), float((img.sum(1) * i).sum() / total)


@pytest.mark.parametrize("box", [16, 17])
def test_integer_shift_equals_roll(box, dtype):
    g = torch.Generator().manual_seed(box)
    img = torch.randn(3, box, box, generator=g, dtype=dtype)
    sx = torch.tensor([2.0, -3.0, 0.0], dtype=dtype)
    sy = torch.tensor([-1.0, 4.0, 5.0], dtype=dtype)
    out = shift_images(img, sx, sy)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for n in range(3):
        ref = torch.roll(img[n], shifts=(int(sy[n]), int(sx[n])), dims=(-2, -1))
        assert torch.allclose(out[n], ref, atol=tol)
    assert out.dtype == dtype


@pytest.mark.parametrize("box", [40, 41])
def test_subpixel_shift_sign_with_offcentre_gaussian(box):
    img = gaussian_image(box, cx=-3.0, cy=2.0)
    out = shift_images(img, 1.25, -0.5)
    ref = gaussian_image(box, cx=-1.75, cy=1.5)
    assert torch.allclose(out, ref, atol=1e-10)
    x, y = centroid(out)
    assert x == pytest.approx(box // 2 - 1.75, abs=1e-6)
    assert y == pytest.approx(box // 2 + 1.5, abs=1e-6)


@pytest.mark.parametrize("box", [32, 33])
def test_shift_then_unshift_is_identity(box, dtype):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(4, box, box, generator=g, dtype=dtype)
    sx = torch.rand(4, generator=g, dtype=dtype) * 10 - 5
    sy = torch.rand(4, generator=g, dtype=dtype) * 10 - 5
    back = shift_images(shift_images(img, sx, sy), -sx, -sy)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    if box % 2:
        assert torch.allclose(back, img, atol=tol)
    else:
        # even N: only the Nyquist row/column is lost for non-integer shifts
        ft_b, ft_i = rfft2_centred(back), rfft2_centred(img)
        assert torch.allclose(ft_b[..., 1:, :-1], ft_i[..., 1:, :-1], atol=tol * box)
        smooth = gaussian_image(box, 1.0, -1.0, sigma=3.0, dtype=dtype)
        # (1e-7: the Gaussian's ~1e-9 cut at the box edge has some Nyquist content)
        round_trip = shift_images(shift_images(smooth, 2.3, -1.7), -2.3, 1.7)
        assert torch.allclose(round_trip, smooth, atol=max(tol, 1e-7))


def test_fourier_variant_matches_real_space():
    box = 21
    img = gaussian_image(box, 1.0, 2.0)
    ft = rfft2_centred(img)
    assert torch.allclose(phase_shift_fourier(ft, 0.7, -1.3, box), rfft2_centred(
        shift_images(img, 0.7, -1.3)), atol=1e-10)
    full = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(img)))
    shifted = phase_shift_fourier(full, 0.7, -1.3, box, rfft=False)
    back = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(shifted))).real
    assert torch.allclose(back, shift_images(img, 0.7, -1.3), atol=1e-10)


@pytest.mark.parametrize("box", [40, 41])
def test_relion_origin_semantics(box):
    """With origin (ox, oy) A the particle sits at (N//2 - ox/px, N//2 - oy/px); centring moves it
    to (N//2, N//2); apply_origin is the inverse."""
    px, ox, oy = 1.5, 4.5, -3.0  # -> particle at x = N//2 - 3, y = N//2 + 2
    particle = gaussian_image(box, cx=-ox / px, cy=-oy / px)
    centred = centre_by_origin(particle, ox, oy, px)
    assert torch.allclose(centred, gaussian_image(box, 0.0, 0.0), atol=1e-8)
    x, y = centroid(centred)
    assert (x, y) == (pytest.approx(box // 2, abs=1e-6), pytest.approx(box // 2, abs=1e-6))
    assert torch.allclose(apply_origin(centred, ox, oy, px), particle, atol=1e-8)
    # batched origins
    ox_b = torch.tensor([4.5, -6.0], dtype=torch.float64)
    oy_b = torch.tensor([-3.0, 1.5], dtype=torch.float64)
    moved = apply_origin(gaussian_image(box, 0, 0).expand(2, box, box), ox_b, oy_b, px)
    assert torch.allclose(moved[1], gaussian_image(box, cx=4.0, cy=-1.0), atol=1e-8)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="images"):
        shift_images(torch.zeros(4, 5), 1.0, 1.0)
    with pytest.raises(ValueError, match="ft"):
        phase_shift_fourier(torch.zeros(8, 8, dtype=torch.complex64), 1.0, 1.0, 8)
