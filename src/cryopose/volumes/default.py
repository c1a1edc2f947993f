"""The embedded default reference: the 80S ribosome (PDB 6ZU5) as a compact atom list.

The package ships ``cryopose/data/ribosome_6zu5.npz`` (about 0.73 MB): the 165,175
non-hydrogen, non-water atoms of 6ZU5's first model, coordinates quantised to 0.01 Angstrom
and delta-encoded as int16, with their atomic numbers (written by
``tools/make_embedded_ribosome.py``). Because atoms rather than a map are stored, the density
is exact at any box and pixel size (:func:`default_volume`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from cryopose.volumes.atomic import AtomicModel, density_from_atoms, load_atomic_model

__all__ = ["DEFAULT_MODEL_NAME", "default_model_path", "default_atomic_model", "default_volume"]

#: File name of the embedded model inside ``cryopose/data``.
DEFAULT_MODEL_NAME = "ribosome_6zu5.npz"


def default_model_path() -> Path:
    """Path of the embedded compact atom file (accepted by ``density_from_model``)."""
    return Path(str(resources.files("cryopose").joinpath("data", DEFAULT_MODEL_NAME)))


@lru_cache(maxsize=1)
def default_atomic_model() -> AtomicModel:
    """The embedded ribosome's atoms (read once, then cached; arrays are read-only)."""
    atoms = load_atomic_model(default_model_path())
    for array in (
        atoms.positions_angstrom,
        atoms.atomic_numbers,
        atoms.occupancies,
        atoms.bfactors_angstrom2,
    ):
        array.setflags(write=False)
    return atoms


def default_volume(
    box: int,
    pixel_size_angstrom: float,
    *,
    bfactor: float = 0.0,
    center: str | Sequence[float] | None = "mass",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Density of the embedded 80S ribosome (6ZU5) at a given box and pixel size.

    Parameters
    ----------
    box : int
        Box size ``N`` in pixels, even or odd.
    pixel_size_angstrom : float
        Pixel size in Angstrom. The ribosome is about 280 Angstrom across, so
        ``box * pixel_size_angstrom`` >= 300 holds all of it.
    bfactor : float
        Global B-factor in Angstrom^2 (``exp(-bfactor s^2 / 4)``).
    center : {'mass', None} or (x, y, z)
        As in :func:`cryopose.volumes.density_from_model` (default: centre of mass at
        ``N // 2``; ``None`` keeps 6ZU5's deposited frame).
    device, dtype :
        Device and floating dtype of the result.

    Returns
    -------
    torch.Tensor
        ``[N, N, N]`` map indexed ``[z, y, x]`` in Angstrom^-2.
    """
    return density_from_atoms(
        default_atomic_model(),
        box,
        pixel_size_angstrom,
        bfactor=bfactor,
        center=center,
        device=device,
        dtype=dtype,
    )
