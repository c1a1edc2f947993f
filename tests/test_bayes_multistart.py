"""Multi-start refinement on a pseudo-symmetric map (issue 4: "start refinement from several
distinct top candidates of the global posterior, not only its argmax")."""

from __future__ import annotations

import math

import pytest
import torch
from test_simulate import blob_volume

from cryopose.bayes.estimate import EstimateConfig, estimate_poses
from cryopose.io import read_particles
from cryopose.simulate import SimulationConfig, simulate_particles
from cryopose.so3 import geodesic_distance

BOX, PX = 32, 6.0


def pseudo_symmetric(eps: float) -> torch.Tensor:
    """An asymmetric blob map made 2-fold symmetric about z up to a fraction ``eps`` of its
    antisymmetric part: ``sym + eps * anti`` with ``sym, anti = (v +- C2 v) / 2``."""
    v = blob_volume(BOX)
    # (x, y) -> (-x, -y) about index N // 2 of an even box: flip, then roll by one
    mate = torch.roll(v.flip(1, 2), shifts=(1, 1), dims=(1, 2))
    return 0.5 * (v + mate) + eps * 0.5 * (v - mate)


@pytest.mark.parametrize(
    "seed", [1, pytest.param(2, marks=pytest.mark.slow)]  # seed 1: 14 -> 5 flipped, seed 2: 11 -> 0
)
def test_several_starts_escape_the_wrong_pseudo_symmetric_basin(tmp_path, seed):
    """Noiseless particles of a map that is 90% C2-symmetric, a coarse grid (order 1, 30
    degrees): the global argmax often sits in the 2-fold mate's basin, whose grid point can
    score higher than the true basin's off-peak grid point. Polishing only the argmax keeps
    those particles flipped by ~180 degrees; polishing 3 distinct candidates and keeping the
    best polished mode recovers most of them."""
    vol = pseudo_symmetric(0.1)
    config = SimulationConfig(n=64, box=BOX, pixel_size_angstrom=PX, snr=math.inf, seed=seed)
    result, _ = simulate_particles(config, tmp_path, volume=vol)
    table = read_particles(result.particles_star)
    truth = table.rotations().double()
    flipped, wrong = {}, {}
    for starts in (1, 3):
        est = estimate_poses(
            table, vol, PX, EstimateConfig(grid_order=1, n_starts=starts, noise_sigma=1.0)
        )
        err = torch.rad2deg(geodesic_distance(est.estimates.rotations_mle.double(), truth))
        flipped[starts] = int((err > 90.0).sum())
        wrong[starts] = int((err > 1.0).sum())  # noiseless and polished: found means < 1 deg
    assert flipped[1] >= 8, flipped  # the trap is real on this map
    assert flipped[3] <= flipped[1] // 2, flipped
    assert wrong[3] <= wrong[1] // 2, wrong
