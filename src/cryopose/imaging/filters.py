"""Fourier cropping, soft masks, low-pass filtering and RELION-like normalisation."""

from __future__ import annotations

import math

import torch

from cryopose.imaging.fft import fftn_centred, ifftn_centred

__all__ = ["fourier_crop", "soft_circular_mask", "low_pass", "normalise"]


def _check_cube(x: torch.Tensor, ndim: int, name: str) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"ndim: expected 2 (images) or 3 (volumes), got {ndim}")
    if x.ndim < ndim or len(set(x.shape[-ndim:])) != 1:
        raise ValueError(
            f"{name}: expected [..., N{', N' * (ndim - 1)}] square/cubic data, got {tuple(x.shape)}"
        )
    return int(x.shape[-1])


def fourier_crop(x: torch.Tensor, new_box: int, ndim: int = 2) -> torch.Tensor:
    """Down-sample by keeping the central ``new_box`` Fourier coefficients.

    The pixel size becomes ``pixel_size * N / new_box``. Values are preserved (the result
    samples the same band-limited function on the coarser grid: a constant stays the same
    constant), i.e. the centred DFT coefficients scale by ``(new_box / N)^ndim``. The centre
    ``N // 2`` maps to ``new_box // 2``.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., N, N]`` images (``ndim=2``) or ``[..., N, N, N]`` volumes (``ndim=3``), real.
    new_box : int
        Output side, ``1 <= new_box <= N``.
    ndim : int
        2 or 3.

    Returns
    -------
    torch.Tensor
        ``[..., new_box, new_box(, new_box)]`` real.
    """
    box = _check_cube(x, ndim, "x")
    if not (isinstance(new_box, int) and 1 <= new_box <= box):
        raise ValueError(f"new_box: expected an int in [1, {box}], got {new_box!r}")
    if new_box == box:
        return x.clone()
    start = box // 2 - new_box // 2
    ft = fftn_centred(x, ndim)
    index = (Ellipsis,) + (slice(start, start + new_box),) * ndim
    cropped = ft[index]
    return ifftn_centred(cropped, ndim).real * (new_box / box) ** ndim


def _radius_grid(box: int, ndim: int, dtype: torch.dtype, device) -> torch.Tensor:
    i = torch.arange(box, dtype=dtype, device=device) - box // 2
    if ndim == 2:
        return torch.sqrt(i[:, None] ** 2 + i[None, :] ** 2)
    if ndim == 3:
        return torch.sqrt(i[:, None, None] ** 2 + i[None, :, None] ** 2 + i[None, None, :] ** 2)
    raise ValueError(f"ndim: expected 2 or 3, got {ndim}")


def _raised_cosine(r: torch.Tensor, radius: float, edge: float) -> torch.Tensor:
    """1 for r <= radius, cosine fall-off to 0 at radius + edge, 0 beyond."""
    if edge <= 0:
        return (r <= radius).to(r.dtype)
    t = ((r - radius) / edge).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def soft_circular_mask(
    box: int,
    radius_px: float,
    edge_px: float = 5.0,
    ndim: int = 2,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Circular (2D) or spherical (3D) mask about the centre ``box // 2``, with a raised-cosine
    edge.

    Parameters
    ----------
    box : int
        Side in pixels.
    radius_px : float
        Radius (pixels) up to which the mask is 1.
    edge_px : float
        Width (pixels) of the cosine fall-off from 1 to 0 (0 gives a hard mask).
    ndim : int
        2 (``[box, box]``) or 3 (``[box, box, box]``).
    dtype, device
        Of the output (default torch's default dtype, CPU).

    Returns
    -------
    torch.Tensor
        Mask values in [0, 1].
    """
    if radius_px < 0 or edge_px < 0:
        raise ValueError(f"radius_px, edge_px: expected >= 0, got {radius_px}, {edge_px}")
    dtype = dtype or torch.get_default_dtype()
    return _raised_cosine(_radius_grid(box, ndim, dtype, device), radius_px, edge_px)


def low_pass(
    x: torch.Tensor,
    resolution_angstrom: float,
    pixel_size_angstrom: float,
    edge_fourier_px: float = 2.0,
    ndim: int = 2,
) -> torch.Tensor:
    """Low-pass filter images or volumes to a resolution, with a raised-cosine edge.

    Frequencies ``|k| <= 1 / resolution_angstrom`` are kept unchanged; the filter falls to 0
    over ``edge_fourier_px`` Fourier pixels (units of 1 / (N * pixel_size)) beyond that.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., N, N]`` (``ndim=2``) or ``[..., N, N, N]`` (``ndim=3``) real data.
    resolution_angstrom : float
        Cut-off resolution in Angstrom (``>= 2 * pixel_size`` to have any effect below
        Nyquist).
    pixel_size_angstrom : float
        Pixel size in Angstrom.
    edge_fourier_px : float
        Width of the cosine edge in Fourier pixels.
    ndim : int
        2 or 3.

    Returns
    -------
    torch.Tensor
        Filtered data, same shape.
    """
    box = _check_cube(x, ndim, "x")
    if not (resolution_angstrom > 0 and pixel_size_angstrom > 0):
        raise ValueError(
            f"resolution_angstrom, pixel_size_angstrom: expected > 0, got "
            f"{resolution_angstrom}, {pixel_size_angstrom}"
        )
    dims = tuple(range(-ndim, 0))
    freqs = [torch.fft.fftfreq(box, dtype=x.dtype, device=x.device)] * (ndim - 1)
    freqs.append(torch.fft.rfftfreq(box, dtype=x.dtype, device=x.device))
    grids = torch.meshgrid(*freqs, indexing="ij")
    r = torch.sqrt(sum(g**2 for g in grids)) * box  # Fourier pixels
    cutoff = box * pixel_size_angstrom / resolution_angstrom
    filt = _raised_cosine(r, cutoff, edge_fourier_px)
    return torch.fft.irfftn(torch.fft.rfftn(x, dim=dims) * filt, s=(box,) * ndim, dim=dims)


def normalise(images: torch.Tensor, background_radius_px: float | None = None) -> torch.Tensor:
    """RELION-like normalisation: zero mean and unit standard deviation of the background.

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` images.
    background_radius_px : float, optional
        Pixels farther than this from the centre ``(N // 2, N // 2)`` are background. Default
        ``0.375 * N`` (a background circle of diameter 75% of the box, RELION's GUI default).

    Returns
    -------
    torch.Tensor
        ``(images - mean_bg) / std_bg`` per image (population std).
    """
    box = _check_cube(images, 2, "images")
    radius = 0.375 * box if background_radius_px is None else background_radius_px
    r = _radius_grid(box, 2, torch.float64, images.device)
    background = r > radius
    if int(background.sum()) < 2:
        raise ValueError(
            f"background_radius_px: {radius} leaves fewer than 2 background pixels in a {box} box"
        )
    bg = images[..., background]
    mean = bg.mean(dim=-1)[..., None, None]
    std = bg.std(dim=-1, correction=0)[..., None, None]
    if (std == 0).any():
        raise ValueError("images: background standard deviation is zero for some image")
    return (images - mean) / std
