"""RELION STAR particle files: read 3.0 and 3.1/4/5 into one table, write 3.1.

Reading uses the ``starfile`` package; writing is done here (shortest round-trip float
formatting, so every value survives read -> write -> read exactly, and an atomic rename).

Normalisation on read (the table always looks like RELION >= 3.1 with the optics merged in):

* RELION >= 3.1 (``data_optics`` + ``data_particles``): every optics column is copied onto each
  particle through ``rlnOpticsGroup``. A column present in both blocks stays per particle.
* RELION 3.0 (one ``data_`` block, optics per particle): the pixel size is
  ``rlnImagePixelSize``, else ``rlnPixelSize``, else
  ``rlnDetectorPixelSize [um] * 1e4 / rlnMagnification``; ``rlnOriginX/Y/Z`` (pixels) become
  ``rlnOriginX/Y/ZAngst`` (Angstrom, times the pixel size); ``rlnImageSize`` is taken from the
  first particle's stack header when that file exists; optics groups are numbered 1, 2, ... in
  order of first appearance of each distinct (voltage, Cs, amplitude contrast, pixel size, box).
  ``rlnMagnification``, ``rlnDetectorPixelSize``, ``rlnPixelSize`` and ``rlnOriginX/Y/Z`` are
  dropped (their content lives on in the new columns).

Image paths in ``rlnImageName`` (``"index@path"``) are resolved relative to the STAR file's
folder (``image_root``), and written relative to the output STAR file's folder.
"""

from __future__ import annotations

import os
import tempfile
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryopose.io.errors import CryoposeInputError, input_error, require_file
from cryopose.io.files import publish
from cryopose.io.particles import (
    IMAGE_NAME,
    OPTICS_GROUP,
    ParticleTable,
    assign_optics_groups,
    relative_image_names,
    split_image_names,
)

__all__ = ["read_star", "write_star", "StarWriter", "STRING_LABELS"]

PathType = str | PathLike[str]

#: Labels always parsed as text (starfile would otherwise turn "000001" or "1" into numbers).
STRING_LABELS = [
    "rlnImageName",
    "rlnMicrographName",
    "rlnImageOriginalName",
    "rlnOpticsGroupName",
    "rlnCtfImage",
    "rlnReconstructImageName",
    "rlnReferenceImage",
    "rlnMtfFileName",
    "rlnTomoName",
    "rlnTomoParticleName",
    "rlnMicrographMovieName",
]

_RELION30_DROPPED = [
    "rlnMagnification",
    "rlnDetectorPixelSize",
    "rlnPixelSize",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginZ",
]


def _read_blocks(path: PathType) -> dict[str, pd.DataFrame | dict]:
    require_file(path, "STAR file")
    try:
        blocks = starfile.read(os.fspath(path), always_dict=True, parse_as_string=STRING_LABELS)
    except Exception as err:  # starfile/pandas raise many types on malformed text
        message = " ".join(str(err).split())
        raise input_error(path, f"unreadable STAR file ({type(err).__name__}: {message})") from None
    if not blocks:
        raise input_error(path, "no data_ block found; expected a RELION STAR file")
    return blocks


def _loop(path: PathType, blocks: dict, name: str) -> pd.DataFrame:
    block = blocks[name]
    if not isinstance(block, pd.DataFrame):
        raise input_error(path, f"data_{name} is not a loop_ table; expected one row per item")
    return block.reset_index(drop=True)


def _require_columns(path: PathType, df: pd.DataFrame, columns: list[str], block: str) -> None:
    for column in columns:
        if column not in df.columns:
            raise input_error(path, f"missing column {column} in {block}")


def _box_from_stack(path: PathType, data: pd.DataFrame, image_root: Path) -> int | None:
    if len(data) == 0 or IMAGE_NAME not in data.columns:
        return None
    from cryopose.io.mrc import read_mrc_header

    _, stack_path = split_image_names(data[IMAGE_NAME].iloc[:1], path)
    candidate = Path(stack_path[0])
    candidate = candidate if candidate.is_absolute() else image_root / candidate
    if not candidate.is_file():
        return None
    header = read_mrc_header(candidate)
    return int(header.shape[2])


def _normalise_relion30(path: PathType, data: pd.DataFrame, image_root: Path) -> pd.DataFrame:
    data = data.copy()
    if "rlnImagePixelSize" not in data.columns:
        if "rlnPixelSize" in data.columns:
            data["rlnImagePixelSize"] = data["rlnPixelSize"].astype(np.float64)
        elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(data.columns):
            magnification = data["rlnMagnification"].astype(np.float64)
            if (magnification <= 0).any():
                raise input_error(path, "rlnMagnification must be positive in data_ block")
            data["rlnImagePixelSize"] = (
                data["rlnDetectorPixelSize"].astype(np.float64) * 1e4 / magnification
            )
    for axis in ("X", "Y", "Z"):
        pixels = f"rlnOrigin{axis}"
        if pixels in data.columns and f"rlnOrigin{axis}Angst" not in data.columns:
            if "rlnImagePixelSize" not in data.columns:
                raise input_error(
                    path,
                    f"{pixels} is in pixels but no pixel size column (rlnImagePixelSize, "
                    "rlnPixelSize or rlnDetectorPixelSize + rlnMagnification) is present",
                )
            data[f"{pixels}Angst"] = data[pixels].astype(np.float64) * data[
                "rlnImagePixelSize"
            ].astype(np.float64)
    data = data.drop(columns=[c for c in _RELION30_DROPPED if c in data.columns])
    if "rlnImageSize" not in data.columns:
        box = _box_from_stack(path, data, image_root)
        if box is not None:
            data["rlnImageSize"] = np.int64(box)
    if "rlnImageDimensionality" not in data.columns:
        data["rlnImageDimensionality"] = np.int64(2)
    return data


def read_star(
    path: PathType, *, image_root: PathType | None = None, require_images: bool = True
) -> ParticleTable:
    """Read a RELION particle STAR file (3.0, 3.1, 4 or 5) into a :class:`ParticleTable`.

    Parameters
    ----------
    path : str or PathLike
        The STAR file.
    image_root : str or PathLike, optional
        Folder that relative image paths in ``rlnImageName`` are resolved against; default
        the STAR file's folder.
    require_images : bool
        Require ``rlnImageName`` (default). ``False`` accepts pose-only files (e.g. for
        ``cryopose compare``); such a table cannot read images.

    Returns
    -------
    ParticleTable
        ``data`` has one row per particle with RELION 3.1 labels and the optics merged in;
        ``optics`` one row per optics group.

    Raises
    ------
    CryoposeInputError
        Missing file, unreadable text, no particle block, missing ``rlnImageName`` or
        ``rlnOpticsGroup``, a particle whose optics group is not in ``data_optics``.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    blocks = _read_blocks(path)
    if "particles" in blocks:
        block_name = "data_particles"
        data = _loop(path, blocks, "particles")
    elif len(blocks) == 1:
        name = next(iter(blocks))
        block_name = f"data_{name}"
        data = _loop(path, blocks, name)
    elif "images" in blocks:
        block_name = "data_images"
        data = _loop(path, blocks, "images")
    else:
        names = ", ".join(f"data_{k}" for k in blocks)
        raise input_error(path, f"no data_particles block (found {names})")
    has_images = IMAGE_NAME in data.columns
    if require_images:
        _require_columns(path, data, [IMAGE_NAME], block_name)

    if "optics" in blocks:
        optics = _loop(path, blocks, "optics")
        _require_columns(path, optics, [OPTICS_GROUP], "data_optics")
        _require_columns(path, data, [OPTICS_GROUP], block_name)
        if optics[OPTICS_GROUP].duplicated().any():
            raise input_error(path, "rlnOpticsGroup values in data_optics are not unique")
        known = set(optics[OPTICS_GROUP].tolist())
        missing = ~data[OPTICS_GROUP].isin(known)
        if missing.any():
            row = int(np.flatnonzero(missing.to_numpy())[0])
            raise input_error(
                path,
                f"rlnOpticsGroup {data[OPTICS_GROUP].iloc[row]} of particle row {row + 1} in "
                f"{block_name} is not in data_optics",
            )
        shared = [c for c in optics.columns if c != OPTICS_GROUP and c in data.columns]
        optics = optics.drop(columns=shared)
        indexed = optics.set_index(OPTICS_GROUP)
        data = data.copy()
        for column in indexed.columns:
            data[column] = data[OPTICS_GROUP].map(indexed[column]).to_numpy()
        table = ParticleTable(data=data, optics=optics, image_root=root, source=path)
    else:
        data = _normalise_relion30(path, data, root)
        data, optics = assign_optics_groups(data)
        table = ParticleTable(data=data, optics=optics, image_root=root, source=path)
    # Validate the image names now so that a malformed one is reported at read time.
    if has_images:
        split_image_names(table.data[IMAGE_NAME], path)
    return table


def _format_column(series: pd.Series) -> pd.Series:
    """Text for one STAR column: shortest round-trip floats, quoted strings with spaces."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype(np.int64).astype(str)
    if pd.api.types.is_float_dtype(series):
        values = series.to_numpy(dtype=np.float64)
        return pd.Series([repr(float(v)) for v in values], index=series.index, dtype=object)
    if pd.api.types.is_integer_dtype(series):
        return series.astype(str).str.replace("<NA>", "nan", regex=False)
    text = series.astype(str)
    needs_quote = text.str.contains(r"\s", regex=True) | (text == "")
    if needs_quote.any():
        text = text.where(~needs_quote, '"' + text + '"')
    return text


def _rows_text(df: pd.DataFrame) -> str:
    columns = [_format_column(df[c]).to_numpy(dtype=object) for c in df.columns]
    rows = np.stack(columns, axis=1) if columns else np.empty((len(df), 0), dtype=object)
    return "\n".join("\t".join(row) for row in rows.tolist())


def _loop_text(name: str, df: pd.DataFrame) -> str:
    lines = ["", "# version 30001", "", f"data_{name}", "", "loop_"]
    lines += [f"_{column} #{i}" for i, column in enumerate(df.columns, 1)]
    body = _rows_text(df) if len(df) else ""
    return "\n".join(lines) + "\n" + body + ("\n" if body else "") + "\n"


def _split_for_writing(table: ParticleTable, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics block, particle block) of a table, image names relative to ``path``'s folder."""
    if OPTICS_GROUP not in table.optics.columns or OPTICS_GROUP not in table.data.columns:
        raise CryoposeInputError(f"{path}: table has no rlnOpticsGroup; cannot write RELION 3.1")
    optics = table.optics.copy()
    first = [c for c in (OPTICS_GROUP, "rlnOpticsGroupName") if c in optics.columns]
    optics = optics[first + [c for c in optics.columns if c not in first]]
    optics_only = [c for c in optics.columns if c != OPTICS_GROUP]
    particles = table.data.drop(columns=[c for c in optics_only if c in table.data.columns])
    if IMAGE_NAME in particles.columns:
        particles = particles.copy()
        particles[IMAGE_NAME] = relative_image_names(table, path.parent)
    return optics.reset_index(drop=True), particles


def write_star(table: ParticleTable, path: PathType) -> None:
    """Write a particle table as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``).

    Optics values come from ``table.optics``; optics columns are removed from the particle
    block (``rlnOpticsGroup`` stays). ``rlnImageName`` is rewritten as ``"%06d@path"`` with the
    path relative to the output file's folder. All other columns, known or not, are written
    unchanged. The file is written to a temporary name and renamed.

    Parameters
    ----------
    table : ParticleTable
    path : str or PathLike
        Output ``.star`` file.
    """
    with StarWriter(path) as writer:
        writer.write(table)


class StarWriter:
    """Write a RELION 3.1 STAR file from particle tables given chunk by chunk.

    The first chunk fixes the optics block and the particle columns; later chunks must have
    the same columns and optics. Rows go to a temporary file in the destination folder that
    :meth:`close` renames to ``path`` (on error or :meth:`abort` it is removed). Each chunk is
    formatted like :func:`write_star` (image paths relative to the output folder).

    Parameters
    ----------
    path : str or PathLike
        Output ``.star`` file.
    """

    def __init__(self, path: PathType) -> None:
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self._tmp = Path(tmp)
        self._handle = os.fdopen(fd, "w")
        self._optics: pd.DataFrame | None = None
        self._columns: list[str] | None = None
        self.n_written = 0

    def __enter__(self) -> StarWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, table: ParticleTable) -> None:
        """Append the particles of ``table`` (a chunk)."""
        if self._handle.closed:
            raise CryoposeInputError(f"{self.path}: writer is closed")
        optics, particles = _split_for_writing(table, self.path)
        if self._optics is None:
            self._optics, self._columns = optics, list(particles.columns)
            self._handle.write("\n# Written by cryopose\n" + _loop_text("optics", optics))
            self._handle.write(_loop_text("particles", particles.iloc[:0]).rstrip("\n") + "\n")
        else:
            if list(particles.columns) != self._columns:
                raise CryoposeInputError(
                    f"{self.path}: chunk columns {list(particles.columns)} differ from the first "
                    f"chunk's {self._columns}"
                )
            known = self._optics.set_index(OPTICS_GROUP)
            for _, row in optics.iterrows():
                group = row[OPTICS_GROUP]
                if group not in known.index or not known.loc[group].equals(
                    row.drop(OPTICS_GROUP).rename(group)
                ):
                    raise CryoposeInputError(
                        f"{self.path}: optics group {group} of a later chunk differs from the "
                        "first chunk's data_optics"
                    )
        if len(particles):
            self._handle.write(_rows_text(particles) + "\n")
        self.n_written += len(particles)

    def close(self) -> None:
        """Finish the file and rename it to ``path``."""
        if self._handle.closed:
            return
        try:
            if self._optics is None:
                raise CryoposeInputError(f"{self.path}: no particle table was written")
            self._handle.write("\n")
            self._handle.close()
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the partially written file."""
        if not self._handle.closed:
            self._handle.close()
        self._tmp.unlink(missing_ok=True)
