"""Haar-uniform random rotations, seeded and reproducible.

Every random function in :mod:`cryopose.so3` takes ``generator``: ``None`` (torch's global
generator, not reproducible), an ``int`` seed, or a :class:`torch.Generator`. Random numbers are
drawn in float64 on the generator's device (CPU for an ``int`` seed) and only then cast and moved
to the requested ``dtype``/``device``, so a given seed gives the same rotations (the same bytes
for a given dtype) on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cryopose.so3.conversions import quaternion_to_matrix

__all__ = ["random_rotations", "random_unit_vectors", "resolve_generator"]

GeneratorLike = torch.Generator | int | None


def resolve_generator(generator: GeneratorLike) -> torch.Generator | None:
    """Turn an ``int`` seed into a CPU :class:`torch.Generator`; pass others through.

    Parameters
    ----------
    generator : torch.Generator or int or None
        A generator, a seed (non-negative int) or ``None`` (torch's global generator).

    Returns
    -------
    torch.Generator or None
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int) or generator < 0:
        raise ValueError(
            f"generator: expected a torch.Generator, a non-negative int seed or None, "
            f"got {generator!r}"
        )
    return torch.Generator(device="cpu").manual_seed(int(generator))


def _shape_tuple(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: expected non-negative sizes, got {shape}")
    return shape


def _randn(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)


def random_unit_vectors(
    shape: int | Sequence[int],
    *,
    generator: GeneratorLike = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly distributed unit vectors on the sphere S^2 (normalised Gaussian vectors).

    Parameters
    ----------
    shape : int or sequence of int
        Batch shape.
    generator : torch.Generator or int or None
        Random source (see module docstring).
    dtype, device
        Output dtype and device.

    Returns
    -------
    torch.Tensor
        ``[*shape, 3]`` unit vectors.
    """
    shape = _shape_tuple(shape)
    gen = resolve_generator(generator)
    v = _randn((*shape, 3), gen)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v.to(dtype=dtype, device=device)


def random_rotations(
    shape: int | Sequence[int],
    *,
    generator: GeneratorLike = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-uniform random rotation matrices.

    A quaternion with i.i.d. standard normal components, normalised, is uniform on S^3, and
    the rotation it represents is Haar-uniform on SO(3) (its rotation angle ``w`` has density
    ``(1 - cos w) / pi`` on [0, pi]).

    Parameters
    ----------
    shape : int or sequence of int
        Batch shape.
    generator : torch.Generator or int or None
        Random source: a generator, an ``int`` seed (same seed, same rotations on every
        device) or ``None`` for torch's global generator.
    dtype : torch.dtype
        Output dtype (the rotations are built in float64 and then cast).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    torch.Tensor
        ``[*shape, 3, 3]`` rotation matrices.
    """
    shape = _shape_tuple(shape)
    gen = resolve_generator(generator)
    q = _randn((*shape, 4), gen)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)
