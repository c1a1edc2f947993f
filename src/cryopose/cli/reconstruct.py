"""``cryopose reconstruct PARTICLES.star -o MAP.mrc``: direct Fourier reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from cryopose.cli._common import fail, particle_progress


def _half_path(out: Path, k: int) -> Path:
    return out.with_name(f"{out.stem}_half{k}{out.suffix or '.mrc'}")


def reconstruct(
    particles: Path = typer.Argument(..., help="STAR file with poses (and CTF, origins)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output map (MRC)."),
    symmetry: str = typer.Option("C1", "--symmetry", help="Point group: C1, Cn, Dn, T, O or I."),
    halves: bool = typer.Option(
        False, "--halves", help="Also write MAP_half1.mrc / MAP_half2.mrc and report their FSC."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="STAR column with per-particle weights (>= 0)."
    ),
    keep_fraction: float | None = typer.Option(
        None, "--keep-fraction", help="Keep this fraction of particles (0 < F <= 1), see --by."
    ),
    by: str | None = typer.Option(
        None, "--by", help="Column ranking particles for --keep-fraction (lowest values kept)."
    ),
    ssnr: str = typer.Option(
        "fsc", "--ssnr", help="Wiener SSNR: 'fsc' (per shell from half-maps) or a constant."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the half split without rlnRandomSubset."),
    pad_factor: float = typer.Option(
        2.0, "--pad-factor", help="Fourier oversampling of the insertion grid (>= 1; RELION: 2)."
    ),
    gridding_correction: bool = typer.Option(
        True,
        "--gridding-correction/--no-gridding-correction",
        help="Divide by the trilinear kernel's sinc^2 footprint (off: a softer, apodised map).",
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Reconstruct a map from particles with known poses (CTF-weighted, Wiener-filtered)."""
    import torch

    from cryopose.io import read_particles, write_volume
    from cryopose.reconstruct import reconstruct_particles

    try:
        table = read_particles(particles)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    columns = table.data.columns
    if (keep_fraction is None) != (by is None):
        fail("--keep-fraction and --by: expected both or neither")
    for option, column in (("--weights", weights), ("--by", by)):
        if column is not None and column not in columns:
            fail(f"{particles}: {option} column {column} not found in data_particles")
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            fail(f"--keep-fraction: expected 0 < F <= 1, got {keep_fraction}")
        values = table.data[by].to_numpy(dtype=np.float64)
        n_keep = max(1, int(round(keep_fraction * len(table))))
        keep = np.sort(np.argsort(values, kind="stable")[:n_keep])
        table = table.subset(keep)
    weight_values = None
    if weights is not None:
        weight_values = table.data[weights].to_numpy(dtype=np.float64)
        if not (np.isfinite(weight_values).all() and (weight_values >= 0).all()):
            fail(f"{particles}: --weights column {weights}: expected finite values >= 0")
    ssnr_value: float | str = ssnr
    if ssnr != "fsc":
        try:
            ssnr_value = float(ssnr)
        except ValueError:
            fail(f"--ssnr: expected 'fsc' or a positive number, got {ssnr!r}")
        if not ssnr_value > 0:
            fail(f"--ssnr: expected 'fsc' or a positive number, got {ssnr!r}")
    if not pad_factor >= 1.0:
        fail(f"--pad-factor: expected >= 1, got {pad_factor}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device: {device} requested but CUDA is not available")
    try:
        with particle_progress("reconstructing", len(table)) as advance:
            result = reconstruct_particles(
                table,
                symmetry=symmetry,
                weights=weight_values,
                ssnr=ssnr_value,
                seed=seed,
                device=device,
                batch_size=batch_size,
                pad_factor=pad_factor,
                gridding_correction=gridding_correction,
                progress=advance,
            )
        px = table.pixel_size
        write_volume(out, result.volume.cpu(), px)
        if halves:
            write_volume(_half_path(out, 1), result.half1.cpu(), px)
            write_volume(_half_path(out, 2), result.half2.cpu(), px)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    console = Console()
    console.print(f"wrote {out} ({result.n_particles} particles, symmetry {symmetry})")
    if halves and result.half_fsc is not None:
        f = result.half_fsc
        console.print(f"wrote {_half_path(out, 1)} and {_half_path(out, 2)}")
        console.print(
            f"half-map FSC resolution: {f.resolution_0143_angstrom:.2f} A (0.143), "
            f"{f.resolution_05_angstrom:.2f} A (0.5)"
        )
