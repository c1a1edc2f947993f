"""Simulation throughput against ASPIRE, and peak memory of a large ``cryopose simulate``.

Goals (issue 3): simulating particles with CTF and white noise at SNR 0.1, written to disk,
at least 2x ASPIRE's ``Simulation`` rate on the same machine (recorded there: 74 images/s at
128 px and 338 images/s at 64 px); ``cryopose simulate --n 200000 --box 64`` with a peak
memory under 1 GB. A script, not a test: it prints what it measured in this run and never
fails on timing.

    .venv/bin/python bench/bench_simulate.py [--n 10000] [--sizes 128 64]
        [--peers-venv DIR] [--mem-n 200000 | --skip-memory]

Our side: :func:`cryopose.simulate.simulate_particles` (the library call behind
``cryopose simulate``) on the embedded 6ZU5 ribosome, 384 Angstrom boxes (128 px at 3 A/px,
64 px at 6 A/px, the same maps ASPIRE gets), CTF (defocus 1.0-2.5 um, up to 500 A
astigmatism), white noise at SNR 0.1, particles.mrcs + particles.star + reference.mrc written.
The timed span starts after the one-off reference-map build (timed and printed separately)
and includes the projector build, every chunk and all file writing, like ASPIRE's
``Simulation(...)`` + ``save(...)``.

ASPIRE side: ``peer_simulate_aspire.py`` from ``../shared/bench-peers`` (GPL peer tooling,
never imported or copied: it runs under the peers venv's python in a subprocess), fed maps
made here with cryopose (``ref64.mrc``: 6ZU5 at 64 px, 6 A/px; the 3 A/px map at 128 px).
Only run when a peers venv is given (``--peers-venv DIR`` or ``PEERS_VENV_BIN``); otherwise
the figures recorded in ``results-here.md`` are printed, labelled as not measured in this run.

Memory: max RSS of the ``cryopose simulate`` child process (``os.wait4`` rusage of that one
child), output written to a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cryopose.io import write_volume
from cryopose.simulate import SimulationConfig, load_reference, simulate_particles

#: Box (px) -> pixel size (Angstrom): a 384 Angstrom box at both sizes, as the peer script uses.
PIXEL_SIZE = {128: 3.0, 64: 6.0}
#: ASPIRE's rate (images/s, CTF + noise + saving) stated in issue 3 for this machine.
ISSUE_ASPIRE_RATE = {128: 74.0, 64: 338.0}
GOAL_SPEEDUP = 2.0
GOAL_PEAK_GB = 1.0
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEERS_DIR = REPO.parent / "shared" / "bench-peers"


@dataclass
class OurRun:
    box: int
    pixel_size: float
    n: int
    reference_s: float
    simulate_s: float
    output_mb: float
    measured_snr: float | None

    @property
    def rate(self) -> float:
        return self.n / self.simulate_s


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run_ours(n: int, box: int, work: Path) -> tuple[OurRun, torch.Tensor]:
    """Build the reference (timed apart), then time the simulation with files written."""
    px = PIXEL_SIZE[box]
    t0 = time.perf_counter()
    volume = load_reference(box, px)
    t_ref = time.perf_counter() - t0
    out = work / f"ours_{box}"
    config = SimulationConfig(n=n, box=box, pixel_size_angstrom=px, snr=0.1, ctf=True, seed=0)
    t0 = time.perf_counter()
    result, _ = simulate_particles(config, out, volume=volume)
    t_sim = time.perf_counter() - t0
    run = OurRun(box, px, n, t_ref, t_sim, folder_mb(out), result.measured_snr)
    shutil.rmtree(out)
    return run, volume


def peers_python(arg: str | None) -> Path | None:
    """The peers venv's python from ``--peers-venv DIR`` or ``PEERS_VENV_BIN``, if usable."""
    if arg:
        candidate = Path(arg) / "bin" / "python"
    elif os.environ.get("PEERS_VENV_BIN"):
        candidate = Path(os.environ["PEERS_VENV_BIN"]) / "python"
    else:
        return None
    if not candidate.exists():
        print(f"peers venv: {candidate} not found; ASPIRE not run")
        return None
    check = subprocess.run(
        [str(candidate), "-c", "import aspire; print(aspire.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        print(f"peers venv: {candidate} cannot import aspire ({last}); ASPIRE not run")
        return None
    print(f"peers venv: {candidate} (aspire {check.stdout.strip()})")
    return candidate


def run_aspire(
    python: Path,
    peers_dir: Path,
    n: int,
    sizes: list[int],
    volumes: dict[int, torch.Tensor],
    work: Path,
    timeout_s: float | None,
) -> dict[int, dict]:
    """Run the peer script on maps made here; returns its per-size records by box."""
    data = work / "peers-data"
    data.mkdir()
    ref64 = volumes[64] if 64 in volumes else load_reference(64, PIXEL_SIZE[64])
    write_volume(data / "ref64.mrc", ref64, PIXEL_SIZE[64])
    src_map = work / "6zu5_3A_128.mrc"
    map128 = volumes[128] if 128 in volumes else load_reference(128, PIXEL_SIZE[128])
    write_volume(src_map, map128, PIXEL_SIZE[128])
    out_json = work / "sim_aspire.json"
    env = dict(os.environ, PEERS_DATA=str(data), PEERS_SRC_MAP=str(src_map))
    cmd = [
        str(python),
        str(peers_dir / "peer_simulate_aspire.py"),
        "--n", str(n),
        "--sizes", *map(str, sizes),
        "--out", str(out_json),
        "--workdir", str(work / "aspire_sim"),
    ]
    print(f"running ASPIRE ({load_text()}) ...", flush=True)
    log = work / "aspire.log"
    with open(log, "w") as handle:
        proc = subprocess.run(
            cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s
        )
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith("[aspire sim]"):
            print("  " + line)
    if proc.returncode != 0 or not out_json.exists():
        print(f"ASPIRE run failed (exit {proc.returncode}); last lines:")
        print("\n".join("  " + s for s in text.splitlines()[-15:]))
        return {}
    record = json.loads(out_json.read_text())
    print(f"  ({record.get('tool', 'aspire')}, {load_text()})")
    return {int(r["L"]): r for r in record["runs"]}


def recorded_baseline(peers_dir: Path) -> dict[int, tuple[float, str]]:
    """ASPIRE rates from results-here.md (rows '4 simulate NNpx'), else issue 3's figures."""
    table = peers_dir / "results-here.md"
    found: dict[int, tuple[float, str]] = {}
    if table.exists():
        for line in table.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            match = re.fullmatch(r"4 simulate (\d+)px", cells[0]) if cells else None
            rate = re.match(r"([\d.]+) img/s", cells[4]) if match and len(cells) > 4 else None
            if match and rate:
                found[int(match.group(1))] = (float(rate.group(1)), f"results-here.md, {cells[2]}")
    for box, rate in ISSUE_ASPIRE_RATE.items():
        found.setdefault(box, (rate, "issue 3"))
    return found


def proc_status_kib(pid: int) -> dict[str, int]:
    """RssAnon and RssFile (KiB) of a running process from /proc (empty where unavailable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    pattern = r"^(RssAnon|RssFile):\s+(\d+)"
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def run_memory(n: int, box: int, work: Path) -> None:
    """Max RSS of ``cryopose simulate --n n --box box`` (default pixel size) as a child."""
    need = n * box * box * 4 * 1.05 + 2**28
    free = shutil.disk_usage(work).free
    print(f"\npeak memory: cryopose simulate --n {n} --box {box} "
          f"(needs ~{need / 2**30:.1f} GB on disk, {free / 2**30:.0f} GB free in {work})")
    if free < need:
        print("  skipped: not enough free disk space")
        return
    exe = Path(sys.executable).with_name("cryopose")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "cryopose.cli.main"]
    out = work / "memory"
    cmd = [*base, "simulate", "-o", str(out), "--n", str(n), "--box", str(box)]
    log = work / "memory.log"
    t0 = time.perf_counter()
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        while True:  # sample the anonymous / file-backed split until the child exits
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for key, kib in proc_status_kib(proc.pid).items():
                peaks[key] = max(peaks[key], kib)
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    size_gb = folder_mb(out) / 1024 if out.exists() else 0.0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        print(f"  failed (exit {proc.returncode}): " + " | ".join(tail))
        return
    peak_gb = usage.ru_maxrss * 1024 / 2**30  # Linux: ru_maxrss in KiB
    verdict = "met" if peak_gb < GOAL_PEAK_GB else "NOT met"
    print(f"  max RSS {peak_gb:.3f} GB (goal < {GOAL_PEAK_GB:g} GB: {verdict}); "
          f"{size_gb:.2f} GB written in {wall:.1f} s = {n / wall:.0f} images/s "
          f"(whole command: start-up and reference build included; {load_text()})")
    if peaks["RssAnon"]:
        print(f"  sampled every 0.2 s: peak RssAnon {peaks['RssAnon'] / 2**20:.3f} GB (heap), "
              f"peak RssFile {peaks['RssFile'] / 2**20:.3f} GB (file-backed pages, e.g. a "
              "memory-mapped output stack, count in max RSS)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="particles per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 64], choices=[128, 64])
    parser.add_argument("--peers-venv", default=None, help="peers venv folder (has bin/python)")
    parser.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS_DIR,
                        help="folder with peer_simulate_aspire.py and results-here.md")
    parser.add_argument("--peer-timeout", type=float, default=None, help="seconds")
    parser.add_argument("--mem-n", type=int, default=200_000)
    parser.add_argument("--mem-box", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder parent")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {load_text()}")
    print(f"workload: n={args.n:,} per size, CTF, white noise SNR 0.1, written to disk")

    with tempfile.TemporaryDirectory(prefix="bench_sim_", dir=args.tmp) as tmp:
        work = Path(tmp)
        ours: dict[int, OurRun] = {}
        volumes: dict[int, torch.Tensor] = {}
        for box in args.sizes:
            run, volumes[box] = run_ours(args.n, box, work)
            ours[box] = run
            snr = f"{run.measured_snr:.3f}" if run.measured_snr is not None else "-"
            print(f"[cryopose] {box} px ({run.pixel_size:g} A/px): reference map build "
                  f"{run.reference_s:.2f} s (one-off, not in the rate); simulate+write "
                  f"{run.simulate_s:.1f} s -> {run.rate:.1f} images/s; {run.output_mb:.0f} MB "
                  f"written; measured SNR {snr}; {load_text()}", flush=True)

        python = peers_python(args.peers_venv)
        measured: dict[int, dict] = {}
        if python is not None:
            measured = run_aspire(
                python, args.peers_dir, args.n, args.sizes, volumes, work, args.peer_timeout
            )

        print("\nsummary (images/s, CTF + noise + files written):")
        baseline = recorded_baseline(args.peers_dir)
        for box in args.sizes:
            ours_rate = ours[box].rate
            if box in measured:
                peer = measured[box]["images_per_s_incl_save"]
                label = f"ASPIRE measured in this run (n={measured[box]['n']:,})"
            else:
                peer, source = baseline[box]
                label = f"ASPIRE recorded baseline (not measured in this run; {source})"
            ratio = ours_rate / peer
            verdict = "met" if ratio >= GOAL_SPEEDUP else "NOT met"
            print(f"  {box:>3} px: cryopose {ours_rate:7.1f} | {label} {peer:7.1f} | "
                  f"ours/ASPIRE {ratio:.2f}x (goal >= {GOAL_SPEEDUP:g}x: {verdict})")
            if box in measured and box in ISSUE_ASPIRE_RATE:
                print(f"          (issue 3 recorded ASPIRE at {ISSUE_ASPIRE_RATE[box]:g} images/s "
                      f"at {box} px; ours vs that: {ours_rate / ISSUE_ASPIRE_RATE[box]:.2f}x)")

        if not args.skip_memory:
            run_memory(args.mem_n, args.mem_box, work)


if __name__ == "__main__":
    main()
