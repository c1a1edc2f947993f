"""Numba kernels behind :class:`cryopose.imaging.PlaneSampler`: bilinear reads of the padded
half-plane transform of a batch of real images at precomputed cells (rows wrap, ``kx < 0``
reads the mirrored point and conjugates). Imported on first use; compiled once and cached on
disk."""

import numba as nb

_FLAGS = {"reassoc", "contract", "nsz", "arcp"}  # vectorise; no nnan / ninf assumptions


@nb.njit(inline="always")
def _bilinear(t, low, high, u, v, part):
    """Component ``part`` (0 real, 1 imaginary) between the flat (re, im) offsets ``low``
    (row 0, column ``c``) and ``high`` (row 1, column ``c``) and the next column, at fractions
    ``u`` (column) and ``v`` (row)."""
    a = t[low + part]
    a += u * (t[low + 2 + part] - a)
    h = t[high + part]
    h += u * (t[high + 2 + part] - h)
    return a + v * (h - a)


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def gather_complex(table, off0, off1, fx, fy, sign, weight, out, paired):
    """Complex values into ``out`` ``[B, R, S, 2]`` (re, im) from ``table`` ``[B, M W 2]`` (each
    image's ``[M, W]`` complex table flattened).

    Cells ``off0, off1`` (flat offsets of the (re, im) pair at rows 0 and 1, column ``c``),
    ``fx, fy, sign`` are ``[R, Q]``; ``weight`` ``[B, R]`` scales row ``r``. With ``paired``
    (``S = 2 Q``) the point ``Q + q`` is ``-(point q)``: its value, the conjugate (real
    images), is written without a second read."""
    n_b, n_r, n_q = out.shape[0], off0.shape[0], off0.shape[1]
    for b in nb.prange(n_b):
        t = table[b]
        for r in range(n_r):
            w = weight[b, r]
            for q in range(n_q):
                low, high, u, v = off0[r, q], off1[r, q], fx[r, q], fy[r, q]
                re = w * _bilinear(t, low, high, u, v, 0)
                im = w * sign[r, q] * _bilinear(t, low, high, u, v, 1)
                out[b, r, q, 0] = re
                out[b, r, q, 1] = im
                if paired:
                    out[b, r, n_q + q, 0] = re
                    out[b, r, n_q + q, 1] = -im


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def gather_real(table, off0, off1, fx, fy, weight, out):
    """Real parts into ``out`` ``[B, R, Q]`` from ``table`` ``[B, M W 2]`` (cells as in
    :func:`gather_complex`; the real part needs no sign)."""
    n_b, n_r, n_q = out.shape[0], off0.shape[0], off0.shape[1]
    for b in nb.prange(n_b):
        t = table[b]
        for r in range(n_r):
            w = weight[b, r]
            for q in range(n_q):
                out[b, r, q] = w * _bilinear(t, off0[r, q], off1[r, q], fx[r, q], fy[r, q], 0)
