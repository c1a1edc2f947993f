"""Numba kernels behind :class:`cryopose.imaging.PlaneSampler`: bilinear reads of the padded
half-plane transform of a batch of real images at precomputed cells (rows wrap, ``kx < 0``
reads the mirrored point and conjugates). Imported on first use; compiled once and cached on
disk."""

import numba as nb

_FLAGS = {"reassoc", "contract", "nsz", "arcp"}  # vectorise; no nnan / ninf assumptions


@nb.njit(inline="always")
def _bilinear(table, b, row0, row1, col, u, v, part):
    """Component ``part`` (0 real, 1 imaginary) of image ``b`` between rows ``row0, row1`` and
    columns ``col, col + 1`` at fractions ``u`` (column) and ``v`` (row)."""
    low = table[b, row0, col, part]
    low += u * (table[b, row0, col + 1, part] - low)
    high = table[b, row1, col, part]
    high += u * (table[b, row1, col + 1, part] - high)
    return low + v * (high - low)


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def gather_complex(table, row0, row1, col, fx, fy, sign, weight, out, paired):
    """Complex values into ``out`` ``[B, R, S, 2]`` (re, im) from ``table`` ``[B, M, W, 2]``.

    Cells ``row0, row1, col, fx, fy, sign`` are ``[R, Q]``; ``weight`` ``[B, R]`` scales row
    ``r``. With ``paired`` (``S = 2 Q``) the point ``Q + q`` is ``-(point q)``: its value, the
    conjugate (real images), is written without a second read."""
    n_b, n_r, n_q = out.shape[0], row0.shape[0], row0.shape[1]
    for b in nb.prange(n_b):
        for r in range(n_r):
            w = weight[b, r]
            for q in range(n_q):
                a, c, x, u, v = row0[r, q], row1[r, q], col[r, q], fx[r, q], fy[r, q]
                re = w * _bilinear(table, b, a, c, x, u, v, 0)
                im = w * sign[r, q] * _bilinear(table, b, a, c, x, u, v, 1)
                out[b, r, q, 0] = re
                out[b, r, q, 1] = im
                if paired:
                    out[b, r, n_q + q, 0] = re
                    out[b, r, n_q + q, 1] = -im


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def gather_real(table, row0, row1, col, fx, fy, weight, out):
    """Real parts into ``out`` ``[B, R, Q]`` from ``table`` ``[B, M, W, 2]`` (cells as in
    :func:`gather_complex`; the real part needs no sign)."""
    n_b, n_r, n_q = out.shape[0], row0.shape[0], row0.shape[1]
    for b in nb.prange(n_b):
        for r in range(n_r):
            w = weight[b, r]
            for q in range(n_q):
                out[b, r, q] = w * _bilinear(table, b, row0[r, q], row1[r, q], col[r, q],
                                             fx[r, q], fy[r, q], 0)
