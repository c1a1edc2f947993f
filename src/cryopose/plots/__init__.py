"""Figures (matplotlib, written to files; no screen needed)."""

from cryopose.plots.errors import error_histograms, error_vs_snr
from cryopose.plots.montage import particle_montage

__all__ = ["error_histograms", "error_vs_snr", "particle_montage"]
