"""Point groups in RELION's settings, symmetry-aware distances and coset representatives.

A map with point group ``G`` satisfies ``V(g x) = V(x)`` for every ``g`` in ``G`` (``x`` in the
map's ``(x, y, z)`` coordinates). Its projection at RELION matrix ``A`` equals the one at
``A g``; in the cryopose convention (``R = A.T``) the poses ``R`` and ``g.T @ R`` give the same
image, so symmetry acts on the **left** of ``R`` and a pose is only defined up to its coset
``{g.T @ R : g in G}``.

Axis settings (those of RELION's ``--sym``; see ``docs/conventions.md``):

* ``C<n>``: n-fold axis along z.
* ``D<n>``: n-fold axis along z, a 2-fold axis along x.
* ``T``: 3-fold axis along z, a 2-fold axis along ``(0, sqrt(2/3), sqrt(1/3))`` (in the yz
  plane, 54.74 degrees from z). This is RELION's setting, *not* the "2-folds on x, y, z"
  orientation of Heymann et al. (2005).
* ``O``: 4-fold axes along x, y and z (3-folds along ``(+-1, +-1, +-1)``).
* ``I`` (= ``I2``, RELION's default, "Crowther 222"): 2-fold axes along x, y and z; the twelve
  5-fold axes along the cyclic permutations of ``(+-1, 0, +-tau)`` (tau the golden ratio), so
  the two 5-folds nearest +z lie in the **xz** plane, 31.72 degrees from z; 3-folds along
  ``(+-1, +-1, +-1)`` and the cyclic permutations of ``(0, +-1/tau, +-tau)``.
* ``I1`` ("no-Crowther 222", Heymann et al. 2005): ``I2`` rotated by 90 degrees about z
  (5-folds along cyclic permutations of ``(0, +-1, +-tau)``, the ones nearest +z in the yz
  plane).
* ``I3``: a 5-fold along z and a 2-fold along ``(-1, 0, tau)`` (normalised).
* ``I4``: a 5-fold along ``(2, 0, 1)`` and a 2-fold along ``(1, 0, tau)`` (normalised).
"""

from __future__ import annotations

import functools
import math
import re

import torch

from cryopose.so3.distances import geodesic_distance

__all__ = [
    "PointGroupError",
    "point_group",
    "symmetric_geodesic_distance",
    "closest_symmetry_mate",
    "canonical_representative",
]

_GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0
_SYMBOL_HELP = "expected C<n> (n >= 1), D<n> (n >= 2), T, O, I, I1, I2, I3 or I4"
# Rows of the [n, |G|] score matrix handled at once (bounds temporary memory to ~64 MiB).
_SCORE_ELEMENTS = 1 << 23


class PointGroupError(ValueError):
    """An unknown or malformed point-group symbol."""


def _axis_rotation(axis: tuple[float, float, float], fold: int) -> torch.Tensor:
    """Right-handed rotation by 360/fold degrees about ``axis`` (float64, Rodrigues)."""
    u = torch.tensor(axis, dtype=torch.float64)
    u = u / torch.linalg.vector_norm(u)
    angle = 2.0 * math.pi / fold
    k = torch.tensor(
        [[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64
    )
    eye = torch.eye(3, dtype=torch.float64)
    return eye + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def _generators(kind: str, order: int) -> list[torch.Tensor]:
    tau = _GOLDEN
    if kind == "C":
        return [_axis_rotation((0.0, 0.0, 1.0), order)]
    if kind == "D":
        return [_axis_rotation((0.0, 0.0, 1.0), order), _axis_rotation((1.0, 0.0, 0.0), 2)]
    if kind == "T":
        return [
            _axis_rotation((0.0, 0.0, 1.0), 3),
            _axis_rotation((0.0, math.sqrt(2.0 / 3.0), math.sqrt(1.0 / 3.0)), 2),
        ]
    if kind == "O":
        return [_axis_rotation((1.0, 1.0, 1.0), 3), _axis_rotation((0.0, 0.0, 1.0), 4)]
    if kind == "I2":
        return [_axis_rotation((0.0, 0.0, 1.0), 2), _axis_rotation((1.0, 0.0, tau), 5)]
    if kind == "I1":
        return [_axis_rotation((1.0, 0.0, 0.0), 2), _axis_rotation((tau, 0.0, -1.0), 5)]
    if kind == "I3":
        return [_axis_rotation((0.0, 0.0, 1.0), 5), _axis_rotation((-1.0, 0.0, tau), 2)]
    if kind == "I4":
        return [_axis_rotation((2.0, 0.0, 1.0), 5), _axis_rotation((1.0, 0.0, tau), 2)]
    raise AssertionError(kind)  # pragma: no cover


def _close(generators: list[torch.Tensor]) -> torch.Tensor:
    """All products of the generators (breadth-first from the identity), deduplicated."""
    elements = [torch.eye(3, dtype=torch.float64)]
    queue = [elements[0]]
    while queue:
        current = queue.pop(0)
        for generator in generators:
            candidate = generator @ current
            stacked = torch.stack(elements)
            if (stacked - candidate).abs().amax(dim=(-1, -2)).min() > 1e-9:
                elements.append(candidate)
                queue.append(candidate)
            if len(elements) > 1000:  # pragma: no cover - guards against a wrong generator
                raise AssertionError("point-group closure did not terminate")
    group = torch.stack(elements)
    return torch.where(group.abs() < 1e-14, torch.zeros_like(group), group)


def _parse(symbol: str) -> tuple[str, int]:
    if not isinstance(symbol, str):
        raise PointGroupError(f"point group symbol {symbol!r}: {_SYMBOL_HELP}")
    text = symbol.strip().upper()
    match = re.fullmatch(r"([CD])(\d+)", text)
    if match:
        kind, order = match.group(1), int(match.group(2))
        if (kind == "C" and order >= 1) or (kind == "D" and order >= 2):
            return kind, order
        raise PointGroupError(f"point group symbol {symbol!r}: {_SYMBOL_HELP}")
    if text in {"T", "O"}:
        return text, 0
    if text in {"I", "I2"}:
        return "I2", 0
    if text in {"I1", "I3", "I4"}:
        return text, 0
    raise PointGroupError(f"point group symbol {symbol!r}: {_SYMBOL_HELP}")


@functools.lru_cache(maxsize=64)
def _point_group_float64(kind: str, order: int) -> torch.Tensor:
    return _close(_generators(kind, order))


def point_group(
    symbol: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotation matrices of a point group in RELION's axis setting.

    Parameters
    ----------
    symbol : str
        ``C<n>`` (n >= 1), ``D<n>`` (n >= 2), ``T``, ``O``, ``I`` (= ``I2``), ``I1``, ``I3``
        or ``I4``; case-insensitive. The axis settings are listed in the module docstring.
    dtype : torch.dtype
        Output dtype (the group is built in float64 and cast).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    torch.Tensor
        ``[|G|, 3, 3]`` matrices ``g`` with ``V(g x) = V(x)`` for a map with this symmetry;
        the identity comes first, then the elements in breadth-first order of the generators
        (deterministic).

    Raises
    ------
    PointGroupError
        (a ``ValueError``) for an unknown symbol.
    """
    kind, order = _parse(symbol)
    return _point_group_float64(kind, order).to(dtype=dtype, device=device)


def _as_group(group: torch.Tensor | str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(group, str):
        return point_group(group, dtype=like.dtype, device=like.device)
    if group.ndim != 3 or group.shape[-2:] != (3, 3) or group.shape[0] < 1:
        raise ValueError(f"group: expected a [|G|, 3, 3] tensor, got shape {tuple(group.shape)}")
    return group.to(dtype=like.dtype, device=like.device)


def _best_element(products: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Index ``argmax_g <g, P>_F`` for each ``P`` in ``products`` [n, 3, 3] (chunked)."""
    flat = products.reshape(-1, 9)
    group_flat = group.reshape(-1, 9)
    if group_flat.shape[0] == 1:
        return torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    rows = max(1, _SCORE_ELEMENTS // group_flat.shape[0])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        stop = min(start + rows, flat.shape[0])
        out[start:stop] = (flat[start:stop] @ group_flat.T).argmax(dim=-1)
    return out


def _check_rotations(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[-2:] != (3, 3):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a [..., 3, 3] tensor of rotations, got {shape}")


def closest_symmetry_mate(
    rotations: torch.Tensor,
    reference: torch.Tensor,
    group: torch.Tensor | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetry-equivalent pose ``g.T @ R`` closest to a reference pose.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices ``R``.
    reference : torch.Tensor
        ``[..., 3, 3]`` matrices (broadcast against ``rotations``).
    group : torch.Tensor or str
        ``[|G|, 3, 3]`` group matrices or a symbol for :func:`point_group`.

    Returns
    -------
    mate : torch.Tensor
        ``[..., 3, 3]`` the element ``g.T @ R`` of the coset of ``R`` at the smallest geodesic
        distance from ``reference``.
    index : torch.Tensor
        ``[...]`` (int64) index of that ``g`` in ``group``.
    """
    _check_rotations("rotations", rotations)
    _check_rotations("reference", reference)
    g = _as_group(group, rotations)
    shape = torch.broadcast_shapes(rotations.shape, reference.shape)
    r = rotations.expand(shape).reshape(-1, 3, 3)
    ref = reference.to(rotations.dtype).expand(shape).reshape(-1, 3, 3)
    # d(ref, g^T R) is smallest where tr(ref^T g^T R) = <g, R ref^T>_F is largest.
    index = _best_element(r @ ref.transpose(-1, -2), g)
    mate = g[index].transpose(-1, -2) @ r
    return mate.reshape(shape), index.reshape(shape[:-2])


def symmetric_geodesic_distance(
    rotations_1: torch.Tensor,
    rotations_2: torch.Tensor,
    group: torch.Tensor | str,
) -> torch.Tensor:
    """Geodesic angle between two poses modulo a point group.

    ``min over g in G of d(R1, g.T @ R2)``, with ``d`` the geodesic angle of
    :func:`cryopose.so3.distances.geodesic_distance`. It is symmetric in its arguments and
    unchanged when either pose is replaced by a symmetry mate ``g.T @ R``. The best ``g``
    maximises ``<g, R2 R1.T>_F`` (one ``[n, |G|]`` product, computed in chunks of bounded
    memory); the angle itself is then evaluated with the accurate ``atan2`` formula.

    Parameters
    ----------
    rotations_1, rotations_2 : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices (broadcastable).
    group : torch.Tensor or str
        ``[|G|, 3, 3]`` group matrices or a symbol for :func:`point_group`.

    Returns
    -------
    torch.Tensor
        ``[...]`` angles in radians, in ``[0, pi]``.
    """
    mate, _ = closest_symmetry_mate(rotations_2, rotations_1, group)
    return geodesic_distance(rotations_1.to(mate.dtype), mate)


def canonical_representative(
    rotations: torch.Tensor,
    group: torch.Tensor | str,
) -> torch.Tensor:
    """One deterministic representative of each pose's symmetry coset ``{g.T @ R}``.

    The representative is the coset element closest to the identity, i.e. the one with the
    largest trace ``tr(g.T @ R) = <g, R>_F`` (the Dirichlet domain of the group around the
    identity); exact ties go to the first such ``g`` in ``group`` order. The result is the
    same for ``R`` and for every ``g.T @ R``, and applying the function twice changes nothing
    (both up to rounding, and except on the measure-zero boundaries where two coset elements
    are equally close to the identity).

    Parameters
    ----------
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices.
    group : torch.Tensor or str
        ``[|G|, 3, 3]`` group matrices or a symbol for :func:`point_group`.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` representatives.
    """
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    mate, _ = closest_symmetry_mate(rotations, eye, group)
    return mate
