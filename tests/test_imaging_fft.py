"""Centred FFT conventions: phase origin at N // 2, layouts, round trips (even and odd N)."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.imaging import (
    fft2_centred,
    fftn_centred,
    frequency_grid_2d,
    ifft2_centred,
    ifftn_centred,
    irfft2_centred,
    radial_frequency_2d,
    rfft2_centred,
)


@pytest.mark.parametrize("box", [8, 9])
def test_delta_at_centre_has_flat_spectrum(box, dtype):
    img = torch.zeros(box, box, dtype=dtype)
    img[box // 2, box // 2] = 1.0
    assert torch.allclose(rfft2_centred(img).real, torch.ones(box, box // 2 + 1, dtype=dtype))
    assert rfft2_centred(img).imag.abs().max() < 1e-6
    vol = torch.zeros(box, box, box, dtype=dtype)
    vol[box // 2, box // 2, box // 2] = 1.0
    assert torch.allclose(fftn_centred(vol).real, torch.ones_like(vol))


@pytest.mark.parametrize("box", [8, 9])
def test_layout_and_round_trips(box):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, box, box, generator=g, dtype=torch.float64)
    assert torch.allclose(irfft2_centred(rfft2_centred(img), box), img)
    assert torch.allclose(ifft2_centred(fft2_centred(img)).real, img)
    assert torch.allclose(ifftn_centred(fftn_centred(img[0], ndim=2), ndim=2).real, img[0])
    # half plane = columns kx >= 0 of the full centred transform (row N//2 is ky = 0)
    full = fft2_centred(img)
    assert torch.allclose(rfft2_centred(img)[..., : box - box // 2], full[..., box // 2 :])
    # a cosine with (kx, ky) = (2, -1) cycles per box peaks at row N//2 - 1, column 2
    i = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    cos = torch.cos(2 * math.pi * (2 * xx - yy) / box)
    ft = rfft2_centred(cos).abs()
    assert tuple((ft == ft.max()).nonzero()[0].tolist()) == (box // 2 - 1, 2)
    ky, kx = frequency_grid_2d(box, 2.0, dtype=torch.float64)
    assert float(kx[box // 2 - 1, 2]) == pytest.approx(2 / (box * 2.0))
    assert float(ky[box // 2 - 1, 2]) == pytest.approx(-1 / (box * 2.0))
    r = radial_frequency_2d(box, rfft=False, centred=True, dtype=torch.float64)
    assert float(r[box // 2, box // 2]) == 0 and float(r[box // 2 - 1, box // 2 + 2]) == (
        pytest.approx(math.sqrt(5))
    )


def test_irfft_shape_error():
    with pytest.raises(ValueError, match="ft"):
        irfft2_centred(torch.zeros(8, 8, dtype=torch.complex64), 8)
