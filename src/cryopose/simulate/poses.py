"""Pose distributions named by a short spec string, shared by ``simulate --poses`` and
``estimate --prior``.

Specs::

    uniform                          Haar-uniform rotations
    iso-gaussian:ETA                 IG(ETA) about the identity (ETA in radians)
    iso-gaussian:ETA@ROT,TILT,PSI    IG(ETA) about the rotation with these RELION angles (deg)
    FILE.star                        the poses of a real data set (resampled with replacement)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cryopose.io.errors import CryoposeInputError
from cryopose.so3.conversions import euler_to_matrix
from cryopose.so3.distributions import sample_iso_gaussian
from cryopose.so3.random import random_rotations

__all__ = ["PoseDistribution", "parse_pose_distribution"]


@dataclass(frozen=True)
class PoseDistribution:
    """A distribution of particle poses.

    Attributes
    ----------
    kind : {"uniform", "iso-gaussian", "empirical"}
    eta : float
        IG width in radians (``kind == "iso-gaussian"``).
    mean : torch.Tensor
        ``[3, 3]`` IG mean rotation (cryopose ``R``), float64.
    rotations : torch.Tensor or None
        ``[m, 3, 3]`` poses to resample (``kind == "empirical"``).
    source : str
        The spec it was parsed from.
    """

    kind: str
    eta: float = math.inf
    mean: torch.Tensor | None = None
    rotations: torch.Tensor | None = None
    source: str = "uniform"

    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64):
        """``[n, 3, 3]`` rotations drawn with ``generator`` (consumed; same seed, same draws)."""
        if self.kind == "uniform":
            return random_rotations(n, generator=generator, dtype=dtype)
        if self.kind == "iso-gaussian":
            return sample_iso_gaussian(
                n, self.eta, self.mean.to(dtype), generator=generator, dtype=dtype
            )
        index = torch.randint(0, self.rotations.shape[0], (n,), generator=generator)
        return self.rotations[index].to(dtype)


def parse_pose_distribution(spec: str) -> PoseDistribution:
    """Parse a pose-distribution spec (see the module docstring).

    Raises
    ------
    CryoposeInputError
        One line naming what was wrong with the spec.
    """
    text = spec.strip()
    if text.lower() == "uniform":
        return PoseDistribution("uniform", source=text)
    if text.lower().startswith("iso-gaussian:"):
        body = text.split(":", 1)[1]
        eta_text, _, mean_text = body.partition("@")
        try:
            eta = float(eta_text)
        except ValueError:
            raise CryoposeInputError(
                f"pose spec {spec!r}: ETA {eta_text!r} is not a number "
                "(expected iso-gaussian:ETA or iso-gaussian:ETA@ROT,TILT,PSI)"
            ) from None
        if not (eta > 0 and math.isfinite(eta)):
            raise CryoposeInputError(f"pose spec {spec!r}: ETA must be a positive number (radians)")
        mean = torch.eye(3, dtype=torch.float64)
        if mean_text:
            try:
                angles = [float(v) for v in mean_text.split(",")]
            except ValueError:
                angles = []
            if len(angles) != 3:
                raise CryoposeInputError(
                    f"pose spec {spec!r}: mean {mean_text!r} must be ROT,TILT,PSI in degrees"
                )
            mean = euler_to_matrix(torch.tensor(angles, dtype=torch.float64))
        return PoseDistribution("iso-gaussian", eta=eta, mean=mean, source=text)
    path = Path(text)
    if path.suffix.lower() in (".star", ".cs"):
        from cryopose.io.particles import read_particles

        table = read_particles(path)
        if not table.has_poses:
            raise CryoposeInputError(
                f"{path}: no poses (expected rlnAngleRot, rlnAngleTilt, rlnAnglePsi) to "
                "take the pose distribution from"
            )
        rotations = table.rotations(dtype=torch.float64)
        return PoseDistribution("empirical", rotations=rotations, source=str(path))
    raise CryoposeInputError(
        f"pose spec {spec!r}: expected uniform, iso-gaussian:ETA[@ROT,TILT,PSI] or a .star/.cs file"
    )
