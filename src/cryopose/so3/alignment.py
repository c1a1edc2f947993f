"""Global alignment of an estimated set of poses onto a reference set.

A map reconstructed by an ab-initio method sits in an arbitrary frame: rotated (and possibly
mirrored) relative to the reference map. If the estimated map is ``V_est(x) = V_ref(Q x)``,
the image of a particle at reference pose ``R_ref`` is ``int V_ref(R_ref u) dz`` and at
estimated pose ``R_est`` it is ``int V_ref(Q R_est u) dz``, so ``R_ref = Q @ R_est``: the
global rotation acts on the **left** of cryopose matrices. If the estimated map is also the
mirror image (handedness flip, ``R -> J R J`` with ``J = diag(1, 1, -1)``), then
``R_ref = Q @ J @ R_est @ J``. With a point group ``G`` every reference pose is only known up
to ``g.T @ R_ref``.

:func:`align_rotations` finds ``Q`` (and the flip) minimising the robust cost
``sum_i rho(theta_i)`` with ``theta_i = min_g d(g.T @ ref_i, Q @ est_i)``. Each step is closed
form: the per-particle ``g_i`` maximises ``<g, M_i Q.T>_F`` with ``M_i = ref_i @ est_i.T``, and
``Q`` is the projection onto SO(3) of ``sum_i w_i g_i.T @ M_i`` (weighted orthogonal
Procrustes). Robustness comes from iteratively re-weighted least squares with Cauchy weights
``w_i = 1 / (1 + (theta_i / c)^2)``; the scale ``c`` is twice the median residual unless
fixed, so up to (just under) half the particles may be arbitrary outliers. The start is the
best, by median residual on a seeded subsample, of the unweighted Procrustes solution and the
single-particle solutions ``M_j`` of a few seeded particles ``j`` (each exact when particle
``j`` is an inlier), which avoids the local minima that the symmetry assignment creates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryopose.so3.distances import geodesic_distance
from cryopose.so3.procrustes import project_to_so3
from cryopose.so3.symmetry import _as_group, canonical_representative

__all__ = ["AlignmentResult", "align_rotations", "flip_handedness"]

# Score-matrix entries ([rows, |G|]) handled at once; bounds temporary memory to ~64 MiB.
_SCORE_ELEMENTS = 1 << 23
# Particles used to estimate the Cauchy scale, and (the first of them) to rank the starts.
_SAMPLE_SIZE = 100_000
_RANK_SIZE = 20_000
# A handedness whose best start has a cost this many times the other's is not refined.
_FLIP_MARGIN = 1.5
_FLIP_SIGNS = ((1.0, 1.0, -1.0), (1.0, 1.0, -1.0), (-1.0, -1.0, 1.0))


def flip_handedness(rotations: torch.Tensor) -> torch.Tensor:
    """Poses in the mirrored map: ``J @ R @ J`` with ``J = diag(1, 1, -1)``.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` matrices (entries (0, 2), (1, 2), (2, 0), (2, 1) change sign).
    """
    signs = torch.tensor(_FLIP_SIGNS, dtype=rotations.dtype, device=rotations.device)
    return rotations * signs


@dataclass(frozen=True)
class AlignmentResult:
    """Outcome of :func:`align_rotations`.

    Attributes
    ----------
    rotation : torch.Tensor
        ``[3, 3]`` global rotation ``Q`` with ``reference_i ~ Q @ estimated_i`` (or
        ``Q @ J @ estimated_i @ J`` when ``flipped``), up to ``g.T`` on the left of
        ``reference_i`` under a point group. Under a group ``Q`` is only defined up to
        ``g @ Q``; the one returned is the coset element closest to the identity.
    flipped : bool
        Whether the estimated poses were mirrored (``J R J``) before rotating.
    errors_rad : torch.Tensor
        Per-particle geodesic error (radians) after alignment, ``min_g d(g.T @ ref_i,
        Q @ est_i)`` (``g`` = identity without a group); same leading shape as the input.
    rotation_angle_deg : float
        Rotation angle of ``Q`` in degrees.
    weights : torch.Tensor
        Final IRLS weights in ``(0, 1]`` (1 = inlier; all ones when ``robust=False``).
    group_indices : torch.Tensor or None
        Index into the group of the ``g`` matched to each particle (None without a group).
    scale_rad : float
        Cauchy scale ``c`` of the last iteration in radians (``inf`` when not robust).
    n_iter : int
        Number of Procrustes iterations run.
    """

    rotation: torch.Tensor
    flipped: bool
    errors_rad: torch.Tensor
    rotation_angle_deg: float
    weights: torch.Tensor
    group_indices: torch.Tensor | None
    scale_rad: float
    n_iter: int

    def apply(self, estimated: torch.Tensor) -> torch.Tensor:
        """Map estimated poses into the reference frame: ``Q @ R`` (``Q @ J @ R @ J`` if flipped).

        Under a point group the result matches each reference pose up to its symmetry mate
        ``g_i.T @ ref_i`` (see ``group_indices``).

        Parameters
        ----------
        estimated : torch.Tensor
            ``[..., 3, 3]`` poses in the estimated map's frame.
        """
        poses = flip_handedness(estimated) if self.flipped else estimated
        return self.rotation.to(dtype=poses.dtype, device=poses.device) @ poses


@dataclass
class _Fit:
    rotation: torch.Tensor
    cost: float
    weights: torch.Tensor
    scale: float
    n_iter: int


class _Problem:
    """The products ``M_i = ref_i est_i^T`` of one handedness, with cached views."""

    def __init__(self, products: torch.Tensor, group: torch.Tensor, sample: torch.Tensor):
        self.products = products
        self.flat = products.reshape(-1, 9)
        self.flat64 = self.flat.to(torch.float64)
        self.group = group
        self.sample = sample

    def scores(
        self, rotation: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best index and score ``max_g <g, M_i Q^T> = max_g <g Q, M_i>`` (= 1 + 2 cos theta)."""
        flat = self.flat if rows is None else self.flat[rows]
        targets = (self.group @ rotation).reshape(-1, 9)
        n = flat.shape[0]
        if targets.shape[0] == 1:
            return torch.zeros(n, dtype=torch.long, device=flat.device), flat @ targets[0]
        chunk = max(1, _SCORE_ELEMENTS // targets.shape[0])
        best = torch.empty(n, dtype=flat.dtype, device=flat.device)
        index = torch.empty(n, dtype=torch.long, device=flat.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            best[start:stop], index[start:stop] = (flat[start:stop] @ targets.T).max(dim=-1)
        return index, best

    def procrustes(self, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``proj_SO3(sum_i w_i g_i^T M_i)``, accumulated in float64."""
        weights64 = weights.to(torch.float64)
        if self.group.shape[0] == 1:
            total = (weights64 @ self.flat64).reshape(3, 3)
            total = self.group[0].to(torch.float64).T @ total
        else:
            per_element = torch.zeros(
                self.group.shape[0], 9, dtype=torch.float64, device=self.flat.device
            )
            per_element.index_add_(0, index, self.flat64 * weights64[:, None])
            group64 = self.group.to(torch.float64).transpose(-1, -2)
            total = (group64 @ per_element.reshape(-1, 3, 3)).sum(dim=0)
        return project_to_so3(total).to(self.flat.dtype)


def _draw(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random indices below ``n``: a shuffled prefix of all of them when
    ``n <= 4 count``, otherwise independent draws (rare repeats do no harm here)."""
    if n <= 4 * count:
        return torch.randperm(n, generator=generator)[:count]
    return torch.randint(0, n, (count,), generator=generator)


def _angle_from_score(score: torch.Tensor) -> torch.Tensor:
    """Approximate residual angle from ``1 + 2 cos theta`` (enough for weights and costs)."""
    return torch.acos(((score - 1.0) * 0.5).clamp(-1.0, 1.0))


def _cost(theta: torch.Tensor, robust: bool) -> float:
    return float(theta.median()) if robust else float((theta * theta).mean())


def _initial_rotation(
    problem: _Problem, picks: torch.Tensor, robust: bool
) -> tuple[torch.Tensor, float]:
    """Best start among the unweighted Procrustes and single-particle solutions."""
    unweighted = project_to_so3(problem.flat64.sum(dim=0).reshape(3, 3))
    candidates = torch.cat([unweighted.to(problem.flat.dtype)[None], problem.products[picks]])
    # All candidates in one product: rows x (candidates * |G|) scores, bounded in memory.
    n_targets = candidates.shape[0] * problem.group.shape[0]
    rows = problem.sample[: max(1000, min(_RANK_SIZE, _SCORE_ELEMENTS // n_targets))]
    targets = (problem.group[None] @ candidates[:, None]).reshape(n_targets, 9)
    scores = (problem.flat[rows] @ targets.T).reshape(rows.shape[0], candidates.shape[0], -1)
    theta = _angle_from_score(scores.amax(dim=-1))
    costs = theta.median(dim=0).values if robust else (theta * theta).mean(dim=0)
    best = int(costs.argmin())
    return candidates[best], float(costs[best])


def _refine(
    problem: _Problem,
    rotation: torch.Tensor,
    *,
    robust: bool,
    n_iter: int,
    fixed_scale: float | None,
) -> _Fit:
    """IRLS: re-assign group elements, re-weight, weighted Procrustes, until Q settles."""
    dtype = problem.flat.dtype
    floor = 10.0 * math.sqrt(torch.finfo(dtype).eps)
    tolerance = 1e-3 * floor
    n = problem.flat.shape[0]
    weights = torch.ones(n, dtype=dtype, device=problem.flat.device)
    scale = math.inf

    def reweight(theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        if fixed_scale is not None:
            c = fixed_scale
        else:
            c = max(2.0 * float(theta[problem.sample].median()), floor)
        return 1.0 / (1.0 + (theta / c) ** 2), c

    iterations = 0
    for iterations in range(1, n_iter + 1):  # noqa: B007 - reported after the loop
        index, score = problem.scores(rotation)
        if robust:
            weights, scale = reweight(_angle_from_score(score))
        new_rotation = problem.procrustes(weights, index)
        change = float(geodesic_distance(rotation, new_rotation))
        rotation = new_rotation
        if change <= tolerance:
            break

    _, score = problem.scores(rotation)
    theta = _angle_from_score(score)
    if robust:
        weights, scale = reweight(theta)
    return _Fit(rotation, _cost(theta, robust), weights, scale, iterations)


def align_rotations(
    estimated: torch.Tensor,
    reference: torch.Tensor,
    *,
    allow_flip: bool = False,
    group: torch.Tensor | str | None = None,
    robust: bool = True,
    n_iter: int = 50,
    scale_deg: float | None = None,
    n_candidates: int = 16,
    seed: int = 0,
) -> AlignmentResult:
    """Global rotation (and optional handedness flip) that best maps estimated poses to truth.

    Solves ``reference_i ~ g_i.T @ Q @ F(estimated_i)`` for one ``Q`` in SO(3), with
    ``F`` the identity or the handedness flip ``R -> J R J`` and ``g_i`` in the point group
    (see the module docstring for the derivation and the algorithm).

    Parameters
    ----------
    estimated : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices in the estimated map's frame.
    reference : torch.Tensor
        ``[..., 3, 3]`` matrices of the same particles in the reference frame (same shape).
    allow_flip : bool
        Also try the mirrored estimate ``J R J`` and keep whichever fits better (lower
        median residual when ``robust``, lower mean squared residual otherwise).
    group : torch.Tensor or str, optional
        Point group of the reference map (``[|G|, 3, 3]`` or a :func:`point_group` symbol);
        each reference pose then matches up to ``g.T @ R``.
    robust : bool
        Iteratively re-weight with Cauchy weights so outliers do not pull ``Q``; if False,
        plain least squares on the chordal distance.
    n_iter : int
        Maximum number of Procrustes iterations (stops earlier once ``Q`` moves by less than
        ``1e-2 sqrt(eps)`` radians).
    scale_deg : float, optional
        Fixed Cauchy scale in degrees (default: twice the median residual, re-estimated at
        every iteration).
    n_candidates : int
        Number of single-particle starting rotations tried.
    seed : int
        Seed for choosing the candidate particles and the subsample that ranks them.

    Returns
    -------
    AlignmentResult
        ``Q``, the flip flag, per-particle errors and weights.

    Raises
    ------
    ValueError
        If the shapes differ or are not ``[..., 3, 3]``, the set is empty, or an argument is
        out of range.
    """
    for name, value in (("estimated", estimated), ("reference", reference)):
        if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[-2:] != (3, 3):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise ValueError(f"{name}: expected a [..., 3, 3] tensor of rotations, got {shape}")
    if estimated.shape != reference.shape:
        raise ValueError(
            f"reference: expected the shape of estimated {tuple(estimated.shape)}, "
            f"got {tuple(reference.shape)}"
        )
    if not estimated.is_floating_point():
        raise ValueError(f"estimated: expected a floating-point tensor, got {estimated.dtype}")
    if estimated.numel() == 0:
        raise ValueError("estimated: expected at least one rotation, got an empty tensor")
    if n_iter < 1:
        raise ValueError(f"n_iter: expected a positive integer, got {n_iter}")
    if n_candidates < 0:
        raise ValueError(f"n_candidates: expected a non-negative integer, got {n_candidates}")
    if scale_deg is not None and not scale_deg > 0:
        raise ValueError(f"scale_deg: expected a positive angle in degrees, got {scale_deg}")

    leading = estimated.shape[:-2]
    est = estimated.reshape(-1, 3, 3)
    ref = reference.to(dtype=est.dtype, device=est.device).reshape(-1, 3, 3)
    n = est.shape[0]
    eye = torch.eye(3, dtype=est.dtype, device=est.device)[None]
    group_matrices = eye if group is None else _as_group(group, est)
    fixed_scale = None if scale_deg is None else math.radians(scale_deg)
    generator = torch.Generator().manual_seed(seed)
    picks = _draw(n, n_candidates, generator).to(est.device)
    sample = _draw(n, _SAMPLE_SIZE, generator).to(est.device)

    starts = []
    for flipped in (False, True) if allow_flip else (False,):
        poses = flip_handedness(est) if flipped else est
        problem = _Problem(ref @ poses.transpose(-1, -2), group_matrices, sample)
        start, cost = _initial_rotation(problem, picks, robust)
        starts.append((cost, flipped, problem, start))
    starts.sort(key=lambda item: item[0])
    # Refine the other handedness too only when the starts do not already tell them apart.
    if len(starts) == 2 and starts[1][0] > _FLIP_MARGIN * starts[0][0]:
        starts = starts[:1]
    fits = []
    for _, flipped, problem, start in starts:
        fit = _refine(problem, start, robust=robust, n_iter=n_iter, fixed_scale=fixed_scale)
        fits.append((fit.cost, flipped, problem, fit))
    _, flipped, problem, fit = min(fits, key=lambda item: item[0])
    products = problem.products

    rotation = fit.rotation
    if group is not None:
        rotation = canonical_representative(rotation, group_matrices)
    index, _ = problem.scores(rotation)
    # theta_i = angle(M_i^T g_i Q) (a conjugate of ref_i^T g_i Q est_i), via atan2.
    errors = geodesic_distance(products, (group_matrices @ rotation)[index])
    angle = float(geodesic_distance(eye[0], rotation))
    return AlignmentResult(
        rotation=rotation,
        flipped=flipped,
        errors_rad=errors.reshape(leading),
        rotation_angle_deg=math.degrees(angle),
        weights=fit.weights.reshape(leading),
        group_indices=None if group is None else index.reshape(leading),
        scale_rad=fit.scale,
        n_iter=fit.n_iter,
    )
