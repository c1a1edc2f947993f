"""Montages of particle images."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["particle_montage"]


def particle_montage(
    rows: dict[str, torch.Tensor],
    path: str | Path,
    *,
    columns: int = 8,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Write a PNG grid with one labelled row per image set (e.g. clean and noisy).

    Parameters
    ----------
    rows : dict of str to torch.Tensor
        Row label -> ``[k, N, N]`` images; the first ``columns`` images of each are shown,
        each with its own grey scale (1st to 99th percentile).
    path : str or Path
        Output PNG (written to a temporary name, then renamed).
    columns : int
        Images per row.
    title : str, optional
        Figure title.
    """
    path = Path(path)
    n_rows = len(rows)
    fig, axes = plt.subplots(
        n_rows, columns, figsize=(1.3 * columns, 1.4 * n_rows + 0.4), squeeze=False
    )
    for r, (label, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < images.shape[0]:
                img = images[c].detach().cpu().float()
                lo, hi = torch.quantile(img.flatten(), torch.tensor([0.01, 0.99])).tolist()
                ax.imshow(img.numpy(), cmap="gray", vmin=lo, vmax=hi, origin="lower")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
