"""Trilinear corners and weights on a flat cubic grid: the kernel behind the Fourier scatter
(:class:`cryopose.reconstruct.FourierAccumulator`). (The gather,
:meth:`cryopose.imaging.Projector.sample_with_gradient_ri`, reads 2x2 corner blocks instead.)"""

from __future__ import annotations

import torch

__all__ = ["trilinear_corners"]


def trilinear_corners(index: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and weights of the 8 trilinear corners of points on a ``side^3`` grid.

    Parameters
    ----------
    index : torch.Tensor
        ``[P, 3]`` continuous voxel coordinates ``(x, y, z)`` (voxel ``i`` at coordinate ``i``)
        of a grid stored flat in ``[z, y, x]`` order.
    side : int
        Grid side. The lower corner is clamped into ``[0, side - 2]`` and the fractions into
        ``[0, 1]``, so every index is valid; points outside the grid get wrong weights and must
        be masked by the caller (a zero margin makes that unnecessary for points inside).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``[P, 8]`` int64 flat indices and ``[P, 8]`` weights (summing to 1), corners in
        ``(dz, dy, dx)`` order, ``dx`` fastest.
    """
    base = torch.floor(index).clamp_(0, side - 2)
    frac = (index - base).clamp_(0.0, 1.0)
    b = base.to(torch.int64)
    flat = (b[:, 2] * side + b[:, 1]) * side + b[:, 0]
    offsets = torch.tensor(
        [(dz * side + dy) * side + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
        dtype=torch.int64,
        device=index.device,
    )
    lo = 1.0 - frac
    wx = torch.stack((lo[:, 0], frac[:, 0]), dim=1)
    wy = torch.stack((lo[:, 1], frac[:, 1]), dim=1)
    wz = torch.stack((lo[:, 2], frac[:, 2]), dim=1)
    p = index.shape[0]
    weight = ((wz[:, :, None] * wy[:, None, :]).reshape(p, 4, 1) * wx[:, None, :]).reshape(p, 8)
    return flat[:, None] + offsets, weight
