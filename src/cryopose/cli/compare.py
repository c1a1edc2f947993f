"""``cryopose compare ESTIMATED.star TRUTH.star``: pose accuracy against a reference."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cryopose.cli._common import fail


def compare(
    estimated: Path = typer.Argument(..., help="STAR file with the estimated poses."),
    truth: Path = typer.Argument(..., help="STAR file with the reference (true) poses."),
    symmetry: str = typer.Option("C1", "--symmetry", help="Point group: C1, Cn, Dn, T, O or I."),
    align: str = typer.Option(
        "none",
        "--align",
        help="Global alignment before comparing: none, rotation, rotation+hand.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Geodesic pose errors, chordal MSE and shift RMSE of ESTIMATED against TRUTH.

    Rows are joined by rlnImageName (by row order, with a warning, when names are missing).
    """
    from cryopose.evaluate.compare import ALIGN_MODES, compare_star_files

    if align not in ALIGN_MODES:
        fail(f"--align: expected one of {', '.join(ALIGN_MODES)}, got {align!r}")
    err = Console(stderr=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = compare_star_files(estimated, truth, symmetry=symmetry, align=align)
        except (OSError, ValueError) as exc:
            fail(str(exc))
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}")
    if as_json:
        typer.echo(json.dumps(result.summary()))
        return
    table = Table(title=f"{estimated.name} vs {truth.name}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("particles (joined by " + result.joined_by + ")", f"{result.n}"),
        ("mean error (deg)", f"{result.mean_deg:.3f}"),
        ("median error (deg)", f"{result.median_deg:.3f}"),
        ("90th percentile (deg)", f"{result.p90_deg:.3f}"),
        ("max error (deg)", f"{result.max_deg:.3f}"),
        ("fraction < 5 deg", f"{result.frac_lt_5deg:.4f}"),
        ("fraction < 10 deg", f"{result.frac_lt_10deg:.4f}"),
        ("mean squared chordal error", f"{result.chordal_mse:.5f}"),
        (
            "shift RMSE (A)",
            "n/a (origins missing)"
            if result.shift_rmse_angstrom is None
            else f"{result.shift_rmse_angstrom:.3f}",
        ),
        ("symmetry", result.symmetry),
        (
            "alignment",
            "none"
            if align == "none"
            else f"{align}: {result.align_rotation_deg:.3f} deg"
            + (", hand flipped" if result.hand_flipped else ""),
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
