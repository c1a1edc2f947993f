"""Peak memory of ``cryopose estimate`` on 20,000 particles of 64 px (issue 4 goal: < 4 GB).

A script, not a test: it prints what it measured in this run and never fails.

    .venv/bin/python bench/bench_memory.py [--n 20000] [--snr 0.1] [--refine-limit 300]
        [--global-limit 900] [--skip-global | --skip-refine] [--keep-data] [--work DIR]

1. ``cryopose simulate --n N --box 64 --pixel-size 6 --snr 0.1`` (CTF on) into ``--work``
   (default ``/tmp/bench_memory``; about 330 MB for 20,000 particles), reused while present.
2. ``cryopose estimate`` in a child process, twice:

   * default settings (grid order 3, multi-start Gauss-Newton finish, ``--batch-size 128``;
     40-100 particles/s on 2 cores since 2026-12-02, so 20,000 particles take minutes):
     the child is stopped after ``--refine-limit`` seconds (``0``: run to the end) and the
     peak so far is reported together with how it grew (memory that scales with the number
     of particles shows as a steady rise after the first batches);
   * ``--no-local-refine`` (global grid only, the ``[batch, rotations, shifts]``
     log-likelihood tensor and posterior summaries), which finishes all N in minutes, run to
     the end (or ``--global-limit`` seconds).

Peak memory is the child's maximum resident set size: ``ru_maxrss`` from ``os.wait4`` when it
exits by itself, ``VmHWM`` from ``/proc/PID/status`` when it is stopped (the same quantity).
``VmRSS`` is sampled every 0.5 s for the growth figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GOAL_GB = 4.0
DEFAULT_WORK = Path("/tmp/bench_memory")


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def cryopose_command() -> list[str]:
    exe = Path(sys.executable).with_name("cryopose")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cryopose.cli.main"]


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of a live process in KiB (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class MemoryRun:
    label: str
    seconds: float
    completed: bool
    peak_gb: float
    returncode: int | None
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s, VmRSS GB)
    peak_anon_gb: float = 0.0
    peak_file_gb: float = 0.0
    tail: str = ""


def run_child(cmd: list[str], label: str, limit_s: float, log: Path, threads: int) -> MemoryRun:
    """Run ``cmd``; sample its memory; stop it (SIGTERM, then SIGKILL) after ``limit_s``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    samples: list[tuple[float, float]] = []
    hwm = anon = file_ = 0
    completed, usage, status = False, None, None
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                completed = True
                break
            now = time.perf_counter() - t0
            st = status_kib(proc.pid)
            if st:
                hwm = max(hwm, st.get("VmHWM", 0))
                anon = max(anon, st.get("RssAnon", 0))
                file_ = max(file_, st.get("RssFile", 0))
                samples.append((now, st.get("VmRSS", 0) / 2**20))
            if limit_s > 0 and now > limit_s:
                status, usage = _stop(proc)
                break
            time.sleep(0.5)
    seconds = time.perf_counter() - t0
    peak_kib = max(hwm, usage.ru_maxrss if usage is not None else 0)  # Linux: KiB
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    proc.returncode = code  # reaped here by os.wait4, not by Popen
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    return MemoryRun(label, seconds, completed, peak_kib / 2**20, code, samples,
                     anon / 2**20, file_ / 2**20, tail)


def _stop(proc: subprocess.Popen) -> tuple[int, object]:
    """SIGTERM the child, SIGKILL it after 10 s; reap it and return (status, rusage)."""
    proc.send_signal(signal.SIGTERM)
    end = time.perf_counter() + 10
    while time.perf_counter() < end:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage
        time.sleep(0.2)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    return status, usage


def growth_text(run: MemoryRun) -> str:
    """RSS after the first fifth of the run against its end, and the slope in between."""
    if len(run.samples) < 10:
        return "too few samples for a growth figure"
    times = [t for t, _ in run.samples]
    rss = [r for _, r in run.samples]
    start = next(i for i, t in enumerate(times) if t >= times[-1] * 0.2)
    window = rss[start:]
    first, last = max(window[: max(1, len(window) // 5)]), max(window[-max(1, len(window) // 5):])
    slope = (last - first) / max(times[-1] - times[start], 1e-9) * 60 * 1024
    return (f"RSS {first:.2f} GB after {times[start]:.0f} s, {last:.2f} GB at the end "
            f"({slope:+.1f} MB/min in between)")


def report(run: MemoryRun) -> None:
    verdict = "met" if run.peak_gb < GOAL_GB else "NOT met"
    state = ("finished" if run.completed and run.returncode == 0 else
             f"exit {run.returncode}" if run.completed else f"stopped after {run.seconds:.0f} s")
    print(f"  {run.label}: peak {run.peak_gb:.2f} GB (goal < {GOAL_GB:g} GB: {verdict}); "
          f"{state}, {run.seconds:.0f} s; peak RssAnon {run.peak_anon_gb:.2f} GB, RssFile "
          f"{run.peak_file_gb:.2f} GB; {growth_text(run)}; {load_text()}")
    if run.completed and run.returncode != 0:
        print(f"    last output: {run.tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel-size", type=float, default=6.0)
    parser.add_argument("--snr", default="0.1")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--keep-data", action="store_true", help="keep the simulated set")
    parser.add_argument("--refine-limit", type=float, default=300,
                        help="seconds for the default-settings run (0: to the end)")
    parser.add_argument("--global-limit", type=float, default=900,
                        help="seconds for the --no-local-refine run (0: to the end)")
    parser.add_argument("--skip-refine", action="store_true")
    parser.add_argument("--skip-global", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    print(f"peak memory of cryopose estimate on {args.n:,} particles of {args.box} px; "
          f"{load_text()}")
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"sim_n{args.n}_{args.box}px_snr{args.snr}"
    star = data / "particles.star"
    base = cryopose_command()
    if not star.exists():
        cmd = [*base, "simulate", "-o", str(data), "--n", str(args.n), "--box", str(args.box),
               "--pixel-size", str(args.pixel_size), "--snr", args.snr, "--seed", "0"]
        sim = run_child(cmd, "cryopose simulate", 0, args.work / "simulate.log", args.threads)
        if sim.returncode != 0:
            sys.exit(f"cryopose simulate failed: {sim.tail}")
        print(f"simulated {args.n:,} particles in {sim.seconds:.0f} s (its peak "
              f"{sim.peak_gb:.2f} GB) into {data}")
    else:
        print(f"reusing {data}")
    reference = data / "reference.mrc"

    runs = []
    if not args.skip_refine:
        runs.append(("default settings (grid order 3 + local refinement, batch 128)", [],
                     args.refine_limit))
    if not args.skip_global:
        runs.append(("--no-local-refine (grid order 3, batch 128)", ["--no-local-refine"],
                     args.global_limit))
    for label, extra, limit in runs:
        out = args.work / "estimate_out.star"
        cmd = [*base, "estimate", str(star), "--reference", str(reference), "-o", str(out),
               *extra]
        print(f"running cryopose estimate {' '.join(extra) or '(defaults)'} "
              f"({'to the end' if limit <= 0 else f'at most {limit:g} s'}); {load_text()} ...",
              flush=True)
        run = run_child(cmd, label, limit, args.work / "estimate.log", args.threads)
        report(run)
        out.unlink(missing_ok=True)
    if not args.keep_data:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
