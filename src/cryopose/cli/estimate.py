"""``cryopose estimate PARTICLES.star --reference MAP.mrc -o OUT.star``: Bayesian poses."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cryopose.cli._common import fail, particle_progress


def estimate(
    particles: Path = typer.Argument(..., help="Particles: RELION STAR (3.0-5) or cryoSPARC .cs."),
    reference: Path = typer.Option(..., "--reference", help="Reference map (MRC)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output RELION 3.1 STAR file."),
    method: str = typer.Option("mmse", "--method", help="mmse | map | mle."),
    prior: str = typer.Option(
        "uniform", "--prior", help="uniform | iso-gaussian:ETA[@ROT,TILT,PSI] | empirical."
    ),
    grid_order: int = typer.Option(
        3, "--grid-order", help="HEALPix order (2: 4,608 rotations, 3: 36,864)."
    ),
    local_refine: bool = typer.Option(True, "--local-refine/--no-local-refine"),
    refine_levels: int = typer.Option(
        0, "--refine-levels", help="Nested local grid levels (each 3x finer) before Newton."
    ),
    starts: int = typer.Option(3, "--starts", help="Distinct top candidates refined."),
    newton: bool = typer.Option(
        True, "--newton/--no-newton", help="Gauss-Newton + Laplace finish of the refinement."
    ),
    shift_range: float = typer.Option(0.0, "--shift-range", help="Translation search, Angstrom."),
    shift_step: float | None = typer.Option(None, "--shift-step", help="Angstrom (default 1 px)."),
    noise_sigma: str = typer.Option("auto", "--noise-sigma", help="auto or sigma per pixel."),
    symmetry: str = typer.Option("C1", "--symmetry", help="Point group of the reference."),
    max_frequency: float | None = typer.Option(
        None, "--max-frequency", help="Band limit in Angstrom (default Nyquist)."
    ),
    batch_size: int = typer.Option(128, "--batch-size"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Posterior over rotations (and shifts) per particle; MMSE, MAP or MLE poses with
    uncertainty (rlnMaxValueProbDistribution, rlnCryoposeExpectedLoss,
    rlnCryoposeCredibleRadiusDeg, rlnCryoposeMassOutside20Deg)."""
    import torch

    from cryopose.bayes.estimate import EstimateConfig, estimate_poses
    from cryopose.io import read_particles, read_volume, write_star

    config = EstimateConfig(
        method=method,
        prior=prior,
        grid_order=grid_order,
        local_refine=local_refine,
        refine_levels=refine_levels,
        n_starts=starts,
        newton_finish=newton,
        shift_range_angstrom=shift_range,
        shift_step_angstrom=shift_step,
        noise_sigma=noise_sigma,
        symmetry=symmetry,
        max_frequency_angstrom=max_frequency,
        batch_size=batch_size,
        device=device,
    )
    try:
        config.validate()
        if device.startswith("cuda") and not torch.cuda.is_available():
            fail("--device cuda: no CUDA device is available (use --device cpu)")
        table = read_particles(particles)
        volume = read_volume(reference, require_pixel_size=True)
        with particle_progress("estimating", len(table)) as advance:
            result = estimate_poses(
                table, volume.data, volume.pixel_size_angstrom, config, progress=advance
            )
        write_star(result.table, out)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    est = result.estimates
    Console().print(
        f"wrote {out}: {len(table)} particles, {method.upper()} poses in {result.seconds:.1f} s "
        f"({len(table) / result.seconds:.1f} particles/s); median expected chordal loss "
        f"{float(est.expected_loss.median()):.4f}, median 90% credible radius "
        f"{float(est.credible_radius_deg.median()):.2f} deg"
    )
