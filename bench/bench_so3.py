"""SO(3) throughput: geodesic distances per second and the time to align 10^6 rotations.

Goals (issue 2): >= 1e7 geodesic pairs/s on 2 cores, and aligning 1e6 rotations in < 2 s.
A script, not a test: it prints what it measured in this run and never fails on timing.

    .venv/bin/python bench/bench_so3.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from cryopose import so3


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-align", type=int, default=1_000_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")

    a = so3.random_rotations(4096, generator=0)
    b = so3.random_rotations(4096, generator=1)

    # pairwise (all pairs of two sets, blocked): the nearest-neighbour / covering workload
    def pairwise() -> None:
        for _ in so3.pairwise_geodesic_blocks(a, b, block_size=2048):
            pass

    t = best_of(pairwise)
    pairs = a.shape[0] * b.shape[0]
    print(
        f"pairwise geodesic (blocked, quaternion form): {pairs / t:.3e} pairs/s "
        f"({pairs / t / 1e7:.2f}x the 1e7 goal)"
    )

    # elementwise (one distance per particle): the evaluation workload
    n = 1_000_000
    r1 = so3.random_rotations(n, generator=2)
    r2 = so3.random_rotations(n, generator=3)
    t = best_of(lambda: so3.geodesic_distance(r1, r2))
    print(
        f"elementwise geodesic (matrix atan2 form): {n / t:.3e} pairs/s "
        f"({n / t / 1e7:.2f}x the 1e7 goal)"
    )

    # alignment of 1e6 rotations with 20% outliers, rotation + handedness
    n = args.n_align
    truth = so3.random_rotations(n, generator=4)
    q = so3.random_rotations(1, generator=5)[0]
    j = torch.diag(torch.tensor([1.0, 1.0, -1.0]))
    estimated = j @ (q.T @ truth) @ j
    outliers = torch.arange(n) % 5 == 0
    estimated[outliers] = so3.random_rotations(int(outliers.sum()), generator=6)
    t0 = time.perf_counter()
    result = so3.align_rotations(estimated, truth, allow_flip=True)
    t_align = time.perf_counter() - t0
    aligned = result.apply(estimated)
    err = torch.rad2deg(so3.geodesic_distance(aligned[~outliers], truth[~outliers]))
    print(
        f"align {n:,} rotations (20% outliers, rotation+hand): {t_align:.2f} s "
        f"(goal < 2 s: {2.0 / t_align:.2f}x margin); flipped={result.flipped}, "
        f"inlier error max {err.max():.2e} deg"
    )

    # under point groups (each particle may match up to a group element)
    for symbol in ("D7", "I"):
        group = so3.point_group(symbol, dtype=torch.float32)
        pick = torch.randint(0, group.shape[0], (n,), generator=torch.Generator().manual_seed(7))
        est = q.T @ (group[pick].transpose(-1, -2) @ truth)
        est[outliers] = so3.random_rotations(int(outliers.sum()), generator=8)
        t0 = time.perf_counter()
        result = so3.align_rotations(est, truth, group=group)
        t_group = time.perf_counter() - t0
        err = torch.rad2deg(
            so3.symmetric_geodesic_distance(result.apply(est)[~outliers], truth[~outliers], group)
        )
        print(
            f"align {n:,} rotations under {symbol} (20% outliers): {t_group:.2f} s "
            f"(goal < 2 s: {2.0 / t_group:.2f}x margin); inlier error max {err.max():.2e} deg"
        )


if __name__ == "__main__":
    main()
