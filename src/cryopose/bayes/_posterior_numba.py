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


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def cone_rows(grid_t, extra, weights, r_map, r_est, cone_trace, scale, n_bins, cone_bin, mass,
              map_inside, lowest, inside):
    """:func:`credible_rows` with the traces against the estimate ``r_est [r, 9]`` computed on
    the fly from the points (``grid_t [9, G0]`` shared, columns contiguous so the pass over
    them vectorises, then ``extra [r, E, 9]`` per row), and the weight within the cone ``tr >=
    cone_trace`` of ``r_map [r, 9]`` summed into ``map_inside [r]`` (no ``[r, G]`` trace
    arrays: one row of traces and bins per thread)."""
    r, g = weights.shape
    g0 = grid_t.shape[1]
    for i in nb.prange(r):
        m0, m1, m2, m3, m4, m5, m6, m7, m8 = r_map[i]
        e0, e1, e2, e3, e4, e5, e6, e7, e8 = r_est[i]
        t_est = np.empty(g)
        near = 0.0
        for j in range(g0):
            x0, x1, x2 = grid_t[0, j], grid_t[1, j], grid_t[2, j]
            x3, x4, x5 = grid_t[3, j], grid_t[4, j], grid_t[5, j]
            x6, x7, x8 = grid_t[6, j], grid_t[7, j], grid_t[8, j]
            t_map = (m0 * x0 + m1 * x1 + m2 * x2 + m3 * x3 + m4 * x4 + m5 * x5 + m6 * x6
                     + m7 * x7 + m8 * x8)
            t_est[j] = (e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3 + e4 * x4 + e5 * x5 + e6 * x6
                        + e7 * x7 + e8 * x8)
            near += weights[i, j] if t_map >= cone_trace else 0.0
        for j in range(g0, g):
            t_map = 0.0
            t = 0.0
            for c in range(9):
                t_map += extra[i, j - g0, c] * r_map[i, c]
                t += extra[i, j - g0, c] * r_est[i, c]
            t_est[j] = t
            near += weights[i, j] if t_map >= cone_trace else 0.0
        map_inside[i] = near
        hist = np.zeros(n_bins)
        bins = np.empty(g, dtype=np.int32)
        for j in range(g):
            k = _bin(t_est[j], scale, n_bins)
            bins[j] = k
            hist[k] += weights[i, j]
        crossing, fraction = _crossing(hist, mass, cone_bin)
        inside[i] = fraction
        best = math.inf
        for j in range(g):
            if bins[j] <= crossing and t_est[j] < best:
                best = t_est[j]
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
