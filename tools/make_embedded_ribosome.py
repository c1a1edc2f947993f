"""Regenerate cryopose's embedded default ribosome from the PDB entry 6ZU5 (80S ribosome).

Usage::

    python tools/make_embedded_ribosome.py [path/to/6zu5.cif.gz] [output.npz]

Defaults: ``/work/shared/data/models/6zu5.cif.gz`` and
``src/cryopose/data/ribosome_6zu5.npz``. The file holds every non-hydrogen, non-water atom of
the first model (first alternative conformation) as ``positions_delta`` (int16 ``[3, n]``,
successive differences of the coordinates in units of ``quantum_angstrom`` = 0.01 Angstrom,
atoms in file order), ``origin_angstrom`` (float64 ``[3]``, added after the cumulative sum),
``atomic_numbers`` (uint8 ``[n]``) and provenance strings. Occupancies are all 1 in 6ZU5 and
B-factors are not stored. Read it with ``cryopose.volumes.load_atomic_model``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cryopose.volumes.atomic import load_atomic_model

QUANTUM_ANGSTROM = 0.01
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "models" / "6zu5.cif.gz"
DEFAULT_OUTPUT = ROOT / "src" / "cryopose" / "data" / "ribosome_6zu5.npz"


def main(source: Path = DEFAULT_SOURCE, output: Path = DEFAULT_OUTPUT) -> None:
    atoms = load_atomic_model(source, remove_hydrogens=True, remove_waters=True)
    if not np.allclose(atoms.occupancies, 1.0):
        raise SystemExit(f"{source}: occupancies other than 1 are not stored; extend the format")
    xyz = atoms.positions_angstrom
    origin = np.round((xyz.min(0) + xyz.max(0)) / 2.0, 2)
    q = np.round((xyz - origin) / QUANTUM_ANGSTROM).astype(np.int64).T  # [3, n]
    delta = np.diff(q, axis=1, prepend=0)
    if np.abs(delta).max() > np.iinfo(np.int16).max:
        raise SystemExit(f"{source}: model spans more than 327 Angstrom; use a coarser quantum")
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                positions_delta=delta.astype(np.int16),
                atomic_numbers=atoms.atomic_numbers.astype(np.uint8),
                origin_angstrom=origin,
                quantum_angstrom=np.float64(QUANTUM_ANGSTROM),
                source=np.str_("PDB 6ZU5 (80S ribosome), non-H non-water atoms, model 1"),
                source_sha256=np.str_(digest),
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    back = load_atomic_model(output)
    error = np.abs(back.positions_angstrom - xyz).max()
    print(
        f"{output}: {atoms.n_atoms} atoms, {output.stat().st_size / 1e6:.3f} MB, "
        f"max coordinate error {error:.4f} A"
    )


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    main(*args)
