"""Pose-error figures: histograms per method and error against SNR."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["error_histograms", "error_vs_snr"]


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def error_histograms(
    errors_deg: dict[str, dict[str, np.ndarray]], path: str | Path, *, bins: int = 36
) -> Path:
    """One panel per condition (e.g. SNR), one histogram per method of geodesic errors.

    Parameters
    ----------
    errors_deg : dict
        ``{condition: {method: errors in degrees}}``.
    path : str or Path
        Output PNG.
    """
    path = Path(path)
    n = len(errors_deg)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (condition, by_method) in zip(axes[0], errors_deg.items(), strict=True):
        edges = np.linspace(0, 180, bins + 1)
        for method, errors in by_method.items():
            ax.hist(
                errors,
                bins=edges,
                histtype="step",
                linewidth=1.6,
                label=f"{method} (median {np.median(errors):.1f} deg)",
            )
        ax.set_title(condition)
        ax.set_xlabel("geodesic error (deg)")
        ax.set_ylabel("particles")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def error_vs_snr(
    snrs: list[float], figures: dict[str, dict[str, list[float]]], path: str | Path
) -> Path:
    """Median geodesic error and mean squared chordal error against SNR, one line per method.

    Parameters
    ----------
    snrs : list of float
    figures : dict
        ``{method: {"median_deg": [...], "chordal_mse": [...]}}`` aligned with ``snrs``.
    path : str or Path
        Output PNG.
    """
    path = Path(path)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    styles = ["o-", "s--", "^:", "d-."]  # distinct, so identical curves (MLE = MAP) stay visible
    for i, (method, values) in enumerate(figures.items()):
        style = styles[i % len(styles)]
        a.plot(snrs, values["median_deg"], style, label=method, markerfacecolor="none")
        b.plot(snrs, values["chordal_mse"], style, label=method, markerfacecolor="none")
    for ax, label in ((a, "median geodesic error (deg)"), (b, "mean squared chordal error")):
        ax.set_xscale("log")
        ax.set_xlabel("SNR")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)
