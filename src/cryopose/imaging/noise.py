"""Gaussian noise at a requested SNR, white or coloured, seeded.

SNR definition (``docs/conventions.md``, ASPIRE's): ``SNR = P / sigma^2`` where ``P`` is the
mean of the squared clean image (after CTF and shift) over pixels inside the disk of radius
``N / 2`` about the centre ``(N // 2, N // 2)``, averaged over the data set, and ``sigma^2`` is
the noise variance per pixel. For coloured noise the radial power spectrum's *shape* is
normalised to mean 1 over the full DFT grid, so ``sigma^2`` is still the mean per-pixel noise
variance and the same SNR definition holds.

Streaming simulation: measure ``P`` once (:func:`signal_power` on a first pass or a reference
set), then pass it as ``signal_power=`` to :func:`add_noise` for every batch so that all batches
share one ``sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cryopose.imaging.fft import radial_frequency_2d

__all__ = [
    "disk_mask",
    "signal_power",
    "noise_sigma",
    "white_noise",
    "coloured_noise",
    "add_noise",
]

RadialPower = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _generator(generator: torch.Generator | int, device: torch.device) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        g = torch.Generator(device=device)
        g.manual_seed(generator)
        return g
    raise TypeError(f"generator: expected a torch.Generator or an int seed, got {generator!r}")


def disk_mask(
    box: int,
    radius_px: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[box, box]`` mask of pixels within ``radius_px`` (default ``box / 2``) of the
    centre ``(box // 2, box // 2)``."""
    radius = box / 2 if radius_px is None else radius_px
    i = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    return i[:, None] ** 2 + i[None, :] ** 2 <= radius**2


def signal_power(
    images: torch.Tensor, radius_px: float | None = None, per_image: bool = False
) -> torch.Tensor:
    """Mean squared value of clean images inside the disk of radius ``N / 2``.

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` clean (CTF-applied, shifted) images.
    radius_px : float, optional
        Disk radius in pixels (default ``N / 2``).
    per_image : bool
        Return one value per image ``[...]`` instead of the batch average (a 0-d tensor).

    Returns
    -------
    torch.Tensor
        Signal power in (image units)^2.
    """
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected [..., N, N], got shape {tuple(images.shape)}")
    mask = disk_mask(int(images.shape[-1]), radius_px, images.device)
    power = (images[..., mask] ** 2).mean(dim=-1)
    return power if per_image else power.mean()


_batch_signal_power = signal_power  # the argument of add_noise shadows the public name


def noise_sigma(signal_power: float | torch.Tensor, snr: float) -> float | torch.Tensor:
    """Noise standard deviation ``sqrt(P / snr)`` (0 for ``snr = inf``)."""
    if not snr > 0:
        raise ValueError(f"snr: expected > 0 (or inf for no noise), got {snr}")
    if math.isinf(snr):
        return signal_power * 0.0
    if isinstance(signal_power, torch.Tensor):
        return torch.sqrt(signal_power / snr)
    return math.sqrt(signal_power / snr)


def white_noise(
    shape: tuple[int, ...],
    sigma: float | torch.Tensor,
    generator: torch.Generator | int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """White Gaussian noise of standard deviation ``sigma`` (broadcast as ``[..., 1, 1]`` if a
    tensor), seeded by ``generator`` (a ``torch.Generator`` or an int seed)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = _generator(generator, device)
    noise = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    sig = torch.as_tensor(sigma, dtype=noise.dtype, device=device)
    if sig.ndim > 0:
        sig = sig[..., None, None]
    return noise * sig


def _shape_filter(box: int, radial_power: RadialPower, dtype: torch.dtype, device: torch.device):
    """``sqrt(S)`` on the native-order rfft grid, with ``S`` normalised to mean 1 over the
    full ``box x box`` DFT grid."""
    r_full = radial_frequency_2d(box, rfft=False, centred=False, dtype=dtype, device=device)
    r_half = radial_frequency_2d(box, rfft=True, centred=False, dtype=dtype, device=device)

    def evaluate(r: torch.Tensor) -> torch.Tensor:
        if callable(radial_power):
            return torch.as_tensor(radial_power(r / box), dtype=dtype, device=device)
        table = torch.as_tensor(radial_power, dtype=dtype, device=device)
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError("radial_power: expected a 1D tensor of >= 2 values at radii 0, 1, ...")
        r_clamped = r.clamp(max=table.numel() - 1)
        lo = r_clamped.floor().long().clamp(max=table.numel() - 2)
        frac = r_clamped - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    s_full = evaluate(r_full)
    if (s_full < 0).any() or not torch.isfinite(s_full).all():
        raise ValueError("radial_power: expected finite, non-negative values")
    mean = s_full.mean()
    if mean <= 0:
        raise ValueError("radial_power: expected a spectrum that is not identically zero")
    return torch.sqrt(evaluate(r_half) / mean)


def coloured_noise(
    shape: tuple[int, ...],
    sigma: float | torch.Tensor,
    radial_power: RadialPower,
    generator: torch.Generator | int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stationary Gaussian noise with a radial power spectrum of a given shape.

    Parameters
    ----------
    shape : tuple of int
        ``(..., N, N)``.
    sigma : float or torch.Tensor
        Standard deviation per pixel (the spectrum's shape is normalised to mean 1 over the
        DFT grid, so the expected per-pixel variance is ``sigma^2``).
    radial_power : torch.Tensor or callable
        Power spectrum shape ``S``: either a 1D tensor of values at radii ``0, 1, 2, ...``
        Fourier pixels (cycles per box; linearly interpolated, constant beyond the last), or a
        callable mapping radial frequency in cycles per pixel (tensor) to ``S``.
    generator : torch.Generator or int
        Seed source.
    dtype, device
        Of the output.

    Returns
    -------
    torch.Tensor
        ``shape`` real noise.
    """
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"shape: expected (..., N, N), got {shape}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    white = white_noise(shape, 1.0, generator, dtype=dtype, device=device)
    filt = _shape_filter(int(shape[-1]), radial_power, white.dtype, device)
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * filt, s=shape[-2:])
    sig = torch.as_tensor(sigma, dtype=noise.dtype, device=device)
    if sig.ndim > 0:
        sig = sig[..., None, None]
    return noise * sig


def add_noise(
    images: torch.Tensor,
    snr: float,
    generator: torch.Generator | int,
    *,
    signal_power: float | torch.Tensor | None = None,
    radial_power: RadialPower | None = None,
) -> torch.Tensor:
    """Add white (or coloured) Gaussian noise to clean images at a requested SNR.

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` clean images.
    snr : float
        Requested SNR (``math.inf``: no noise, the images are returned as a copy).
    generator : torch.Generator or int
        Seed source (same seed, same bytes).
    signal_power : float or torch.Tensor, optional
        Externally measured signal power ``P`` (see :func:`signal_power`); by default measured
        on this batch.
    radial_power : torch.Tensor or callable, optional
        Noise power spectrum shape (see :func:`coloured_noise`); white if None.

    Returns
    -------
    torch.Tensor
        Noisy images ``images + noise`` with per-pixel noise variance ``P / snr``.
    """
    if not snr > 0:
        raise ValueError(f"snr: expected > 0 (or inf for no noise), got {snr}")
    if math.isinf(snr):
        return images.clone()
    power = _batch_signal_power(images) if signal_power is None else signal_power
    sigma = noise_sigma(power, snr)
    if radial_power is None:
        noise = white_noise(images.shape, sigma, generator, images.dtype, images.device)
    else:
        noise = coloured_noise(
            images.shape, sigma, radial_power, generator, images.dtype, images.device
        )
    return images + noise

