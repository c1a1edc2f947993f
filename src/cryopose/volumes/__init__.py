"""Reference volumes: density maps from atomic models, resampling, symmetrisation, and the
embedded default ribosome (6ZU5).

Volumes are ``[..., z, y, x]`` tensors with the centre at index ``N // 2`` on every axis;
conventions in ``docs/conventions.md`` ("Density maps from atomic models").
"""

from cryopose.volumes.atomic import (
    AtomicModel,
    antialias_bfactor,
    density_from_atoms,
    density_from_model,
    electron_form_factor_at_zero,
    load_atomic_model,
)
from cryopose.volumes.default import default_atomic_model, default_model_path, default_volume
from cryopose.volumes.transform import resample_volume, symmetrise

__all__ = [
    "AtomicModel",
    "antialias_bfactor",
    "density_from_atoms",
    "density_from_model",
    "electron_form_factor_at_zero",
    "load_atomic_model",
    "default_atomic_model",
    "default_model_path",
    "default_volume",
    "resample_volume",
    "symmetrise",
]
