"""Posterior over a rotation grid x shift grid, and the estimators and uncertainties it gives.

Model
-----
For one image ``y`` and grid points ``(R_g, t_j)`` with log-likelihoods ``l[g, j]`` (any
per-image constant), quadrature weights ``q_g`` (Haar mass of the cell of ``R_g``; sum 1), a
rotation prior density ``pi(R)`` w.r.t. normalised Haar measure and a shift prior ``s_j`` (mass
of shift ``j``, default uniform ``1 / T``), the joint posterior mass of a grid point is::

    P(g, j | y) = q_g pi(R_g) s_j exp(l[g, j]) / Z,     Z = sum_{g, j} q_g pi(R_g) s_j exp(l[g, j])

evaluated with log-sum-exp (only differences of log-likelihoods enter, so offsets of 1e6 or
likelihoods that differ by 1e6 between grid points are harmless). ``log Z`` is the log evidence
(up to the per-image constant of ``l``). The rotation posterior marginalises the shifts,
``p_g = sum_j P(g, j | y)`` (seed appendix B).

Estimators
----------
- MLE: ``argmax_{g, j} l[g, j]``; MAP: ``argmax_{g, j} l[g, j] + log pi(R_g) + log s_j``
  (posterior *density*, so the quadrature weights do not enter; with a uniform prior MAP = MLE).
- MMSE rotation (seed Prop. 1 / appendix C): ``project_to_so3(M)`` with ``M = sum_g p_g R_g``
  the posterior mean matrix (one ``[B, G] @ [G, 9]`` GEMM); it minimises the posterior
  expected squared chordal loss ``E ||R - R_hat||_F^2 = 6 - 2 tr(R_hat^T M)`` over SO(3).
- MMSE shift: the posterior mean of the shifts.

Point groups
------------
Poses ``R`` and ``g^T R`` (cryopose left action) give the same image, so a symmetric posterior
has ``|G|`` equivalent modes whose plain mean collapses. With ``group`` given, every grid point is
replaced by its symmetry copy nearest the MAP estimate before averaging, and distances (credible
radius, mass outside a cone, candidate separation, expected loss) are symmetric distances
``min_g d(R_hat, g^T R)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from cryopose.runtime import numba_ready
from cryopose.so3.procrustes import project_to_so3
from cryopose.so3.symmetry import point_group

__all__ = [
    "MULTIMODAL_CONE_DEG",
    "PoseEstimates",
    "estimate_grid_spacing_deg",
    "marginalize_shifts",
    "rotation_log_posterior",
    "summarize_posterior",
    "top_candidates",
]

MULTIMODAL_CONE_DEG = 20.0
"""Half-angle (degrees) of the cone whose outside posterior mass flags multimodality."""

# Weights (relative to the largest) below which a grid point is left out of the sums.
_NEGLIGIBLE_WEIGHT = 1e-14
# exp(x) for x below this is below 1e-30 of the peak: treated as exactly 0. Clamping first keeps
# exp on its fast path (x86 exp of arguments that underflow, i.e. most of a peaked posterior's
# grid, runs ~10x slower than of normal ones).
_EXP_FLOOR = -69.0


def _exp_relative(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` in place for ``x <= 0``, with ``exp(x) = 0`` exactly for ``x < -69``."""
    below = x < _EXP_FLOOR
    return x.clamp_(min=_EXP_FLOOR).exp_().masked_fill_(below, 0.0)
# Elements of the largest temporary ([rows, G, T] or [rows, G]) built per chunk: 2^25 (~100
# particles of a 36,864-point grid with the 9-wide rotation factor) summarises 2,000 particles
# 23% faster than 2^23 (fewer, larger passes) for ~130 MB of float32 temporaries.
_CHUNK_ELEMENTS = 1 << 25


@dataclass
class PoseEstimates:
    """Per-particle pose estimates and posterior summaries (one row per particle).

    Attributes
    ----------
    rotations_mle, rotations_map, rotations_mmse : torch.Tensor
        ``[B, 3, 3]`` cryopose rotation matrices of the maximum-likelihood, maximum a posteriori
        and posterior-mean (MMSE, chordal loss) estimates.
    shifts_mle_px, shifts_map_px, shifts_mmse_px : torch.Tensor
        ``[B, 2]`` shifts in pixels (``(x, y)``, same meaning as the input ``shifts_px``) at the
        MLE and MAP grid points, and the posterior mean shift.
    shift_rms_px : torch.Tensor
        ``[B]`` posterior root-mean-square deviation of the shift from its mean, pixels.
    expected_loss : torch.Tensor
        ``[B]`` posterior expected squared chordal loss ``E ||R - R_mmse||_F^2`` of the MMSE
        estimate (dimensionless, in [0, 8]; ``6 - 2 tr(R_mmse^T M)`` without a point group).
    max_probability : torch.Tensor
        ``[B]`` largest posterior probability of one rotation grid point, shifts marginalised
        (RELION's ``rlnMaxValueProbDistribution`` up to RELION's not marginalising shifts).
    credible_radius_deg : torch.Tensor
        ``[B]`` smallest geodesic radius (degrees) of a cone about the MMSE estimate holding
        ``credible_mass`` of the posterior (grid points within the radius; resolution 0.05 deg,
        rounded up; 0 when one grid point at the estimate holds the mass).
    mass_outside_20deg : torch.Tensor
        ``[B]`` posterior mass farther than 20 deg from the MMSE estimate (near 1 when the
        estimate sits between distant modes).
    map_mass_outside_20deg : torch.Tensor
        ``[B]`` posterior mass farther than 20 deg from the MAP estimate: the mass not in the
        main mode (0.5 for two equal, distant modes).
    top_candidates : torch.Tensor
        ``[B, K]`` (int64) grid indices of distinct high-posterior points, best first: greedy by
        posterior mass, skipping points within ``min_separation_deg`` of a chosen one; ``-1``
        pads rows with fewer than ``K`` distinct points.
    index_mle, index_map : torch.Tensor
        ``[B]`` (int64) rotation grid indices of the MLE and MAP.
    log_evidence : torch.Tensor
        ``[B]`` float64 ``log sum_{g, j} q_g pi(R_g) s_j exp(l[g, j])`` (includes the
        per-image constant of the log-likelihoods).
    """

    rotations_mle: torch.Tensor
    rotations_map: torch.Tensor
    rotations_mmse: torch.Tensor
    shifts_mle_px: torch.Tensor
    shifts_map_px: torch.Tensor
    shifts_mmse_px: torch.Tensor
    shift_rms_px: torch.Tensor
    expected_loss: torch.Tensor
    max_probability: torch.Tensor
    credible_radius_deg: torch.Tensor
    mass_outside_20deg: torch.Tensor
    map_mass_outside_20deg: torch.Tensor
    top_candidates: torch.Tensor
    index_mle: torch.Tensor
    index_map: torch.Tensor
    log_evidence: torch.Tensor

    def __len__(self) -> int:
        return int(self.rotations_mmse.shape[0])

    def to(self, device: torch.device | str) -> PoseEstimates:
        """Copy with every tensor on ``device``."""
        return PoseEstimates(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def take(self, rows: torch.Tensor) -> PoseEstimates:
        """The estimates of particles ``rows`` (int64 indices, any order)."""
        return PoseEstimates(**{f.name: getattr(self, f.name)[rows.to(
            getattr(self, f.name).device)] for f in fields(self)})

    @staticmethod
    def concatenate(parts: Sequence[PoseEstimates]) -> PoseEstimates:
        """Join estimates of consecutive particle batches (``top_candidates`` must agree in K)."""
        if len(parts) == 0:
            raise ValueError("parts: expected at least one PoseEstimates to concatenate, got 0")
        names = [f.name for f in fields(PoseEstimates)]
        return PoseEstimates(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _angle_from_trace(trace: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (radians) from ``tr(R1^T R2)`` (callers pass float64 traces)."""
    return torch.acos(((trace - 1.0) * 0.5).clamp(-1.0, 1.0))


def _trace_threshold(angle_deg: float) -> float:
    """``tr(R1^T R2)`` at geodesic angle ``angle_deg``: angle <= a  <=>  trace >= this."""
    return 1.0 + 2.0 * math.cos(math.radians(min(max(angle_deg, 0.0), 180.0)))


def estimate_grid_spacing_deg(rotations: torch.Tensor, *, n_probe: int = 256) -> float:
    """Typical spacing of a rotation grid: the median nearest-neighbour geodesic angle.

    Deterministic: the probes are ``n_probe`` evenly spaced grid points, each compared with the
    whole grid (cost ``n_probe x G``).

    Parameters
    ----------
    rotations : torch.Tensor
        ``[G, 3, 3]`` grid rotations (``G >= 2``).
    n_probe : int
        Number of probe points.

    Returns
    -------
    float
        Spacing in degrees (for a HEALPix grid of order k about ``0.9 x 60 / 2^k``; pass
        ``SO3Grid.inplane_step_deg`` instead where available).
    """
    if rotations.ndim != 3 or tuple(rotations.shape[1:]) != (3, 3) or rotations.shape[0] < 2:
        raise ValueError(
            f"rotations: expected a [G, 3, 3] grid with G >= 2, got {tuple(rotations.shape)}"
        )
    n = rotations.shape[0]
    flat = rotations.reshape(n, 9).to(torch.float64)
    probe = torch.linspace(0, n - 1, min(n_probe, n), device=flat.device).round().long().unique()
    trace = flat[probe] @ flat.T
    trace[torch.arange(probe.numel(), device=flat.device), probe] = -math.inf
    nearest = _angle_from_trace(trace.amax(dim=1))
    return math.degrees(float(nearest.median()))


def marginalize_shifts(
    log_likelihood: torch.Tensor, log_shift_prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotation log-likelihoods with the shifts summed out: ``log sum_j s_j exp(l[..., j])``.

    Parameters
    ----------
    log_likelihood : torch.Tensor
        ``[B, G, T]`` log-likelihoods.
    log_shift_prior : torch.Tensor, optional
        ``[T]`` or ``[B, T]`` log-masses of the shifts (normalised or not); default uniform
        ``-log T``.

    Returns
    -------
    torch.Tensor
        ``[B, G]`` in the input's dtype (for one shift, a view of the input).
    """
    if log_likelihood.ndim != 3:
        raise ValueError(
            f"log_likelihood: expected [B, G, T], got shape {tuple(log_likelihood.shape)}"
        )
    b, g, t = log_likelihood.shape
    lsp = _log_shift_prior(log_shift_prior, b, t, log_likelihood.device)
    if t == 1:  # one shift: nothing to sum (its normalised log-mass is 0); a view
        return log_likelihood[..., 0]
    out = torch.empty(b, g, dtype=log_likelihood.dtype, device=log_likelihood.device)
    # In the input's dtype: logsumexp subtracts the maximum first, so float32 values lose
    # nothing that their own rounding had not (the output is in that dtype anyway); a uniform
    # shift prior is one constant, subtracted after the sum.
    uniform = log_shift_prior is None
    rows = max(1, _CHUNK_ELEMENTS // max(1, g * t))
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        x = log_likelihood[start:stop]
        if uniform:
            out[start:stop] = torch.logsumexp(x, dim=-1).sub_(math.log(t))
        else:
            x = x + lsp[start:stop, None, :].to(x.dtype)
            out[start:stop] = torch.logsumexp(x, dim=-1)
    return out


def _log_shift_prior(
    log_shift_prior: torch.Tensor | None, b: int, t: int, device: torch.device
) -> torch.Tensor:
    """``[B, T]`` float64 normalised log shift masses."""
    if log_shift_prior is None:
        return torch.full((b, t), -math.log(t), dtype=torch.float64, device=device)
    lsp = torch.as_tensor(log_shift_prior).to(dtype=torch.float64, device=device)
    if lsp.shape == (t,):
        lsp = lsp.expand(b, t)
    if lsp.shape != (b, t):
        raise ValueError(
            f"log_shift_prior: expected [T] = [{t}] or [B, T] = [{b}, {t}], got {tuple(lsp.shape)}"
        )
    return lsp - torch.logsumexp(lsp, dim=-1, keepdim=True)


def _per_grid(
    value: torch.Tensor | None, name: str, b: int, g: int, device: torch.device
) -> torch.Tensor | None:
    """Validate a ``[G]`` or ``[B, G]`` tensor; return float64 ``[1 or B, G]`` (or None)."""
    if value is None:
        return None
    v = torch.as_tensor(value).to(dtype=torch.float64, device=device)
    if v.shape == (g,):
        return v[None]
    if v.shape == (b, g):
        return v
    raise ValueError(f"{name}: expected [G] = [{g}] or [B, G] = [{b}, {g}], got {tuple(v.shape)}")


def rotation_log_posterior(
    log_likelihood: torch.Tensor,
    *,
    log_prior: torch.Tensor | None = None,
    log_quadrature_weights: torch.Tensor | None = None,
    log_shift_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised log posterior mass of each rotation grid point, shifts marginalised.

    Parameters
    ----------
    log_likelihood : torch.Tensor
        ``[B, G, T]`` (or ``[B, G]``: no shift search) log-likelihoods.
    log_prior, log_quadrature_weights : torch.Tensor, optional
        ``[G]`` or ``[B, G]`` log prior density (w.r.t. normalised Haar) and log quadrature
        weights (default equal weights).
    log_shift_prior : torch.Tensor, optional
        ``[T]`` or ``[B, T]`` log shift masses (default uniform).

    Returns
    -------
    torch.Tensor
        ``[B, G]`` float64 ``log p_g`` with ``logsumexp = 0`` per row.
    """
    ll = log_likelihood[..., None] if log_likelihood.ndim == 2 else log_likelihood
    b, g, _ = ll.shape
    x = marginalize_shifts(ll, log_shift_prior).to(torch.float64)
    for extra in (
        _per_grid(log_prior, "log_prior", b, g, x.device),
        _per_grid(log_quadrature_weights, "log_quadrature_weights", b, g, x.device),
    ):
        if extra is not None:
            x = x + extra
    return x - torch.logsumexp(x, dim=1, keepdim=True)


def top_candidates(
    log_likelihood: torch.Tensor,
    grid,
    *,
    log_prior: torch.Tensor | None = None,
    group: torch.Tensor | str | None = None,
    n_candidates: int = 3,
    min_separation_deg: float | None = None,
) -> torch.Tensor:
    """The distinct top candidates of :func:`summarize_posterior` alone (``[B, K]`` grid
    indices, ordered by posterior mass, missing ones replaced by the first): what local
    refinement starts from, without the summaries it would discard.

    Parameters
    ----------
    log_likelihood : torch.Tensor
        ``[B, G, T]`` or ``[B, G]`` log-likelihoods over a shared grid.
    grid : SO3Grid
        The grid (its weights are the quadrature weights, its in-plane step sets the default
        separation, twice the step, as in :func:`summarize_posterior`).
    log_prior : torch.Tensor, optional
        ``[G]`` or ``[B, G]`` log prior density w.r.t. normalised Haar measure.
    group : torch.Tensor or str, optional
        Point group (candidates are distinct modulo the group).
    n_candidates : int
        ``K``.
    min_separation_deg : float, optional
        Minimum symmetric geodesic separation of the candidates.
    """
    ll = log_likelihood[..., None] if log_likelihood.ndim == 2 else log_likelihood
    b, g, _ = ll.shape
    log_q = torch.log(grid.weights.to(dtype=torch.float64, device=ll.device))
    if min_separation_deg is None:
        min_separation_deg = 2.0 * float(grid.inplane_step_deg)
    if isinstance(group, str):
        group = point_group(group, dtype=torch.float64, device=ll.device)
    if group is not None and group.shape[0] == 1:
        group = None
    group = None if group is None else group.to(dtype=torch.float64, device=ll.device)
    flat = grid.matrices.reshape(g, 9).to(dtype=torch.float64, device=ll.device)
    separation = _trace_threshold(float(min_separation_deg))
    out = []
    rows = max(1, _CHUNK_ELEMENTS // (g * max(9, ll.shape[-1])))
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        lp = None if log_prior is None else (
            log_prior if log_prior.ndim == 1 else log_prior[start:stop])
        # unnormalised log posterior (the ranking needs no normalisation, and a term that is
        # the same for every grid point changes no rank: a flat prior and equal weights are
        # not added, and one shift is read in place)
        log_p = marginalize_shifts(ll[start:stop])
        mass = log_q if lp is None else log_q + lp.to(torch.float64)  # [G] or [r, G]
        if bool((mass.amax(-1) > mass.amin(-1)).any()):
            log_p = log_p.to(torch.float64) + mass
        finite = torch.isfinite(log_p.amax(dim=1))  # NaN, +inf or all -inf are not
        if not bool(finite.all()):
            bad = start + int(torch.nonzero(~finite)[0, 0])
            raise ValueError(
                f"log_likelihood: particle {bad} has NaN, +inf or only -inf values (with the "
                "log-prior); expected finite values or -inf with at least one finite"
            )
        cand = _greedy_candidates(flat, log_p, group, int(n_candidates), separation)
        out.append(torch.where(cand < 0, cand[:, :1], cand))
    return torch.cat(out)


class _GridPlusExtra:
    """Rotations of a chunk: the shared grid ``[G, 9]`` followed by per-particle extra points
    ``[r, E, 9]`` (point ``g < G`` is grid row ``g``, point ``G + e`` is particle b's extra
    ``e``), so a refined quadrature never copies the grid once per particle."""

    ndim = 0  # neither the shared (2) nor the per-particle (3) tensor layout

    def __init__(self, grid: torch.Tensor, extra: torch.Tensor):
        self.grid, self.extra = grid, extra
        self.g = grid.shape[0]
        self.dtype = grid.dtype

    def at(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Rotations of points ``col`` of particles ``row`` (broadcast), with the rows' trailing
        shape (``[..., 9]`` here, ``[..., 3, 3]`` for matrices)."""
        row, col = torch.broadcast_tensors(row, col)
        if self.g == 0:
            return self.extra[row, col]
        from_grid = self.grid[col.clamp(max=self.g - 1)]
        if self.extra.shape[1] == 0:
            return from_grid
        from_extra = self.extra[row, (col - self.g).clamp(min=0)]
        in_grid = (col < self.g).reshape(*col.shape, *([1] * (from_grid.ndim - col.ndim)))
        return torch.where(in_grid, from_grid, from_extra)

    def subset(self, rows: torch.Tensor) -> _GridPlusExtra:
        return _GridPlusExtra(self.grid, self.extra[rows])


class _Rotations:
    """Shared ``[G, 3, 3]``, per-particle ``[B, G, 3, 3]``, or shared grid plus per-particle
    extra (``([G0, 3, 3], [B, E, 3, 3])``, ``G = G0 + E``) rotations in the work dtype."""

    def __init__(
        self, rotations, b: int, g: int, device: torch.device, dtype: torch.dtype
    ):
        self.mixed = isinstance(rotations, tuple)
        if self.mixed:
            grid, extra = rotations
            if (grid.ndim != 3 or grid.shape[1:] != (3, 3) or extra.ndim != 4
                    or extra.shape[0] != b or extra.shape[2:] != (3, 3)
                    or grid.shape[0] + extra.shape[1] != g):
                raise ValueError(
                    f"rotations: expected ([G0, 3, 3], [B, E, 3, 3]) with B = {b}, "
                    f"G0 + E = {g}, got {tuple(grid.shape)} and {tuple(extra.shape)}"
                )
            self.shared = False
            self.flat = grid.reshape(-1, 9).to(dtype=dtype, device=device)
        elif rotations.ndim == 3 and tuple(rotations.shape) == (g, 3, 3):
            self.shared = True
        elif rotations.ndim == 4 and tuple(rotations.shape) == (b, g, 3, 3):
            self.shared = False
        else:
            raise ValueError(
                f"rotations: expected [G, 3, 3] = [{g}, 3, 3] or [B, G, 3, 3] = [{b}, {g}, 3, 3] "
                f"matching log_likelihood, got {tuple(rotations.shape)}"
            )
        self.source = rotations
        self.device = device
        self.dtype = dtype
        if self.shared:
            self.flat = rotations.reshape(g, 9).to(dtype=dtype, device=device)

    def chunk(self, start: int, stop: int):
        """``[G, 9]`` (shared), ``[r, G, 9]`` or a :class:`_GridPlusExtra` for particles
        start:stop (work dtype)."""
        if self.shared:
            return self.flat
        if self.mixed:
            part = self.source[1][start:stop]
            part = part.reshape(part.shape[0], part.shape[1], 9)
            return _GridPlusExtra(self.flat, part.to(dtype=self.dtype, device=self.device))
        part = self.source[start:stop]
        part = part.reshape(part.shape[0], part.shape[1], 9)
        return part.to(dtype=self.dtype, device=self.device)

    @staticmethod
    def weighted_sum(flat, weights: torch.Tensor) -> torch.Tensor:
        """``sum_g w[b, g] R_g`` as ``[r, 9]`` (one GEMM / batched GEMM)."""
        if isinstance(flat, _GridPlusExtra):
            return weights[:, : flat.g] @ flat.grid + torch.bmm(
                weights[:, None, flat.g :], flat.extra
            )[:, 0]
        if flat.ndim == 2:
            return weights @ flat
        return torch.bmm(weights[:, None, :], flat)[:, 0]

    @staticmethod
    def traces(flat, probes: torch.Tensor) -> torch.Tensor:
        """``tr(P_b^T R_g) = <P_b, R_g>_F`` for probes ``[r, 9]`` -> ``[r, G]``."""
        if isinstance(flat, _GridPlusExtra):
            return torch.cat(
                [probes @ flat.grid.T, torch.bmm(flat.extra, probes[:, :, None])[..., 0]], dim=1
            )
        if flat.ndim == 2:
            return probes @ flat.T
        return torch.bmm(flat, probes[:, :, None])[..., 0]

    @staticmethod
    def gather(flat, index: torch.Tensor) -> torch.Tensor:
        """``R_{index[b]}`` as ``[r, 9]``."""
        rows = torch.arange(index.shape[0], device=index.device)
        if isinstance(flat, _GridPlusExtra):
            return flat.at(rows, index)
        if flat.ndim == 2:
            return flat[index]
        return flat[rows, index]

    @staticmethod
    def at(flat, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Rotations ``[n, 9]`` of the listed (particle, point) pairs."""
        if isinstance(flat, _GridPlusExtra):
            return flat.at(row, col)
        if flat.ndim == 2:
            return flat[col]
        return flat[row, col]


def _symmetric_traces(
    flat: torch.Tensor, reference: torch.Tensor, group: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``max_h tr(Ref_b^T h^T R_g)`` ``[r, G]`` and the maximising ``h`` (None without a group).

    ``tr(Ref^T h^T R) = <h Ref, R>_F``, so the copy ``h^T R`` nearest ``Ref`` comes from one
    GEMM against the ``r |G|`` probes ``h Ref`` and a max over the group.
    """
    ref = reference.reshape(-1, 3, 3)
    if group is None:
        return _Rotations.traces(flat, ref.reshape(-1, 9)), None
    r, h = ref.shape[0], group.shape[0]
    probes = (group[None] @ ref[:, None]).reshape(r, h, 9)
    if isinstance(flat, _GridPlusExtra):
        grid_tr = (probes.reshape(r * h, 9) @ flat.grid.T).reshape(r, h, flat.g).max(dim=1)
        extra_tr = torch.bmm(flat.extra, probes.transpose(1, 2)).max(dim=2)
        return (torch.cat([grid_tr[0], extra_tr[0]], dim=1),
                torch.cat([grid_tr[1], extra_tr[1]], dim=1))
    if flat.ndim == 2:
        traces = (probes.reshape(r * h, 9) @ flat.T).reshape(r, h, flat.shape[0])
        return traces.max(dim=1)
    return torch.bmm(flat, probes.transpose(1, 2)).max(dim=2)


def _greedy_candidates(
    flat: torch.Tensor,
    log_p: torch.Tensor,
    group: torch.Tensor | None,
    n_candidates: int,
    separation_trace: float,
) -> torch.Tensor:
    """Greedy distinct candidates ``[r, K]`` (grid indices, -1 padded).

    The greedy pass runs on the ``M`` most probable points of each row (traces against each
    chosen candidate, ``[r, M]``); rows where those ``M`` points hold fewer than ``K``
    distinct candidates (a posterior so sharp that its top ``M`` points lie within the
    separation of the first) are redone over the whole grid.
    """
    r, g = log_p.shape
    device = log_p.device
    m = min(g, max(64, 16 * n_candidates))
    top_log_p, top_index = log_p.topk(m, dim=1)
    if isinstance(flat, _GridPlusExtra):
        top_rot = flat.at(torch.arange(r, device=device)[:, None].expand(r, m), top_index)
    elif flat.ndim == 2:
        top_rot = flat[top_index]
    else:
        top_rot = torch.gather(flat, 1, top_index[..., None].expand(r, m, 9))
    available = top_log_p > -math.inf
    candidates = torch.full((r, n_candidates), -1, dtype=torch.long, device=device)
    rows = torch.arange(r, device=device)
    for k in range(n_candidates):
        ok = available.any(dim=1)
        first = available.to(torch.uint8).argmax(dim=1)
        candidates[:, k] = torch.where(ok, top_index[rows, first], -1)
        if k + 1 < n_candidates:
            chosen = top_rot[rows, first]  # [r, 9]
            near = _pairwise_symmetric_traces(top_rot, group, chosen[:, None])[:, :, 0]
            available &= ~(near >= separation_trace)
        available[rows, first] = False
    short = (candidates < 0).any(dim=1) & (top_log_p[:, -1] > -math.inf)
    if m < g and bool(short.any()):
        redo = torch.nonzero(short)[:, 0]
        candidates[redo] = _greedy_full(
            flat if isinstance(flat, torch.Tensor) and flat.ndim == 2 else (
                flat.subset(redo) if isinstance(flat, _GridPlusExtra) else flat[redo]),
            log_p[redo], group, n_candidates,
            separation_trace,
        )
    return candidates


def _pairwise_symmetric_traces(
    points: torch.Tensor, group: torch.Tensor | None, others: torch.Tensor | None = None
) -> torch.Tensor:
    """``max_h <h P_i, Q_j>_F`` for points ``[r, M, 9]`` and ``others`` ``[r, L, 9]`` (default
    the points themselves) -> ``[r, M, L]``."""
    others = points if others is None else others
    r, m, _ = points.shape
    if group is None:
        return torch.bmm(points, others.transpose(1, 2))
    mats = points.reshape(r, m, 3, 3)
    probes = (group[None, :, None] @ mats[:, None]).reshape(r, -1, 9)  # [r, h*M, 9]
    traces = torch.bmm(probes, others.transpose(1, 2)).reshape(r, group.shape[0], m, -1)
    return traces.amax(dim=1)


def _greedy_full(
    flat: torch.Tensor,
    log_p: torch.Tensor,
    group: torch.Tensor | None,
    n_candidates: int,
    separation_trace: float,
) -> torch.Tensor:
    """Greedy distinct candidates over the whole grid (fallback of :func:`_greedy_candidates`)."""
    r = log_p.shape[0]
    rows = torch.arange(r, device=log_p.device)
    available = log_p.clone()
    candidates = torch.full((r, n_candidates), -1, dtype=torch.long, device=log_p.device)
    for k in range(n_candidates):
        best, best_index = available.max(dim=1)
        ok = best > -math.inf
        candidates[:, k] = torch.where(ok, best_index, -1)
        if k + 1 == n_candidates or not bool(ok.any()):
            break
        chosen = _Rotations.gather(flat, best_index).reshape(r, 3, 3)
        near, _ = _symmetric_traces(flat, chosen, group)
        suppress = (near >= separation_trace) & ok[:, None]
        suppress[rows, best_index] = True
        available.masked_fill_(suppress, -math.inf)
    return candidates


def _check_probability(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected a probability in (0, 1], got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Main entry point
# --------------------------------------------------------------------------------------------


def summarize_posterior(
    log_likelihood: torch.Tensor,
    rotations: torch.Tensor | object,
    shifts_px: torch.Tensor | None = None,
    *,
    log_prior: torch.Tensor | None = None,
    log_quadrature_weights: torch.Tensor | None = None,
    log_shift_prior: torch.Tensor | None = None,
    group: torch.Tensor | str | None = None,
    n_candidates: int = 4,
    min_separation_deg: float | None = None,
    credible_mass: float = 0.9,
) -> PoseEstimates:
    """Posterior over (rotation grid x shift grid) and its estimators and uncertainties.

    Everything is computed in float64 log space, in chunks of particles so temporaries stay
    around ``2^25`` elements; process large data sets in batches and join them with
    :meth:`PoseEstimates.concatenate`.

    Parameters
    ----------
    log_likelihood : torch.Tensor
        ``[B, G, T]`` log-likelihoods ``log p(y_b | R_g, t_j)`` up to a per-image constant
        (``[B, G]`` is read as ``T = 1``). ``-inf`` excludes a point; NaN and ``+inf`` are
        errors.
    rotations : torch.Tensor or tuple or SO3Grid
        ``[G, 3, 3]`` shared grid rotations, ``[B, G, 3, 3]`` per-particle rotation sets (local
        refinement), a pair ``([G0, 3, 3] shared, [B, E, 3, 3] per particle)`` with
        ``G = G0 + E`` (a grid refined by extra points per particle, e.g. Laplace cubatures),
        or a :class:`cryopose.so3.grids.SO3Grid` (its weights are used as quadrature weights
        and its in-plane step as the grid spacing unless given).
    shifts_px : torch.Tensor, optional
        ``[T, 2]`` or per-particle ``[B, T, 2]`` candidate shifts in pixels; ``None`` means one
        zero shift (``T`` must then be 1).
    log_prior : torch.Tensor, optional
        ``[G]`` or ``[B, G]`` log prior density of the grid rotations w.r.t. normalised Haar
        measure (e.g. ``prior.log_prior(grid.matrices)``); default uniform (0).
    log_quadrature_weights : torch.Tensor, optional
        ``[G]`` or ``[B, G]`` log Haar mass of each grid point's cell (default equal weights).
    log_shift_prior : torch.Tensor, optional
        ``[T]`` or ``[B, T]`` log prior masses of the shifts (default uniform).
    group : torch.Tensor or str, optional
        ``[|G|, 3, 3]`` point-group matrices or a symbol (``"C4"``, ``"D7"``, ``"I"`` ...);
        poses ``R`` and ``g^T R`` are treated as equal.
    n_candidates : int
        Number ``K`` of distinct top candidates to return.
    min_separation_deg : float, optional
        Minimum geodesic (symmetric) separation of the candidates in degrees; default twice the
        grid spacing (the in-plane step of an SO3Grid, else
        :func:`estimate_grid_spacing_deg` of the first particle's rotations).
    credible_mass : float
        Posterior mass of the credible cone (default 0.9).

    Returns
    -------
    PoseEstimates
        Float fields in the rotations' floating dtype (``log_evidence`` always float64), on
        the log-likelihoods' device.
    """
    grid_weights = getattr(rotations, "weights", None)
    inplane_step = getattr(rotations, "inplane_step_deg", None)
    rotations = getattr(rotations, "matrices", rotations)
    mixed = isinstance(rotations, tuple) and len(rotations) == 2 and all(
        isinstance(x, torch.Tensor) for x in rotations)
    if not (isinstance(rotations, torch.Tensor) or mixed):
        raise ValueError(f"rotations: expected a tensor, a (grid, extra) pair or an SO3Grid, "
                         f"got {type(rotations)}")
    if not isinstance(log_likelihood, torch.Tensor) or log_likelihood.ndim not in (2, 3):
        shape = getattr(log_likelihood, "shape", type(log_likelihood).__name__)
        raise ValueError(f"log_likelihood: expected a [B, G, T] or [B, G] tensor, got {shape}")
    ll_all = log_likelihood[..., None] if log_likelihood.ndim == 2 else log_likelihood
    b, g, t = ll_all.shape
    if b == 0 or g == 0 or t == 0:
        raise ValueError(f"log_likelihood: expected non-empty [B, G, T], got {tuple(ll_all.shape)}")
    device = ll_all.device
    first_rot = rotations[0] if mixed else rotations
    out_dtype = first_rot.dtype if first_rot.is_floating_point() else torch.get_default_dtype()
    work = ll_all.dtype if ll_all.dtype in (torch.float32, torch.float64) else torch.float64
    rots = _Rotations(rotations, b, g, device, work)
    if log_quadrature_weights is None and grid_weights is not None:
        log_quadrature_weights = torch.log(grid_weights.to(torch.float64))

    # Shifts.
    if shifts_px is None:
        if t != 1:
            raise ValueError(f"shifts_px: required when log_likelihood has T = {t} > 1 shifts")
        shifts64 = torch.zeros(1, 2, dtype=torch.float64, device=device)
    else:
        shifts64 = torch.as_tensor(shifts_px).to(dtype=torch.float64, device=device)
        if shifts64.shape not in ((t, 2), (b, t, 2)):
            raise ValueError(
                f"shifts_px: expected [T, 2] = [{t}, 2] or [B, T, 2] = [{b}, {t}, 2], "
                f"got {tuple(shifts64.shape)}"
            )
    lsp = _log_shift_prior(log_shift_prior, b, t, device)
    lp = _per_grid(log_prior, "log_prior", b, g, device)
    lq = _per_grid(log_quadrature_weights, "log_quadrature_weights", b, g, device)
    lp = None if lp is None else lp.to(work)
    lq = None if lq is None else lq.to(work)

    # Options.
    if isinstance(group, str):
        group = point_group(group, dtype=work, device=device)
    elif group is not None:
        if group.ndim != 3 or tuple(group.shape[1:]) != (3, 3) or group.shape[0] < 1:
            raise ValueError(f"group: expected [|G|, 3, 3] matrices, got {tuple(group.shape)}")
        group = group.to(dtype=work, device=device)
    if group is not None and group.shape[0] == 1:
        group = None
    credible_mass = _check_probability(credible_mass, "credible_mass")
    n_candidates = int(n_candidates)
    if n_candidates < 1:
        raise ValueError(f"n_candidates: expected an integer >= 1, got {n_candidates}")
    if min_separation_deg is None:
        if inplane_step is not None:
            min_separation_deg = 2.0 * float(inplane_step)
        elif g >= 2:
            first = rotations if rots.shared else rotations[0]
            if mixed:
                first = rotations[0]  # the shared grid's spacing
            min_separation_deg = 2.0 * estimate_grid_spacing_deg(first)
        else:
            min_separation_deg = 0.0
    min_separation_deg = float(min_separation_deg)
    if not (min_separation_deg >= 0.0):
        raise ValueError(f"min_separation_deg: expected >= 0 degrees, got {min_separation_deg}")
    separation_trace = _trace_threshold(min_separation_deg)

    outputs: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(PoseEstimates)}
    width = max(t, 9, 1 if group is None else group.shape[0])
    # (the credible-radius histogram is [rows, _RADIUS_BINS]: bounded too, for small G)
    rows = max(1, min(_CHUNK_ELEMENTS // (g * width), _CHUNK_ELEMENTS // _RADIUS_BINS))
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        chunk = _summarize_chunk(
            ll_all[start:stop],
            rots.chunk(start, stop),
            shifts64 if shifts64.ndim == 2 else shifts64[start:stop],
            lsp[start:stop],
            None if lp is None else (lp if lp.shape[0] == 1 else lp[start:stop]),
            None if lq is None else (lq if lq.shape[0] == 1 else lq[start:stop]),
            group,
            n_candidates,
            separation_trace,
            credible_mass,
            start,
        )
        for name, value in chunk.items():
            keep = value.dtype == torch.long or name == "log_evidence"
            outputs[name].append(value if keep else value.to(out_dtype))
    return PoseEstimates(**{name: torch.cat(values) for name, values in outputs.items()})


def _summarize_chunk(
    ll: torch.Tensor,
    flat: torch.Tensor,
    shifts: torch.Tensor,
    lsp: torch.Tensor,
    lp: torch.Tensor | None,
    lq: torch.Tensor | None,
    group: torch.Tensor | None,
    n_candidates: int,
    separation_trace: float,
    credible_mass: float,
    offset: int,
) -> dict[str, torch.Tensor]:
    """All summaries for one chunk of particles.

    Bulk ``[r, G]`` passes run in the log-likelihood's dtype (float32 is safe: only
    differences to the row maximum are exponentiated); per-particle results in float64.
    """
    r, g, t = ll.shape
    device = ll.device
    work = flat.dtype
    rows = torch.arange(r, device=device)

    # MLE over (g, t); everything below is relative to each row's maximum ``ref`` (exact
    # offsets, so +-1e6 in float32 loses nothing), added back in float64 for the evidence.
    ref, g_mle_t = ll.reshape(r, g * t).to(work).max(dim=1)
    ref = torch.where(torch.isfinite(ref), ref, 0.0)
    ll = ll.to(work) - ref[:, None, None]
    ref64 = ref.to(torch.float64)
    if lp is None and t == 1:
        g_map_t = g_mle_t
    else:
        score = ll + lsp[:, None, :].to(work) if t > 1 else ll.clone()
        if lp is not None:
            score += lp[:, :, None]
        g_map_t = score.reshape(r, g * t).argmax(dim=1)
        del score
    g_mle, t_mle = g_mle_t // t, g_mle_t % t
    g_map, t_map = g_map_t // t, g_map_t % t

    # Unnormalised rotation weights w[g] = exp(log_joint[g] - peak), shifts marginalised.
    e = None
    if t == 1:
        log_joint = ll[..., 0] if (lp is None and lq is None) else ll[..., 0].clone()
    else:
        peak_t = ll.amax(dim=-1, keepdim=True)
        peak_t = torch.where(torch.isfinite(peak_t), peak_t, 0.0)
        x = (ll - peak_t).add_(lsp[:, None, :].to(work))
        e = _exp_relative(x)
        s_t = e.sum(dim=-1)
        log_joint = s_t.log().add_(peak_t[..., 0])
    if lp is not None:
        log_joint += lp
    if lq is not None:
        log_joint += lq
    peak = log_joint.amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(peak).all()):
        bad = offset + int(torch.nonzero(~torch.isfinite(peak[:, 0]))[0, 0])
        raise ValueError(
            f"log_likelihood: particle {bad} has NaN, +inf or only -inf values (with the "
            "log-prior); expected finite values or -inf with at least one finite"
        )
    w = _exp_relative(torch.sub(log_joint, peak))
    total = w.sum(dim=1)
    if not bool(torch.isfinite(total).all()):
        bad = offset + int(torch.nonzero(~torch.isfinite(total))[0, 0])
        raise ValueError(f"log_likelihood: particle {bad} has NaN values; expected finite or -inf")
    total64 = total.to(torch.float64)
    log_evidence = ref64 + peak[:, 0].to(torch.float64) + total64.log()
    p_max = 1.0 / total64  # the largest weight is exp(0) = 1

    # Shift posterior P(t) = sum_g p_g e[g, t] / s[g]; MMSE shift and its spread.
    if e is None:
        p_shift = torch.ones(r, 1, dtype=torch.float64, device=device)
    else:
        cond = torch.where(s_t > 0, w / torch.where(s_t > 0, s_t, 1.0), 0.0)
        p_shift = torch.einsum("rg,rgt->rt", cond, e).to(torch.float64) / total64[:, None]
        del e, cond, x
    if shifts.ndim == 2:
        shift_mean = p_shift @ shifts
        shift_sq = p_shift @ (shifts * shifts).sum(-1)
        shift_mle, shift_map = shifts[t_mle], shifts[t_map]
    else:
        shift_mean = torch.bmm(p_shift[:, None, :], shifts)[:, 0]
        shift_sq = (p_shift * (shifts * shifts).sum(-1)).sum(-1)
        shift_mle, shift_map = shifts[rows, t_mle], shifts[rows, t_map]
    shift_rms = torch.sqrt((shift_sq - (shift_mean * shift_mean).sum(-1)).clamp_min(0.0))

    # The support that matters: weights above 1e-14 of the largest (the rest hold less than
    # G * 1e-14 of the mass). Sums below run over this list of (row, grid index) pairs; when
    # most points matter the list is all of them and "gathering" is a reshape.
    keep = w > _NEGLIGIBLE_WEIGHT
    dense = 8 * int(keep.sum()) > r * g
    # dense rows without symmetry on the CPU: the traces against the MAP and the MMSE
    # estimate are made on the fly by one numba pass per row (no [r, G] trace arrays, no
    # pair lists)
    fused = (dense and group is None and device.type == "cpu"
             and (isinstance(flat, _GridPlusExtra) or flat.ndim == 2) and numba_ready())
    linear = None
    if fused:
        sig_row = sig_col = None
    elif dense:
        sig_row = torch.arange(r, device=device).repeat_interleave(g)
        sig_col = torch.arange(g, device=device).repeat(r)
    else:
        linear = torch.nonzero(keep.reshape(-1))[:, 0]
        sig_row, sig_col = linear // g, linear % g
    del keep
    points = None if dense else _Rotations.at(flat, sig_row, sig_col)

    def take(values: torch.Tensor) -> torch.Tensor:
        flat_values = values.reshape(-1)
        return flat_values if linear is None else flat_values.index_select(0, linear)

    def traces_at(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Symmetric traces (and copy index) against ``reference`` at the listed points."""
        if dense:
            tr, index = _symmetric_traces(flat, reference, group)
            return take(tr), (None if index is None else take(index))
        ref = reference.reshape(r, 3, 3)
        if group is None:
            return (points * ref.reshape(r, 9)[sig_row]).sum(-1), None
        best = best_index = None
        for k in range(group.shape[0]):
            tr = (points * (group[k] @ ref).reshape(r, 9)[sig_row]).sum(-1)
            if best is None:
                best, best_index = tr, torch.zeros_like(sig_row)
            else:
                better = tr > best
                best = torch.where(better, tr, best)
                best_index = torch.where(better, k, best_index)
        return best, best_index

    w_sig = take(w)
    cone_trace = _trace_threshold(MULTIMODAL_CONE_DEG)

    # Rotations: MLE, MAP and the posterior mean (symmetry copies aligned with the MAP).
    r_mle = _Rotations.gather(flat, g_mle).reshape(r, 3, 3)
    r_map = _Rotations.gather(flat, g_map).reshape(r, 3, 3)
    if not fused:
        map_sig, copy_sig = traces_at(r_map)
    if group is None:
        mean = _Rotations.weighted_sum(flat, w).reshape(r, 3, 3)
    else:
        h = group.shape[0]
        if points is None:
            points = _Rotations.at(flat, sig_row, sig_col)
        parts = torch.zeros(r * h, 9, dtype=work, device=device)
        parts.index_add_(0, sig_row * h + copy_sig, points * w_sig[:, None])
        mean = torch.einsum("hji,rhjk->rik", group, parts.reshape(r, h, 3, 3))
        del copy_sig, parts
    mean = mean.to(torch.float64) / total64[:, None, None]
    r_mmse = project_to_so3(mean)

    # Uncertainty about the MMSE estimate: expected loss, cone masses, credible radius.
    if fused:
        from cryopose.bayes._posterior_numba import cone_rows

        grid9, extra9 = ((flat.grid, flat.extra) if isinstance(flat, _GridPlusExtra)
                         else (flat, flat.new_zeros(r, 0, 9)))
        map_inside, lowest, inside = (torch.empty(r, dtype=torch.float64) for _ in range(3))
        cone_rows(grid9.T.contiguous().numpy(), extra9.contiguous().numpy(),
                  w.contiguous().numpy(), r_map.reshape(r, 9).to(work).contiguous().numpy(),
                  r_mmse.reshape(r, 9).to(work).contiguous().numpy(), cone_trace,
                  _CHORD_SCALE, _RADIUS_BINS, _CONE_BIN, float(credible_mass),
                  map_inside.numpy(), lowest.numpy(), inside.numpy())
        radius = torch.rad2deg(_angle_from_trace(lowest))
    else:
        near_map = torch.where(map_sig >= cone_trace, w_sig, 0.0)
        if dense:
            map_inside = near_map.reshape(r, g).sum(dim=1)
        else:
            map_inside = torch.zeros(r, dtype=work, device=device)
            map_inside.index_add_(0, sig_row, near_map)
        del near_map, map_sig
        est_sig, _ = traces_at(r_mmse.to(work))
    if group is None:
        expected_loss = 6.0 - 2.0 * (r_mmse * mean).sum(dim=(1, 2))
    else:
        weighted = torch.zeros(r, dtype=work, device=device)
        weighted.index_add_(0, sig_row, w_sig * est_sig)
        expected_loss = 6.0 - 2.0 * weighted.to(torch.float64) / total64
    expected_loss = expected_loss.clamp_min(0.0)
    if not fused:
        radius, inside = _credible_radius_deg(
            sig_row, est_sig, w_sig, r, credible_mass, dense_width=g if dense else None
        )

    # Distinct top candidates (by posterior mass).
    candidates = _greedy_candidates(flat, log_joint, group, n_candidates, separation_trace)
    return {
        "rotations_mle": r_mle,
        "rotations_map": r_map,
        "rotations_mmse": r_mmse,
        "shifts_mle_px": shift_mle,
        "shifts_map_px": shift_map,
        "shifts_mmse_px": shift_mean,
        "shift_rms_px": shift_rms,
        "expected_loss": expected_loss,
        "max_probability": p_max,
        "credible_radius_deg": radius,
        "mass_outside_20deg": (1.0 - inside).clamp_min(0.0),
        "map_mass_outside_20deg": (1.0 - map_inside.to(torch.float64) / total64).clamp_min(0.0),
        "top_candidates": candidates,
        "index_mle": g_mle,
        "index_map": g_map,
        "log_evidence": log_evidence,
    }


# Chordal-histogram scale: bin = floor(sqrt(3 - tr) * scale), sqrt(3 - tr) = 2 sin(theta / 2)
# in [0, 2]. The scale puts a bin edge exactly at MULTIMODAL_CONE_DEG and gives ~1000 bins per
# unit (about 0.06 deg per bin near 0).
_CONE_CHORD = 2.0 * math.sin(math.radians(MULTIMODAL_CONE_DEG) / 2.0)
_CONE_BIN = round(_CONE_CHORD * 1024.0)
_CHORD_SCALE = _CONE_BIN / _CONE_CHORD
_RADIUS_BINS = int(math.ceil(2.0 * _CHORD_SCALE)) + 2


def _credible_radius_deg(
    row: torch.Tensor,
    traces: torch.Tensor,
    weights: torch.Tensor,
    r: int,
    credible_mass: float,
    dense_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Credible radius (degrees) and the posterior mass within the multimodality cone.

    ``row``, ``traces`` and ``weights`` list the significant (particle, grid point) pairs
    (``dense_width``: every row lists that many points, row-major). Points are histogrammed by
    chordal distance ``sqrt(3 - tr)``; in the bin where the cumulative mass first reaches
    ``credible_mass`` the radius is rounded up to the farthest point of that bin (so a single
    point at the estimate gives 0). The cone mass is the cumulative mass below the bin edge
    placed at ``MULTIMODAL_CONE_DEG``.
    """
    device = weights.device
    if dense_width is not None and device.type == "cpu" and numba_ready():
        # one fused pass per row (histogram, crossing, lowest trace) instead of ~10 [r, G]
        # passes and a scatter
        from cryopose.bayes._posterior_numba import credible_rows

        lowest = torch.empty(r, dtype=torch.float64)
        inside_cone = torch.empty(r, dtype=torch.float64)
        credible_rows(traces.reshape(r, dense_width).contiguous().numpy(),
                      weights.reshape(r, dense_width).contiguous().numpy(), _CHORD_SCALE,
                      _RADIUS_BINS, _CONE_BIN, float(credible_mass), lowest.numpy(),
                      inside_cone.numpy())
        return torch.rad2deg(_angle_from_trace(lowest)), inside_cone
    chord = (3.0 - traces).clamp_(min=0.0).sqrt_()
    bins = chord.mul_(_CHORD_SCALE).to(torch.int32).clamp_(max=_RADIUS_BINS - 1)
    del chord
    hist = torch.zeros(r * _RADIUS_BINS, dtype=weights.dtype, device=device)
    hist.index_add_(0, bins + row.to(torch.int32) * _RADIUS_BINS, weights)
    cumulative = hist.reshape(r, _RADIUS_BINS).to(torch.float64).cumsum_(dim=1)
    total64 = cumulative[:, -1]
    inside_cone = cumulative[:, _CONE_BIN - 1] / total64
    target = (credible_mass - 1e-12) * total64[:, None]
    crossing = (cumulative < target).sum(dim=1).to(torch.int32)
    candidates = torch.where(bins <= crossing[row], traces, math.inf)
    if dense_width is not None:
        lowest = candidates.reshape(r, dense_width).amin(dim=1)
    else:
        lowest = torch.full((r,), math.inf, dtype=traces.dtype, device=device)
        lowest.scatter_reduce_(0, row, candidates, reduce="amin")
    return torch.rad2deg(_angle_from_trace(lowest.to(torch.float64))), inside_cone
