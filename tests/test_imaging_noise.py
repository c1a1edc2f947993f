"""Noise at a requested SNR (white and coloured), spectrum shape, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from cryopose.imaging import (
    add_noise,
    coloured_noise,
    disk_mask,
    noise_sigma,
    radial_frequency_2d,
    signal_power,
    white_noise,
)


def clean_images(n: int, box: int, dtype=torch.float64) -> torch.Tensor:
    i = torch.arange(box, dtype=dtype) - box // 2
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    shifts = torch.linspace(-4, 4, n, dtype=dtype)
    return 3.0 * torch.exp(-((xx - shifts[:, None, None]) ** 2 + yy**2) / (2 * 5.0**2))


def test_signal_power_uses_disk_of_radius_half_box():
    box = 32
    img = torch.zeros(2, box, box, dtype=torch.float64)
    img[:, box // 2, box // 2] = 2.0  # one pixel of value 2 in each image
    img[0, 0, 0] = 100.0  # corner: outside the disk, ignored
    mask = disk_mask(box)
    assert not mask[0, 0] and mask[box // 2, 0] and mask[box // 2, box // 2]
    n_in = int(mask.sum())
    assert float(signal_power(img)) == pytest.approx(4.0 / n_in)
    per = signal_power(img, per_image=True)
    assert per.shape == (2,) and float(per[1]) == pytest.approx(4.0 / n_in)


@pytest.mark.parametrize("box", [32, 33])
def test_white_noise_snr_within_5_percent(box, dtype):
    clean = clean_images(64, box, dtype)
    snr = 0.1
    noisy = add_noise(clean, snr, generator=123)
    noise = noisy - clean
    measured = float(signal_power(clean)) / float(noise.var())
    assert measured == pytest.approx(snr, rel=0.05)
    assert noisy.dtype == dtype
    # white: neighbouring pixels uncorrelated
    lag1 = float((noise[..., 1:] * noise[..., :-1]).mean() / noise.var())
    assert abs(lag1) < 0.02


def radial_profile(power: torch.Tensor, box: int) -> torch.Tensor:
    """Mean power per integer radius (native fft2 layout), radii 0 .. box // 2 - 1."""
    r = radial_frequency_2d(box, rfft=False, centred=False, dtype=torch.float64).round().long()
    out = torch.zeros(box // 2, dtype=torch.float64)
    for k in range(box // 2):
        out[k] = power[r == k].mean()
    return out


@pytest.mark.parametrize("box", [48, 49])
def test_coloured_noise_snr_and_spectrum_shape(box):
    clean = clean_images(256, box)
    shape_table = 1.0 / (1.0 + (torch.arange(box // 2 + 1, dtype=torch.float64) / 6.0) ** 2)
    snr = 0.05
    noisy = add_noise(clean, snr, generator=7, radial_power=shape_table)
    noise = noisy - clean
    measured = float(signal_power(clean)) / float(noise.var())
    assert measured == pytest.approx(snr, rel=0.05)
    # measured radial spectrum vs requested shape (both normalised at radius 1..)
    power = (torch.fft.fft2(noise).abs() ** 2).mean(0)
    prof = radial_profile(power, box)
    want = shape_table[: box // 2]
    ratio = (prof[1:] / prof[1:].mean()) / (want[1:] / want[1:].mean())
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.1)
    # the spectrum really is coloured: high-frequency power 10x below low-frequency
    assert prof[box // 2 - 1] < 0.1 * prof[1]


def test_coloured_noise_callable_and_variance():
    box = 40
    noise = coloured_noise((500, box, box), 2.0, lambda k: torch.exp(-k / 0.1), generator=1,
                           dtype=torch.float64)
    assert float(noise.var()) == pytest.approx(4.0, rel=0.03)


def test_same_seed_same_bytes_and_generator_objects():
    clean = clean_images(4, 24)
    a = add_noise(clean, 0.5, generator=99)
    b = add_noise(clean, 0.5, generator=99)
    c = add_noise(clean, 0.5, generator=100)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = torch.ones(64)
    ca = add_noise(clean, 0.5, g1, radial_power=t)
    cb = add_noise(clean, 0.5, g2, radial_power=t)
    assert torch.equal(ca, cb)
    assert torch.equal(white_noise((3, 8, 8), 1.0, 4), white_noise((3, 8, 8), 1.0, 4))


def test_external_signal_power_fixes_sigma_across_batches():
    clean = clean_images(8, 32)
    p_ref = 2.5
    noisy = add_noise(clean, 0.25, generator=0, signal_power=p_ref)
    assert float((noisy - clean).std()) == pytest.approx(math.sqrt(p_ref / 0.25), rel=0.05)
    assert noise_sigma(p_ref, 0.25) == pytest.approx(math.sqrt(10.0))


def test_infinite_snr_means_no_noise_and_bad_snr_raises():
    clean = clean_images(2, 16)
    out = add_noise(clean, math.inf, generator=0)
    assert torch.equal(out, clean) and out is not clean
    with pytest.raises(ValueError, match="snr"):
        add_noise(clean, 0.0, generator=0)
    with pytest.raises(TypeError, match="generator"):
        add_noise(clean, 1.0, generator=None)
    with pytest.raises(ValueError, match="radial_power"):
        add_noise(clean, 1.0, generator=0, radial_power=-torch.ones(10))
