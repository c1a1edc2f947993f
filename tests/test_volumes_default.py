"""The embedded default ribosome (6ZU5): size, fidelity to the deposited model, maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODELS, require

from cryopose.volumes import (
    default_atomic_model,
    default_model_path,
    default_volume,
    density_from_model,
    electron_form_factor_at_zero,
    load_atomic_model,
)

RIBOSOME = MODELS / "6zu5.cif.gz"


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_embedded_file_is_package_data_and_compact():
    path = default_model_path()
    assert path.is_file() and path.parent.name == "data" and path.parent.parent.name == "cryopose"
    size_mb = path.stat().st_size / 1e6
    print(f"embedded ribosome: {path.name}, {size_mb:.3f} MB")
    assert size_mb < 2.0
    atoms = default_atomic_model()
    assert atoms.n_atoms == 165_175  # 6ZU5 without hydrogens and waters
    assert set(np.unique(atoms.atomic_numbers).tolist()) == {6, 7, 8, 12, 15, 16, 30}
    assert not atoms.positions_angstrom.flags.writeable
    # About 280 Angstrom across: a 300 Angstrom box holds it.
    extent = atoms.positions_angstrom.max(0) - atoms.positions_angstrom.min(0)
    assert 200 < extent.max() < 300


def test_embedded_atoms_equal_the_deposited_model():
    reference = load_atomic_model(require(RIBOSOME))
    atoms = default_atomic_model()
    assert np.array_equal(atoms.atomic_numbers, reference.atomic_numbers)
    # int16 deltas of 0.01 A quanta: every coordinate within half a quantum.
    assert np.abs(atoms.positions_angstrom - reference.positions_angstrom).max() <= 0.0051


@pytest.mark.parametrize("box", [33, pytest.param(32, marks=pytest.mark.slow)])
def test_default_volume_total_and_centre(box):
    px = 10.0  # 320 A box: holds the whole ribosome
    vol = default_volume(box, px, dtype=torch.float64)
    assert vol.shape == (box,) * 3 and vol.dtype == torch.float64
    atoms = default_atomic_model()
    expected = float(electron_form_factor_at_zero(atoms.atomic_numbers).sum())
    assert float(vol.sum()) * px**3 == pytest.approx(expected, rel=2e-3)
    grid = torch.meshgrid(*[torch.arange(box, dtype=torch.float64)] * 3, indexing="ij")
    centroid = [float((vol * g).sum() / vol.sum()) for g in grid]
    assert np.allclose(centroid, box // 2, atol=0.5)


@pytest.mark.slow  # ~8 s: reads the 3.8 MB mmCIF and computes two ribosome maps
def test_default_volume_matches_the_deposited_model_64px_5A():
    # The atom-level test above already pins the embedded atoms; this checks the whole path.
    ref = density_from_model(require(RIBOSOME), 64, 5.0)
    got = default_volume(64, 5.0)
    assert _correlation(got, ref) > 0.99
    assert float((got - ref).abs().max()) < 1e-2 * float(ref.abs().max())
