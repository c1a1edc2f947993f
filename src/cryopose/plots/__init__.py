"""Figures (matplotlib, written to files; no screen needed)."""

from cryopose.plots.montage import particle_montage

__all__ = ["particle_montage"]
