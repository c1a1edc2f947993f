"""``cryopose demo``: the main job on the embedded default data (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cryopose.cli._common import fail, particle_progress
from cryopose.plots import particle_montage
from cryopose.simulate import SimulationConfig, simulate_particles


def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "-o", "--out", help="Output folder."),
    n: int = typer.Option(500, "--n", help="Number of particles."),
    box: int = typer.Option(64, "--box", help="Box size in pixels."),
    pixel_size: float = typer.Option(5.0, "--pixel-size", help="Pixel size in Angstrom."),
    snr: float = typer.Option(0.1, "--snr", help="Signal-to-noise ratio."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Simulate ribosome particles from the embedded 80S model and draw them.

    Writes DIR/particles.mrcs, particles.star (true poses, origins, CTF), reference.mrc,
    simulation.json and montage.png (clean and noisy particles side by side).
    """
    config = SimulationConfig(
        n=n,
        box=box,
        pixel_size_angstrom=pixel_size,
        snr=snr,
        ctf=True,
        max_shift_angstrom=2 * pixel_size,
        seed=seed,
    )
    try:
        with particle_progress("simulating", n) as advance:
            result, clean = simulate_particles(config, out_dir, progress=advance, keep_clean=8)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    from cryopose.io.mrc import ParticleStack

    with ParticleStack(result.particles_mrcs) as stack:
        noisy = stack.read(list(range(min(8, n))))
    montage = particle_montage(
        {"clean (CTF)": clean, f"SNR {snr:g}": noisy},
        Path(out_dir) / "montage.png",
        title=f"80S ribosome (6ZU5), {box} px at {pixel_size:g} A/px",
    )
    table = Table(title="cryopose demo", show_header=False)
    table.add_row("particles", f"{n} x {box} px at {pixel_size:g} A/px")
    table.add_row("SNR requested / measured", f"{snr:g} / {result.measured_snr:.4g}")
    table.add_row(
        "files",
        f"{result.particles_star}, {result.particles_mrcs.name}, "
        f"{result.reference_mrc.name}, {result.parameters_json.name}",
    )
    table.add_row("montage", str(montage))
    table.add_row("next", "pose estimation on these particles arrives with `cryopose estimate`")
    Console().print(table)
