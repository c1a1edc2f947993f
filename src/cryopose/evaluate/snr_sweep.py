"""Pose accuracy against SNR on simulated data: simulate, estimate (MLE, MAP, MMSE), compare.

The workflow behind ``cryopose demo``; also what accuracy claims and benches are built on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cryopose.bayes.estimate import EstimateConfig, estimate_poses
from cryopose.evaluate.compare import PoseComparison, compare_poses
from cryopose.io.particles import read_particles
from cryopose.io.star import write_star
from cryopose.simulate.particles import SimulationConfig, load_reference, simulate_particles
from cryopose.so3.distances import chordal_from_geodesic

__all__ = ["SweepRow", "snr_sweep"]

METHODS = ("mle", "map", "mmse")


@dataclass
class SweepRow:
    """Figures at one SNR: one :class:`PoseComparison` per method, plus uncertainty checks."""

    snr: float
    n: int
    comparisons: dict[str, PoseComparison]
    seconds: float
    spearman_loss_vs_error: float
    calibration: float
    simulation_dir: Path
    errors_deg: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def snr_sweep(
    out_dir: str | Path,
    snrs: list[float],
    *,
    simulation: SimulationConfig,
    estimation: EstimateConfig,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SweepRow]:
    """Simulate ``simulation.n`` particles at each SNR, estimate their poses, compare.

    Parameters
    ----------
    out_dir : str or Path
        Each SNR gets ``out_dir/snr_<value>/`` with the simulated data and ``estimated.star``.
    snrs : list of float
    simulation, estimation : SimulationConfig, EstimateConfig
        ``simulation.snr`` is overridden per SNR; the same seed (so the same poses) is used.
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    list of SweepRow
    """
    out = Path(out_dir)
    volume = load_reference(
        simulation.box, simulation.pixel_size_angstrom, symmetry=simulation.symmetry
    )
    rows = []
    for snr in snrs:
        folder = out / f"snr_{snr:g}"
        config = SimulationConfig(**{**simulation.__dict__, "snr": snr})
        result, _ = simulate_particles(config, folder, volume=volume)
        table = read_particles(result.particles_star)
        t0 = time.perf_counter()
        done = [0]

        def tick(k: int, snr=snr, done=done, total=len(table)) -> None:
            done[0] += k
            if progress is not None:
                progress(f"SNR {snr:g}", done[0], total)

        estimate = estimate_poses(
            table, volume, simulation.pixel_size_angstrom, estimation, progress=tick
        )
        seconds = time.perf_counter() - t0
        write_star(estimate.table, folder / "estimated.star")
        truth = table.rotations()
        origins = table.origins_angstrom()
        comparisons, errors = {}, {}
        for method in METHODS:
            rotations = getattr(estimate.estimates, f"rotations_{method}").double()
            shifts = -getattr(estimate.estimates, f"shifts_{method}_px").double()
            comparisons[method] = compare_poses(
                rotations,
                truth,
                symmetry=simulation.symmetry,
                estimated_shifts_angstrom=shifts * simulation.pixel_size_angstrom,
                reference_shifts_angstrom=origins,
            )
            errors[method] = torch.as_tensor(comparisons[method].errors_deg)
        mmse_err = torch.deg2rad(errors["mmse"])
        squared_chordal = chordal_from_geodesic(mmse_err) ** 2
        loss = estimate.estimates.expected_loss.double()
        rows.append(
            SweepRow(
                snr=snr,
                n=len(table),
                comparisons=comparisons,
                seconds=seconds,
                spearman_loss_vs_error=_spearman(loss, mmse_err),
                calibration=float(loss.mean() / squared_chordal.mean().clamp_min(1e-12)),
                simulation_dir=folder,
                errors_deg=errors,
            )
        )
    return rows
