"""Numba kernel for the credible radius of dense posterior rows
(:func:`cryopose.bayes.posterior._credible_radius_deg`; imported on first use, compiled once and
cached on disk)."""

import math

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True)
def credible_rows(traces, weights, scale, n_bins, cone_bin, mass, lowest, inside):
    """Per row of ``traces`` / ``weights`` ``[r, G]``: histogram the weights by chordal bin
    ``floor(sqrt(3 - tr) * scale)`` (``n_bins`` bins, the last one open), find the first bin
    where the cumulative mass reaches ``mass`` of the total, and write the lowest trace among
    the points of that bin and below into ``lowest [r]`` and the mass below bin ``cone_bin``
    (a fraction of the total) into ``inside [r]``."""
    r, g = traces.shape
    for i in nb.prange(r):
        hist = np.zeros(n_bins)
        for j in range(g):
            chord = math.sqrt(max(3.0 - traces[i, j], 0.0))
            k = min(int(chord * scale), n_bins - 1)
            hist[k] += weights[i, j]
        total = 0.0
        for k in range(n_bins):
            total += hist[k]
        target = (mass - 1e-12) * total
        cumulative = 0.0
        crossing = 0
        below_cone = 0.0
        for k in range(n_bins):
            cumulative += hist[k]
            if k == cone_bin - 1:
                below_cone = cumulative
            if cumulative < target:
                crossing = k + 1
        best = math.inf
        for j in range(g):
            chord = math.sqrt(max(3.0 - traces[i, j], 0.0))
            k = min(int(chord * scale), n_bins - 1)
            if k <= crossing and traces[i, j] < best:
                best = traces[i, j]
        lowest[i] = best
        inside[i] = below_cone / total
