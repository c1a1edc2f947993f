"""Soft- versus hard-assignment EM without projections: the Bayesian seed's Figs. 4 and 5.

Reproduces qualitatively (seed section 4.2):

* ``em_2d.png``: 2D image recovery from in-plane-rotated noisy copies; relative error and
  correlation of the EM estimate with the truth against SNR, soft (EM, MMSE back-rotation)
  versus hard (MLE rotation) assignment.
* ``em_3d.png``: the same for 3D volumes observed under 3D rotations (cryo-ET model).
* ``einstein_from_noise.png``: pure noise, EM started from a template; correlation of every
  iterate with the template, soft versus hard, 2D and 3D.
* ``em_soft_vs_hard.json`` and ``em_soft_vs_hard_table.md``: the numbers.

Run (seeded; a few minutes on 2 cores, ``--quick`` well under one)::

    .venv/bin/python docs/figures/em_soft_vs_hard.py [--quick] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cryopose.imaging.filters import low_pass, soft_circular_mask  # noqa: E402
from cryopose.reconstruct.em_models import (  # noqa: E402
    align_to_reference,
    ball_signal_power,
    em_inplane,
    em_subtomograms,
    pearson_correlation,
    simulate_inplane_observations,
    simulate_subtomogram_observations,
)
from cryopose.so3 import healpix_grid  # noqa: E402
from cryopose.volumes.default import default_volume  # noqa: E402

DTYPE = torch.float64
PARTICLE_ANGSTROM = 400.0  # box side in Angstrom: the ~280 A ribosome fits inside the mask


def settings(quick: bool) -> dict:
    """Sizes of the experiments (full mode: a few minutes on 2 cores)."""
    if quick:
        return {
            "box_2d": 24, "n_images": 600, "n_angles": 36, "iterations_2d": 25,
            "snr_2d": [0.01, 0.03, 0.1, 1.0],
            "box_3d": 14, "n_subtomograms": 200, "healpix_order": 1, "iterations_3d": 8,
            "snr_3d": [0.003, 0.01, 0.1],
            "noise_iterations": 10, "template_snr": 0.1,
        }
    return {
        "box_2d": 32, "n_images": 2000, "n_angles": 36, "iterations_2d": 50,
        "snr_2d": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        "box_3d": 16, "n_subtomograms": 300, "healpix_order": 1, "iterations_3d": 12,
        "snr_3d": [0.002, 0.005, 0.01, 0.03, 0.1, 0.5],
        "noise_iterations": 15, "template_snr": 0.1,
    }


def normalised(x: torch.Tensor) -> torch.Tensor:
    """Scale to unit mean square inside the disk / ball of radius N / 2 (the SNR's signal)."""
    return x / math.sqrt(ball_signal_power(x))


def truth_2d(box: int) -> torch.Tensor:
    """Projection (along z) of the embedded ribosome, soft-masked, unit signal power."""
    pixel = PARTICLE_ANGSTROM / box
    vol = default_volume(box, pixel, bfactor=4.0 * pixel**2, dtype=DTYPE)
    image = vol.sum(0) * soft_circular_mask(box, 0.42 * box, 0.06 * box, ndim=2, dtype=DTYPE)
    return normalised(image)


def truth_3d(box: int) -> torch.Tensor:
    """The embedded ribosome, low-passed, soft-masked, unit signal power."""
    pixel = PARTICLE_ANGSTROM / box
    vol = default_volume(box, pixel, bfactor=8.0 * pixel**2, dtype=DTYPE)
    vol = vol * soft_circular_mask(box, 0.42 * box, 0.06 * box, ndim=3, dtype=DTYPE)
    return normalised(vol)


def start_from(truth: torch.Tensor) -> torch.Tensor:
    """Initial template for the SNR sweeps: the truth low-passed to a quarter of Nyquist."""
    return low_pass(truth, 8.0, 1.0, edge_fourier_px=1.0, ndim=truth.ndim)


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """``||aligned estimate - truth|| / ||truth||`` after removing the global rotation."""
    aligned, _ = align_to_reference(estimate, truth)
    return float(torch.linalg.vector_norm(aligned - truth) / torch.linalg.vector_norm(truth))


def sweep_2d(cfg: dict, log) -> dict:
    truth = truth_2d(cfg["box_2d"])
    initial = start_from(truth)
    rows, examples = [], {}
    for snr in cfg["snr_2d"]:
        sigma2 = 1.0 / snr
        images, _ = simulate_inplane_observations(
            truth, cfg["n_images"], sigma2, angles_deg=cfg["n_angles"], seed=2024
        )
        row = {"snr": snr}
        for assignment in ("soft", "hard"):
            t0 = time.perf_counter()
            result = em_inplane(
                images, initial, sigma2, cfg["n_angles"], assignment=assignment,
                n_iterations=cfg["iterations_2d"], truth=truth,
            )
            aligned, _ = align_to_reference(result.final, truth)
            row[assignment] = {
                "relative_error": relative_error(result.final, truth),
                "correlation": float(pearson_correlation(aligned, truth)),
                "iterations": result.n_iterations,
                "converged": result.converged,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            examples[(snr, assignment)] = aligned
        log(f"2D SNR {snr:g}: soft {row['soft']} hard {row['hard']}")
        rows.append(row)
    return {"truth": truth, "initial": initial, "rows": rows, "examples": examples}


def sweep_3d(cfg: dict, log) -> dict:
    truth = truth_3d(cfg["box_3d"])
    initial = start_from(truth)
    grid = healpix_grid(cfg["healpix_order"], dtype=DTYPE)
    rows, examples = [], {}
    for snr in cfg["snr_3d"]:
        sigma2 = 1.0 / snr
        subtomograms, _ = simulate_subtomogram_observations(
            truth, cfg["n_subtomograms"], sigma2, grid=grid, seed=2025
        )
        row = {"snr": snr}
        for assignment in ("soft", "hard"):
            t0 = time.perf_counter()
            result = em_subtomograms(
                subtomograms, initial, sigma2, grid, assignment=assignment,
                n_iterations=cfg["iterations_3d"], truth=truth,
            )
            aligned, _ = align_to_reference(result.final, truth)
            row[assignment] = {
                "relative_error": relative_error(result.final, truth),
                "correlation": float(pearson_correlation(aligned, truth)),
                "iterations": result.n_iterations,
                "converged": result.converged,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            examples[(snr, assignment)] = aligned
        log(f"3D SNR {snr:g}: soft {row['soft']} hard {row['hard']}")
        rows.append(row)
    return {"truth": truth, "initial": initial, "rows": rows, "examples": examples}


def einstein_from_noise(cfg: dict, log) -> dict:
    """Pure white noise (sigma2 = 1), EM started from a template of SNR ``template_snr``."""
    out = {}
    template_scale = math.sqrt(cfg["template_snr"])
    template_2d = template_scale * truth_2d(cfg["box_2d"])
    noise_2d = torch.randn(
        cfg["n_images"], cfg["box_2d"], cfg["box_2d"],
        generator=torch.Generator().manual_seed(7), dtype=DTYPE,
    )
    template_3d = template_scale * truth_3d(cfg["box_3d"])
    box = cfg["box_3d"]
    noise_3d = torch.randn(
        cfg["n_subtomograms"], box, box, box,
        generator=torch.Generator().manual_seed(8), dtype=DTYPE,
    )
    grid = healpix_grid(cfg["healpix_order"], dtype=DTYPE)
    for assignment in ("soft", "hard"):
        r2 = em_inplane(
            noise_2d, template_2d, 1.0, cfg["n_angles"], assignment=assignment,
            n_iterations=cfg["noise_iterations"], tolerance=0.0, template=template_2d,
        )
        r3 = em_subtomograms(
            noise_3d, template_3d, 1.0, grid, assignment=assignment,
            n_iterations=cfg["noise_iterations"], tolerance=0.0, template=template_3d,
        )
        out[assignment] = {"2d": r2, "3d": r3}
        log(
            f"noise {assignment}: 2D corr {r2.template_correlation[-1]:.3f}, "
            f"3D corr {r3.template_correlation[-1]:.3f}"
        )
    out["template_2d"], out["template_3d"] = template_2d, template_3d
    return out


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _central(x: torch.Tensor) -> torch.Tensor:
    return x[x.shape[0] // 2] if x.ndim == 3 else x


def plot_sweep(sweep: dict, title: str, path: Path, show_snr: float) -> None:
    rows = sweep["rows"]
    snr = [r["snr"] for r in rows]
    fig = plt.figure(figsize=(12, 6.5))
    ax1 = fig.add_subplot(2, 4, (1, 2))
    ax2 = fig.add_subplot(2, 4, (5, 6))
    for assignment, style in (("soft", "o-"), ("hard", "s--")):
        label = "soft (EM, MMSE back-rotation)" if assignment == "soft" else "hard (MLE)"
        ax1.plot(snr, [r[assignment]["relative_error"] for r in rows], style, label=label)
        ax2.plot(snr, [r[assignment]["correlation"] for r in rows], style, label=label)
    for ax, ylabel in ((ax1, "relative error vs truth"), (ax2, "correlation with truth")):
        ax.set_xscale("log")
        ax.set_xlabel("SNR (mean signal power in the disk / ball / sigma^2)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title(title)
    panels = [
        ("truth", sweep["truth"]),
        ("initial template", sweep["initial"]),
        (f"soft, SNR {show_snr:g}", sweep["examples"][(show_snr, "soft")]),
        (f"hard, SNR {show_snr:g}", sweep["examples"][(show_snr, "hard")]),
    ]
    for i, (name, image) in enumerate(panels):
        ax = fig.add_subplot(2, 4, (3, 4, 7, 8)[i])
        ax.imshow(_central(image).numpy(), cmap="gray", origin="lower")
        ax.set_title(name + (" (central slice)" if image.ndim == 3 else ""), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_noise(noise: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.5))
    for row, key in enumerate(("2d", "3d")):
        ax = axes[row, 0]
        for assignment, style in (("soft", "o-"), ("hard", "s--")):
            corr = noise[assignment][key].template_correlation.numpy()
            ax.plot(range(len(corr)), corr, style, label=assignment, markersize=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel("correlation with the template")
        ax.set_title(f"{key.upper()}: pure noise, EM from a template")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        panels = [
            ("template", noise[f"template_{key}"]),
            ("hard, final", noise["hard"][key].final),
            ("soft, final", noise["soft"][key].final),
        ]
        for col, (name, image) in enumerate(panels, start=1):
            a = axes[row, col]
            a.imshow(_central(image).numpy(), cmap="gray", origin="lower")
            a.set_title(name + (" (central slice)" if image.ndim == 3 else ""), fontsize=9)
            a.axis("off")
    fig.tight_layout()
    _save(fig, path)


def table(sweeps: dict, noise: dict) -> str:
    lines = []
    for key, title in (("2d", "2D in-plane"), ("3d", "3D (cryo-ET model)")):
        lines += [
            f"### {title}",
            "",
            "| SNR | soft rel. error | hard rel. error | soft corr. | hard corr. "
            "| soft it. | hard it. |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sweeps[key]["rows"]:
            s, h = r["soft"], r["hard"]
            lines.append(
                f"| {r['snr']:g} | {s['relative_error']:.3f} | {h['relative_error']:.3f} | "
                f"{s['correlation']:.3f} | {h['correlation']:.3f} | {s['iterations']} | "
                f"{h['iterations']} |"
            )
        lines.append("")
    lines += [
        "### Einstein from noise (correlation of the iterate with the template)",
        "",
        "| model | assignment | after 1 iteration | final |",
        "|---|---|---|---|",
    ]
    for key in ("2d", "3d"):
        for assignment in ("soft", "hard"):
            c = noise[assignment][key].template_correlation
            lines.append(f"| {key.upper()} | {assignment} | {c[1]:.3f} | {c[-1]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = settings(args.quick)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    sweeps = {"2d": sweep_2d(cfg, log), "3d": sweep_3d(cfg, log)}
    noise = einstein_from_noise(cfg, log)
    plot_sweep(sweeps["2d"], "2D image recovery (in-plane rotations)", args.out / "em_2d.png",
               cfg["snr_2d"][1])
    plot_sweep(sweeps["3d"], "3D volume recovery (3D rotations, cryo-ET model)",
               args.out / "em_3d.png", cfg["snr_3d"][1])
    plot_noise(noise, args.out / "einstein_from_noise.png")
    record = {
        "settings": cfg,
        "dtype": str(DTYPE),
        "sweep_2d": sweeps["2d"]["rows"],
        "sweep_3d": sweeps["3d"]["rows"],
        "einstein_from_noise": {
            a: {k: noise[a][k].template_correlation.tolist() for k in ("2d", "3d")}
            for a in ("soft", "hard")
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_text(args.out / "em_soft_vs_hard.json", json.dumps(record, indent=1) + "\n")
    _write_text(args.out / "em_soft_vs_hard_table.md", table(sweeps, noise))
    log(f"wrote figures and tables to {args.out}")
    print(table(sweeps, noise))


if __name__ == "__main__":
    main()
