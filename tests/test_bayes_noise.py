"""Tests of cryopose.bayes.noise: per-shell noise variance from the image background."""

from __future__ import annotations

import pytest
import torch

from cryopose.bayes.noise import estimate_noise_sigma2
from cryopose.imaging import coloured_noise


@pytest.mark.parametrize("n", [64, 63])
@pytest.mark.parametrize("radius", [0.25, 0.45])
def test_white_noise_gives_its_variance_in_every_shell(n: int, radius: float,
                                                       dtype: torch.dtype) -> None:
    # radius 0.45 of the box (estimate's default particle mask): the background is the
    # corners, whose transform spans the lowest shells; the mean removal's dip there must be
    # accounted for (it made shells 1-2 ~20 % low)
    g = torch.Generator().manual_seed(0)
    s = 1.7
    x = (torch.randn(300, n, n, generator=g, dtype=torch.float64) * s + 0.3).to(dtype)
    # a bright particle in the middle must not leak into the estimate
    i = torch.arange(n, dtype=torch.float64) - n // 2
    x = x + (50 * torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / 20.0)).to(dtype)
    col = estimate_noise_sigma2(x, radius * n)
    white = estimate_noise_sigma2(x, radius * n, coloured=False)
    assert col.shape == white.shape == (n // 2 + 1,)
    assert col.dtype == dtype
    torch.testing.assert_close(white, torch.full_like(white, s**2), rtol=0.02, atol=0)
    assert float((col / s**2 - 1).abs().max()) < 0.06
    assert float(col.mean() / s**2) == pytest.approx(1.0, abs=0.01)


def test_coloured_noise_shape_is_recovered() -> None:
    n = 64
    g = torch.Generator().manual_seed(1)
    radii = torch.arange(n, dtype=torch.float64)
    shape = 1.0 / (1.0 + (radii / 8.0) ** 2) + 0.1  # falling spectrum
    x = coloured_noise((400, n, n), 1.0, shape, generator=g, dtype=torch.float64)
    est = estimate_noise_sigma2(x, n / 4)
    # ratio of estimated to true shape is a constant (the normalisation) within ~10%,
    # away from the lowest shells where the mask's blur matters most
    ratio = est[3:] / shape[3 : n // 2 + 1]
    assert float(ratio.max() / ratio.min()) < 1.2
    assert float(est[2] / est[-1]) > 5.0  # strongly coloured (truth: ~8.6)


def test_bad_mask_radius_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask_radius_px"):
        estimate_noise_sigma2(torch.randn(2, 16, 16), 30.0)
