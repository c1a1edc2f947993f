"""Priors on particle rotations: uniform, isotropic Gaussian, and an empirical prior learned by EM.

Every prior gives ``log_prior(rotations [..., 3, 3]) -> [...]``: the log-density w.r.t.
normalised Haar measure (uniform = 0), the ``log_prior`` argument of
:func:`cryopose.bayes.posterior.summarize_posterior`.

Empirical prior (seed appendix F2)
----------------------------------
Given per-particle rotation log-likelihoods ``l_i(g)`` over a grid (shifts marginalised), the
prior masses ``m_g`` (``sum m = 1``; density ``m_g / q_g`` with ``q`` the quadrature weights) are
fitted by smoothed EM (the "EMS" algorithm of Silverman, Jones, Wilson & Nychka 1990)::

    r_i(g)  = m_g exp(l_i(g)) / sum_h m_h exp(l_i(h))           (E-step, log-sum-exp)
    m      <- K (mean_i r_i)                                     (M-step, then smoothing)
    m      <- (1 - floor) m + floor q                            (no grid point gets zero prior)

``K`` convolves with IG(kernel_eta): ``(K m)_j = sum_k K_jk m_k``, ``K_jk ∝ q_j S(d(G_j, G_k))``
normalised over ``j`` (mass preserving), ``S`` the IG kernel density. It is applied as ``n``
steps of IG(kernel_eta / sqrt(n)) (IG(a) * IG(b) = IG(sqrt(a^2 + b^2))), each step no wider
than the grid spacing and truncated at 3.5 step widths, so ``K`` is a sparse matrix with ~190
neighbours per point on a HEALPix grid whatever ``kernel_eta`` is (memory ``O(G)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cryopose.bayes.posterior import estimate_grid_spacing_deg, marginalize_shifts
from cryopose.io.errors import CryoposeInputError
from cryopose.simulate.poses import parse_pose_distribution
from cryopose.so3.conversions import matrix_to_euler
from cryopose.so3.distributions import iso_gaussian_log_density, iso_gaussian_log_kernel

__all__ = [
    "RotationPrior",
    "UniformPrior",
    "IsoGaussianPrior",
    "EmpiricalPrior",
    "parse_prior",
]

LogLikelihoodSource = (
    torch.Tensor | Sequence[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]
)


class RotationPrior:
    """Base class: a prior density on SO(3) w.r.t. normalised Haar measure."""

    #: ``True`` for priors that must be fitted to data before :meth:`log_prior` works.
    requires_fit: bool = False
    #: ``True`` when the prior is the uniform (Haar) distribution.
    is_uniform: bool = False

    def log_prior(self, rotations: torch.Tensor) -> torch.Tensor:
        """Log-density ``[...]`` at ``rotations [..., 3, 3]`` (dtype and device of the input)."""
        raise NotImplementedError


@dataclass(frozen=True)
class UniformPrior(RotationPrior):
    """The uniform (Haar) prior: log-density 0 everywhere."""

    is_uniform = True

    def log_prior(self, rotations: torch.Tensor) -> torch.Tensor:
        _check_rotations(rotations)
        return torch.zeros(rotations.shape[:-2], dtype=rotations.dtype, device=rotations.device)


@dataclass(frozen=True)
class IsoGaussianPrior(RotationPrior):
    """Isotropic Gaussian IG(eta) about ``mean`` (default identity).

    Attributes
    ----------
    eta : float
        Width in radians (the angle from the mean is about Maxwell(eta) for small eta).
    mean : torch.Tensor or None
        ``[3, 3]`` cryopose mean rotation.
    """

    eta: float
    mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (float(self.eta) > 0 and math.isfinite(float(self.eta))):
            raise ValueError(f"eta: expected a positive finite width in radians, got {self.eta}")
        if self.mean is not None and tuple(self.mean.shape) != (3, 3):
            raise ValueError(f"mean: expected a [3, 3] rotation, got {tuple(self.mean.shape)}")

    def log_prior(self, rotations: torch.Tensor) -> torch.Tensor:
        _check_rotations(rotations)
        mean = self.mean
        if mean is None:
            mean = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        mean = mean.to(dtype=rotations.dtype, device=rotations.device)
        return iso_gaussian_log_density(rotations, mean, float(self.eta))


def _check_rotations(rotations: torch.Tensor) -> None:
    if not isinstance(rotations, torch.Tensor) or rotations.ndim < 2:
        raise ValueError("rotations: expected a [..., 3, 3] tensor")
    if tuple(rotations.shape[-2:]) != (3, 3):
        raise ValueError(f"rotations: expected [..., 3, 3], got {tuple(rotations.shape)}")


# --------------------------------------------------------------------------------------------
# Empirical prior
# --------------------------------------------------------------------------------------------


def _grid_parts(grid: object) -> tuple[torch.Tensor, torch.Tensor, float, object | None]:
    """(matrices [G, 3, 3] float64, quadrature weights [G] float64, spacing deg, SO3Grid)."""
    matrices = getattr(grid, "matrices", grid)
    if not isinstance(matrices, torch.Tensor) or matrices.ndim != 3 or matrices.shape[1:] != (
        3,
        3,
    ):
        raise ValueError("grid: expected an SO3Grid or a [G, 3, 3] tensor of rotations")
    matrices = matrices.to(torch.float64)
    g = matrices.shape[0]
    weights = getattr(grid, "weights", None)
    if weights is None:
        weights = torch.full((g,), 1.0 / g, dtype=torch.float64, device=matrices.device)
    weights = weights.to(dtype=torch.float64, device=matrices.device)
    weights = weights / weights.sum()
    step = getattr(grid, "inplane_step_deg", None)
    spacing = float(step) if step is not None else estimate_grid_spacing_deg(matrices)
    is_healpix = all(hasattr(grid, a) for a in ("order", "n_inplane", "euler_deg"))
    return matrices, weights, spacing, grid if is_healpix else None


def _smoothing_kernel(
    matrices: torch.Tensor,
    weights: torch.Tensor,
    eta_step: float,
    *,
    block_rows: int = 512,
) -> torch.Tensor:
    """Sparse ``[G, G]`` mass-preserving IG(eta_step) kernel, truncated at 3.5 eta_step."""
    g = matrices.shape[0]
    device = matrices.device
    flat = matrices.reshape(g, 9)
    cutoff = min(math.pi, 3.5 * eta_step)
    threshold = 1.0 + 2.0 * math.cos(cutoff) - 1e-12
    rows, cols, vals = [], [], []
    log_q = torch.log(weights)
    # log S tabulated on [0, cutoff] and interpolated linearly (a smoothing kernel needs no
    # more; evaluating the series per pair would dominate the cost).
    n_table = 4097
    table_angle = torch.linspace(0.0, cutoff, n_table, dtype=torch.float64, device=device)
    table = iso_gaussian_log_kernel(table_angle, eta_step)
    scale = (n_table - 1) / cutoff
    for start in range(0, g, block_rows):
        stop = min(g, start + block_rows)
        trace = flat[start:stop] @ flat.T
        r_idx, c_idx = torch.nonzero(trace >= threshold, as_tuple=True)
        angle = torch.acos(((trace[r_idx, c_idx] - 1.0) * 0.5).clamp(-1.0, 1.0))
        # K[j, k] with j = target (row), k = source (column): q_j S(d_jk).
        rows.append(r_idx + start)
        cols.append(c_idx)
        position = (angle * scale).clamp_(0.0, n_table - 1.0)
        low = position.floor().long().clamp_(max=n_table - 2)
        frac = position - low
        log_kernel = table[low] * (1.0 - frac) + table[low + 1] * frac
        vals.append(log_kernel + log_q[r_idx + start])
    row = torch.cat(rows)
    col = torch.cat(cols)
    log_val = torch.cat(vals)
    # Normalise each column (source) to total 1 in log space.
    col_max = torch.full((g,), -math.inf, dtype=torch.float64, device=device)
    col_max.scatter_reduce_(0, col, log_val, reduce="amax")
    val = torch.exp(log_val - col_max[col])
    col_sum = torch.zeros(g, dtype=torch.float64, device=device).index_add_(0, col, val)
    val = val / col_sum[col]
    return torch.sparse_coo_tensor(
        torch.stack([row, col]), val, (g, g), check_invariants=False
    ).coalesce()


def _log_likelihood_batches(source: LogLikelihoodSource) -> Callable[[], Iterable[torch.Tensor]]:
    """A re-iterable source of ``[b, G]`` (or ``[b, G, T]``) log-likelihood batches."""
    if isinstance(source, torch.Tensor):
        if source.ndim not in (2, 3):
            raise ValueError(
                f"log_likelihood: expected [N, G] or [N, G, T], got {tuple(source.shape)}"
            )

        def tensor_batches() -> Iterable[torch.Tensor]:
            for start in range(0, source.shape[0], 1024):
                yield source[start : start + 1024]

        return tensor_batches
    if callable(source):
        return source
    if isinstance(source, Sequence):
        return lambda: iter(source)
    raise ValueError(
        "log_likelihood: expected a tensor, a sequence of tensors or a callable returning an "
        f"iterable of [b, G] tensors (re-iterated every EM step), got {type(source).__name__}"
    )


@dataclass
class EmpiricalPrior(RotationPrior):
    """Orientation prior learned from the data by smoothed EM over a rotation grid.

    Construct unfitted with settings (what :func:`parse_prior` returns for ``"empirical"``) and
    call :meth:`learn`, or call the classmethod :meth:`fit` directly.

    Attributes
    ----------
    kernel_eta : float or None
        Width (radians) of the IG smoothing kernel; ``None`` = one grid spacing.
    n_iter : int
        Maximum number of EM iterations.
    floor : float
        Weight of the uniform component mixed in after every step: the density is at least
        ``floor`` (relative to uniform) everywhere.
    tol : float
        Stop when the mean per-particle log marginal likelihood improves by less than this.
    log_prior_grid : torch.Tensor or None
        ``[G]`` fitted log-density (w.r.t. normalised Haar) at the grid rotations, float64.
    grid_matrices : torch.Tensor or None
        ``[G, 3, 3]`` the grid rotations (float64).
    history : list of float
        Mean per-particle log marginal likelihood ``log sum_g m_g exp(l_i(g))`` before each
        iteration (non-decreasing for plain EM; smoothing can cost a little).
    """

    kernel_eta: float | None = None
    n_iter: int = 20
    floor: float = 1e-3
    tol: float = 1e-6
    log_prior_grid: torch.Tensor | None = None
    grid_matrices: torch.Tensor | None = None
    history: list[float] = field(default_factory=list)
    _grid: object | None = field(default=None, repr=False)

    requires_fit = True

    @property
    def is_fitted(self) -> bool:
        return self.log_prior_grid is not None

    @property
    def masses(self) -> torch.Tensor:
        """``[G]`` prior probability of each grid cell (sums to 1)."""
        self._require_fit()
        g = self.log_prior_grid.shape[0]
        q = getattr(self._grid, "weights", None)
        log_q = (
            torch.log(q.to(torch.float64) / q.sum())
            if q is not None
            else torch.full((g,), -math.log(g), dtype=torch.float64)
        ).to(self.log_prior_grid.device)
        return torch.softmax(self.log_prior_grid + log_q, 0)

    def _require_fit(self) -> None:
        if not self.is_fitted:
            raise ValueError(
                "EmpiricalPrior: not fitted; call EmpiricalPrior.fit(log_likelihood, grid) or "
                "prior.learn(log_likelihood, grid) first"
            )

    def learn(self, log_likelihood: LogLikelihoodSource, grid: object) -> EmpiricalPrior:
        """A fitted copy using this object's settings (see :meth:`fit`)."""
        return EmpiricalPrior.fit(
            log_likelihood,
            grid,
            kernel_eta=self.kernel_eta,
            n_iter=self.n_iter,
            floor=self.floor,
            tol=self.tol,
        )

    @classmethod
    def fit(
        cls,
        log_likelihood: LogLikelihoodSource,
        grid: object,
        *,
        kernel_eta: float | None = None,
        n_iter: int = 20,
        floor: float = 1e-3,
        tol: float = 1e-6,
    ) -> EmpiricalPrior:
        """Fit the prior to per-particle log-likelihoods over ``grid`` by smoothed EM.

        Parameters
        ----------
        log_likelihood : tensor, sequence of tensors, or callable
            ``[N, G]`` rotation log-likelihoods (shifts marginalised; ``[N, G, T]`` is
            marginalised with a uniform shift prior), a sequence of ``[b, G]`` batches, or a
            callable returning a fresh iterable of batches (called once per EM iteration, so
            batches can be streamed from disk or recomputed).
        grid : SO3Grid or torch.Tensor
            The grid (``[G, 3, 3]`` rotations in the same order as the log-likelihoods).
        kernel_eta : float, optional
            IG smoothing width in radians (default: one grid spacing).
        n_iter : int
            Maximum EM iterations.
        floor : float
            Weight in (0, 1) of the uniform density mixed in (the minimum density relative to
            uniform).
        tol : float
            Convergence threshold on the mean log marginal likelihood (nats per particle).

        Returns
        -------
        EmpiricalPrior
            Fitted; ``log_prior_grid`` holds the log-density at the grid points.
        """
        matrices, q, spacing_deg, healpix = _grid_parts(grid)
        g = matrices.shape[0]
        device = matrices.device
        if not (0.0 < floor < 1.0):
            raise ValueError(f"floor: expected a density fraction in (0, 1), got {floor}")
        if int(n_iter) < 1:
            raise ValueError(f"n_iter: expected >= 1 EM iterations, got {n_iter}")
        spacing = math.radians(spacing_deg)
        eta = spacing if kernel_eta is None else float(kernel_eta)
        if not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"kernel_eta: expected a positive width in radians, got {kernel_eta}")
        n_steps = min(256, max(1, math.ceil((eta / spacing) ** 2)))
        kernel = _smoothing_kernel(matrices, q, eta / math.sqrt(n_steps))
        batches = _log_likelihood_batches(log_likelihood)
        log_q = torch.log(q)
        log_m = log_q.clone()
        history: list[float] = []
        for _ in range(int(n_iter)):
            acc = torch.zeros(g, dtype=torch.float64, device=device)
            total, count = 0.0, 0
            for batch in batches():
                x = batch
                if x.ndim == 3:
                    x = marginalize_shifts(x)
                if x.ndim != 2 or x.shape[1] != g:
                    raise ValueError(
                        f"log_likelihood: expected batches of shape [b, {g}], got "
                        f"{tuple(batch.shape)}"
                    )
                x = x.to(dtype=torch.float64, device=device) + log_m
                lse = torch.logsumexp(x, dim=1, keepdim=True)
                if not bool(torch.isfinite(lse).all()):
                    raise ValueError(
                        "log_likelihood: a particle has NaN/inf or only -inf log-likelihoods"
                    )
                acc += torch.exp(x - lse).sum(dim=0)
                total += float(lse.sum())
                count += x.shape[0]
            if count == 0:
                raise ValueError("log_likelihood: expected at least one particle, got none")
            history.append(total / count)
            m = acc / count
            for _step in range(n_steps):
                m = (kernel @ m[:, None])[:, 0]
            m = (1.0 - floor) * m / m.sum() + floor * q
            log_m = torch.log(m)
            if len(history) >= 2 and abs(history[-1] - history[-2]) < tol:
                break
        return cls(
            kernel_eta=eta,
            n_iter=int(n_iter),
            floor=floor,
            tol=tol,
            log_prior_grid=log_m - log_q,
            grid_matrices=matrices,
            history=history,
            _grid=healpix if healpix is not None else grid,
        )

    def log_prior(self, rotations: torch.Tensor) -> torch.Tensor:
        """Log-density at any rotations: the value of the grid cell holding each rotation.

        On a HEALPix :class:`~cryopose.so3.grids.SO3Grid` the cell is (HEALPix pixel of the
        viewing direction) x (in-plane interval of psi), found in O(1) per rotation; on other
        grids it is the nearest grid point (chunked search). The prior is piecewise constant
        at the grid's resolution (it was smoothed at ``kernel_eta`` >= one spacing).
        """
        self._require_fit()
        _check_rotations(rotations)
        index = self.cell_index(rotations)
        values = self.log_prior_grid.to(rotations.device)[index]
        return values.to(rotations.dtype)

    def cell_index(self, rotations: torch.Tensor) -> torch.Tensor:
        """Grid index ``[...]`` (int64) of the cell (HEALPix) or nearest point of each rotation."""
        self._require_fit()
        shape = rotations.shape[:-2]
        rots = rotations.reshape(-1, 3, 3).to(torch.float64)
        grid = self._grid
        if all(hasattr(grid, a) for a in ("order", "n_inplane", "euler_deg")):
            import healpy

            euler = matrix_to_euler(rots).cpu().numpy()  # rot, tilt, psi (deg)
            nside = 2**grid.order
            pixel = healpy.ang2pix(
                nside, np.radians(euler[:, 1]), np.radians(euler[:, 0]), nest=True
            )
            step = 360.0 / grid.n_inplane
            phase = float(grid.euler_deg[0, 2]) / step
            j = np.floor(np.mod(euler[:, 2], 360.0) / step - phase + 0.5).astype(np.int64)
            j = np.mod(j, grid.n_inplane)
            index = torch.from_numpy(pixel.astype(np.int64) * grid.n_inplane + j)
            return index.to(rotations.device).reshape(shape)
        flat = self.grid_matrices.reshape(-1, 9).to(rotations.device)
        out = torch.empty(rots.shape[0], dtype=torch.long, device=rotations.device)
        block = max(1, (1 << 22) // flat.shape[0])
        for start in range(0, rots.shape[0], block):
            part = rots[start : start + block].reshape(-1, 9).to(rotations.device)
            out[start : start + block] = (part @ flat.T).argmax(dim=1)
        return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------


def parse_prior(spec: str) -> RotationPrior:
    """Prior from a command-line spec.

    ``"uniform"``, ``"iso-gaussian:ETA"`` (about the identity), ``"iso-gaussian:ETA@ROT,TILT,PSI"``
    (RELION angles of the mean, degrees; the same syntax as ``simulate --poses``) or
    ``"empirical"`` / ``"empirical:KERNEL_ETA"`` (radians; returns an unfitted
    :class:`EmpiricalPrior` to :meth:`~EmpiricalPrior.learn` from the data).

    Raises
    ------
    CryoposeInputError
        One line naming the bad spec and the accepted forms.
    """
    text = str(spec).strip()
    lower = text.lower()
    if lower == "empirical" or lower.startswith("empirical:"):
        eta = None
        if ":" in text:
            value = text.split(":", 1)[1]
            try:
                eta = float(value)
            except ValueError:
                eta = math.nan
            if not (eta > 0 and math.isfinite(eta)):
                raise CryoposeInputError(
                    f"prior spec {spec!r}: KERNEL_ETA {value!r} must be a positive number "
                    "(radians) in empirical:KERNEL_ETA"
                )
        return EmpiricalPrior(kernel_eta=eta)
    if lower == "uniform" or lower.startswith("iso-gaussian:"):
        distribution = parse_pose_distribution(text)
        if distribution.kind == "uniform":
            return UniformPrior()
        return IsoGaussianPrior(eta=distribution.eta, mean=distribution.mean)
    raise CryoposeInputError(
        f"prior spec {spec!r}: expected uniform, iso-gaussian:ETA, iso-gaussian:ETA@ROT,TILT,PSI "
        "or empirical[:KERNEL_ETA]"
    )
