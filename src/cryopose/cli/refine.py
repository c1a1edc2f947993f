"""``cryopose refine PARTICLES.star --reference MAP.mrc -o DIR``: EM refinement (soft, mmse or
hard)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cryopose.cli._common import fail, particle_progress


def refine(
    particles: Path = typer.Argument(..., help="Particles: RELION STAR (3.0-5) or cryoSPARC .cs."),
    reference: Path = typer.Option(..., "--reference", help="Initial map (MRC)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created if needed)."),
    iterations: int = typer.Option(3, "--iterations", help="Number of EM iterations."),
    assignment: str = typer.Option(
        "soft", "--assignment",
        help="soft (posterior-weighted, EM), mmse (MMSE pose only) or hard (MLE pose only).",
    ),
    grid_order: int = typer.Option(2, "--grid-order", help="HEALPix order (2: 4,608 rotations)."),
    shift_range: float = typer.Option(
        0.0, "--shift-range", help="Translation search about the input origins, Angstrom."
    ),
    shift_step: float | None = typer.Option(None, "--shift-step", help="Angstrom (default 1 px)."),
    max_frequency: float | None = typer.Option(
        None, "--max-frequency", help="Band limit of the likelihood, Angstrom (default Nyquist)."
    ),
    initial_lowpass: float | None = typer.Option(
        None, "--initial-lowpass", help="Low-pass the reference to this resolution first (A)."
    ),
    symmetry: str = typer.Option("C1", "--symmetry", help="Point group: C1, Cn, Dn, T, O or I."),
    noise_sigma: str = typer.Option("auto", "--noise-sigma", help="auto or sigma per pixel."),
    batch_size: int = typer.Option(128, "--batch-size", help="Particles scored at once."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the half split without rlnRandomSubset."),
) -> None:
    """Refine a map and the poses by EM: each iteration writes DIR/iter_NNN.mrc (and
    _half1/_half2), DIR/iter_NNN.star (MMSE poses for soft, MLE for hard) and
    DIR/iter_NNN_fsc.csv (half-map FSC)."""
    import torch

    from cryopose.io import read_particles, read_volume
    from cryopose.reconstruct.refine import RefineConfig, iteration_paths
    from cryopose.reconstruct.refine import refine as run_refine

    config = RefineConfig(
        iterations=iterations,
        assignment=assignment,
        grid_order=grid_order,
        shift_range_angstrom=shift_range,
        shift_step_angstrom=shift_step,
        max_frequency_angstrom=max_frequency,
        initial_lowpass_angstrom=initial_lowpass,
        symmetry=symmetry,
        noise_sigma=noise_sigma,
        batch_size=batch_size,
        device=device,
        seed=seed,
    )
    try:
        config.validate()
        if device.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device: {device} requested but CUDA is not available (use --device cpu)")
        if out.exists() and not out.is_dir():
            fail(f"{out}: exists and is not a folder; expected an output folder")
        table = read_particles(particles)
        volume = read_volume(reference, require_pixel_size=True)
        with particle_progress(f"refining ({assignment})", iterations * len(table)) as advance:
            result = run_refine(
                table, volume.data, volume.pixel_size_angstrom, config, out_dir=out,
                progress=advance,
            )
    except (OSError, ValueError) as exc:
        fail(str(exc))
    summary = Table(title=f"cryopose refine ({assignment}, {len(table)} particles)")
    for column in ("iteration", "half-map FSC 0.143 (A)", "half-map FSC 0.5 (A)",
                   "median expected loss", "seconds"):
        summary.add_column(column)
    for record in result.iterations:
        f = record.reconstruction.half_fsc
        summary.add_row(
            str(record.iteration),
            f"{f.resolution_0143_angstrom:.2f}",
            f"{f.resolution_05_angstrom:.2f}",
            f"{float(record.estimates.expected_loss.median()):.4f}",
            f"{record.seconds:.1f}",
        )
    console = Console()
    console.print(summary)
    last = iteration_paths(out, len(result.iterations))
    console.print(
        f"wrote {last['map'].name}, {last['star'].name} and the earlier iterations' maps, "
        f"half maps, STAR and FSC files to {out}",
        soft_wrap=True,
    )
