"""``cryopose convert IN OUT.star``: cryoSPARC .cs or any RELION STAR -> RELION 3.1 STAR."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cryopose.cli._common import fail


def convert(
    source: Path = typer.Argument(..., help="Input .cs or .star particle file."),
    output: Path = typer.Argument(..., help="Output RELION 3.1 .star file."),
    image_root: Path | None = typer.Option(
        None,
        "--image-root",
        help="Folder that image paths in the input are relative to (default: its folder).",
    ),
) -> None:
    """Write RELION 3.1 STAR (data_optics + data_particles); image paths become relative to OUT.

    cryoSPARC poses become RELION Euler angles, shifts become rlnOriginX/YAngst (shift times
    blob/psize_A), CTF angles become degrees (docs/conventions.md, "Files").
    """
    from cryopose.io.particles import read_particles
    from cryopose.io.star import write_star

    if output.suffix.lower() != ".star":
        fail(f"{output}: output must be a .star file")
    try:
        table = read_particles(source, image_root=image_root)
        write_star(table, output)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    Console().print(
        f"wrote {len(table)} particles in {table.n_optics_groups} optics group(s) to {output}"
    )
