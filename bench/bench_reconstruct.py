"""Reconstruction with true poses against cryoDRGN and ASPIRE on the same particles (issue 5).

Goal: particles per second reconstructing 10,000 particles of 128 px at least 5x the faster of
cryoDRGN's ``backproject_voxel`` and ASPIRE's ``MeanEstimator``, at an equal or better FSC
against the truth map. A script, not a test: it prints what it measured in this run (one table
with the ratios) and never fails on timing.

    .venv/bin/python bench/bench_reconstruct.py [--n 10000] [--box 128] [--snr 0.1]
        [--peers-venv /tmp/peers] [--timeout 1800] [--subset-n 2000] [--skip-peers]

Data (simulated once with cryopose, reused while its ``simulation.json`` matches): the embedded
6ZU5 ribosome at ``--box`` px and ``384 / box`` Angstrom/px, uniform true poses, RELION CTF
(defocus 1.0-2.5 um, up to 500 A astigmatism), no origin shifts, white noise at ``--snr``;
``particles.star`` (RELION 3.1) + ``particles.mrcs`` + ``reference.mrc`` (the truth) under
``--workdir`` (default: ``bench_recon`` in the temp folder). Both peers apply the CTF from that
STAR file (cryoDRGN via ``parse_ctf_star`` and its default ``--ctf-alg mul``; ASPIRE's
``RelionSource`` builds its CTF filters from the STAR columns).

Timed spans (wall seconds, whole commands, Python start-up and file reading included):

* cryopose: ``cryopose reconstruct STAR -o MAP`` in a subprocess (reads the STAR and the stack,
  half-maps with the FSC-based Wiener SSNR, writes the map), with the defaults (RELION's 2x
  oversampled grid and gridding correction) and with ``--pad-factor 1
  --no-gridding-correction`` (cryoDRGN's scheme; its real-space sinc^2 apodisation damps the
  noise away from the centre, which raises an unmasked FSC); also the library call
  :func:`cryopose.reconstruct.reconstruct_particles` in this process, for reference.
* cryoDRGN: ``parse_pose_star`` + ``parse_ctf_star`` + ``backproject_voxel --uninvert-data``
  (cryoDRGN inverts the data sign by default; our simulation has positive density).
* ASPIRE: a child script under the peers venv's python: ``RelionSource`` + ``MeanEstimator``
  (CG least squares, ``--aspire-maxiter`` iterations) + writing the map.

Peers run only as subprocesses with the peers venv's python (they are GPL and never a
dependency of cryopose). A peer that runs past ``--timeout`` on all particles is run again on the
first ``--subset-n`` particles, and that rate is labelled as a subset rate.

FSC of every map against ``reference.mrc`` with :func:`cryopose.evaluate.fsc`, without a mask
and with one soft sphere for every map (holding 99.5% of the truth's squared density). The
"as is" figures are the honest ones; transposed / flipped / integer-shifted variants are printed
as diagnostics of convention mismatches (hand, axis order, origin), with the voxel size and
shape each tool wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryopose.evaluate.fsc import fsc
from cryopose.io import read_particles, read_volume
from cryopose.reconstruct import reconstruct_particles
from cryopose.simulate import SimulationConfig, simulate_particles

GOAL_SPEEDUP = 5.0
BOX_ANGSTROM = 384.0  # 128 px at 3 A/px, as in the other benches and the peer scripts
REPO = Path(__file__).resolve().parents[1]

ASPIRE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import mrcfile, numpy as np
from aspire.reconstruction import MeanEstimator
from aspire.source import RelionSource
star, out = sys.argv[1], sys.argv[2]
px, maxiter, rows = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
src = RelionSource(star, pixel_size=px, max_rows=rows if rows > 0 else None)
t1 = time.perf_counter()
vol = MeanEstimator(src, checkpoint_iterations=None, maxiter=maxiter).estimate()
t2 = time.perf_counter()
v = vol.asnumpy()[0].astype(np.float32)
with mrcfile.new(out, overwrite=True) as m:
    m.set_data(v)
    m.voxel_size = px
print(json.dumps({"n": int(src.n), "t_import_load_s": t1 - t0, "t_estimate_s": t2 - t1,
                  "n_filters": len(src.unique_filters)}))
"""


@dataclass
class Run:
    """One reconstruction: who, how many particles, how long, and its FSC against the truth."""

    tool: str
    n: int
    wall_s: float | None = None
    detail: str = ""
    map_path: str | None = None
    error: str | None = None
    subset: bool = False
    fsc_05_angstrom: float | None = None
    fsc_0143_angstrom: float | None = None
    fixed_05_angstrom: float | None = None
    fixed_0143_angstrom: float | None = None
    masked_05_angstrom: float | None = None
    masked_0143_angstrom: float | None = None
    fix: str = "as is"
    diagnostics: dict = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.n / self.wall_s if self.wall_s and self.error is None else None


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in (
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"
    ):
        env[key] = str(threads)
    return env


def run_timed(cmd: list[str], timeout: float, env: dict, cwd: Path | None = None,
              log: Path | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` in its own process group; returns (exit code or 124 on timeout, s, output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, nothing else
        out, _ = proc.communicate()
        code = 124
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(out or "")
    return code, wall, out or ""


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# ---- data -------------------------------------------------------------------------------------
def simulate(args: argparse.Namespace, work: Path) -> tuple[Path, float | None]:
    """Simulate once (or reuse a matching data set); returns the folder and seconds spent."""
    config = SimulationConfig(n=args.n, box=args.box, pixel_size_angstrom=args.pixel_size,
                              snr=args.snr, ctf=True, max_shift_angstrom=0.0, seed=args.seed)
    folder = work / f"data_n{args.n}_box{args.box}_snr{args.snr:g}_seed{args.seed}"
    record = folder / "simulation.json"
    if record.exists() and not args.resimulate:
        saved = json.loads(record.read_text()).get("config", {})
        if all(saved.get(k) == v for k, v in asdict(config).items()):
            print(f"data: reusing {folder} (same simulation config; --resimulate to redo)")
            return folder, None
    print(f"data: simulating {args.n:,} particles of {args.box} px ({load_text()}) ...",
          flush=True)
    t0 = time.perf_counter()
    simulate_particles(config, folder)
    wall = time.perf_counter() - t0
    print(f"data: {wall:.1f} s ({args.n / wall:.0f} particles/s) -> {folder}")
    return folder, wall


# ---- tools ------------------------------------------------------------------------------------
#: cryopose CLI configurations timed: (label, extra flags). The defaults follow RELION (2x
#: oversampled insertion grid, sinc^2 gridding correction); the second is cryoDRGN's
#: backproject_voxel scheme (no oversampling, no gridding correction), whose sinc^2 apodisation
#: damps the noise away from the box centre (a higher FSC, a softer map edge).
OUR_CONFIGS = [
    ("cryopose reconstruct (CLI, defaults)", []),
    ("cryopose reconstruct (CLI, --pad-factor 1 --no-gridding-correction)",
     ["--pad-factor", "1", "--no-gridding-correction"]),
]


def run_ours_cli(data: Path, out: Path, args: argparse.Namespace, label: str,
                 flags: list[str], index: int) -> Run:
    exe = Path(sys.executable).with_name("cryopose")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "cryopose.cli.main"]
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"cryopose_cli{index}.mrc"
    cmd = [*base, "reconstruct", str(data / "particles.star"), "-o", str(target), *flags]
    code, wall, text = run_timed(cmd, args.timeout, child_env(args.threads),
                                 log=out / f"cryopose_cli{index}.log")
    run = Run(label, args.n, wall,
              "whole command: start-up, STAR + stack read, half-maps, FSC-SSNR Wiener, write")
    if code != 0:
        run.error = f"exit {code}: {tail(text)}"
    else:
        run.map_path = str(target)
    return run


def run_ours_library(data: Path, out: Path, args: argparse.Namespace) -> Run:
    from cryopose.io import write_volume

    t0 = time.perf_counter()
    table = read_particles(data / "particles.star")
    t_read = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = reconstruct_particles(table)
    t_rec = time.perf_counter() - t1
    target = out / "cryopose_library.mrc"
    write_volume(target, result.volume, table.pixel_size)
    wall = time.perf_counter() - t0
    return Run("cryopose reconstruct_particles (library)", args.n, wall,
               f"in-process: read_particles {t_read:.2f} s, reconstruct_particles {t_rec:.1f} s "
               f"(stack streamed from disk), write", map_path=str(target))


def run_cryodrgn(data: Path, out: Path, args: argparse.Namespace, first: int | None) -> Run:
    bin_dir = args.peers_venv / "bin"
    star, mrcs = data / "particles.star", data / "particles.mrcs"
    n = first or args.n
    tag = f"cryodrgn_n{n}"
    od = out / tag
    od.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    geometry = ["-D", str(args.box), "--Apix", f"{args.pixel_size:g}"]
    steps = [
        ("parse_pose_star", [str(bin_dir / "cryodrgn"), "parse_pose_star", str(star),
                             "-o", str(od / "pose.pkl"), *geometry]),
        ("parse_ctf_star", [str(bin_dir / "cryodrgn"), "parse_ctf_star", str(star),
                            "-o", str(od / "ctf.pkl"), *geometry, "--ps", "0"]),
        ("backproject_voxel", [str(bin_dir / "cryodrgn"), "backproject_voxel", str(mrcs),
                               "--poses", str(od / "pose.pkl"), "--ctf", str(od / "ctf.pkl"),
                               "--uninvert-data", "-o", str(od / "out"),
                               *(["--first", str(first)] if first else [])]),
    ]
    run = Run("cryoDRGN backproject_voxel", n, 0.0, subset=first is not None)
    times = []
    for name, cmd in steps:
        code, wall, text = run_timed(cmd, args.timeout, env, log=od / f"{name}.log")
        run.wall_s += wall
        times.append(f"{name} {wall:.1f} s")
        if code != 0:
            run.error = ("timeout" if code == 124 else f"exit {code}") + f" in {name} after " \
                f"{wall:.0f} s" + ("" if code == 124 else f": {tail(text)}")
            break
    run.detail = ", ".join(times) + " (defaults: --ctf-alg mul, half-maps + FSC, reg-weight 1)"
    if run.error is None:
        run.map_path = str(od / "out" / "backproject.mrc")
    return run


def run_aspire(data: Path, out: Path, args: argparse.Namespace, first: int | None) -> Run:
    n = first or args.n
    od = out / f"aspire_n{n}"
    od.mkdir(parents=True, exist_ok=True)
    target = od / "mean.mrc"
    cmd = [str(args.peers_venv / "bin" / "python"), "-c", ASPIRE_CHILD,
           str(data / "particles.star"), str(target), f"{args.pixel_size:g}",
           str(args.aspire_maxiter), str(first or 0)]
    # cwd: ASPIRE writes ./logs and aspire.err.log into the working directory
    code, wall, text = run_timed(cmd, args.timeout, child_env(args.threads), cwd=od,
                                 log=od / "aspire.log")
    run = Run("ASPIRE MeanEstimator", n, wall, subset=first is not None)
    if code != 0:
        run.error = "timeout" if code == 124 else f"exit {code}: {tail(text)}"
        run.error += f" after {wall:.0f} s"
        return run
    info = json.loads(text.strip().splitlines()[-1])
    run.detail = (f"import + RelionSource {info['t_import_load_s']:.1f} s, MeanEstimator "
                  f"{info['t_estimate_s']:.1f} s ({info['n_filters']} CTF filters; DiracBasis3D, "
                  f"circulant preconditioner, maxiter {args.aspire_maxiter})")
    run.map_path = str(target)
    return run


# ---- FSC --------------------------------------------------------------------------------------
def fit_box(volume: torch.Tensor, box: int) -> torch.Tensor:
    """Centre-crop or zero-pad a cube to ``box`` (only used when a tool writes another size)."""
    n = volume.shape[0]
    if n == box:
        return volume
    out = torch.zeros((box,) * 3, dtype=volume.dtype)
    a, b = max(0, n // 2 - box // 2), max(0, box // 2 - n // 2)
    m = min(n, box)
    out[b:b + m, b:b + m, b:b + m] = volume[a:a + m, a:a + m, a:a + m]
    return out


def best_integer_shift(volume: torch.Tensor, truth: torch.Tensor) -> tuple[int, int, int]:
    """Circular shift (z, y, x) of ``volume`` that maximises its correlation with ``truth``."""
    cc = torch.fft.ifftn(torch.fft.fftn(truth) * torch.fft.fftn(volume).conj()).real
    idx = np.unravel_index(int(torch.argmax(cc)), cc.shape)
    n = volume.shape[0]
    return tuple(int(i if i <= n // 2 else i - n) for i in idx)


def truth_mask(truth: torch.Tensor, fraction: float = 0.995, edge_px: float = 6.0) -> torch.Tensor:
    """Soft sphere (cosine edge ``edge_px``) about the box centre whose hard radius holds
    ``fraction`` of the truth's squared density: the same mask for every tool's map."""
    n = truth.shape[0]
    i = torch.arange(n, dtype=torch.float64) - n // 2
    r = torch.sqrt(i[:, None, None] ** 2 + i[None, :, None] ** 2 + i[None, None, :] ** 2)
    power = truth.to(torch.float64) ** 2
    order = torch.argsort(r.reshape(-1))
    cumulative = torch.cumsum(power.reshape(-1)[order], 0) / power.sum()
    radius = float(r.reshape(-1)[order][torch.searchsorted(cumulative, fraction)])
    ramp = ((radius + edge_px - r) / edge_px).clamp(0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * ramp)


def score(run: Run, truth: torch.Tensor, px: float, mask: torch.Tensor | None = None) -> None:
    with mrcfile.open(run.map_path, permissive=True) as m:
        raw = torch.from_numpy(np.asarray(m.data, dtype=np.float64).copy())
        voxel = float(m.voxel_size.x)
    box = truth.shape[0]
    bad = int((~torch.isfinite(raw)).sum())
    run.diagnostics["written"] = f"shape {tuple(raw.shape)}, voxel {voxel:g} A"
    if bad:
        run.diagnostics["written"] += f", {bad} non-finite voxels (set to 0 for the FSC)"
        run.error = f"{bad} non-finite voxels in the map"
        raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    vol = fit_box(raw, box)
    as_is = fsc(vol, truth, px)
    run.fsc_05_angstrom = as_is.resolution_05_angstrom
    run.fsc_0143_angstrom = as_is.resolution_0143_angstrom
    variants = {
        "transpose_zyx": vol.permute(2, 1, 0),
        "flip_z(hand)": vol.flip(0),
        "flip_x(hand)": vol.flip(2),
        "negated": -vol,
    }
    shift = best_integer_shift(vol, truth)
    if any(shift):
        variants[f"shift{shift}"] = torch.roll(vol, shift, dims=(0, 1, 2))
    diag = {}
    for name, v in variants.items():
        r = fsc(v.contiguous(), truth, px)
        diag[name] = (r.resolution_05_angstrom, r.resolution_0143_angstrom)
    run.diagnostics["variants (FSC0.5, FSC0.143 A)"] = diag
    # Convention fix: the variant with the best FSC 0.143 if it beats "as is" (labelled).
    run.fixed_05_angstrom, run.fixed_0143_angstrom = (run.fsc_05_angstrom,
                                                      run.fsc_0143_angstrom)
    best = min(diag, key=lambda k: (diag[k][1], diag[k][0]))
    if diag[best][1] < run.fsc_0143_angstrom - 1e-6 or (
        diag[best][1] <= run.fsc_0143_angstrom + 1e-6
        and diag[best][0] < run.fsc_05_angstrom - 1e-6
    ):
        run.fix = best
        run.fixed_05_angstrom, run.fixed_0143_angstrom = diag[best]
    if mask is not None:
        fixed = vol if run.fix == "as is" else (
            torch.roll(vol, shift, dims=(0, 1, 2)) if run.fix.startswith("shift")
            else variants[run.fix])
        masked = fsc(fixed.contiguous(), truth, px, mask=mask)
        run.masked_05_angstrom = masked.resolution_05_angstrom
        run.masked_0143_angstrom = masked.resolution_0143_angstrom
        run.diagnostics["masked FSC (convention fixed) at shells N/8, N/4, 3N/8, N/2-2"] = [
            round(float(masked.fsc[k]), 3) for k in (box // 8, box // 4, 3 * box // 8,
                                                      box // 2 - 2)]
    run.diagnostics["best integer shift (z,y,x) px"] = shift
    low = [float(as_is.fsc[s]) for s in (box // 8, box // 4, 3 * box // 8, box // 2 - 2)]
    run.diagnostics["as-is FSC at shells N/8, N/4, 3N/8, N/2-2"] = [round(x, 3) for x in low]


# ---- report -----------------------------------------------------------------------------------
def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(runs: list[Run], px: float) -> None:
    print("\n| tool | particles | wall s | particles/s | FSC 0.5 / 0.143 (A) as is | "
          "after convention fix (A) | masked, fixed (A) |\n|---|---|---|---|---|---|---|")
    for r in runs:
        label = r.tool + (" (SUBSET: first particles only)" if r.subset else "")
        status = f" ({r.error})" if r.error else ""
        print(f"| {label}{status} | {r.n:,} | {fmt(r.wall_s, '.1f')} | {fmt(r.rate, '.1f')} | "
              f"{fmt(r.fsc_05_angstrom, '.2f')} / {fmt(r.fsc_0143_angstrom, '.2f')} | "
              f"{fmt(r.fixed_05_angstrom, '.2f')} / {fmt(r.fixed_0143_angstrom, '.2f')}"
              f"{'' if r.fix == 'as is' else ' (' + r.fix + ')'} | "
              f"{fmt(r.masked_05_angstrom, '.2f')} / {fmt(r.masked_0143_angstrom, '.2f')} |")
    print(f"(Nyquist {2 * px:g} A; resolutions from cryopose.evaluate.fsc against the truth, "
          "no mask; 'convention fix' = the sign / hand / axis-order / integer-shift variant "
          "with the best FSC, named when it is not the map as written; 'masked': the same soft "
          "sphere for every map, holding 99.5% of the truth's squared density, 6 px cosine edge)")


def verdict(runs: list[Run]) -> None:
    ours_runs = [r for r in runs if r.tool.startswith("cryopose reconstruct (CLI")]
    peers = [r for r in runs if not r.tool.startswith("cryopose") and r.rate is not None]
    # a map with non-finite voxels is an error: it has no rate
    if not any(r.rate for r in ours_runs):
        print("\nno cryopose rate: no ratio")
        return
    if not peers:
        print("\nno peer measured in this run: no ratio")
        return
    fastest = max(peers, key=lambda r: r.rate)
    subset = " (peer rate from a SUBSET run)" if fastest.subset else ""

    def no_worse(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and a <= b + 1e-6

    for ours in ours_runs:
        if ours.rate is None:
            continue
        ratio = ours.rate / fastest.rate
        speed_ok = ratio >= GOAL_SPEEDUP
        print(f"\n{ours.tool}: ours/faster peer {ours.rate:.1f} / {fastest.rate:.1f} "
              f"particles/s ({fastest.tool}, n={fastest.n:,}){subset} = {ratio:.2f}x "
              f"(goal >= {GOAL_SPEEDUP:g}x: {'met' if speed_ok else 'NOT met'})")
        for p in peers:
            if p.fixed_05_angstrom is None or ours.fixed_05_angstrom is None:
                continue
            plain = no_worse(ours.fixed_05_angstrom, p.fixed_05_angstrom) and no_worse(
                ours.fixed_0143_angstrom, p.fixed_0143_angstrom)
            masked = no_worse(ours.masked_05_angstrom, p.masked_05_angstrom) and no_worse(
                ours.masked_0143_angstrom, p.masked_0143_angstrom)
            fix = "" if p.fix == "as is" else f", peer map {p.fix}"
            print(f"  vs {p.tool}{' (subset)' if p.subset else ''}: rate "
                  f"{ours.rate / p.rate:.2f}x; FSC0.5/0.143 {ours.fixed_05_angstrom:.2f}/"
                  f"{ours.fixed_0143_angstrom:.2f} vs {p.fixed_05_angstrom:.2f}/"
                  f"{p.fixed_0143_angstrom:.2f} A ({'equal or better' if plain else 'WORSE'}); "
                  f"masked {fmt(ours.masked_05_angstrom, '.2f')}/"
                  f"{fmt(ours.masked_0143_angstrom, '.2f')} vs {fmt(p.masked_05_angstrom, '.2f')}/"
                  f"{fmt(p.masked_0143_angstrom, '.2f')} A "
                  f"({'equal or better' if masked else 'WORSE'}){fix}"
                  + (" [different particle count]" if p.n != ours.n else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="particles")
    parser.add_argument("--box", type=int, default=128, help="box size (px)")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="Angstrom/px (default 384 / box)")
    parser.add_argument("--snr", type=float, default=0.1, help="SNR of the simulated images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers-venv", type=Path, default=Path("/tmp/peers"),
                        help="peers venv folder (bin/python with cryodrgn and aspire)")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--tools", nargs="+", default=["cryodrgn", "aspire"],
                        choices=["cryodrgn", "aspire"], help="peers to run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per peer command")
    parser.add_argument("--subset-n", type=int, default=2000,
                        help="particles for a peer's second run after a timeout")
    parser.add_argument("--aspire-maxiter", type=int, default=50)
    parser.add_argument("--skip-library", action="store_true",
                        help="skip the in-process reconstruct_particles run")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_recon"))
    parser.add_argument("--resimulate", action="store_true")
    args = parser.parse_args()
    args.pixel_size = args.pixel_size or BOX_ANGSTROM / args.box
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {load_text()}")
    print(f"workload: {args.n:,} particles, {args.box} px, {args.pixel_size:g} A/px, CTF, "
          f"no shifts, SNR {args.snr:g}, true poses")

    args.workdir.mkdir(parents=True, exist_ok=True)
    data, _ = simulate(args, args.workdir)
    out = args.workdir / f"maps_n{args.n}_box{args.box}_snr{args.snr:g}"
    out.mkdir(parents=True, exist_ok=True)
    truth = read_volume(data / "reference.mrc").data.to(torch.float64)
    mask = truth_mask(truth)

    runs: list[Run] = []

    def record(run: Run) -> Run:
        if run.map_path:
            score(run, truth, args.pixel_size, mask)
        runs.append(run)
        print(f"[{run.tool}{' SUBSET' if run.subset else ''}] n={run.n:,} "
              f"wall {fmt(run.wall_s, '.1f')} s, {fmt(run.rate, '.1f')} particles/s, FSC0.5 "
              f"{fmt(run.fsc_05_angstrom, '.2f')} A, FSC0.143 {fmt(run.fsc_0143_angstrom, '.2f')} A"
              f"{' ERROR ' + run.error if run.error else ''}; {load_text()}", flush=True)
        if run.detail:
            print(f"    {run.detail}")
        for k, v in run.diagnostics.items():
            print(f"    {k}: {v}")
        (out / "results.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()},
             "runs": [asdict(r) | {"rate": r.rate} for r in runs]}, indent=1))
        return run

    for index, (label, flags) in enumerate(OUR_CONFIGS):
        record(run_ours_cli(data, out, args, label, flags, index))
    if not args.skip_library:
        record(run_ours_library(data, out, args))

    if not args.skip_peers:
        python = args.peers_venv / "bin" / "python"
        if not python.exists():
            print(f"peers venv: {python} not found; peers not run (see bench/README.md)")
        else:
            runners = {"cryodrgn": run_cryodrgn, "aspire": run_aspire}
            for name in args.tools:
                print(f"running {name} on {args.n:,} particles ({load_text()}) ...", flush=True)
                run = record(runners[name](data, out, args, None))
                if run.error and run.error.startswith("timeout") and args.subset_n < args.n:
                    print(f"running {name} on the first {args.subset_n:,} particles ...",
                          flush=True)
                    record(runners[name](data, out, args, args.subset_n))

    print_table(runs, args.pixel_size)
    verdict(runs)
    print(f"\n{load_text()}; maps and results.json in {out}")
    print("note: the machine may be shared with other jobs; timings vary by about +-25 %.")


if __name__ == "__main__":
    main()
