"""Centred Fourier transforms and frequency grids for images and volumes.

Convention (``docs/conventions.md``): the array centre is index ``N // 2`` for odd and even
``N``; a centred transform is ``fftshift(fftn(ifftshift(x)))`` so that the phase origin is the
array centre and the zero frequency sits at index ``N // 2``. The *centred rfft* of an image is
``fftshift(rfft2(ifftshift(x)), dim=-2)``: shape ``[..., N, N // 2 + 1]``, rows ``ky`` centred
(row ``N // 2`` is ``ky = 0``), columns ``kx = 0 .. N // 2``. Transforms are unnormalised forward
(numpy/torch ``norm="backward"``).
"""

from __future__ import annotations

import torch

__all__ = [
    "fft2_centred",
    "ifft2_centred",
    "rfft2_centred",
    "irfft2_centred",
    "fftn_centred",
    "ifftn_centred",
    "frequency_grid_2d",
    "radial_frequency_2d",
]


def _check_square(images: torch.Tensor, name: str = "images") -> int:
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"{name}: expected [..., N, N] square images, got shape {tuple(images.shape)}"
        )
    return int(images.shape[-1])


def fft2_centred(images: torch.Tensor) -> torch.Tensor:
    """Centred 2D DFT of ``[..., N, N]`` images (full, complex, zero frequency at ``N // 2``)."""
    return torch.fft.fftshift(
        torch.fft.fft2(torch.fft.ifftshift(images, dim=(-2, -1))), dim=(-2, -1)
    )


def ifft2_centred(ft: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_centred` (complex output; take ``.real`` for real images)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(ft, dim=(-2, -1))), dim=(-2, -1))


def rfft2_centred(images: torch.Tensor) -> torch.Tensor:
    """Centred half-plane DFT of real ``[..., N, N]`` images.

    Returns
    -------
    torch.Tensor
        ``[..., N, N // 2 + 1]`` complex; rows are ``ky = -(N // 2) ..`` (row ``N // 2`` is
        ``ky = 0``), columns ``kx = 0 .. N // 2``, phase origin at pixel ``(N // 2, N // 2)``.
    """
    _check_square(images)
    ft = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    return torch.fft.fftshift(ft, dim=-2)


def irfft2_centred(ft: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centred`: ``[..., box, box // 2 + 1]`` -> ``[..., box, box]``."""
    if ft.shape[-2:] != (box, box // 2 + 1):
        raise ValueError(
            f"ft: expected [..., {box}, {box // 2 + 1}] centred rfft for box {box}, "
            f"got shape {tuple(ft.shape)}"
        )
    img = torch.fft.irfft2(torch.fft.ifftshift(ft, dim=-2), s=(box, box))
    return torch.fft.fftshift(img, dim=(-2, -1))


def fftn_centred(x: torch.Tensor, ndim: int = 3) -> torch.Tensor:
    """Centred DFT over the last ``ndim`` axes (full complex)."""
    dims = tuple(range(-ndim, 0))
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifftn_centred(ft: torch.Tensor, ndim: int = 3) -> torch.Tensor:
    """Inverse of :func:`fftn_centred` (complex output)."""
    dims = tuple(range(-ndim, 0))
    x = torch.fft.ifftn(torch.fft.ifftshift(ft, dim=dims), dim=dims)
    return torch.fft.fftshift(x, dim=dims)


def frequency_grid_2d(
    box: int,
    pixel_size_angstrom: float = 1.0,
    *,
    rfft: bool = True,
    centred: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies ``(ky, kx)`` of a ``box x box`` image's DFT, in 1/Angstrom.

    With ``pixel_size_angstrom = 1`` the values are in cycles per pixel.

    Parameters
    ----------
    box : int
        Image side N in pixels.
    pixel_size_angstrom : float
        Pixel size in Angstrom.
    rfft : bool
        Half-plane layout ``[N, N // 2 + 1]`` (True) or full ``[N, N]`` (False).
    centred : bool
        Zero frequency at row (and, for the full layout, column) ``N // 2`` (True) or at index 0
        (torch's native order, False).
    dtype, device
        Of the returned tensors (default: torch's default dtype, CPU).

    Returns
    -------
    tuple of torch.Tensor
        ``ky`` and ``kx``, each of shape ``[N, N // 2 + 1]`` or ``[N, N]``.
    """
    dtype = dtype or torch.get_default_dtype()
    ky = torch.fft.fftfreq(box, d=pixel_size_angstrom, dtype=dtype, device=device)
    if rfft:
        kx = torch.fft.rfftfreq(box, d=pixel_size_angstrom, dtype=dtype, device=device)
    else:
        kx = torch.fft.fftfreq(box, d=pixel_size_angstrom, dtype=dtype, device=device)
    if centred:
        ky = torch.fft.fftshift(ky)
        if not rfft:
            kx = torch.fft.fftshift(kx)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return gy, gx


def radial_frequency_2d(
    box: int,
    *,
    rfft: bool = True,
    centred: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Radius ``|k|`` of each DFT sample in Fourier pixels (cycles per box), same layouts as
    :func:`frequency_grid_2d`."""
    ky, kx = frequency_grid_2d(box, 1.0, rfft=rfft, centred=centred, dtype=dtype, device=device)
    return torch.sqrt(ky**2 + kx**2) * box
