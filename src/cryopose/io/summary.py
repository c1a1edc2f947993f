"""What a file holds (for ``cryopose info``): particle files and MRC volumes/stacks."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from cryopose.io.mrc import read_mrc_header
from cryopose.io.particles import (
    CTF_LABELS,
    EULER_LABELS,
    OPTICS_GROUP,
    ORIGIN_LABELS,
    ParticleTable,
    read_particles,
)

__all__ = ["describe_file", "describe_table"]

_CTF_COLUMNS = [label for label, _ in CTF_LABELS.values() if label != "rlnImagePixelSize"]


def _one_or_list(values: list[Any]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _number(value: Any) -> Any:
    if value is None:
        return None
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def describe_table(table: ParticleTable) -> dict[str, Any]:
    """Summary of a particle table as a JSON-ready dict.

    Keys: ``n_particles``, ``box`` (pixels) and ``pixel_size_angstrom`` (a number, or one value
    per optics group when there are several), ``n_optics_groups``, ``optics_groups`` (list of
    dicts), ``has_poses``, ``has_origins``, ``has_ctf``, ``pose_fields``, ``ctf_fields`` and
    ``ranges`` (``label -> [min, max]`` over particles, for pose, origin and CTF columns).
    """
    data, optics = table.data, table.optics
    groups = []
    for _, row in optics.iterrows():
        groups.append({str(k): _number(v) for k, v in row.items()})

    def per_group(label: str) -> Any:
        if label in optics.columns:
            return _one_or_list([_number(v) for v in optics[label].tolist()])
        if label in data.columns and OPTICS_GROUP in data.columns:
            first = data.drop_duplicates(OPTICS_GROUP)[label].tolist()
            return _one_or_list([_number(v) for v in first])
        return None

    pose_fields = [c for c in (*EULER_LABELS, *ORIGIN_LABELS) if c in data.columns]
    ctf_fields = [c for c in _CTF_COLUMNS if c in data.columns]
    ranges = {}
    for label in pose_fields + ctf_fields:
        values = data[label].to_numpy(dtype=np.float64)
        if values.size:
            ranges[label] = [_number(float(np.nanmin(values))), _number(float(np.nanmax(values)))]
    return {
        "n_particles": len(table),
        "box": per_group("rlnImageSize"),
        "pixel_size_angstrom": per_group("rlnImagePixelSize"),
        "n_optics_groups": table.n_optics_groups,
        "optics_groups": groups,
        "has_poses": table.has_poses,
        "has_origins": table.has_origins,
        "has_ctf": table.has_ctf,
        "pose_fields": pose_fields,
        "ctf_fields": ctf_fields,
        "ranges": ranges,
    }


def describe_file(path: str | PathLike[str]) -> dict[str, Any]:
    """Summary of a ``.star``, ``.cs``, ``.mrc`` or ``.mrcs`` file as a JSON-ready dict.

    Always holds ``file``, ``kind`` (``relion_star``, ``cryosparc_cs``, ``mrc_stack`` or
    ``mrc_volume``), ``n_particles`` (``None`` for a volume), ``box``,
    ``pixel_size_angstrom`` (``None`` when unknown), ``n_optics_groups``, ``has_poses`` and
    ``has_ctf``. MRC files add ``shape`` ``[nz, ny, nx]`` and ``mode``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".star", ".cs"):
        summary = describe_table(read_particles(path))
        kind = "relion_star" if suffix == ".star" else "cryosparc_cs"
        return {"file": str(path), "kind": kind, **summary}
    header = read_mrc_header(path)
    nz, ny, nx = header.shape
    return {
        "file": str(path),
        "kind": "mrc_stack" if header.is_image_stack else "mrc_volume",
        "n_particles": nz if header.is_image_stack else None,
        "box": nx if ny == nx else [ny, nx],
        "pixel_size_angstrom": header.pixel_size_angstrom,
        "n_optics_groups": 0,
        "has_poses": False,
        "has_ctf": False,
        "shape": [nz, ny, nx],
        "mode": header.mode,
    }
