"""Density maps from atomic models: units, centring, axis order, anti-aliasing, B-factors."""

from __future__ import annotations

import gzip
import shutil

import gemmi
import numpy as np
import pytest
import torch
from conftest import MODELS, require

from cryopose.io.errors import CryoposeInputError
from cryopose.volumes import (
    AtomicModel,
    density_from_atoms,
    density_from_model,
    electron_form_factor_at_zero,
    load_atomic_model,
)
from cryopose.volumes.atomic import _c4322_table, _periodic_density

AKE = MODELS / "1ake.pdb.gz"


def _atoms(xyz, z) -> AtomicModel:
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    n = xyz.shape[0]
    return AtomicModel(xyz, np.asarray(z, dtype=np.int64), np.ones(n), np.zeros(n))


def _structure_factor_map(u, z, m, px, bfactor):
    """Band-limited map on the periodic cell of m (odd) pixels, from the analytic transform.

    rho_j = (1 / L^3) sum_{|n_i| <= (m-1)/2} F(n / L) exp(2 pi i n.j / m), L = m px, with
    F(k) = sum_atoms f(|k|) exp(-B |k|^2 / 4) exp(-2 pi i k.r), f = sum_i a_i exp(-b_i s^2/4).
    Returned as [x, y, z] like the internal function.
    """
    a, b = _c4322_table()
    n = np.fft.fftfreq(m, 1.0 / m)
    nx, ny, nz = np.meshgrid(n, n, n, indexing="ij")
    s2 = (nx**2 + ny**2 + nz**2) / (m * px) ** 2
    spectrum = np.zeros(s2.shape, dtype=complex)
    for uu, zz in zip(u, z, strict=True):
        form = (a[zz][:, None, None, None] * np.exp(-(b[zz][:, None, None, None]) * s2 / 4)).sum(0)
        phase = np.exp(-2j * np.pi * (nx * uu[0] + ny * uu[1] + nz * uu[2]) / m)
        spectrum += form * np.exp(-bfactor * s2 / 4) * phase
    return np.fft.ifftn(spectrum).real * m**3 / (m * px) ** 3


@pytest.mark.parametrize("px", [0.8, 2.0, 4.5])
def test_band_limited_map_matches_analytic_fourier_series(px):
    # Pins units (Angstrom^-2), the form factors, the anti-aliasing and the exact un-blurring.
    rng = np.random.default_rng(3)
    m = 21
    u = rng.uniform(5.0, 16.0, (15, 3))
    z = rng.choice([6, 7, 8, 15, 16, 12], 15)
    got = _periodic_density(
        u, z, np.ones(15), np.zeros(15), m, px, 30.0, torch.device("cpu"), torch.float64
    ).numpy()
    ref = _structure_factor_map(u, z, m, px, 30.0)
    assert np.abs(got - ref).max() < 2e-4 * np.abs(ref).max()


@pytest.mark.parametrize("box", [32, 33])
@pytest.mark.parametrize("px", [1.0, 2.0])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_single_atom_lands_on_expected_voxel(box, px, axis):
    # An atom 10 A along x (axis 0 of xyz) lands at [N//2, N//2, N//2 + 10/px] of [z, y, x].
    xyz = np.zeros(3)
    xyz[axis] = 10.0
    vol = density_from_atoms(_atoms(xyz, [6]), box, px, center=(0.0, 0.0, 0.0))
    expected = [box // 2] * 3
    expected[2 - axis] += int(10 / px)
    assert np.unravel_index(int(vol.argmax()), vol.shape) == tuple(expected)
    # The mass centre of one atom is the atom: center='mass' puts it at N//2.
    vol = density_from_atoms(_atoms(xyz, [6]), box, px)
    assert np.unravel_index(int(vol.argmax()), vol.shape) == (box // 2,) * 3


def test_center_none_keeps_file_frame():
    # Model origin at voxel 0: an atom at (x, y, z) = (4, 6, 8) A, 2 A/px -> index [4, 3, 2].
    vol = density_from_atoms(_atoms([4.0, 6.0, 8.0], [8]), 12, 2.0, center=None)
    assert np.unravel_index(int(vol.argmax()), vol.shape) == (4, 3, 2)


def test_single_atom_integral_and_peak_symmetry():
    # sum * px^3 = f(0) of carbon (2.5088 A), and the peak is symmetric about the atom.
    vol = density_from_atoms(_atoms([0, 0, 0], [6]), 31, 1.0, bfactor=20.0, dtype=torch.float64)
    assert float(vol.sum()) == pytest.approx(float(electron_form_factor_at_zero([6])[0]), rel=1e-3)
    c = 15
    assert torch.allclose(vol, vol.flip(0).flip(1).flip(2), atol=1e-6 * float(vol.max()))
    assert float(vol[c, c, c + 1]) == pytest.approx(float(vol[c + 1, c, c]), rel=1e-6)


@pytest.mark.parametrize("box", [44, 45])
def test_1ake_total_centre_and_dtype(box, dtype):
    path = require(AKE)
    px = 2.0
    vol = density_from_model(path, box, px, dtype=dtype)
    assert vol.shape == (box, box, box) and vol.dtype == dtype
    atoms = load_atomic_model(path)
    # Total density = sum of the electron form factors at s = 0 (times occupancy).
    expected = float((electron_form_factor_at_zero(atoms.atomic_numbers) * atoms.occupancies).sum())
    assert float(vol.sum()) * px**3 == pytest.approx(expected, rel=2e-3)
    assert float(vol.sum()) > 0
    # The density-weighted centroid is the (mass-weighted) model centre, at voxel N//2.
    grid = torch.meshgrid(*[torch.arange(box, dtype=dtype)] * 3, indexing="ij")
    centroid = [float((vol * g).sum() / vol.sum()) for g in grid]
    assert np.allclose(centroid, box // 2, atol=0.5)


def test_1ake_blurred_map_is_positive():
    # With a B-factor that damps the transform at Nyquist the Gibbs ringing of the sharp
    # band limit vanishes and the map is (numerically) non-negative.
    vol = density_from_model(require(AKE), 40, 2.0, bfactor=250.0)
    assert float(vol.min()) > -5e-3 * float(vol.max())


def test_bfactor_attenuates_as_exp_minus_b_s2_over_4_and_keeps_total():
    path = require(AKE)
    box, px, bfac = 48, 2.0, 60.0
    sharp = density_from_model(path, box, px, dtype=torch.float64)
    soft = density_from_model(path, box, px, bfactor=bfac, dtype=torch.float64)
    assert float(soft.sum()) == pytest.approx(float(sharp.sum()), rel=1e-3)
    f_sharp = torch.fft.fftn(sharp)
    f_soft = torch.fft.fftn(soft)
    k = torch.fft.fftfreq(box, d=px, dtype=torch.float64)
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    shell = (s2 > 0.15**2) & (s2 < 0.2**2)  # 5-6.7 A, well inside the band
    ratio = (f_soft.abs() ** 2)[shell].sum() / (f_sharp.abs() ** 2)[shell].sum()
    power = f_sharp.abs() ** 2
    expected = (torch.exp(-bfac * s2 / 2) * power)[shell].sum() / power[shell].sum()
    assert float(ratio) == pytest.approx(float(expected), rel=0.02)
    s_half = 0.25 / px  # half Nyquist: above it the power drops by at least exp(-B s^2 / 2)
    high = s2 > s_half**2
    bound = float(np.exp(-bfac * s_half**2 / 2))
    assert float((f_soft.abs() ** 2)[high].sum()) < bound * float((f_sharp.abs() ** 2)[high].sum())


def test_pdb_gz_pdb_and_mmcif_give_the_same_map(tmp_path):
    path = require(AKE)
    plain = tmp_path / "1ake.pdb"
    with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    cif = tmp_path / "1ake.cif"
    structure = gemmi.read_structure(str(path))
    structure.setup_entities()
    structure.make_mmcif_document().write_file(str(cif))
    ref = density_from_model(path, 33, 2.5)
    for other in (plain, cif, gemmi.read_structure(str(path))):
        assert torch.allclose(density_from_model(other, 33, 2.5), ref, atol=1e-6)


def _gemmi_atom(element: str, pos: gemmi.Position) -> gemmi.Atom:
    atom = gemmi.Atom()
    atom.name, atom.element, atom.pos, atom.occ = element, gemmi.Element(element), pos, 1.0
    return atom


def test_waters_and_hydrogens_are_removed():
    path = require(AKE)
    structure = gemmi.read_structure(str(path))
    kept = load_atomic_model(structure)
    # Add one hydrogen to the first residue and one water (HOH) in a new chain.
    residue = structure[0][0][0]
    residue.add_atom(_gemmi_atom("H", residue[0].pos))
    water = gemmi.Residue()
    water.name, water.seqid = "HOH", gemmi.SeqId(9001, " ")
    com = kept.center_of_mass()  # voxel N//2 below; the water sits 2 px from it, on a voxel
    # (off-voxel sharp atoms ring beyond the box, so the in-box sum is exact only on voxels)
    water.add_atom(_gemmi_atom("O", gemmi.Position(*(com + [4.0, 0.0, 0.0]))))
    chain = gemmi.Chain("W")
    chain.add_residue(water)
    structure[0].add_chain(chain)
    assert load_atomic_model(structure).n_atoms == kept.n_atoms
    assert load_atomic_model(structure, remove_waters=False).n_atoms == kept.n_atoms + 1
    assert load_atomic_model(structure, remove_hydrogens=False).n_atoms == kept.n_atoms + 1
    # ... and the map changes by exactly the water's scattering when it is kept.
    box, px = 40, 2.0
    dry = density_from_model(structure, box, px, center=com, dtype=torch.float64)
    wet = density_from_model(
        structure, box, px, center=com, remove_waters=False, dtype=torch.float64
    )
    f_oxygen = float(electron_form_factor_at_zero([8])[0])
    assert float(wet.sum() - dry.sum()) * px**3 == pytest.approx(f_oxygen, rel=1e-2)


def test_model_larger_than_box_is_truncated_not_wrapped():
    # Two atoms, one far outside a small box: the map equals the map of the inner atom alone.
    both = _atoms([[0, 0, 0], [60, 0, 0]], [6, 6])
    one = _atoms([[0, 0, 0]], [6])
    a = density_from_atoms(both, 16, 1.5, center=(0, 0, 0))
    b = density_from_atoms(one, 16, 1.5, center=(0, 0, 0))
    assert torch.allclose(a, b, atol=1e-6 * float(b.max()))


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pdb"):
        density_from_model(tmp_path / "missing.pdb", 16, 1.0)
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_loop\ngarbage\n")
    with pytest.raises(CryoposeInputError, match="bad.cif"):
        density_from_model(bad, 16, 1.0)
    atoms = _atoms([0, 0, 0], [6])
    with pytest.raises(CryoposeInputError, match="box"):
        density_from_atoms(atoms, 0, 1.0)
    with pytest.raises(CryoposeInputError, match="pixel_size"):
        density_from_atoms(atoms, 8, -1.0)
    with pytest.raises(CryoposeInputError, match="center"):
        density_from_atoms(atoms, 8, 1.0, center="geometric")
