"""``cryopose demo``: the main job on the embedded default data (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cryopose.cli._common import fail


def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "-o", "--out", help="Output folder."),
    n: int = typer.Option(1000, "--n", help="Particles per SNR."),
    snrs: str = typer.Option("1,0.1,0.03,0.015", "--snrs", help="Comma-separated SNRs."),
    box: int = typer.Option(64, "--box", help="Box size in pixels."),
    pixel_size: float = typer.Option(5.0, "--pixel-size", help="Pixel size in Angstrom."),
    grid_order: int = typer.Option(3, "--grid-order", help="HEALPix order of the global grid."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Simulate 80S ribosome particles at several SNRs, estimate their poses by MLE, MAP and
    MMSE, and compare with the truth: a table, error histograms, error against SNR, and a
    montage of clean and noisy particles, all in DIR."""
    from cryopose.bayes.estimate import EstimateConfig
    from cryopose.evaluate.snr_sweep import METHODS, snr_sweep
    from cryopose.io.mrc import ParticleStack
    from cryopose.plots import error_histograms, error_vs_snr, particle_montage
    from cryopose.simulate import SimulationConfig, simulate_particles

    try:
        snr_values = [float(s) for s in snrs.split(",") if s.strip()]
    except ValueError:
        fail(f"--snrs: expected comma-separated numbers, got {snrs!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    simulation = SimulationConfig(n=n, box=box, pixel_size_angstrom=pixel_size, ctf=True, seed=seed)
    estimation = EstimateConfig(grid_order=grid_order, batch_size=100)
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"estimating at {stage}", total=total)
        bar.update(tasks[stage], completed=done)

    try:
        with bar:
            rows = snr_sweep(
                out_dir,
                snr_values,
                simulation=simulation,
                estimation=estimation,
                progress=progress,
            )
            # montage: clean and noisy particles at the lowest SNR
            low = min(snr_values)
            config = SimulationConfig(**{**simulation.__dict__, "n": 8, "snr": low})
            _, clean = simulate_particles(config, out_dir / "montage-data", keep_clean=8)
        with ParticleStack(out_dir / "montage-data" / "particles.mrcs") as stack:
            noisy = stack.read()
    except (OSError, ValueError) as exc:
        fail(str(exc))
    montage = particle_montage(
        {"clean (CTF)": clean, f"SNR {low:g}": noisy},
        out_dir / "montage.png",
        title=f"80S ribosome (6ZU5), {box} px at {pixel_size:g} A/px",
    )
    histograms = error_histograms(
        {
            f"SNR {r.snr:g}": {m.upper(): r.errors_deg[m].numpy() for m in ("mle", "mmse")}
            for r in rows
        },
        out_dir / "error_histograms.png",
    )
    curve = error_vs_snr(
        [r.snr for r in rows],
        {
            m.upper(): {
                "median_deg": [r.comparisons[m].median_deg for r in rows],
                "chordal_mse": [r.comparisons[m].chordal_mse for r in rows],
            }
            for m in METHODS
        },
        out_dir / "error_vs_snr.png",
    )
    table = Table(title=f"cryopose demo: {n} ribosome particles per SNR, grid order {grid_order}")
    for column in (
        "SNR",
        "method",
        "median (deg)",
        "mean (deg)",
        "< 5 deg",
        "chordal MSE",
        "shift RMSE (A)",
        "particles/s",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        for m in METHODS:
            c = r.comparisons[m]
            table.add_row(
                f"{r.snr:g}",
                m.upper(),
                f"{c.median_deg:.2f}",
                f"{c.mean_deg:.2f}",
                f"{c.frac_lt_5deg:.2f}",
                f"{c.chordal_mse:.4f}",
                f"{c.shift_rmse_angstrom:.2f}",
                f"{r.n / r.seconds:.1f}" if m == "mle" else "",
            )
    Console().print(table)
    unc = Table(title="uncertainty (MMSE): is the expected loss informative and calibrated?")
    for column in ("SNR", "Spearman(expected loss, error)", "mean expected / measured loss"):
        unc.add_column(column, justify="right")
    for r in rows:
        unc.add_row(f"{r.snr:g}", f"{r.spearman_loss_vs_error:.2f}", f"{r.calibration:.2f}")
    Console().print(unc)
    Console().print(f"plots: {histograms}, {curve}, {montage}; data and estimates under {out_dir}/")
