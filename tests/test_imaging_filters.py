"""Fourier crop, soft masks, low-pass, normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.imaging import fourier_crop, low_pass, normalise, soft_circular_mask


def trig_image(box: int, modes, pixel: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Sum of cos(2 pi (kx x + ky y) / L + phase), x, y in original pixels relative to the centre,
    sampled on a grid of the given pixel size (L = physical box length in original pixels)."""
    n = box
    length = n * pixel
    i = (torch.arange(n, dtype=dtype) - n // 2) * pixel
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    img = torch.zeros(n, n, dtype=dtype)
    for kx, ky, ph in modes:
        img += torch.cos(2 * math.pi * (kx * xx + ky * yy) / length + ph)
    return img


MODES = [(0, 0, 0.0), (3, -2, 0.4), (-5, 7, 1.1), (9, 4, -0.3)]  # |k| < 12 cycles per box


@pytest.mark.parametrize(("box", "new_box"), [(64, 32), (64, 27), (65, 33), (65, 30)])
def test_fourier_crop_preserves_band_limited_image(box, new_box, dtype):
    """A band-limited image is sampled exactly on the coarser grid (pixel size x box/new_box)."""
    img = trig_image(box, MODES, dtype=dtype)
    out = fourier_crop(img.expand(2, box, box), new_box)
    ref = trig_image(new_box, MODES, pixel=box / new_box, dtype=dtype)
    assert out.shape == (2, new_box, new_box) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(out[1], ref, atol=tol)


def test_fourier_crop_volume_and_errors():
    box, new = 20, 11
    i = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    vol = torch.cos(2 * math.pi * (2 * x - 3 * y + z) / box)
    out = fourier_crop(vol, new, ndim=3)
    j = (torch.arange(new, dtype=torch.float64) - new // 2) * box / new
    z2, y2, x2 = torch.meshgrid(j, j, j, indexing="ij")
    assert torch.allclose(out, torch.cos(2 * math.pi * (2 * x2 - 3 * y2 + z2) / box), atol=1e-10)
    with pytest.raises(ValueError, match="new_box"):
        fourier_crop(torch.zeros(8, 8), 9)
    with pytest.raises(ValueError, match="x"):
        fourier_crop(torch.zeros(8, 7), 4)


@pytest.mark.parametrize("box", [32, 33])
def test_soft_circular_mask_2d_and_3d(box):
    m = soft_circular_mask(box, radius_px=8, edge_px=4, dtype=torch.float64)
    c = box // 2
    assert m[c, c] == 1 and m[c, c + 8] == 1
    assert float(m[c, c + 10]) == pytest.approx(0.5)  # half-way through the cosine edge
    assert m[c, c + 12] == 0 and m[0, 0] == 0
    assert torch.equal(m, m.T)
    m3 = soft_circular_mask(box, 8, 4, ndim=3, dtype=torch.float64)
    assert m3.shape == (box, box, box)
    assert float(m3[c, c + 10, c]) == pytest.approx(0.5) and float(m3[c + 10, c, c]) == 0.5
    hard = soft_circular_mask(box, 8, 0)
    assert set(hard.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("box", [64, 63])
def test_low_pass_keeps_low_and_removes_high_frequencies(box, dtype):
    px = 2.0  # Nyquist 4 A; resolution 10 A -> cut-off at box * px / 10 Fourier pixels
    cutoff = box * px / 10
    low = trig_image(box, [(int(cutoff) - 2, 1, 0.2)], dtype=dtype)
    high = trig_image(box, [(int(cutoff) + 4, -2, 0.5)], dtype=dtype)
    out = low_pass((low + high).expand(3, box, box), 10.0, px, edge_fourier_px=2.0)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(out[0], low, atol=tol)
    i = torch.arange(box, dtype=dtype) - box // 2
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    vol = torch.cos(2 * math.pi * 3 * x / box) + torch.sin(2 * math.pi * 30 * z / box)
    out3 = low_pass(vol, 10.0, px, ndim=3)
    assert torch.allclose(out3, torch.cos(2 * math.pi * 3 * x / box), atol=tol)


def test_normalise_background_zero_mean_unit_std(dtype):
    box = 40
    g = torch.Generator().manual_seed(0)
    img = 5.0 + 3.0 * torch.randn(4, box, box, generator=g, dtype=dtype)
    img[:, 15:25, 15:25] += 50.0  # particle inside the circle must not affect the statistics
    out = normalise(img, background_radius_px=12)
    i = torch.arange(box) - box // 2
    bg = (i[:, None] ** 2 + i[None, :] ** 2) > 144
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out[:, bg].mean(-1).abs().max() < tol
    assert torch.allclose(out[:, bg].std(-1, correction=0), torch.ones(4, dtype=dtype), atol=tol)
    # default radius 0.375 N
    assert torch.allclose(normalise(img), normalise(img, 0.375 * box))
    with pytest.raises(ValueError, match="background_radius_px"):
        normalise(img, background_radius_px=100)
