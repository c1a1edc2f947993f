"""Numba kernels over whole posterior rows: the uncertainty of dense rows
(:mod:`cryopose.bayes.posterior`) and the ball test of the refined quadrature
(:mod:`cryopose.bayes.estimate`). Imported on first use, compiled once and cached on disk. One
row per thread, fixed order: results do not depend on the thread count."""

import math

import numba as nb
import numpy as np


@nb.njit(inline="always")
def _bin(trace, scale, n_bins):
    """Chordal histogram bin ``floor(sqrt(3 - tr) * scale)`` (the last bin open)."""
    return min(int(math.sqrt(max(3.0 - trace, 0.0)) * scale), n_bins - 1)


@nb.njit(inline="always")
def _crossing(hist, mass, cone_bin):
    """First bin where the cumulative mass reaches ``mass`` of the total, and the fraction
    of the total below bin ``cone_bin``."""
    total = 0.0
    for k in range(hist.shape[0]):
        total += hist[k]
    target = (mass - 1e-12) * total
    cumulative = 0.0
    crossing = 0
    below_cone = 0.0
    for k in range(hist.shape[0]):
        cumulative += hist[k]
        if k == cone_bin - 1:
            below_cone = cumulative
        if cumulative < target:
            crossing = k + 1
    return crossing, below_cone / total


@nb.njit(parallel=True, cache=True)
def credible_rows(traces, weights, scale, n_bins, cone_bin, mass, lowest, inside):
    """Per row of ``traces`` / ``weights`` ``[r, G]``: histogram the weights by chordal bin
    (:func:`_bin`), find the bin where the cumulative mass reaches ``mass``, and write the
    lowest trace among the points of that bin and below into ``lowest [r]`` and the mass
    fraction below bin ``cone_bin`` into ``inside [r]``."""
    r, g = traces.shape
    for i in nb.prange(r):
        hist = np.zeros(n_bins)
        for j in range(g):
            hist[_bin(traces[i, j], scale, n_bins)] += weights[i, j]
        crossing, fraction = _crossing(hist, mass, cone_bin)
        inside[i] = fraction
        best = math.inf
        for j in range(g):
            t = traces[i, j]
            if _bin(t, scale, n_bins) <= crossing and t < best:
                best = t
        lowest[i] = best


@nb.njit(inline="always")
def _dot9(a, i, b, j):
    s = 0.0
    for c in range(9):
        s += a[i, c] * b[j, c]
    return s


@nb.njit(inline="always")
def _dot9_extra(extra, i, e, b, j):
    s = 0.0
    for c in range(9):
        s += extra[i, e, c] * b[j, c]
    return s


@nb.njit(parallel=True, cache=True)
def cone_rows(grid, extra, weights, r_map, r_est, cone_trace, scale, n_bins, cone_bin, mass,
              map_inside, lowest, inside):
    """:func:`credible_rows` with the traces against the estimate ``r_est [r, 9]`` computed on
    the fly from the points (``grid [G0, 9]`` shared, then ``extra [r, E, 9]`` per row), and
    the weight within the cone ``tr >= cone_trace`` of ``r_map [r, 9]`` summed into
    ``map_inside [r]`` (no ``[r, G]`` trace arrays)."""
    r, g = weights.shape
    g0 = grid.shape[0]
    for i in nb.prange(r):
        hist = np.zeros(n_bins)
        near = 0.0
        for j in range(g):
            w = weights[i, j]
            if j < g0:
                t_map = _dot9(grid, j, r_map, i)
                t_est = _dot9(grid, j, r_est, i)
            else:
                t_map = _dot9_extra(extra, i, j - g0, r_map, i)
                t_est = _dot9_extra(extra, i, j - g0, r_est, i)
            if t_map >= cone_trace:
                near += w
            hist[_bin(t_est, scale, n_bins)] += w
        map_inside[i] = near
        crossing, fraction = _crossing(hist, mass, cone_bin)
        inside[i] = fraction
        best = math.inf
        for j in range(g):
            if j < g0:
                t = _dot9(grid, j, r_est, i)
            else:
                t = _dot9_extra(extra, i, j - g0, r_est, i)
            if _bin(t, scale, n_bins) <= crossing and t < best:
                best = t
        lowest[i] = best


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def ball_mask(grid_t, centres, cut, out):
    """``out[b, g] = 1`` where grid point ``g`` (columns of ``grid_t [9, G]``) lies inside a
    ball of row ``b``: ``<centres[b, k], R_g> > cut[b, k]`` for some ``k`` (``cut`` ``+inf``
    for an inactive centre), else 0; ``centres [B, K, 9]``, ``out [B, G]`` uint8. One pass
    per centre over contiguous columns (vectorised) instead of the ``[B, K, G]`` trace GEMM,
    comparison and reductions."""
    b_rows, k_centres = cut.shape
    g_points = grid_t.shape[1]
    for b in nb.prange(b_rows):
        for g in range(g_points):
            out[b, g] = 0
        for k in range(k_centres):
            c0 = centres[b, k, 0]
            c1 = centres[b, k, 1]
            c2 = centres[b, k, 2]
            c3 = centres[b, k, 3]
            c4 = centres[b, k, 4]
            c5 = centres[b, k, 5]
            c6 = centres[b, k, 6]
            c7 = centres[b, k, 7]
            c8 = centres[b, k, 8]
            limit = cut[b, k]
            for g in range(g_points):
                s = (c0 * grid_t[0, g] + c1 * grid_t[1, g] + c2 * grid_t[2, g]
                     + c3 * grid_t[3, g] + c4 * grid_t[4, g] + c5 * grid_t[5, g]
                     + c6 * grid_t[6, g] + c7 * grid_t[7, g] + c8 * grid_t[8, g])
                if s > limit:
                    out[b, g] = 1
