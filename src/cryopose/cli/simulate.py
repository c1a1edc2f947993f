"""``cryopose simulate -o DIR``: particles with known poses from a map, a model or the default."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console

from cryopose.cli._common import fail, particle_progress


def parse_snr(text: str) -> float:
    """``inf`` (no noise) or a positive number."""
    try:
        value = float(text)
    except ValueError:
        fail(f"--snr: expected a positive number or inf, got {text!r}")
    if not value > 0:
        fail(f"--snr: expected a positive number or inf, got {text!r}")
    return value


def simulate(
    out_dir: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    volume: Path | None = typer.Option(None, "--volume", help="Reference map (MRC)."),
    model: Path | None = typer.Option(
        None, "--model", help="Atomic model (PDB/mmCIF, .gz ok). Default: embedded 80S ribosome."
    ),
    n: int = typer.Option(1000, "--n", help="Number of particles."),
    box: int = typer.Option(128, "--box", help="Box size in pixels."),
    pixel_size: float = typer.Option(3.0, "--pixel-size", help="Pixel size in Angstrom."),
    snr: str = typer.Option("0.1", "--snr", help="Signal-to-noise ratio, or inf for no noise."),
    ctf: bool = typer.Option(True, "--ctf/--no-ctf", help="Apply RELION's CTF."),
    defocus_min: float = typer.Option(1.0, "--defocus-min", help="Micrometres (underfocus)."),
    defocus_max: float = typer.Option(2.5, "--defocus-max", help="Micrometres (underfocus)."),
    astigmatism: float = typer.Option(500.0, "--astigmatism", help="Max |dU - dV| in Angstrom."),
    voltage: float = typer.Option(300.0, "--voltage", help="kV."),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration in mm."),
    amplitude_contrast: float = typer.Option(0.1, "--amplitude-contrast"),
    max_shift: float = typer.Option(0.0, "--max-shift", help="Origin radius in Angstrom."),
    poses: str = typer.Option(
        "uniform",
        "--poses",
        help="uniform | iso-gaussian:ETA[@ROT,TILT,PSI] | FILE.star (that data set's poses).",
    ),
    symmetry: str = typer.Option("C1", "--symmetry", help="Point group to symmetrise the map."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Simulate particles with known poses: DIR/particles.mrcs, particles.star, reference.mrc."""
    from cryopose.simulate import SimulationConfig, simulate_particles

    config = SimulationConfig(
        n=n,
        box=box,
        pixel_size_angstrom=pixel_size,
        snr=parse_snr(snr),
        ctf=ctf,
        defocus_min_um=defocus_min,
        defocus_max_um=defocus_max,
        astigmatism_angstrom=astigmatism,
        voltage_kv=voltage,
        cs_mm=cs,
        amplitude_contrast=amplitude_contrast,
        max_shift_angstrom=max_shift,
        poses=poses,
        symmetry=symmetry,
        seed=seed,
    )
    try:
        with particle_progress("simulating", config.n) as advance:
            result, _ = simulate_particles(
                config,
                out_dir,
                volume_path=volume,
                model_path=model,
                progress=advance,
                device=device,
            )
    except (OSError, ValueError) as exc:
        fail(str(exc))
    snr_text = "inf" if math.isinf(config.snr) else f"{result.measured_snr:.4g}"
    Console().print(
        f"wrote {result.particles_star}, {result.particles_mrcs.name}, "
        f"{result.reference_mrc.name}: {n} particles, {box} px at {pixel_size} A/px, "
        f"SNR {snr_text} (requested {snr}), noise sigma {result.noise_sigma:.4g}"
    )
