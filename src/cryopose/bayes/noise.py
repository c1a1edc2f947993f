"""Noise variance per Fourier shell, estimated from the background (outside the particle).

Normalisation (``docs/conventions.md``, "Likelihood"): ``sigma2`` is the noise variance per
real-space pixel, per radial shell ``round(|k|)`` (Fourier pixels, ``0 .. N // 2``; the corners
``|k| > N / 2`` belong to shell ``N // 2``). White noise of pixel variance ``s^2`` has
``sigma2 = s^2`` in every shell.

Coloured estimate: each image's background (pixels farther than ``mask_radius_px`` from the
centre, with a raised-cosine edge, per-image background mean removed) is Fourier transformed;
``E |DFT(m n)|^2 = sum_x m(x)^2 * sigma2`` for white noise ``n`` (less, near ``k = 0``, once
the weighted mean is removed: the exact expectation is used), so the shell sum of
``|DFT(m n)|^2`` divided by the shell sum of that expectation is the per-pixel variance of
each shell. The mask blurs the spectrum by its own transform (a few
Fourier pixels), so sharp spectral features are smoothed.
"""

from __future__ import annotations

import math

import torch

from cryopose.imaging.fft import radial_frequency_2d, rfft2_centred

__all__ = ["estimate_noise_sigma2"]


def _background_mask(box: int, radius_px: float, edge_px: float, dtype, device) -> torch.Tensor:
    i = torch.arange(box, dtype=torch.float64, device=device) - box // 2
    r = torch.sqrt(i[:, None] ** 2 + i[None, :] ** 2)
    t = ((r - radius_px) / edge_px).clamp(0.0, 1.0)
    return (0.5 - 0.5 * torch.cos(math.pi * t)).to(dtype)


def estimate_noise_sigma2(
    images: torch.Tensor,
    mask_radius_px: float,
    *,
    coloured: bool = True,
    edge_px: float = 3.0,
) -> torch.Tensor:
    """Per-shell noise variance from the pixels outside the particle mask.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, N, N]`` (or ``[N, N]``) real particle images.
    mask_radius_px : float
        Particle radius in pixels: pixels within it of the centre ``(N // 2, N // 2)`` are
        excluded (the coloured estimate ramps the background weight from 0 at this radius to 1
        at ``mask_radius_px + edge_px``).
    coloured : bool
        Estimate a radial power spectrum (True) or a single white variance (False).
    edge_px : float
        Width of the raised-cosine edge of the coloured estimate's mask, in pixels.

    Returns
    -------
    torch.Tensor
        ``[N // 2 + 1]`` noise variance per real-space pixel for each shell, in the images'
        dtype (float32 or float64) and device; constant when ``coloured=False``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (2, 3):
        raise ValueError("images: expected a [B, N, N] tensor of particle images")
    if images.ndim == 2:
        images = images[None]
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected square images, got shape {tuple(images.shape)}")
    n = int(images.shape[-1])
    dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
    x = images.to(dtype)
    if not edge_px > 0:
        raise ValueError(f"edge_px: expected > 0, got {edge_px}")
    hard = _background_mask(n, mask_radius_px, 1e-9, dtype, x.device) > 0.5
    if int(hard.sum()) < 2:
        raise ValueError(
            f"mask_radius_px: {mask_radius_px} leaves no background pixels in a {n}-pixel box"
        )
    if not coloured:
        bg = x[:, hard]
        var = (bg - bg.mean(dim=-1, keepdim=True)).pow(2).sum() / (bg.numel() - bg.shape[0])
        return var.expand(n // 2 + 1).clone()
    m = _background_mask(n, mask_radius_px, edge_px, dtype, x.device)
    msum = (m**2).sum()
    if float(msum) < 1.0:
        raise ValueError(
            f"mask_radius_px: {mask_radius_px} leaves too little background in a {n}-pixel box"
        )
    s1 = m.sum()
    mean = (x * m).sum(dim=(-2, -1), keepdim=True) / s1
    ft = rfft2_centred((x - mean) * m)
    power = (ft.real**2 + ft.imag**2).mean(dim=0)  # [N, N//2+1]
    # Expected power of white noise of unit variance at each k after the mask and the
    # weighted-mean removal: sum_x m^2 |e_k - M(k) / S1|^2 = S2 - 2 Re(conj(M) M2) / S1 +
    # |M|^2 S2 / S1^2 (M, M2: transforms of m and m^2; S1, S2 their sums). It is zero at k = 0
    # and below S2 near it, by about how much of the background the mask's transform spans;
    # dividing by S2 alone underestimated the lowest shells (by 20 % at shell 1-2 for a
    # particle mask of 0.9 of the box).
    tm, tm2 = rfft2_centred(m), rfft2_centred(m * m)
    expected = msum - 2.0 * (tm.conj() * tm2).real / s1 + (tm.real**2 + tm.imag**2) * msum / s1**2
    # full-plane shell sums: columns 0 < kx < N/2 stand for two coefficients
    mult = torch.full_like(power, 2.0)
    mult[:, 0] = 1.0
    if n % 2 == 0:
        mult[:, n // 2] = 1.0
    shell = radial_frequency_2d(n, dtype=torch.float64, device=x.device).round().long()
    shell = shell.clamp(max=n // 2).reshape(-1)
    num = torch.zeros(n // 2 + 1, dtype=dtype, device=x.device)
    den = torch.zeros(n // 2 + 1, dtype=dtype, device=x.device)
    num.index_add_(0, shell, (power * mult).reshape(-1))
    den.index_add_(0, shell, (expected * mult).reshape(-1))
    # Shell 0 (k = 0 alone) carries no noise power after the mean removal: shell 1's value.
    out = num / den.clamp(min=1e-12 * float(msum))
    out[0] = out[1] if n > 2 else out[0]
    return out
