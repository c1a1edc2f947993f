"""Fused CPU evaluation of the Gauss-Newton terms (numba): the hot loop of
:func:`cryopose.bayes.newton.gauss_newton_poses`.

For each (image, start) pair ``a`` with rotation ``R_a`` and the template points
``k_p = (kx_p, ky_p, 0)``, ``p < n_points``, one pass computes

- ``ll_a = -1/2 sum_p w_p |y_p - c_p X(q_p)|^2`` with ``q_p = R_a k_p`` and ``X`` the
  trilinear interpolant of the padded volume transform,
- ``g_a = sum_p w_p c_p Re(conj(r_p) J_p)`` (``r_p = y_p - c_p X``, ``J_p = dX/dw``, the
  derivative along the right rotation vector ``w`` of ``R_a exp([w]x)``),
- ``H_a = sum_p w_p c_p^2 Re(J_p^H J_p)``,

without materialising the ``[4, 2, A, P]`` values and gradients that the torch path builds.
The transform is read from :meth:`cryopose.imaging.Projector.half_values` (the ``q_z >= 0``
half, Hermitian symmetry for the other), 9 MB for a 64-px box padded twice instead of the
70 MB block table: the random gathers of a slice then hit the CPU cache, which is what made
the torch path slow. Measured on 2 cores, 768 pairs x 1,600 points: torch 180 ms; this kernel
with the block table 100 ms, with the half table 37 ms, and 12-14 ms once reassociation let
LLVM vectorise the point loop.

Each pair is summed by one thread in a fixed order (float64 accumulators), so the result does
not depend on the number of threads. The kernel is compiled on first use and cached on disk
(numba ``cache=True``).
"""

from __future__ import annotations

import numpy as np
import torch

from cryopose.runtime import numba_ready

__all__ = ["gauss_newton_terms"]


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype=dtype).contiguous().numpy()


def gauss_newton_terms(
    projector,
    rotations: torch.Tensor,
    data_r: torch.Tensor,
    data_i: torch.Tensor,
    data_row: torch.Tensor,
    weights: torch.Tensor,
    ctf: torch.Tensor | None,
    owner: torch.Tensor,
    kx: torch.Tensor,
    ky: torch.Tensor,
    n_points: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ll [A]``, ``g [A, 3]`` and ``H [A, 3, 3]`` of every pair (module docstring).

    Parameters
    ----------
    projector : cryopose.imaging.Projector
        The reference (CPU).
    rotations : torch.Tensor
        ``[A, 3, 3]`` pose of each pair.
    data_r, data_i : torch.Tensor
        ``[D, P]`` real and imaginary data at the points (already multiplied by the conjugate
        shift phase where the pair has a shift); pair ``a`` reads row ``data_row[a]``.
    weights : torch.Tensor
        ``[B, P]`` ``1 / sigma^2``-type weights per image; pair ``a`` reads row ``owner[a]``.
    ctf : torch.Tensor or None
        ``[B, P]`` real CTF per image (None: 1).
    kx, ky : torch.Tensor
        ``[P]`` point frequencies (Fourier pixels of the N box); only the first ``n_points``
        are used (points sorted by radius make a band limit a prefix).

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor)
        In ``projector.dtype``.
    """
    dtype = projector.dtype
    values, _ = projector.half_values()
    a = rotations.shape[0]
    ll = np.zeros(a, dtype=np.float64)
    g = np.zeros((a, 3), dtype=np.float64)
    h = np.zeros((a, 3, 3), dtype=np.float64)
    if a and n_points:
        from cryopose.bayes._newton_numba import terms

        numba_ready()  # (thread count)
        m = projector.padded_box
        c = np.zeros((0, 0), dtype=values.numpy().dtype) if ctf is None else _np(ctf, dtype)
        terms(
            values.numpy(), float(m // 2 + 1), float(m / projector.box),
            _np(rotations, dtype), _np(data_r, dtype), _np(data_i, dtype),
            data_row.to(torch.int64).contiguous().numpy(), _np(weights, dtype), c,
            owner.to(torch.int64).contiguous().numpy(), _np(kx, dtype), _np(ky, dtype),
            int(min(n_points, kx.shape[0])), ll, g, h,
        )
    out = (torch.from_numpy(ll), torch.from_numpy(g), torch.from_numpy(h))
    return tuple(t.to(dtype) for t in out)

