"""Soft- versus hard-assignment EM without projections: the Bayesian seed's Figs. 4 and 5.

Reproduces qualitatively (seed section 4.2):

* ``em_2d.png``: 2D image recovery from in-plane-rotated noisy copies; relative error and
  correlation of the EM estimate with the truth against SNR for three M-steps: soft (EM, the
  MMSE back-rotation operator), mmse (back-rotation by each observation's Procrustes-rounded
  MMSE rotation, the seed's procedure for its 3D figure) and hard (MLE rotation).
* ``em_3d.png``: the same for 3D volumes observed under 3D rotations (cryo-ET model).
* ``einstein_from_noise.png``: pure noise, EM started from a template; correlation of every
  iterate with the template, soft, mmse and hard, 2D and 3D.
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
DTYPE_3D = torch.float32  # the 3D runs (3,000 x 16^3, up to 100 iterations): half the time
ASSIGNMENTS = ("soft", "mmse", "hard")
LABELS = {
    "soft": "soft (EM, MMSE back-rotation operator)",
    "mmse": "mmse (MMSE point rotation, Procrustes)",
    "hard": "hard (MLE rotation)",
}
STYLES = {"soft": "o-", "mmse": "^-.", "hard": "s--"}
PARTICLE_ANGSTROM = 400.0  # box side in Angstrom: the ~280 A ribosome fits inside the mask


def settings(quick: bool) -> dict:
    """Sizes of the experiments (full mode: a few minutes on 2 cores)."""
    if quick:
        return {
            "box_2d": 24, "n_images": 600, "n_angles": 36, "iterations_2d": 25,
            "snr_2d": [0.01, 0.03, 0.1, 1.0],
            "box_3d": 12, "n_subtomograms": 600, "healpix_order": 1, "iterations_3d": 10,
            "snr_3d": [0.005, 0.01, 0.1],
            "noise_iterations": 10, "template_snr": 0.1,
        }
    # 3D: the seed's Fig. 5 used M = 3,000 observations and its stopping rule (relative change
    # 1e-3 or 100 iterations). With 10x fewer the average of perfectly aligned observations
    # already has a relative error of sqrt(1 / (M SNR)) ~ 0.8 at SNR 0.005, and that noise
    # floor, not the assignment, decides the result.
    return {
        "box_2d": 32, "n_images": 2000, "n_angles": 36, "iterations_2d": 50,
        "snr_2d": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        "box_3d": 16, "n_subtomograms": 3000, "healpix_order": 1, "iterations_3d": 100,
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


def _summary(result, truth: torch.Tensor, seconds: float) -> tuple[dict, torch.Tensor]:
    aligned, _ = align_to_reference(result.final, truth)
    row = {
        "relative_error": relative_error(result.final, truth),
        "correlation": float(pearson_correlation(aligned, truth)),
        "iterations": result.n_iterations,
        "converged": result.converged,
        "seconds": round(seconds, 2),
        # per iteration, in the iterates' frame (started from the truth's frame)
        "correlation_by_iteration": [round(float(c), 5) for c in result.truth_correlation],
    }
    return row, aligned


def sweep(kind: str, cfg: dict, log) -> dict:
    """SNR sweep of the three M-steps for ``kind`` = "2d" or "3d"."""
    if kind == "2d":
        truth = truth_2d(cfg["box_2d"])
    else:
        truth = truth_3d(cfg["box_3d"]).to(DTYPE_3D)
        grid = healpix_grid(cfg["healpix_order"], dtype=DTYPE_3D)
    initial = start_from(truth)
    rows, examples = [], {}
    for snr in cfg[f"snr_{kind}"]:
        sigma2 = 1.0 / snr
        if kind == "2d":
            data, _ = simulate_inplane_observations(
                truth, cfg["n_images"], sigma2, angles_deg=cfg["n_angles"], seed=2024
            )
        else:
            data, _ = simulate_subtomogram_observations(
                truth, cfg["n_subtomograms"], sigma2, grid=grid, seed=2025
            )
        row = {"snr": snr}
        for assignment in ASSIGNMENTS:
            t0 = time.perf_counter()
            if kind == "2d":
                result = em_inplane(
                    data, initial, sigma2, cfg["n_angles"], assignment=assignment,
                    n_iterations=cfg["iterations_2d"], truth=truth,
                )
            else:
                result = em_subtomograms(
                    data, initial, sigma2, grid, assignment=assignment,
                    n_iterations=cfg["iterations_3d"], truth=truth,
                )
            row[assignment], examples[(snr, assignment)] = _summary(
                result, truth, time.perf_counter() - t0
            )
        log(
            f"{kind.upper()} SNR {snr:g}: "
            + ", ".join(
                f"{a} err {row[a]['relative_error']:.3f} corr {row[a]['correlation']:.3f} "
                f"({row[a]['iterations']} it., {row[a]['seconds']:.0f} s)"
                for a in ASSIGNMENTS
            )
        )
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
    template_3d = template_scale * truth_3d(cfg["box_3d"]).to(DTYPE_3D)
    box = cfg["box_3d"]
    noise_3d = torch.randn(
        cfg["n_subtomograms"], box, box, box,
        generator=torch.Generator().manual_seed(8), dtype=DTYPE,
    ).to(DTYPE_3D)
    grid = healpix_grid(cfg["healpix_order"], dtype=DTYPE_3D)
    for assignment in ASSIGNMENTS:
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
    fig = plt.figure(figsize=(13, 6.8))
    ax1, ax2, ax3 = fig.add_subplot(2, 4, 1), fig.add_subplot(2, 4, 5), fig.add_subplot(2, 4, 2)
    show = next(r for r in rows if r["snr"] == show_snr)
    for a in ASSIGNMENTS:
        ax1.plot(snr, [r[a]["relative_error"] for r in rows], STYLES[a], label=LABELS[a])
        ax2.plot(snr, [r[a]["correlation"] for r in rows], STYLES[a], label=LABELS[a])
        ax3.plot(show[a]["correlation_by_iteration"], STYLES[a][1:], label=a)
    for ax, ylabel in ((ax1, "relative error vs truth"), (ax2, "correlation with truth")):
        ax.set_xscale("log")
        ax.set_xlabel("SNR (signal power in the disk / ball / sigma^2)", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax1.set_title(title, fontsize=9, loc="left")
    ax3.set_xlabel("iteration")
    ax3.set_ylabel("correlation with truth")
    ax3.set_title(f"SNR {show_snr:g}: by iteration", fontsize=9)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=7)
    panels = [
        (3, "truth", sweep["truth"]),
        (4, "initial template", sweep["initial"]),
    ] + [
        (6 + i, f"{a}, SNR {show_snr:g}", sweep["examples"][(show_snr, a)])
        for i, a in enumerate(ASSIGNMENTS)
    ]
    for slot, name, image in panels:
        ax = fig.add_subplot(2, 4, slot)
        ax.imshow(_central(image).float().numpy(), cmap="gray", origin="lower")
        ax.set_title(name + (" (central slice)" if image.ndim == 3 else ""), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_noise(noise: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 5, figsize=(15, 6.5))
    for row, key in enumerate(("2d", "3d")):
        ax = axes[row, 0]
        for a in ASSIGNMENTS:
            corr = noise[a][key].template_correlation.numpy()
            ax.plot(range(len(corr)), corr, STYLES[a], label=a, markersize=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel("correlation with the template")
        ax.set_title(f"{key.upper()}: pure noise, EM from a template", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        panels = [("template", noise[f"template_{key}"])] + [
            (f"{a}, final", noise[a][key].final) for a in ASSIGNMENTS
        ]
        for col, (name, image) in enumerate(panels, start=1):
            a = axes[row, col]
            a.imshow(_central(image).float().numpy(), cmap="gray", origin="lower")
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
            "| SNR | " + " | ".join(f"{a} rel. error" for a in ASSIGNMENTS) + " | "
            + " | ".join(f"{a} corr." for a in ASSIGNMENTS) + " | "
            + " | ".join(f"{a} it." for a in ASSIGNMENTS) + " |",
            "|---" * (1 + 3 * len(ASSIGNMENTS)) + "|",
        ]
        for r in sweeps[key]["rows"]:
            cells = (
                [f"{r[a]['relative_error']:.3f}" for a in ASSIGNMENTS]
                + [f"{r[a]['correlation']:.3f}" for a in ASSIGNMENTS]
                + [f"{r[a]['iterations']}" + ("" if r[a]["converged"] else "*")
                   for a in ASSIGNMENTS]
            )
            lines.append(f"| {r['snr']:g} | " + " | ".join(cells) + " |")
        lines += ["", "(* = stopped at the iteration limit, not converged)", ""]
    lines += [
        "### Einstein from noise (correlation of the iterate with the template)",
        "",
        "| model | assignment | after 1 iteration | final |",
        "|---|---|---|---|",
    ]
    for key in ("2d", "3d"):
        for a in ASSIGNMENTS:
            c = noise[a][key].template_correlation
            lines.append(f"| {key.upper()} | {a} | {c[1]:.3f} | {c[-1]:.3f} |")
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

    sweeps = {"2d": sweep("2d", cfg, log), "3d": sweep("3d", cfg, log)}
    noise = einstein_from_noise(cfg, log)
    plot_sweep(sweeps["2d"], "2D image recovery (in-plane rotations)", args.out / "em_2d.png",
               cfg["snr_2d"][1])
    plot_sweep(sweeps["3d"], "3D volume recovery (3D rotations, cryo-ET model)",
               args.out / "em_3d.png", cfg["snr_3d"][1])
    plot_noise(noise, args.out / "einstein_from_noise.png")
    record = {
        "settings": cfg,
        "dtype": {"2d": str(DTYPE), "3d": str(DTYPE_3D)},
        "sweep_2d": sweeps["2d"]["rows"],
        "sweep_3d": sweeps["3d"]["rows"],
        "einstein_from_noise": {
            a: {k: noise[a][k].template_correlation.tolist() for k in ("2d", "3d")}
            for a in ASSIGNMENTS
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_text(args.out / "em_soft_vs_hard.json", json.dumps(record, indent=1) + "\n")
    _write_text(args.out / "em_soft_vs_hard_table.md", table(sweeps, noise))
    log(f"wrote figures and tables to {args.out}")
    print(table(sweeps, noise))


if __name__ == "__main__":
    main()
