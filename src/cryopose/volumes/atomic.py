"""Density maps from atomic models (adapter around gemmi's electron scattering factors).

Convention (``docs/conventions.md``, "Density maps from atomic models"):

* The map is the electron-scattering density of the model, ``rho(r) = sum_atoms occ *
  sum_i a_i (4 pi / (b_i + B))^(3/2) exp(-4 pi^2 |r - r_atom|^2 / (b_i + B))`` with the
  five-Gaussian electron form factors ``f(s) = sum_i a_i exp(-b_i s^2 / 4)`` of International
  Tables C 4.3.2.2 (gemmi's ``c4322`` table, ``gemmi.DensityCalculatorE``). Values are in
  Angstrom^-2 (form factor in Angstrom per cubic Angstrom): ``sum(map) * pixel_size**3`` is
  the sum of ``f(0)`` over the atoms when the box holds the whole model.
* The returned map is the **band-limited** map at the requested pixel size: the density is
  evaluated by gemmi on a grid twice as fine, with an anti-aliasing blur
  ``B_aa = 2 ln(1e4) pixel_size^2`` that gemmi applies in real space, then Fourier-cropped to
  the target sampling and un-blurred exactly in Fourier space (``exp(+B_aa s^2 / 4)``).
  Aliased power that lands in the kept band is below 1e-4 of the true value.
* The global ``bfactor`` (Angstrom^2) multiplies the transform by ``exp(-bfactor s^2 / 4)``
  (the same convention as atomic B-factors); it may be negative (sharpening). Per-atom
  B-factors of the file are ignored unless ``use_model_bfactors=True``.
* Arrays are ``[z, y, x]``; an atom at ``(x, y, z)`` Angstrom lies at the continuous index
  ``(z, y, x) / pixel_size + N // 2`` relative to the chosen centre (``center='mass'``: the
  mass-weighted centre of mass of the kept atoms, occupancies included).
* Hydrogens (H, D) and waters are removed by default; only the first model and the first
  alternative conformation are used; occupancies are kept.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path

import gemmi
import numpy as np
import torch

from cryopose.io.errors import input_error, require_file

__all__ = [
    "AtomicModel",
    "load_atomic_model",
    "density_from_model",
    "density_from_atoms",
    "antialias_bfactor",
    "electron_form_factor_at_zero",
    "OVERSAMPLING",
]

#: The density is evaluated on a grid ``OVERSAMPLING`` times finer than the target.
OVERSAMPLING = 2
#: Relative size of the aliased power left in the band after the anti-aliasing blur.
_ALIAS_TOLERANCE = 1e-4
#: gemmi's density cutoff relative to the blurred peak of a carbon atom.
_RELATIVE_CUTOFF = 1e-4
#: Required fields of the compact ``.npz`` atom files (written by tools/make_embedded_ribosome.py).
_NPZ_FIELDS = ("positions_delta", "atomic_numbers", "origin_angstrom", "quantum_angstrom")


@dataclass(frozen=True)
class AtomicModel:
    """A flat list of atoms.

    Attributes
    ----------
    positions_angstrom : numpy.ndarray
        ``[n, 3]`` float64 Cartesian coordinates ``(x, y, z)`` in Angstrom.
    atomic_numbers : numpy.ndarray
        ``[n]`` int64 atomic numbers (1 for H and D).
    occupancies : numpy.ndarray
        ``[n]`` float64 occupancies.
    bfactors_angstrom2 : numpy.ndarray
        ``[n]`` float64 isotropic B-factors in Angstrom^2 (zeros when unknown).
    source : str
        Where the atoms came from (file name or description), used in error messages.
    """

    positions_angstrom: np.ndarray
    atomic_numbers: np.ndarray
    occupancies: np.ndarray
    bfactors_angstrom2: np.ndarray
    source: str = "<atoms>"

    def __post_init__(self) -> None:
        n = self.atomic_numbers.shape[0]
        if self.positions_angstrom.shape != (n, 3):
            raise input_error(
                self.source,
                f"positions_angstrom has shape {self.positions_angstrom.shape}, "
                f"expected ({n}, 3)",
            )
        if self.occupancies.shape != (n,) or self.bfactors_angstrom2.shape != (n,):
            raise input_error(self.source, f"occupancies and bfactors must have shape ({n},)")

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.atomic_numbers.shape[0])

    def masses(self) -> np.ndarray:
        """Atomic masses in dalton, ``[n]`` float64."""
        return _atomic_weights()[self.atomic_numbers]

    def center_of_mass(self) -> np.ndarray:
        """Mass- and occupancy-weighted centre of mass ``(x, y, z)`` in Angstrom."""
        w = self.masses() * self.occupancies
        if w.sum() <= 0:
            raise input_error(self.source, "model has zero total mass; cannot centre it")
        return (self.positions_angstrom * w[:, None]).sum(0) / w.sum()

    def select(self, keep: np.ndarray) -> AtomicModel:
        """The atoms where ``keep`` (a boolean ``[n]`` mask) is true."""
        return AtomicModel(
            self.positions_angstrom[keep],
            self.atomic_numbers[keep],
            self.occupancies[keep],
            self.bfactors_angstrom2[keep],
            self.source,
        )


@lru_cache(maxsize=1)
def _atomic_weights() -> np.ndarray:
    return np.array([0.0] + [gemmi.Element(z).weight for z in range(1, 119)])


@lru_cache(maxsize=1)
def _c4322_table() -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` coefficient tables ``[119, 5]`` of the electron form factors (NaN if absent)."""
    a = np.full((119, 5), np.nan)
    b = np.full((119, 5), np.nan)
    for z in range(1, 119):
        el = gemmi.Element(z)
        if el.c4322 is not None:
            coefs = el.c4322.get_coefs()
            a[z], b[z] = coefs[:5], coefs[5:]
    return a, b


def electron_form_factor_at_zero(atomic_numbers: np.ndarray | Sequence[int]) -> np.ndarray:
    """Electron form factor ``f(0) = sum_i a_i`` in Angstrom (International Tables C 4.3.2.2).

    ``f(0)`` is the integral of one atom's density; ``sum(map) * pixel_size**3`` equals the sum
    of it over the atoms (times occupancy) for a map whose box holds the whole model.
    """
    a, _ = _c4322_table()
    return a[np.asarray(atomic_numbers, dtype=np.int64)].sum(-1)


def antialias_bfactor(pixel_size_angstrom: float) -> float:
    """Anti-aliasing blur (Angstrom^2) used on the ``OVERSAMPLING``-times finer grid.

    On a grid of spacing ``p / 2`` a frequency ``k`` aliases into the kept cube
    ``|k_i| <= 1 / (2 p)`` only when ``|k|^2 - |k'|^2 >= 2 / p^2``, so blurring by ``B`` and
    un-blurring leaves at most ``exp(-B / (2 p^2))`` of it; ``B = 2 ln(1 / tol) p^2``.
    """
    return 2.0 * math.log(1.0 / _ALIAS_TOLERANCE) * pixel_size_angstrom**2


def _is_water(residue: gemmi.Residue) -> bool:
    return residue.is_water()


def load_atomic_model(
    path_or_structure: str | PathLike[str] | gemmi.Structure | AtomicModel,
    *,
    remove_hydrogens: bool = True,
    remove_waters: bool = True,
) -> AtomicModel:
    """Read the atoms of a PDB or mmCIF file (gzipped or not), a gemmi structure or a ``.npz``.

    Parameters
    ----------
    path_or_structure : str, PathLike, gemmi.Structure or AtomicModel
        A ``.pdb``/``.ent``/``.cif``/``.mmcif`` file (optionally ``.gz``), cryopose's compact
        ``.npz`` atom file (see :func:`cryopose.volumes.default_model_path`), a
        ``gemmi.Structure`` (not modified) or an :class:`AtomicModel` (filtered only).
    remove_hydrogens : bool
        Drop H and D atoms.
    remove_waters : bool
        Drop water residues (HOH, WAT, DOD, ...; not possible for ``.npz`` files, which hold
        no residue names and no waters).

    Returns
    -------
    AtomicModel
        The atoms of the first model, first alternative conformation.

    Raises
    ------
    cryopose.io.errors.CryoposeInputError
        When the file is missing, unreadable or holds no atoms.
    """
    if isinstance(path_or_structure, AtomicModel):
        atoms = path_or_structure
    elif isinstance(path_or_structure, gemmi.Structure):
        atoms = _atoms_from_structure(path_or_structure.clone(), "<gemmi.Structure>", remove_waters)
    else:
        path = Path(os.fspath(path_or_structure))
        require_file(path, "atomic model")
        if path.suffix == ".npz":
            atoms = _read_npz(path)
        else:
            try:
                structure = gemmi.read_structure(str(path))
            except (RuntimeError, ValueError, OSError) as exc:
                raise input_error(path, f"cannot read PDB/mmCIF model: {exc}") from None
            atoms = _atoms_from_structure(structure, str(path), remove_waters)
    if remove_hydrogens:
        atoms = atoms.select(atoms.atomic_numbers != 1)
    if atoms.n_atoms == 0:
        raise input_error(atoms.source, "model holds no atoms (after removing H and waters)")
    return atoms


def _atoms_from_structure(
    structure: gemmi.Structure, source: str, remove_waters: bool
) -> AtomicModel:
    if len(structure) == 0:
        raise input_error(source, "model holds no atoms (no MODEL in the file)")
    structure.remove_alternative_conformations()
    model = structure[0]
    xyz, z, occ, b = [], [], [], []
    for chain in model:
        for residue in chain:
            if remove_waters and _is_water(residue):
                continue
            for atom in residue:
                xyz.append(atom.pos.tolist())
                z.append(atom.element.atomic_number)
                occ.append(atom.occ)
                b.append(atom.b_iso)
    atomic_numbers = np.asarray(z, dtype=np.int64)
    if np.any(atomic_numbers < 1):
        raise input_error(source, "atom with unknown element (expected a chemical element)")
    return AtomicModel(
        np.asarray(xyz, dtype=np.float64).reshape(-1, 3),
        atomic_numbers,
        np.asarray(occ, dtype=np.float64),
        np.asarray(b, dtype=np.float64),
        source,
    )


def _read_npz(path: Path) -> AtomicModel:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [f for f in _NPZ_FIELDS if f not in data.files]
            if missing:
                raise input_error(path, f"missing field {missing[0]} in compact atom file")
            delta = data["positions_delta"].astype(np.int64)
            atomic_numbers = data["atomic_numbers"].astype(np.int64)
            origin = data["origin_angstrom"].astype(np.float64)
            quantum = float(data["quantum_angstrom"])
    except (OSError, ValueError) as exc:
        raise input_error(path, f"cannot read compact atom file: {exc}") from None
    if delta.ndim != 2 or delta.shape[0] != 3 or delta.shape[1] != atomic_numbers.shape[0]:
        raise input_error(
            path, f"field positions_delta has shape {delta.shape}, expected (3, n_atoms)"
        )
    positions = np.cumsum(delta, axis=1).T * quantum + origin
    n = atomic_numbers.shape[0]
    return AtomicModel(positions, atomic_numbers, np.ones(n), np.zeros(n), str(path))


def _resolve_center(
    atoms: AtomicModel, center: str | Sequence[float] | np.ndarray | None
) -> np.ndarray | None:
    if center is None:
        return None
    if isinstance(center, str):
        if center != "mass":
            raise input_error(None, f"center={center!r}: expected 'mass', None or (x, y, z)")
        return atoms.center_of_mass()
    c = np.asarray(center, dtype=np.float64)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise input_error(None, f"center={center!r}: expected 'mass', None or (x, y, z) Angstrom")
    return c


def density_from_model(
    path_or_structure: str | PathLike[str] | gemmi.Structure | AtomicModel,
    box: int,
    pixel_size_angstrom: float,
    *,
    bfactor: float = 0.0,
    center: str | Sequence[float] | None = "mass",
    remove_hydrogens: bool = True,
    remove_waters: bool = True,
    use_model_bfactors: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Electron-scattering density map of an atomic model at an exact box and pixel size.

    Parameters
    ----------
    path_or_structure : str, PathLike, gemmi.Structure or AtomicModel
        PDB or mmCIF file (gzipped or not), compact ``.npz`` atom file, gemmi structure or
        atom list; see :func:`load_atomic_model`.
    box : int
        Box size ``N`` in pixels (the map is ``N^3``), even or odd.
    pixel_size_angstrom : float
        Pixel size in Angstrom.
    bfactor : float
        Global B-factor in Angstrom^2 applied as ``exp(-bfactor s^2 / 4)`` in Fourier space
        (``s`` in 1/Angstrom); preserves the total density. Negative values sharpen.
    center : {'mass', None} or (x, y, z)
        ``'mass'``: the mass-weighted centre of mass lands on voxel ``(N//2, N//2, N//2)``.
        A point ``(x, y, z)`` in Angstrom: that point lands there. ``None``: keep the file's
        frame, the coordinate origin at voxel ``(0, 0, 0)`` (as for a deposited map with zero
        origin).
    remove_hydrogens, remove_waters : bool
        Drop hydrogens / waters before computing the map.
    use_model_bfactors : bool
        Add each atom's B-factor from the file to its Gaussians (default: ignore them).
    device : torch.device or str, optional
        Device of the result (the Fourier steps run there; gemmi runs on the CPU).
    dtype : torch.dtype
        ``torch.float32`` (default) or ``torch.float64``.

    Returns
    -------
    torch.Tensor
        ``[N, N, N]`` map indexed ``[z, y, x]``, in Angstrom^-2.
    """
    atoms = load_atomic_model(
        path_or_structure, remove_hydrogens=remove_hydrogens, remove_waters=remove_waters
    )
    return density_from_atoms(
        atoms,
        box,
        pixel_size_angstrom,
        bfactor=bfactor,
        center=center,
        use_model_bfactors=use_model_bfactors,
        device=device,
        dtype=dtype,
    )


def density_from_atoms(
    atoms: AtomicModel,
    box: int,
    pixel_size_angstrom: float,
    *,
    bfactor: float = 0.0,
    center: str | Sequence[float] | None = "mass",
    use_model_bfactors: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Density map of an :class:`AtomicModel`; same conventions as :func:`density_from_model`."""
    box, px, bfactor = _check_map_args(box, pixel_size_angstrom, bfactor, dtype)
    c = _resolve_center(atoms, center)
    # Continuous box index (x, y, z order) of every atom.
    u = atoms.positions_angstrom / px
    if c is not None:
        u = u - c / px + box // 2
    b_atoms = atoms.bfactors_angstrom2 if use_model_bfactors else np.zeros(atoms.n_atoms)
    if np.any(b_atoms < 0) or not np.all(np.isfinite(b_atoms)):
        raise input_error(atoms.source, "atomic B-factors must be finite and >= 0")
    b_aa = antialias_bfactor(px)
    _, b_coef = _c4322_table()
    b_widest = np.nanmax(b_coef[np.unique(atoms.atomic_numbers)])
    if not np.isfinite(b_widest):
        raise input_error(atoms.source, "element without electron form factor in the model")
    # Reach of one atom's blurred density (density below 1e-7 of its peak), in pixels.
    reach = 0.65 * math.sqrt(b_aa + b_widest + float(b_atoms.max(initial=0.0))) / px + 2.0
    inside = np.all((u >= -reach) & (u <= box - 1 + reach), axis=1)
    atoms, u, b_atoms = atoms.select(inside), u[inside], b_atoms[inside]
    out_device = torch.device(device) if device is not None else torch.device("cpu")
    if atoms.n_atoms == 0:
        return torch.zeros((box, box, box), dtype=dtype, device=out_device)
    # Periodic coarse cell [lo, lo + m) in box indices holding the box and every atom's reach.
    lo = math.floor(min(0.0, float(u.min())) - reach)
    hi = math.ceil(max(box - 1.0, float(u.max())) + reach)
    m = hi - lo + 1
    m += 1 - m % 2  # odd: the kept Fourier band is symmetric, no Nyquist term
    work = torch.float64 if dtype == torch.float64 else torch.float32
    coarse = _periodic_density(
        u - lo, atoms.atomic_numbers, atoms.occupancies, b_atoms, m, px, bfactor, out_device, work
    )
    start = -lo
    coarse = coarse[start : start + box, start : start + box, start : start + box]
    return coarse.permute(2, 1, 0).contiguous().to(dtype)


def _periodic_density(
    grid_index: np.ndarray,
    atomic_numbers: np.ndarray,
    occupancies: np.ndarray,
    bfactors: np.ndarray,
    m: int,
    px: float,
    bfactor: float,
    device: torch.device,
    work: torch.dtype,
) -> torch.Tensor:
    """Band-limited density on the periodic cubic cell of ``m`` (odd) pixels, ``[x, y, z]``.

    ``grid_index`` are the atoms' continuous indices ``(x, y, z)`` in that cell.
    """
    b_aa = antialias_bfactor(px)
    fine = _gemmi_density(grid_index, atomic_numbers, occupancies, bfactors, m, px, b_aa)
    spectrum = torch.fft.rfftn(torch.from_numpy(fine).to(device=device, dtype=work))
    del fine
    h = (m - 1) // 2
    n_fine = OVERSAMPLING * m
    full = torch.cat([torch.arange(0, h + 1), torch.arange(n_fine - h, n_fine)]).to(device)
    spectrum = spectrum[full][:, full][:, :, : h + 1]
    freq = torch.cat([torch.arange(0, h + 1), torch.arange(-h, 0)]).to(device, work)
    freq = freq / (m * px)  # 1/Angstrom
    s2 = freq[:, None, None] ** 2 + freq[None, :, None] ** 2 + freq[None, None, : h + 1] ** 2
    spectrum = spectrum * torch.exp((b_aa - bfactor) * s2 / 4.0)
    return torch.fft.irfftn(spectrum, s=(m, m, m)) / OVERSAMPLING**3


def _check_map_args(
    box: int, pixel_size: float, bfactor: float, dtype: torch.dtype
) -> tuple[int, float, float]:
    if isinstance(box, bool) or int(box) != box or box < 1:
        raise input_error(None, f"box={box!r}: expected a positive integer number of pixels")
    px = float(pixel_size)
    if not math.isfinite(px) or px <= 0:
        raise input_error(None, f"pixel_size_angstrom={pixel_size!r}: expected a positive number")
    b = float(bfactor)
    if not math.isfinite(b):
        raise input_error(None, f"bfactor={bfactor!r}: expected a finite number (Angstrom^2)")
    if dtype not in (torch.float32, torch.float64):
        raise input_error(None, f"dtype={dtype}: expected torch.float32 or torch.float64")
    return int(box), px, b


def _gemmi_density(
    grid_index: np.ndarray,
    atomic_numbers: np.ndarray,
    occupancies: np.ndarray,
    bfactors: np.ndarray,
    m: int,
    px: float,
    blur: float,
) -> np.ndarray:
    """gemmi density on a periodic cubic cell of ``m * px`` Angstrom, ``2 m`` points per axis.

    ``grid_index`` are coarse-grid indices (x, y, z); the result is indexed ``[x, y, z]``.
    """
    cell = m * px
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    elements = {int(z): gemmi.Element(int(z)) for z in np.unique(atomic_numbers)}
    atom = gemmi.Atom()
    atom.name = "X"
    positions = (grid_index * px).tolist()
    per_residue = 10000
    for start in range(0, len(positions), per_residue):
        residue = gemmi.Residue()
        residue.name = "UNK"
        residue.seqid = gemmi.SeqId(start // per_residue + 1, " ")
        stop = start + per_residue
        for p, z, o, b in zip(
            positions[start:stop],
            atomic_numbers[start:stop].tolist(),
            occupancies[start:stop].tolist(),
            bfactors[start:stop].tolist(),
            strict=True,
        ):
            atom.pos = gemmi.Position(*p)
            atom.element = elements[z]
            atom.occ = o
            atom.b_iso = b
            residue.add_atom(atom)
        chain.add_residue(residue)
    model.add_chain(chain)
    calc = gemmi.DensityCalculatorE()
    calc.grid.set_unit_cell(gemmi.UnitCell(cell, cell, cell, 90, 90, 90))
    n = OVERSAMPLING * m
    calc.grid.set_size(n, n, n)
    calc.d_min = 0.0  # keep the size set above (initialize_grid only zeroes it)
    calc.blur = blur
    # gemmi drops an atom's density below an absolute cutoff; make it relative to a carbon
    # atom's blurred peak so that the error stays ~1e-4 of the map at any pixel size.
    a_carbon, b_carbon = (c[6] for c in _c4322_table())
    peak = float((a_carbon * (4.0 * math.pi / (b_carbon + blur)) ** 1.5).sum())
    calc.cutoff = _RELATIVE_CUTOFF * peak
    calc.put_model_density_on_grid(model)
    return np.array(calc.grid, copy=True)
