"""Maps from particles: direct Fourier reconstruction (``docs/conventions.md``)."""

from cryopose.reconstruct import em_models  # noqa: F401  (soft/hard EM, seed section 4)
from cryopose.reconstruct.fourier import (
    FourierAccumulator,
    Reconstruction,
    half_subsets,
    reconstruct_images,
    reconstruct_particles,
)

__all__ = [
    "FourierAccumulator",
    "Reconstruction",
    "half_subsets",
    "reconstruct_images",
    "reconstruct_particles",
]
