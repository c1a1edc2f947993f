"""Resampling and point-group symmetrisation of ``[..., z, y, x]`` volumes.

Conventions (``docs/conventions.md``, "Density maps from atomic models"):

* Index ``i`` of an ``N``-pixel axis sits at ``(i - N // 2) * pixel_size`` Angstrom, for odd
  and even ``N``; resampling keeps that physical point fixed (the centre stays at ``N // 2``).
* :func:`resample_volume` samples the band-limited (trigonometric) interpolant of the input,
  low-passed to ``|k| <= 1 / (2 pixel_size_out)`` on each axis. For a pixel size change with
  the physical box kept this is Fourier cropping / zero-padding; the Nyquist term of an even
  input is split evenly between ``+k`` and ``-k``, and on cropping to an even size the two
  input terms at ``+-k_Nyquist`` (which coincide on the output grid) are summed, so padding
  then cropping back is the identity. Outside the input box the volume is zero (real-space
  padding), and a smaller output box is a real-space crop.
* :func:`symmetrise` averages ``V(g x)`` over the group, ``x = (x, y, z)`` in pixels from the
  centre voxel and ``g`` a cryopose (xyz, column-vector) matrix, with trilinear interpolation
  and zero outside the box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cryopose.io.errors import input_error

__all__ = ["resample_volume", "symmetrise"]


def _axis_matrix(
    n_in: int, px_in: float, n_out: int, px_out: float, device: torch.device
) -> torch.Tensor:
    """``[n_out, n_in]`` float64 matrix of band-limited interpolation along one axis."""
    x_in = (torch.arange(n_in, dtype=torch.float64) - n_in // 2) * px_in
    x_out = (torch.arange(n_out, dtype=torch.float64) - n_out // 2) * px_out
    # Periodic cell of m >= n_in input samples (those beyond the input are zeros), the
    # smallest with every output point in [-m/2, m/2] input pixels: a Fourier pad or crop
    # (box kept) needs no extra zeros, a larger box is zero-padded in real space first.
    reach = max(-float(x_out[0]), float(x_out[-1])) / px_in
    m = max(n_in, math.ceil(2.0 * reach - 1e-9))
    half = m // 2
    k = torch.arange(-half, half + 1, dtype=torch.float64)
    weight = torch.ones_like(k)
    if m % 2 == 0:
        weight[0] = weight[-1] = 0.5  # the Nyquist term, split between +k and -k
    freq = k / (m * px_in)  # 1/Angstrom
    nyquist_out = 0.5 / px_out
    tol = 1e-9 / px_in
    # Low-pass to the output Nyquist, inclusive: input terms at +-nyquist_out both coincide
    # with the output's Nyquist term and are summed (so up- then down-sampling is exact).
    weight = torch.where(freq.abs() > nyquist_out + tol, torch.zeros_like(weight), weight)
    # sum_k w_k cos(2 pi k (x_out - x_in)), split as cos.cos + sin.sin (O(n K) memory).
    phase_out = 2.0 * math.pi * x_out[:, None] * freq[None, :]
    phase_in = 2.0 * math.pi * x_in[:, None] * freq[None, :]
    matrix = (torch.cos(phase_out) * weight) @ torch.cos(phase_in).T
    matrix += (torch.sin(phase_out) * weight) @ torch.sin(phase_in).T
    return (matrix / m).to(device)


def _as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise input_error(None, f"{name}={value!r}: expected a positive int or 3 positive ints")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def resample_volume(
    volume: torch.Tensor,
    pixel_size_in: float,
    pixel_size_out: float | None = None,
    box_out: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Change a volume's pixel size (Fourier-exact) and box (real-space crop / zero pad).

    Parameters
    ----------
    volume : torch.Tensor
        ``[..., z, y, x]`` real volume(s), float32 or float64, any device.
    pixel_size_in : float
        Input pixel size in Angstrom.
    pixel_size_out : float, optional
        Output pixel size in Angstrom (default: the input's).
    box_out : int or (nz, ny, nx), optional
        Output box in pixels. Default: ``round(n * pixel_size_in / pixel_size_out)`` per
        axis (the same physical box; at an integer ratio this is Fourier crop / pad).

    Returns
    -------
    torch.Tensor
        ``[..., nz', ny', nx']`` volume with the same dtype and device; the voxel at
        ``N' // 2`` is the physical point of the input's ``N // 2``. Values are densities
        (not sums): ``sum * pixel_size**3`` is preserved when both boxes hold the whole object.
    """
    if volume.ndim < 3 or not volume.dtype.is_floating_point or volume.is_complex():
        raise input_error(
            None, f"volume: expected a real [..., z, y, x] tensor, got {tuple(volume.shape)}"
        )
    px_in = float(pixel_size_in)
    px_out = px_in if pixel_size_out is None else float(pixel_size_out)
    for name, value in (("pixel_size_in", px_in), ("pixel_size_out", px_out)):
        if not math.isfinite(value) or value <= 0:
            raise input_error(None, f"{name}={value!r}: expected a positive number (Angstrom)")
    shape_in = tuple(volume.shape[-3:])
    if box_out is None:
        shape_out = tuple(max(1, round(n * px_in / px_out)) for n in shape_in)
    else:
        shape_out = _as_triple(box_out, "box_out")
    out = volume
    for axis, (n_in, n_out) in enumerate(zip(shape_in, shape_out, strict=True)):
        if n_in == n_out and px_in == px_out:
            continue
        mat = _axis_matrix(n_in, px_in, n_out, px_out, volume.device).to(volume.dtype)
        dim = volume.ndim - 3 + axis
        out = torch.movedim(torch.movedim(out, dim, -1) @ mat.T, -1, dim)
    return out.contiguous()


def symmetrise(volume: torch.Tensor, group_matrices: torch.Tensor) -> torch.Tensor:
    """Average a volume over a point group: ``V_sym(x) = mean_g V(g x)``.

    Parameters
    ----------
    volume : torch.Tensor
        ``[..., z, y, x]`` real volume(s), float32 or float64, any device.
    group_matrices : torch.Tensor
        ``[G, 3, 3]`` rotation matrices acting on ``(x, y, z)`` column vectors (cryopose
        convention, e.g. from ``cryopose.so3.symmetry``), identity included.

    Returns
    -------
    torch.Tensor
        Symmetrised volume, same shape, dtype and device. ``x`` is measured in pixels from the
        voxel ``(N//2, N//2, N//2)``; values are trilinearly interpolated and zero outside the
        box, so ``V_sym(g x) = V_sym(x)`` holds exactly for rotations that map the grid onto
        itself (e.g. C4 about z) and up to interpolation error otherwise.
    """
    if volume.ndim < 3 or not volume.dtype.is_floating_point or volume.is_complex():
        raise input_error(
            None, f"volume: expected a real [..., z, y, x] tensor, got {tuple(volume.shape)}"
        )
    g = torch.as_tensor(group_matrices)
    if g.ndim != 3 or g.shape[-2:] != (3, 3) or g.shape[0] < 1:
        raise input_error(None, f"group_matrices: expected shape [G, 3, 3], got {tuple(g.shape)}")
    g = g.to(device=volume.device, dtype=volume.dtype)
    batch = volume.shape[:-3]
    nz, ny, nx = volume.shape[-3:]
    flat = volume.reshape(-1, 1, nz, ny, nx)
    sizes = torch.tensor([nx, ny, nz], device=volume.device, dtype=volume.dtype)
    axes = [
        torch.arange(n, device=volume.device, dtype=volume.dtype) - n // 2 for n in (nz, ny, nx)
    ]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    xyz = torch.stack([xx, yy, zz], dim=-1)  # [z, y, x, 3] pixels from the centre voxel
    total = torch.zeros_like(flat)
    for matrix in g:
        index = xyz @ matrix.T + torch.div(sizes, 2, rounding_mode="floor")
        # align_corners=True: normalised -1 / +1 are the centres of voxels 0 / n - 1.
        norm = 2.0 * index / (sizes - 1).clamp(min=1) - 1.0
        grid = norm.unsqueeze(0).expand(flat.shape[0], -1, -1, -1, -1)
        total = total + F.grid_sample(
            flat, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
    return (total / g.shape[0]).reshape(*batch, nz, ny, nx)
