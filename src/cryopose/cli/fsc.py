"""``cryopose fsc MAP1.mrc MAP2.mrc``: Fourier shell correlation and resolution."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from cryopose.cli._common import fail


def fsc(
    map1: Path = typer.Argument(..., help="First map (MRC)."),
    map2: Path = typer.Argument(..., help="Second map (MRC), same box."),
    mask: Path | None = typer.Option(None, "--mask", help="Soft mask (MRC, same box)."),
    pixel_size: float | None = typer.Option(
        None, "--pixel-size", help="Angstrom; default: MAP1's header."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write the curve as CSV."),
    png_path: Path | None = typer.Option(None, "--png", help="Plot the curve (PNG)."),
) -> None:
    """FSC between two maps; resolution at FSC = 0.143 and 0.5 (Angstrom)."""
    import torch

    from cryopose.evaluate.fsc import fsc as compute_fsc
    from cryopose.evaluate.fsc import plot_fsc, write_fsc_csv
    from cryopose.io import read_volume

    try:
        a = read_volume(map1, dtype=torch.float64)
        b = read_volume(map2, dtype=torch.float64)
        m = read_volume(mask, dtype=torch.float64).data if mask is not None else None
    except (OSError, ValueError) as exc:
        fail(str(exc))
    if a.data.shape != b.data.shape:
        fail(f"{map2}: shape {tuple(b.data.shape)} differs from {map1} {tuple(a.data.shape)}")
    if m is not None and m.shape != a.data.shape:
        fail(f"{mask}: shape {tuple(m.shape)} differs from {map1} {tuple(a.data.shape)}")
    px = pixel_size if pixel_size is not None else a.pixel_size_angstrom
    if px is None or not px > 0:
        fail(f"{map1}: header voxel size is unset; expected --pixel-size in Angstrom")
    try:
        result = compute_fsc(a.data, b.data, px, mask=m)
        if csv_path is not None:
            write_fsc_csv(result, csv_path)
        if png_path is not None:
            plot_fsc(result, png_path)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.summary()))
        return
    Console().print(
        f"FSC resolution: {result.resolution_0143_angstrom:.2f} A (0.143), "
        f"{result.resolution_05_angstrom:.2f} A (0.5)"
    )
