"""Pose search against cryoDRGN on the same particles (issue 4): particles/s and median error.

Goal (issue 4): at each SNR, cryopose at >= 10x cryoDRGN's pose-search rate with an equal or
lower median angular error. A script, not a test: it prints what it measured in this run and
never fails on timing.

    .venv/bin/python bench/bench_posesearch.py [--snr inf 1.0 0.1 0.03] [--n 1000]
        [--peers-venv /tmp/peers | --skip-peers] [--reuse-peers] [--peer-preset fast|thorough]
        [--tune [--tune-n 300]] [--grid-order K --refine-levels L --n-starts S ...]

Data: ``make_data.py`` from ``../shared/bench-peers`` (benchmark tooling, run in a
subprocess) simulates 64-px particles at 6 A/px (no CTF, no shifts, uniform poses) at SNR
inf / 1 / 0.1 / 0.03 with its own real-space projector, from a 6ZU5 map at 3 A/px made here
with cryopose (``default_volume(92, 3.0)``, written with ``cryopose.io.write_volume``). The
files go to ``--work`` (default ``/tmp/bench_posesearch``) and are reused while they hold at
least ``--n`` particles; both tools get the first ``--n`` particles of the same files.

cryoDRGN: ``peer_posesearch_cryodrgn.py`` (branch-and-bound ``PoseSearch`` against the fixed
``ref64.mrc``, no translation search) run by the python of a separate peers venv
(``--peers-venv DIR`` or ``PEERS_VENV_BIN``); cryoDRGN is GPL and never imported here. Preset
``fast`` (default: HEALPix order 2, 4 iterations, 8 kept poses, L 12-32) was both faster and at
least as accurate as ``thorough`` (order 1, 5 iterations, 24 kept poses) in
``results-here.md``, so it is the stronger baseline. ``--reuse-peers`` reuses the JSON of an
earlier run with the same preset, n and SNRs (the peer takes minutes and does not change when
cryopose does). Without a peers venv the recorded figures of ``results-here.md`` are used,
labelled as such.

cryopose: :func:`cryopose.bayes.estimate.estimate_poses` timed on the loaded table (reference
preparation, noise estimate, scoring, posterior summaries and refinement; the STAR/MRCS
reading before it is not timed, as cryoDRGN's image loading is not), and separately the whole
``cryopose estimate`` command in a subprocess (start-up, reading and writing included). Errors
are geodesic distances to the true poses in the STAR (:func:`cryopose.evaluate.compare_poses`)
for the MLE and MMSE outputs. The settings per SNR come from :data:`PRESETS` (the cheapest found
to meet cryoDRGN's median error; the estimate flags below override them for every SNR), or from
``--tune``, which tries :data:`LADDER` cheapest first on ``--tune-n`` particles and keeps the
first configuration whose MMSE median error is <= cryoDRGN's.

Noiseless data: the particle background is exactly zero there, so ``--noise-sigma auto`` gives
sigma^2 ~ 1e-7; the log-likelihoods are then ~1e13 and the small offset between the global
(polar in-plane FFT) and the local (Cartesian) scoring paths outweighs the true differences,
so the MLE output stays at the global grid point (~6 deg) although the MMSE output is fine.
The SNR-inf preset therefore passes ``noise_sigma=1.0`` (0.5 to 5 gave the same errors).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from cryopose.bayes.estimate import EstimateConfig, estimate_poses, load_cpu_kernels
from cryopose.evaluate import compare_poses
from cryopose.io import read_particles, read_volume, write_star, write_volume
from cryopose.runtime import configure_allocator
from cryopose.volumes.default import default_volume

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEERS_DIR = REPO.parent / "shared" / "bench-peers"
DEFAULT_WORK = Path("/tmp/bench_posesearch")
SNRS = ("inf", "1.0", "0.1", "0.03")
GOAL_SPEEDUP = 10.0
#: Source map for make_data.py: 6ZU5 at 3 A/px in a 92-px box (make_data crops it to 46 px
#: at 6 A/px inside a 64-px box, as in results-here.md: "crop_box 46").
SOURCE_BOX, SOURCE_PIXEL = 92, 3.0

#: cryoDRGN PoseSearch settings (flags of peer_posesearch_cryodrgn.py).
PEER_PRESETS = {
    "fast": {"base-healpy": 2, "niter": 4, "nkeptposes": 8, "lmin": 12, "lmax": 32},
    "thorough": {"base-healpy": 1, "niter": 5, "nkeptposes": 24, "lmin": 12, "lmax": 32},
}

#: cryopose settings per SNR. Since 2026-11-22 the library defaults (HEALPix order 3, no nested
#: levels, Gauss-Newton finish from 3 starts, Laplace cubature) met or came within 0.1 deg of
#: cryoDRGN's median error at every SNR on 300 particles, so every SNR uses them; noiseless data
#: pass a fixed noise_sigma (see the module docstring). ``--tune`` searches :data:`LADDER`.
#: Keys are :class:`EstimateConfig` fields; the rest keep their defaults.
PRESETS: dict[str, dict] = {
    "inf": {"noise_sigma": 1.0},
    "1.0": {},
    "0.1": {},
    "0.03": {},
}

#: Candidates for ``--tune``, roughly cheapest first (batch size and noise follow the SNR).
LADDER: list[dict] = [
    {"grid_order": 1, "local_refine": False},
    {"grid_order": 2, "local_refine": False, "max_frequency_angstrom": 24.0},
    {"grid_order": 2, "local_refine": False},
    {"grid_order": 2, "refine_levels": 1, "n_starts": 1, "newton_finish": False},
    {"grid_order": 2, "refine_levels": 1, "n_starts": 1},
    {"grid_order": 2, "refine_levels": 2, "n_starts": 1, "fast_coarse_levels": True},
    {"grid_order": 2, "refine_levels": 2, "n_starts": 1},
    {"grid_order": 2, "refine_levels": 1, "n_starts": 3},
    {"grid_order": 2, "refine_levels": 2, "n_starts": 3},
    {"grid_order": 2, "refine_levels": 3, "n_starts": 1},
    {"grid_order": 2, "refine_levels": 3, "n_starts": 3},
    {"grid_order": 3, "refine_levels": 2, "n_starts": 3},
]

#: EstimateConfig fields settable from this script's command line (flag: field).
PASS_THROUGH = {
    "grid_order": int,
    "local_refine": None,  # --local-refine / --no-local-refine
    "refine_levels": int,
    "refine_factor": float,
    "n_starts": int,
    "fast_coarse_levels": None,
    "newton_finish": None,
    "max_frequency_angstrom": float,
    "noise_sigma": str,
    "batch_size": int,
}

#: cryopose estimate CLI flag of each EstimateConfig field it exposes.
CLI_FLAGS = {
    "grid_order": "--grid-order",
    "max_frequency_angstrom": "--max-frequency",
    "noise_sigma": "--noise-sigma",
    "batch_size": "--batch-size",
    "shift_range_angstrom": "--shift-range",
}


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def peers_python(arg: str | None) -> Path | None:
    """The peers venv's python from ``--peers-venv DIR`` or ``PEERS_VENV_BIN``, if it has
    cryoDRGN."""
    if arg:
        candidate = Path(arg) / "bin" / "python"
    elif os.environ.get("PEERS_VENV_BIN"):
        candidate = Path(os.environ["PEERS_VENV_BIN"]) / "python"
    else:
        return None
    if not candidate.exists():
        print(f"peers venv: {candidate} not found; cryoDRGN not run")
        return None
    check = subprocess.run(
        [str(candidate), "-c", "import cryodrgn; print(cryodrgn.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        print(f"peers venv: {candidate} cannot import cryodrgn ({last}); cryoDRGN not run")
        return None
    print(f"peers venv: {candidate} (cryodrgn {check.stdout.strip()})")
    return candidate


# ---- data -----------------------------------------------------------------------------------
def data_ready(data: Path, n: int, snrs: list[str]) -> bool:
    info = data / "make_data.json"
    if not info.exists() or not (data / "ref64.mrc").exists():
        return False
    try:
        made = json.loads(info.read_text())
    except ValueError:
        return False
    return made.get("n", 0) >= n and all(
        (data / f"particles_snr{s}.star").exists() for s in snrs
    )


def make_data(work: Path, peers_dir: Path, n: int, python: Path | None, regen: bool) -> Path:
    """Particle sets and ref64.mrc in ``work/data`` (made by make_data.py unless present)."""
    data = work / "data"
    if not regen and data_ready(data, n, list(SNRS)):
        print(f"data: reusing {data} (make_data.json has >= {n} particles)")
        return data
    data.mkdir(parents=True, exist_ok=True)
    source = work / f"6zu5_{SOURCE_PIXEL:g}A_{SOURCE_BOX}.mrc"
    write_volume(source, default_volume(SOURCE_BOX, SOURCE_PIXEL), SOURCE_PIXEL)
    # make_data.py needs numpy/scipy/mrcfile/starfile/pandas only (no peer code): the peers
    # venv when given, else this venv
    exe = str(python) if python is not None else sys.executable
    env = dict(os.environ, PEERS_DATA=str(data), PEERS_SRC_MAP=str(source), OMP_NUM_THREADS="2")
    cmd = [exe, str(peers_dir / "make_data.py"), "--n", str(max(n, 1000)), "--data", str(data),
           "--out", str(data / "make_data.json")]
    print(f"data: simulating {max(n, 1000)} particles x {len(SNRS)} SNRs with make_data.py "
          f"(~3 min on 2 cores) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"make_data.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    print(f"data: made in {time.perf_counter() - t0:.0f} s in {data}")
    return data


# ---- cryoDRGN -------------------------------------------------------------------------------
@dataclass
class PeerRun:
    rate: float
    median_deg: float
    mean_deg: float
    source: str


def run_cryodrgn(
    python: Path, peers_dir: Path, data: Path, work: Path, snrs: list[str], n: int,
    preset: str, reuse: bool,
) -> dict[str, PeerRun]:
    out_json = work / f"ps_cryodrgn_{preset}_n{n}.json"
    runs: dict[str, dict] = {}
    if reuse and out_json.exists():
        record = json.loads(out_json.read_text())
        runs = {r["snr"]: r for r in record.get("runs", [])}
        if all(s in runs for s in snrs):
            print(f"cryoDRGN: reusing {out_json} (measured earlier, not in this run)")
            return {s: _peer(runs[s], f"cryoDRGN {preset}, earlier run") for s in snrs}
    flags = [x for k, v in PEER_PRESETS[preset].items() for x in (f"--{k}", str(v))]
    cmd = [str(python), str(peers_dir / "peer_posesearch_cryodrgn.py"), "--out", str(out_json),
           "--n", str(n), "--snr", *snrs, *flags]
    print(f"cryoDRGN: PoseSearch preset {preset} ({' '.join(flags)}) on {n} particles; "
          f"{load_text()} ...", flush=True)
    env = dict(os.environ, PEERS_DATA=str(data))
    log = work / f"cryodrgn_{preset}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=work)
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith("[cryodrgn PS]"):
            print("  " + line)
    if proc.returncode != 0 or not out_json.exists():
        print(f"cryoDRGN failed (exit {proc.returncode}); last lines of {log}:")
        print("\n".join("  " + s for s in text.splitlines()[-10:]))
        return {}
    record = json.loads(out_json.read_text())
    print(f"  convention check {record.get('convention_check')}; {load_text()}")
    runs = {r["snr"]: r for r in record["runs"]}
    return {s: _peer(runs[s], f"cryoDRGN {preset}, this run") for s in snrs if s in runs}


def _peer(run: dict, source: str) -> PeerRun:
    err = run["err_R_as_A"]
    return PeerRun(run["particles_per_s"], err["median_deg"], err["mean_deg"], source)


def recorded_peers(peers_dir: Path, preset: str) -> dict[str, PeerRun]:
    """cryoDRGN rows '2 pose search SNR=...' of results-here.md for the preset's healpy order."""
    table = peers_dir / "results-here.md"
    order = PEER_PRESETS[preset]["base-healpy"]
    found: dict[str, PeerRun] = {}
    if not table.exists():
        return found
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"2 pose search SNR=(\S+)", cells[0]) if cells else None
        if not match or len(cells) < 6 or not cells[2].startswith(f"healpy{order},"):
            continue
        rate = re.match(r"([\d.]+) p/s", cells[4])
        acc = re.match(r"mean ([\d.]+), median ([\d.]+) deg", cells[5])
        if rate and acc:
            snr = match.group(1)
            found[snr] = PeerRun(float(rate.group(1)), float(acc.group(2)), float(acc.group(1)),
                                 f"results-here.md, {cells[2]} (not measured in this run)")
    return found


# ---- cryopose -------------------------------------------------------------------------------
@dataclass
class OurRun:
    settings: dict
    seconds: float
    n: int
    mle_median: float
    mle_mean: float
    mmse_median: float
    mmse_mean: float
    timings: dict

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def settings_for(snr: str, base: dict, overrides: dict) -> dict:
    settings = dict(base)
    if snr == "inf":
        settings.setdefault("noise_sigma", 1.0)  # auto gives ~1e-7 on zero background
    if "batch_size" not in settings:
        settings["batch_size"] = 128 if settings.get("local_refine", True) else 512
    settings.update(overrides)
    return settings


def warm_up() -> None:
    """Load what cryopose loads on first use before any timing: numba and its CPU kernels
    (:func:`cryopose.bayes.estimate.load_cpu_kernels`: ~0.6 s from the on-disk cache, ~9 s to
    compile them the first time). A one-off start-up cost, not a per-particle rate (the CLI
    timing includes it)."""
    load_cpu_kernels()


def run_cryopose(table, volume, settings: dict) -> OurRun:
    config = EstimateConfig(**settings)
    warm_up()
    t0 = time.perf_counter()
    result = estimate_poses(table, volume.data, volume.pixel_size_angstrom, config)
    seconds = time.perf_counter() - t0
    truth = table.rotations()
    mle = compare_poses(result.estimates.rotations_mle.double(), truth)
    mmse = compare_poses(result.estimates.rotations_mmse.double(), truth)
    return OurRun(settings, seconds, len(table), mle.median_deg, mle.mean_deg, mmse.median_deg,
                  mmse.mean_deg, dict(result.timings))


def run_cli(star: Path, reference: Path, work: Path, snr: str, settings: dict, threads: int):
    """Wall time of ``cryopose estimate`` with the CLI-expressible settings; (seconds, error
    median of its output, settings the CLI cannot express, library seconds it printed)."""
    exe = Path(sys.executable).with_name("cryopose")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "cryopose.cli.main"]
    out = work / f"cli_snr{snr}.star"
    cmd = [*base, "estimate", str(star), "--reference", str(reference), "-o", str(out)]
    for key, value in settings.items():
        if key in CLI_FLAGS:
            cmd += [CLI_FLAGS[key], str(value)]
        elif key == "local_refine":
            cmd.append("--local-refine" if value else "--no-local-refine")
    default = EstimateConfig()
    missing = {k: v for k, v in settings.items()
               if k not in CLI_FLAGS and k != "local_refine" and getattr(default, k) != v}
    # a wide console: rich must not wrap the "poses in X s" line
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), COLUMNS="400")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"  cryopose estimate failed (exit {proc.returncode}): {proc.stderr[-500:]}")
        return None
    match = re.search(r"poses in ([\d.]+) s", " ".join(proc.stdout.split()))
    lib_s = float(match.group(1)) if match else float("nan")
    est = read_particles(out).rotations()
    truth = read_particles(star).rotations()
    median = compare_poses(est.double(), truth.double()).median_deg
    out.unlink()
    return wall, median, missing, lib_s


def tune(snr: str, table, volume, target: float, overrides: dict) -> dict | None:
    """First LADDER entry with MMSE median <= target on ``table``; prints every try."""
    for candidate in LADDER:
        settings = settings_for(snr, candidate, overrides)
        run = run_cryopose(table, volume, settings)
        ok = run.mmse_median <= target
        print(f"  tune SNR {snr}: {short(settings)}: {run.rate:6.1f} p/s, MMSE median "
              f"{run.mmse_median:.2f} deg (target <= {target:.2f}) {'OK' if ok else ''}",
              flush=True)
        if ok:
            return candidate
    return None


def short(settings: dict) -> str:
    names = {"grid_order": "order", "local_refine": "refine", "refine_levels": "levels",
             "n_starts": "starts", "fast_coarse_levels": "fast", "max_frequency_angstrom": "fmax",
             "noise_sigma": "sigma", "batch_size": "batch", "refine_factor": "factor",
             "newton_finish": "newton"}
    return " ".join(f"{names.get(k, k)}={v}" for k, v in settings.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", nargs="+", default=list(SNRS), choices=SNRS)
    parser.add_argument("--n", type=int, default=1000, help="particles per SNR (both tools)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="data and outputs")
    parser.add_argument("--regen-data", action="store_true", help="re-run make_data.py")
    parser.add_argument("--peers-venv", default=None, help="peers venv folder (has bin/python)")
    parser.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS_DIR)
    parser.add_argument("--skip-peers", action="store_true",
                        help="do not run cryoDRGN; use the figures of results-here.md")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="reuse an earlier cryoDRGN run of this preset, n and SNRs")
    parser.add_argument("--peer-preset", choices=sorted(PEER_PRESETS), default="fast")
    parser.add_argument("--skip-cli", action="store_true", help="do not time cryopose estimate")
    parser.add_argument("--tune", action="store_true", help="search LADDER per SNR first")
    parser.add_argument("--tune-n", type=int, default=300, help="particles for --tune")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    group = parser.add_argument_group("cryopose estimate settings (override PRESETS)")
    for key, kind in PASS_THROUGH.items():
        flag = "--" + key.replace("_", "-").replace("-angstrom", "")
        if kind is None:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction,
                               default=None)
        else:
            group.add_argument(flag, dest=key, type=kind, default=None)
    args = parser.parse_args()
    overrides = {k: getattr(args, k) for k in PASS_THROUGH if getattr(args, k) is not None}
    if "noise_sigma" in overrides and overrides["noise_sigma"] != "auto":
        overrides["noise_sigma"] = float(overrides["noise_sigma"])

    torch.set_num_threads(args.threads)
    allocator = configure_allocator()  # as the cryopose command does (cryopose.runtime)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"
          f", glibc allocator tuned: {allocator}; {load_text()}")
    args.work.mkdir(parents=True, exist_ok=True)
    python = None if args.skip_peers else peers_python(args.peers_venv)
    data = make_data(args.work, args.peers_dir, args.n, python, args.regen_data)

    if python is not None:
        peers = run_cryodrgn(python, args.peers_dir, data, args.work, args.snr, args.n,
                             args.peer_preset, args.reuse_peers)
    else:
        peers = {}
    recorded = recorded_peers(args.peers_dir, args.peer_preset)
    for snr in args.snr:
        if snr not in peers and snr in recorded:
            peers[snr] = recorded[snr]

    reference = data / "ref64.mrc"
    volume = read_volume(reference, require_pixel_size=True)
    ours: dict[str, OurRun] = {}
    cli: dict[str, tuple] = {}
    chosen: dict[str, dict] = {}
    for snr in args.snr:
        star = data / f"particles_snr{snr}.star"
        full = read_particles(star)
        table = full.subset(list(range(min(args.n, len(full)))))
        base = PRESETS[snr]
        if args.tune and snr in peers:
            sub = table.subset(list(range(min(args.tune_n, len(table)))))
            found = tune(snr, sub, volume, peers[snr].median_deg, overrides)
            if found is None:
                print(f"  tune SNR {snr}: no LADDER entry met {peers[snr].median_deg:.2f} deg; "
                      f"using PRESETS")
            else:
                base = found
        settings = settings_for(snr, base, overrides)
        chosen[snr] = settings
        print(f"cryopose SNR {snr}: {short(settings)}; {load_text()} ...", flush=True)
        ours[snr] = run = run_cryopose(table, volume, settings)
        times = ", ".join(f"{k} {v:.1f} s" for k, v in run.timings.items())
        print(f"  estimate_poses: {run.n} particles in {run.seconds:.1f} s = {run.rate:.1f} p/s "
              f"({times}); MLE median {run.mle_median:.2f} deg, MMSE median "
              f"{run.mmse_median:.2f} deg", flush=True)
        if snr == "inf":
            verdict = "passed" if run.mle_median < 1.0 else "FAILED (check conventions)"
            print(f"  convention check (noiseless MLE median < 1 deg): {verdict}")
        if not args.skip_cli:
            subset_star = args.work / f"subset_snr{snr}_n{len(table)}.star"
            write_star(table, subset_star)
            cli[snr] = run_cli(subset_star, reference, args.work, snr, settings, args.threads)

    print(f"\nsummary ({load_text()}); errors are geodesic degrees to the true poses, "
          f"median / mean; ratio = cryopose estimate_poses rate / cryoDRGN rate "
          f"(goal >= {GOAL_SPEEDUP:g}x at a median error <= cryoDRGN's)")
    head = ("| SNR | n | cryoDRGN p/s | cryoDRGN err | cryopose p/s | MLE err | MMSE err | "
            "CLI p/s | ratio | goal |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for snr in args.snr:
        run = ours[snr]
        peer = peers.get(snr)
        cli_run = cli.get(snr)
        cli_text = f"{run.n / cli_run[0]:.1f}" if cli_run else "-"
        if peer is not None:
            ratio = run.rate / peer.rate
            met = ratio >= GOAL_SPEEDUP and run.mmse_median <= peer.median_deg
            peer_text = (f"{peer.rate:.1f} | {peer.median_deg:.2f} / {peer.mean_deg:.2f}")
            ratio_text, goal = f"{ratio:.2f}x", "met" if met else "NOT met"
        else:
            peer_text, ratio_text, goal = "- | -", "-", "-"
        print(f"| {snr} | {run.n} | {peer_text} | {run.rate:.1f} | {run.mle_median:.2f} / "
              f"{run.mle_mean:.2f} | {run.mmse_median:.2f} / {run.mmse_mean:.2f} | {cli_text} | "
              f"{ratio_text} | {goal} |")
    print("\ncryoDRGN figures from: " + "; ".join(
        f"SNR {s}: {peers[s].source}" for s in args.snr if s in peers))
    print("cryopose settings (EstimateConfig fields; others default):")
    for snr in args.snr:
        print(f"  SNR {snr}: {chosen[snr]}")
    for snr, value in cli.items():
        if value is None:
            continue
        wall, median, missing, lib_s = value
        note = (f"; the CLI has no flag for {missing}, so it ran with the defaults for those"
                if missing else "")
        print(f"  cryopose estimate CLI, SNR {snr}: {wall:.1f} s wall ({lib_s:.1f} s in the "
              f"library, {wall - lib_s:.1f} s start-up and I/O), output median error "
              f"{median:.2f} deg{note}")
    defaults = {f.name: getattr(EstimateConfig(), f.name) for f in fields(EstimateConfig)}
    print(f"EstimateConfig defaults: {defaults}")
    print(json.dumps({"ours": {s: asdict(r) | {"rate": r.rate} for s, r in ours.items()},
                      "cryodrgn": {s: asdict(p) for s, p in peers.items()}}, default=str))


if __name__ == "__main__":
    main()
