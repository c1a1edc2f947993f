"""Simulated particle data sets with known poses (the ground truth every accuracy figure uses)."""

from cryopose.simulate.particles import (
    SimulationConfig,
    SimulationResult,
    load_reference,
    simulate_particles,
)
from cryopose.simulate.poses import PoseDistribution, parse_pose_distribution

__all__ = [
    "PoseDistribution",
    "SimulationConfig",
    "SimulationResult",
    "load_reference",
    "parse_pose_distribution",
    "simulate_particles",
]
