"""Sub-pixel image shifts by Fourier phase factors, and RELION origin semantics.

``shift_images(images, sx, sy)`` returns ``g(x, y) = f(x - sx, y - sy)``: the content moves by
``+sx`` pixels along x (last axis) and ``+sy`` along y, periodically (a phase ramp
``exp(-2 pi i (kx sx + ky sy))``; integer shifts equal ``torch.roll``).

RELION origins (``rlnOriginXAngst``, ``rlnOriginYAngst``): with origin ``(ox, oy)`` Angstrom
the particle centre sits at pixel ``(N // 2 - ox / px, N // 2 - oy / px)`` (x, y). Centring an
image is a shift by ``+origin`` (:func:`centre_by_origin`); the forward model puts a centred
projection at the origin-displaced position by a shift of ``-origin`` (:func:`apply_origin`).

For even N a non-integer shift cannot be represented exactly at the Nyquist frequency of a
real image (its phase factor is complex); as with any real irfft, only the real part is kept
there, so shift-then-unshift is the identity except for that Nyquist row/column.
"""

from __future__ import annotations

import math

import torch

from cryopose.imaging.fft import frequency_grid_2d, irfft2_centred, rfft2_centred

__all__ = ["phase_shift_fourier", "shift_images", "centre_by_origin", "apply_origin"]

_Number = float | torch.Tensor


def _col(value: _Number, like: torch.Tensor) -> torch.Tensor:
    real_dtype = like.real.dtype if torch.is_complex(like) else like.dtype
    return torch.as_tensor(value, dtype=real_dtype, device=like.device)[..., None, None]


def phase_shift_fourier(
    ft: torch.Tensor,
    shift_x_px: _Number,
    shift_y_px: _Number,
    box: int,
    *,
    rfft: bool = True,
    centred: bool = True,
) -> torch.Tensor:
    """Shift Fourier-domain images by ``(shift_x_px, shift_y_px)`` pixels.

    Parameters
    ----------
    ft : torch.Tensor
        ``[..., N, N // 2 + 1]`` (``rfft=True``) or ``[..., N, N]`` complex DFTs with the phase
        origin at the image centre, e.g. from :func:`cryopose.imaging.fft.rfft2_centred`.
    shift_x_px, shift_y_px : float or torch.Tensor
        Shifts in pixels (broadcast over the leading batch shape); positive moves content
        towards larger x (resp. y) indices.
    box : int
        N.
    rfft, centred : bool
        Layout of ``ft`` (see :func:`cryopose.imaging.fft.frequency_grid_2d`).

    Returns
    -------
    torch.Tensor
        ``ft * exp(-2 pi i (kx sx + ky sy))`` with ``k`` in cycles per pixel.
    """
    expected = (box, box // 2 + 1) if rfft else (box, box)
    if ft.shape[-2:] != expected:
        raise ValueError(f"ft: expected [..., {expected[0]}, {expected[1]}], got {tuple(ft.shape)}")
    real_dtype = ft.real.dtype if torch.is_complex(ft) else ft.dtype
    ky, kx = frequency_grid_2d(
        box, 1.0, rfft=rfft, centred=centred, dtype=real_dtype, device=ft.device
    )
    phase = -2.0 * math.pi * (kx * _col(shift_x_px, ft) + ky * _col(shift_y_px, ft))
    return ft * torch.polar(torch.ones_like(phase), phase)


def shift_images(images: torch.Tensor, shift_x_px: _Number, shift_y_px: _Number) -> torch.Tensor:
    """Shift real ``[..., N, N]`` images by sub-pixel amounts (periodic, via phase factors).

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` real images ``[y, x]``.
    shift_x_px, shift_y_px : float or torch.Tensor
        Shifts in pixels, broadcast against the leading shape; the output is
        ``g(x, y) = f(x - shift_x_px, y - shift_y_px)``.

    Returns
    -------
    torch.Tensor
        Shifted images, same shape and dtype.
    """
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected [..., N, N], got shape {tuple(images.shape)}")
    box = int(images.shape[-1])
    ft = phase_shift_fourier(rfft2_centred(images), shift_x_px, shift_y_px, box)
    return irfft2_centred(ft, box)


def centre_by_origin(
    images: torch.Tensor,
    origin_x_angstrom: _Number,
    origin_y_angstrom: _Number,
    pixel_size_angstrom: float,
) -> torch.Tensor:
    """Centre particles given RELION origins: shift by ``+origin / pixel_size`` pixels.

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` particle images.
    origin_x_angstrom, origin_y_angstrom : float or torch.Tensor
        ``rlnOriginXAngst`` / ``rlnOriginYAngst`` per image.
    pixel_size_angstrom : float
        Pixel size in Angstrom.

    Returns
    -------
    torch.Tensor
        Images with the particle centre moved to pixel ``(N // 2, N // 2)``.
    """
    return shift_images(
        images, origin_x_angstrom / pixel_size_angstrom, origin_y_angstrom / pixel_size_angstrom
    )


def apply_origin(
    images: torch.Tensor,
    origin_x_angstrom: _Number,
    origin_y_angstrom: _Number,
    pixel_size_angstrom: float,
) -> torch.Tensor:
    """Forward model: move centred projections to where RELION's origin says the particle is.

    Shifts by ``-origin / pixel_size`` pixels, so a feature at the image centre ends up at
    ``(N // 2 - ox / px, N // 2 - oy / px)``. Inverse of :func:`centre_by_origin`.
    """
    return shift_images(
        images, -origin_x_angstrom / pixel_size_angstrom, -origin_y_angstrom / pixel_size_angstrom
    )
