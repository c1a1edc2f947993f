"""``cryopose info FILE``: what a STAR, .cs, MRC or MRCS file holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cryopose.cli._common import fail


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return "-" if value is None else str(value)


def info(
    file: Path = typer.Argument(..., help="A .star, .cs, .mrc or .mrcs file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Particle count, box, pixel size, optics groups, pose and CTF fields and their ranges."""
    from cryopose.io.summary import describe_file

    try:
        summary = describe_file(file)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console = Console()
    table = Table(title=f"{file.name} ({summary['kind']})", show_header=True)
    table.add_column("field")
    table.add_column("value", justify="right")
    rows = [
        ("particles", summary["n_particles"]),
        ("box (px)", summary["box"]),
        ("pixel size (A)", summary["pixel_size_angstrom"]),
        ("optics groups", summary["n_optics_groups"]),
        ("poses", summary["has_poses"]),
        ("CTF", summary["has_ctf"]),
    ]
    if "shape" in summary:
        rows += [("shape [z, y, x]", summary["shape"]), ("MRC mode", summary["mode"])]
    for name, value in rows:
        table.add_row(name, _fmt(value))
    console.print(table)
    ranges = summary.get("ranges") or {}
    if ranges:
        fields = Table(title="pose and CTF fields", show_header=True)
        fields.add_column("column")
        fields.add_column("min", justify="right")
        fields.add_column("max", justify="right")
        for label, (low, high) in ranges.items():
            fields.add_row(label, _fmt(low), _fmt(high))
        console.print(fields)
