"""Soft- versus hard-assignment EM for the seed's two no-projection models (seed section 4).

Models (``docs/conventions.md``, "Other observation models")
--------------------------------------------------------------
* **2D in-plane**: ``y_i(x) = I(R_theta_i x) + noise`` with ``theta_i`` uniform on the circle;
  estimate the image ``I`` (:func:`em_inplane`).
* **3D (cryo-ET, subtomogram averaging)**: ``y_i(x) = V(R_i x) + noise`` with ``R_i``
  Haar-uniform; estimate the volume ``V`` (:func:`em_subtomograms`).

The noise is white Gaussian with a known variance ``sigma2`` per pixel (voxel). Rotations are
the latent variables, restricted to a grid ``{R_g}`` with quadrature weights ``w_g``.

One EM iteration
----------------
**E-step**: against the current estimate ``V_t`` the posterior of observation ``i`` over the
grid is ``p_i(g) ∝ w_g exp(log p(y_i | R_g, V_t))`` (the Gaussian log-likelihoods of
:func:`cryopose.bayes.models.score_inplane` and
:class:`cryopose.bayes.models.SubtomogramScorer`, over the Fourier ball ``|k| < N / 2``).

**M-step**: ``V_{t+1} = (1 / B) sum_i sum_g p_i(g) (R_g^-1 . y_i)``, the average of the
observations back-rotated by the MMSE back-rotation operator ``E_{p_i}[g^-1]`` (seed
equations 29-31, Proposition 3). Here ``(R^-1 . y)(x) = y(R^T x)``, so that a noiseless
``y = V(R .)`` is returned to ``V``. With ``p_i`` replaced by the one-hot vector at the
posterior's argmax (the MLE rotation for the uniform prior) the same formula is the
hard-assignment update (seed section 4.1.1). A third M-step, ``assignment="mmse"``, is the
one the seed ran for its 3D figure (section 4.2.1): each observation is back-rotated by its
own MMSE *point* rotation, the posterior mean matrix ``sum_g p_i(g) R_g`` rounded to the
nearest rotation by orthogonal Procrustes (:func:`mmse_rotation`; off the grid), and the
results are averaged. ``soft`` keeps every grid rotation of every observation; ``mmse`` and
``hard`` keep one rotation each, the posterior's centre of mass or its mode.

Cost: by linearity ``sum_i sum_g p_ig y_i(R_g^T x) = sum_g Z_g(R_g^T x)`` with
``Z_g = sum_i p_ig y_i``. The M-step is one matrix product ``P^T Y`` (``[G, B] @ [B, N^d]``,
about twice the E-step's ``[B, 2P] @ [2P, G]`` with ``P ~ 0.26 N^3`` ball coefficients in 3D)
followed by one back-rotation per grid point (per *occupied* grid point for hard assignment;
grid points with negligible total weight are skipped). Each back-rotation is the interpolator
of :func:`cryopose.bayes.models.rotate_volume` / :func:`~cryopose.bayes.models.rotate_image` at
``R^T`` (2x zero padding, sinc^2 gridding correction, trilinear / bilinear sampling of the
centred DFT), batched over grid points; the sum over ``g`` is taken on the Fourier
coefficients before a single inverse FFT. Estimates are therefore band-limited to the ball
``|k| < N / 2``.

Diagnostics: the marginal log-likelihood ``sum_i log sum_g w_g p(y_i | R_g, V_t)`` (up to the
constant ``-(n / 2) log(2 pi sigma2)`` per observation, ``n`` the number of Fourier
coefficients in the ball), the relative change ``||V_{t+1} - V_t|| / ||V_t||`` (the seed's
stopping rule, threshold 1e-3), the mean largest posterior probability, and the Pearson
correlation of every iterate with a given truth and/or template (in the frame of the
iterates; use :func:`align_to_reference` to remove the global rotation ambiguity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryopose.bayes.models import SubtomogramScorer, score_inplane
from cryopose.so3.grids import SO3Grid, healpix_grid, local_grid
from cryopose.so3.procrustes import project_to_so3
from cryopose.so3.random import random_rotations, resolve_generator

__all__ = [
    "EMResult",
    "back_rotate_average",
    "em_inplane",
    "em_subtomograms",
    "mmse_rotation",
    "ASSIGNMENTS",
    "simulate_inplane_observations",
    "simulate_subtomogram_observations",
    "align_to_reference",
    "pearson_correlation",
    "ball_signal_power",
]

# M-step kinds: posterior-weighted back-rotation (EM), back-rotation by the MMSE point
# rotation (Procrustes-rounded posterior mean, the seed's Fig. 5), by the MLE (argmax) rotation.
ASSIGNMENTS = ("soft", "mmse", "hard")
# Padded transforms (real numbers) held at once by the batched back-rotation (~64 MB float32).
_MAX_PADDED_ELEMENTS = 1 << 24
# Columns whose total posterior weight is below this fraction of the total are skipped.
_NEGLIGIBLE_WEIGHT = 1e-12


class EMInputError(ValueError):
    """Bad input to the EM routines (the message names the argument and what was expected)."""


# ---------------------------------------------------------------------------------------------
# Fourier ball and batched rotation
# ---------------------------------------------------------------------------------------------


class _Ball:
    """Half-space centred-rfft coefficients with ``|k| < N / 2`` (the likelihood's ball)."""

    def __init__(self, box: int, ndim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.box, self.ndim, self.dtype, self.device = box, ndim, dtype, device
        centred = torch.arange(box, dtype=dtype, device=device) - box // 2
        half = torch.arange(box // 2 + 1, dtype=dtype, device=device)
        mesh = torch.meshgrid(*([centred] * (ndim - 1) + [half]), indexing="ij")
        radius = torch.sqrt(sum(m**2 for m in mesh))
        self.mask = radius < box / 2.0
        self.freq = torch.stack([m[self.mask] for m in reversed(mesh)], dim=-1)  # (x, y[, z])
        self.multiplicity = torch.where(self.freq[:, 0] > 0, 2.0, 1.0).to(dtype)
        self.shell = torch.round(radius[self.mask]).long()
        self.n_points = int(self.freq.shape[0])

    def points(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, P]`` centred DFT coefficients in the ball of real ``[K, N] * ndim`` arrays."""
        dims = tuple(range(-self.ndim, 0))
        ft = torch.fft.rfftn(torch.fft.ifftshift(x, dim=dims), dim=dims)
        ft = torch.fft.fftshift(ft, dim=dims[:-1])
        return ft[..., self.mask]

    def real(self, values: torch.Tensor) -> torch.Tensor:
        """Real ``[K, N] * ndim`` arrays whose ball coefficients are ``[K, P]`` (zero outside)."""
        shape = (values.shape[0], *self.mask.shape)
        full = torch.zeros(shape, dtype=values.dtype, device=values.device)
        full[:, self.mask] = values
        dims = tuple(range(-self.ndim, 0))
        x = torch.fft.irfftn(
            torch.fft.ifftshift(full, dim=dims[:-1]), s=(self.box,) * self.ndim, dim=dims
        )
        return torch.fft.fftshift(x, dim=dims)


class _Rotator:
    """Batched ``x_k(R_k .)`` at the ball coefficients, one rotation per array.

    The interpolator of :func:`cryopose.bayes.models.rotate_volume`: zero padding to
    ``M = round(pad_factor N)`` (made even), division by the linear kernel's ``sinc^2``,
    centred DFT, (bi/tri)linear sampling at ``R k``. Made cheap by (i) folding the ``sinc^2``
    division and a ``(-1)^(y + z)`` modulation (which centres the DFT along every axis but
    the last) into :meth:`prepare`, applied once to the inputs, (ii) writing the ``N`` box
    straight into the ifftshifted layout of the padded array, and (iii) a real-to-half-complex
    DFT, with points of negative ``kx`` read at ``-R k`` and conjugated (Hermitian symmetry).
    Unlike ``rotate_volume``, points within one padded sample of ``+M / 2`` interpolate with
    the periodic neighbour at ``-M / 2`` instead of zero; the two agree wherever
    ``|R k|_inf < N / 2 - N / M`` (e.g. for data band-limited to ``|k| < N / 2 - 1`` at
    ``pad_factor = 2``).
    """

    def __init__(self, ball: _Ball, pad_factor: float) -> None:
        box, ndim, dtype, device = ball.box, ball.ndim, ball.dtype, ball.device
        padded = max(box, int(round(pad_factor * box)))
        padded += padded % 2
        self.ball, self.padded = ball, padded
        centred = torch.arange(box, dtype=torch.float64, device=device) - box // 2
        s2 = torch.sinc(centred / padded) ** 2
        sign = torch.where(centred.remainder(2) == 0, 1.0, -1.0).to(torch.float64)
        factor = torch.ones((1,) * ndim, dtype=torch.float64, device=device)
        for d in range(ndim):
            shape = [1] * ndim
            shape[d] = box
            axis = 1.0 / s2 if d == ndim - 1 else sign / s2
            factor = factor * axis.reshape(shape)
        self.factor = factor.to(dtype)
        # Flat index in the padded, ifftshifted array of every voxel of the N box.
        dest = centred.long().remainder(padded)
        flat = torch.zeros((1,) * ndim, dtype=torch.long, device=device)
        for d in range(ndim):
            shape = [1] * ndim
            shape[d] = box
            flat = flat * padded + dest.reshape(shape)
        self.dest = flat.reshape(-1)
        # (z,) y, x sizes of the half array after the periodic extension in :meth:`sample`.
        self.sizes = [padded + 1] * (ndim - 1) + [padded // 2 + 1]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, N^d]`` flattened inputs, pre-multiplied for :meth:`sample`."""
        return (x * self.factor).reshape(x.shape[0], -1)

    def sample(self, prepared: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """``[K, P]`` ball coefficients of ``x_k(R_k .)`` from :meth:`prepare`'d ``x_k``.

        ``prepared`` is ``[K, N^d]`` (one array per rotation) or ``[1, N^d]`` (one array at
        all ``K`` rotations, one DFT).
        """
        ball, m = self.ball, self.padded
        n_arrays, n_rot = prepared.shape[0], rotations.shape[0]
        xp = prepared.new_zeros(n_arrays, m**ball.ndim)
        xp[:, self.dest] = prepared
        dims = tuple(range(-ball.ndim, 0))
        ft = torch.fft.rfftn(xp.reshape(n_arrays, *([m] * ball.ndim)), dim=dims)
        ft = torch.movedim(torch.view_as_real(ft), -1, 1)  # [K, 2, (M,) M, M // 2 + 1]
        # Append index M (== index 0, frequency -M/2, by periodicity) along the centred axes so
        # that points between M/2 - 1 and M/2 interpolate with the true neighbour, not zero.
        ft = F.pad(ft, (0, 0) + (0, 1) * (ball.ndim - 1), mode="circular")
        q = torch.einsum("kij,pj->kpi", rotations.to(prepared.dtype), ball.freq) * (m / ball.box)
        flip = torch.where(q[..., 0] < 0, -1.0, 1.0).to(q.dtype)  # [K, P]
        q = q * flip[..., None]
        index = [q[..., 0]] + [q[..., d] + m // 2 for d in range(1, ball.ndim)]  # x, y[, z]
        sizes = self.sizes[::-1]  # x, y[, z]
        grid = torch.stack(
            [i * (2.0 / (n - 1)) - 1.0 for i, n in zip(index, sizes, strict=True)], dim=-1
        )
        shape = (n_arrays, 1, 1, -1, 3) if ball.ndim == 3 else (n_arrays, 1, -1, 2)
        out = F.grid_sample(
            ft, grid.reshape(shape), mode="bilinear", padding_mode="zeros", align_corners=True
        )
        if n_arrays == 1:  # [1, 2, ..., K * P]
            out = out.reshape(2, n_rot, ball.n_points)
        else:  # [K, 2, ..., P]
            out = out.reshape(n_rot, 2, ball.n_points).transpose(0, 1)
        return torch.complex(out[0], out[1] * flip)

    def rotate(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """``[K, N] * d`` arrays ``x(R_k .)`` of one ``[N] * d`` array (band-limited)."""
        prepared = self.prepare(x[None])
        step = max(1, _MAX_PADDED_ELEMENTS // (4 * self.ball.n_points))
        out = [
            self.ball.real(self.sample(prepared, rotations[s : s + step]))
            for s in range(0, rotations.shape[0], step)
        ]
        return torch.cat(out)


def _check_weights_rotations(
    weights: torch.Tensor, rotations: torch.Tensor, n_obs: int, ndim: int
) -> None:
    if rotations.ndim != 3 or tuple(rotations.shape[-2:]) != (ndim, ndim):
        raise EMInputError(
            f"rotations: expected [G, {ndim}, {ndim}] matrices, got shape {tuple(rotations.shape)}"
        )
    if weights.ndim != 2 or tuple(weights.shape) != (n_obs, rotations.shape[0]):
        raise EMInputError(
            f"weights: expected [{n_obs}, {rotations.shape[0]}] (observations x rotations), "
            f"got shape {tuple(weights.shape)}"
        )


def _back_rotate_points(
    prepared: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    rotator: _Rotator,
) -> torch.Tensor:
    """``[P]`` ball coefficients of ``(1 / B) sum_i sum_g w_ig y_i(R_g^T .)``.

    ``prepared`` is ``rotator.prepare(observations)``, ``[B, N^d]``.
    """
    ball = rotator.ball
    n_obs = prepared.shape[0]
    w = weights.to(dtype=ball.dtype, device=ball.device)
    column = w.sum(dim=0)
    total = column.abs().sum()
    keep = torch.nonzero(column.abs() > _NEGLIGIBLE_WEIGHT * total).reshape(-1)
    cdtype = torch.complex128 if ball.dtype == torch.float64 else torch.complex64
    out = torch.zeros(ball.n_points, dtype=cdtype, device=ball.device)
    if keep.numel() == 0:
        return out
    w = w[:, keep]
    back = rotations.to(dtype=ball.dtype, device=ball.device)[keep].transpose(-1, -2)
    step = max(1, _MAX_PADDED_ELEMENTS // (rotator.padded**ball.ndim))
    for start in range(0, keep.numel(), step):
        stop = min(start + step, keep.numel())
        # Z_g = sum_i w_ig y_i: one matrix product, then one back-rotation per grid point.
        z = w[:, start:stop].T @ prepared
        out = out + rotator.sample(z, back[start:stop]).sum(0)
    return out / n_obs


def _back_rotate_each(
    prepared: torch.Tensor, rotations: torch.Tensor, rotator: _Rotator
) -> torch.Tensor:
    """``[P]`` ball coefficients of ``(1 / B) sum_i y_i(R_i^T .)``, one rotation per observation.

    ``prepared`` is ``rotator.prepare(observations)``, ``[B, N^d]``; ``rotations`` ``[B, d, d]``.
    """
    ball = rotator.ball
    n_obs = prepared.shape[0]
    back = rotations.to(dtype=ball.dtype, device=ball.device).transpose(-1, -2)
    cdtype = torch.complex128 if ball.dtype == torch.float64 else torch.complex64
    out = torch.zeros(ball.n_points, dtype=cdtype, device=ball.device)
    step = max(1, _MAX_PADDED_ELEMENTS // (rotator.padded**ball.ndim))
    for start in range(0, n_obs, step):
        stop = min(start + step, n_obs)
        out = out + rotator.sample(prepared[start:stop], back[start:stop]).sum(0)
    return out / n_obs


def mmse_rotation(posterior: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """MMSE rotation of each posterior over a grid: its mean matrix projected onto SO(d).

    The posterior mean ``M_i = sum_g p_ig R_g`` is rounded to the nearest rotation in
    Frobenius norm (orthogonal Procrustes with the determinant fix), the "rounding" step of
    the seed's 3D experiment (section 4.2.1). In 2D ``M_i = s [[c, -s'], [s', c]]`` up to a
    positive scale, so the answer is the rotation by ``atan2`` of its first column.

    Parameters
    ----------
    posterior : torch.Tensor
        ``[B, G]`` probabilities (rows sum to 1).
    rotations : torch.Tensor
        ``[G, d, d]`` grid rotations, ``d`` = 2 or 3.

    Returns
    -------
    torch.Tensor
        ``[B, d, d]`` rotation matrices (dtype and device of ``rotations``).
    """
    rot = rotations.to(posterior.dtype)
    mean = torch.einsum("bg,gij->bij", posterior, rot.to(posterior.device))
    if rot.shape[-1] == 2:
        out = _rotation_2d(torch.rad2deg(torch.atan2(mean[:, 1, 0], mean[:, 0, 0])))
    else:
        out = project_to_so3(mean)
    return out.to(dtype=rotations.dtype, device=rotations.device)


def _as_observations(x: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    what = "[B, N, N, N] subtomograms" if ndim == 3 else "[B, N, N] images"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise EMInputError(f"{name}: expected a real float32/float64 torch.Tensor ({what})")
    if x.ndim != ndim + 1 or len(set(x.shape[1:])) != 1 or x.shape[0] < 1:
        raise EMInputError(f"{name}: expected {what}, got shape {tuple(x.shape)}")
    return x


def back_rotate_average(
    observations: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    *,
    pad_factor: float = 2.0,
) -> torch.Tensor:
    """The EM M-step: observations back-rotated with posterior weights, then averaged.

    ``out(x) = (1 / B) sum_i sum_g w_ig y_i(R_g^T x)``: with ``w_i`` a posterior over the grid
    this is the seed's MMSE back-rotation operator applied to every observation and averaged
    (soft assignment); with one-hot rows it averages each observation back-rotated by its one
    rotation (hard assignment). ``y_i(R^T .)`` undoes the pose of
    :func:`cryopose.bayes.models.rotate_volume` / :func:`~cryopose.bayes.models.rotate_image`.

    Parameters
    ----------
    observations : torch.Tensor
        ``[B, N, N]`` images (then ``rotations`` are 2x2) or ``[B, N, N, N]`` subtomograms
        (3x3 cryopose matrices), real, float32 or float64; sets the dtype and device.
    weights : torch.Tensor
        ``[B, G]`` non-negative weights (rows normally sum to 1). Columns whose total is below
        1e-12 of the total weight are skipped (no back-rotation is computed for them).
    rotations : torch.Tensor
        ``[G, d, d]`` rotation matrices (``d`` = 2 or 3) of the grid.
    pad_factor : float
        Zero padding of the interpolated transforms (as in ``rotate_volume``).

    Returns
    -------
    torch.Tensor
        ``[N, N]`` or ``[N, N, N]`` average, band-limited to ``|k| < N / 2``.
    """
    ndim = observations.ndim - 1
    if ndim not in (2, 3):
        raise EMInputError(
            f"observations: expected [B, N, N] or [B, N, N, N], got {tuple(observations.shape)}"
        )
    obs = _as_observations(observations, ndim, "observations")
    rot = torch.as_tensor(rotations)
    _check_weights_rotations(weights, rot, obs.shape[0], ndim)
    if not pad_factor >= 1.0:
        raise EMInputError(f"pad_factor: expected >= 1, got {pad_factor!r}")
    if obs.dtype not in (torch.float32, torch.float64):
        raise EMInputError(f"observations: expected float32 or float64, got {obs.dtype}")
    ball = _Ball(int(obs.shape[-1]), ndim, obs.dtype, obs.device)
    rotator = _Rotator(ball, pad_factor)
    points = _back_rotate_points(rotator.prepare(obs), weights, rot, rotator)
    return ball.real(points[None])[0]


# ---------------------------------------------------------------------------------------------
# EM
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EMResult:
    """Iterates and diagnostics of one EM run.

    Attributes
    ----------
    estimates : torch.Tensor
        ``[T + 1, N, N]`` or ``[T + 1, N, N, N]``: the initial estimate, then the estimate after
        each of the ``T`` iterations run.
    log_likelihood : torch.Tensor
        ``[T]`` float64 marginal log-likelihood of all observations under ``estimates[t]``
        (computed in iteration ``t + 1``'s E-step), up to the constant
        ``-(n / 2) log(2 pi sigma2)`` per observation.
    relative_change : torch.Tensor
        ``[T]`` ``||estimates[t + 1] - estimates[t]|| / ||estimates[t]||``.
    mean_max_posterior : torch.Tensor
        ``[T]`` mean over observations of the largest posterior probability of a grid rotation
        (1: every posterior is a point mass; ``1 / G``: flat).
    truth_correlation, template_correlation : torch.Tensor or None
        ``[T + 1]`` Pearson correlation of every iterate with the given truth / template (in
        the iterates' frame, no alignment), or ``None`` when not given.
    assignment : str
        ``"soft"``, ``"mmse"`` or ``"hard"``.
    converged : bool
        Whether the relative change fell below the tolerance before the iteration limit.
    """

    estimates: torch.Tensor
    log_likelihood: torch.Tensor
    relative_change: torch.Tensor
    mean_max_posterior: torch.Tensor
    truth_correlation: torch.Tensor | None
    template_correlation: torch.Tensor | None
    assignment: str
    converged: bool

    @property
    def final(self) -> torch.Tensor:
        """The last estimate."""
        return self.estimates[-1]

    @property
    def n_iterations(self) -> int:
        """Number of iterations run (``T``)."""
        return int(self.estimates.shape[0]) - 1


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, ndim: int | None = None) -> torch.Tensor:
    """Pearson correlation over the last ``ndim`` axes (default: all of ``b``'s axes).

    Parameters
    ----------
    a, b : torch.Tensor
        Real arrays broadcastable to each other (e.g. ``[T, N, N]`` and ``[N, N]``).
    ndim : int, optional
        Number of trailing axes correlated (default ``b.ndim``).

    Returns
    -------
    torch.Tensor
        Correlations in [-1, 1], float64, over the leading shape (0 where a side is constant).
    """
    n = b.ndim if ndim is None else ndim
    dims = tuple(range(-n, 0))
    x = a.to(torch.float64)
    y = b.to(device=a.device, dtype=torch.float64)
    x = x - x.mean(dim=dims, keepdim=True)
    y = y - y.mean(dim=dims, keepdim=True)
    num = (x * y).sum(dim=dims)
    den = torch.sqrt((x * x).sum(dim=dims) * (y * y).sum(dim=dims))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num))


def _check_sigma2(sigma2: float | torch.Tensor, box: int) -> torch.Tensor:
    s = torch.as_tensor(sigma2, dtype=torch.float64)
    n_shells = box // 2 + 1
    if s.ndim not in (0, 1) or (s.ndim == 1 and s.shape[0] != n_shells):
        raise EMInputError(
            f"sigma2: expected a noise variance per pixel (number) or [{n_shells}] per shell, "
            f"got shape {tuple(s.shape)}"
        )
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise EMInputError("sigma2: expected positive finite noise variances (per pixel)")
    return s


def _data_term(points: torch.Tensor, ball: _Ball, sigma2: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 ``-sum_k m_k |Y_k|^2 / (2 N^d sigma2(shell))`` over the ball."""
    s = sigma2.to(ball.device)
    per_point = s if s.ndim == 0 else s[ball.shell]
    inv = ball.multiplicity.to(torch.float64) / (float(ball.box) ** ball.ndim * per_point)
    power = points.real.to(torch.float64) ** 2 + points.imag.to(torch.float64) ** 2
    return -0.5 * (power * inv).sum(dim=-1)


def _run_em(
    observations: torch.Tensor,
    initial: torch.Tensor,
    sigma2: float | torch.Tensor,
    rotations: torch.Tensor,
    log_weights: torch.Tensor,
    score,
    *,
    assignment: str,
    n_iterations: int,
    tolerance: float,
    truth: torch.Tensor | None,
    template: torch.Tensor | None,
    pad_factor: float,
) -> EMResult:
    ndim = initial.ndim
    if assignment not in ASSIGNMENTS:
        raise EMInputError(
            f"assignment: expected one of {', '.join(map(repr, ASSIGNMENTS))}, got {assignment!r}"
        )
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 0:
        raise EMInputError(f"n_iterations: expected a non-negative int, got {n_iterations!r}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise EMInputError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")
    if not pad_factor >= 1.0:
        raise EMInputError(f"pad_factor: expected >= 1, got {pad_factor!r}")
    box = int(initial.shape[-1])
    for name, x in (("truth", truth), ("template", template)):
        if x is not None and tuple(x.shape) != tuple(initial.shape):
            raise EMInputError(
                f"{name}: expected the shape of initial {tuple(initial.shape)}, "
                f"got {tuple(x.shape)}"
            )
    s2 = _check_sigma2(sigma2, box)
    dtype, device = initial.dtype, initial.device
    obs = observations.to(device=device, dtype=dtype)
    ball = _Ball(box, ndim, dtype, device)
    rotator = _Rotator(ball, pad_factor)
    prepared = rotator.prepare(obs)  # [B, N^d], reused by every M-step
    data_term = _data_term(ball.points(obs), ball, s2)
    rot = rotations.to(device=device, dtype=dtype)
    log_w = log_weights.to(device=device, dtype=torch.float64)
    sigma_arg = float(s2) if s2.ndim == 0 else s2.to(device=device, dtype=dtype)

    estimates = [initial]
    log_likelihood, change, max_post = [], [], []
    converged = False
    current = initial
    for _ in range(n_iterations):
        scores = score(obs, current, sigma_arg).to(torch.float64) + log_w  # [B, G]
        log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
        posterior = torch.exp(scores - log_norm)
        log_likelihood.append(float((log_norm[:, 0] + data_term).sum()))
        max_post.append(float(posterior.max(dim=-1).values.mean()))
        if assignment == "mmse":
            point = mmse_rotation(posterior, rot)
            points = _back_rotate_each(prepared, point, rotator)
        else:
            if assignment == "hard":
                best = torch.argmax(scores, dim=-1)
                posterior = torch.zeros_like(posterior)
                posterior[torch.arange(best.shape[0], device=device), best] = 1.0
            points = _back_rotate_points(prepared, posterior.to(dtype), rot, rotator)
        new = ball.real(points[None])[0]
        norm = torch.linalg.vector_norm(current.to(torch.float64))
        diff = torch.linalg.vector_norm((new - current).to(torch.float64))
        rel = float(diff / norm) if norm > 0 else math.inf
        change.append(rel)
        estimates.append(new)
        current = new
        if rel < tolerance:
            converged = True
            break
    stack = torch.stack(estimates)
    return EMResult(
        estimates=stack,
        log_likelihood=torch.tensor(log_likelihood, dtype=torch.float64),
        relative_change=torch.tensor(change, dtype=torch.float64),
        mean_max_posterior=torch.tensor(max_post, dtype=torch.float64),
        truth_correlation=None if truth is None else pearson_correlation(stack, truth, ndim),
        template_correlation=(
            None if template is None else pearson_correlation(stack, template, ndim)
        ),
        assignment=assignment,
        converged=converged,
    )


def _angles_deg(angles_deg: int | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """float64 degrees of an in-plane grid (an int L: ``360 j / L``)."""
    if isinstance(angles_deg, int) and not isinstance(angles_deg, bool):
        if angles_deg < 1:
            raise EMInputError(
                f"angles_deg: expected a positive number of angles, got {angles_deg}"
            )
        return torch.arange(angles_deg, dtype=torch.float64) * (360.0 / angles_deg)
    a = torch.as_tensor(angles_deg, dtype=torch.float64).cpu()
    if a.ndim != 1 or a.numel() < 1 or not bool(torch.all(torch.isfinite(a))):
        raise EMInputError(
            f"angles_deg: expected an int or a 1-D tensor of finite degrees, got {tuple(a.shape)}"
        )
    return a


def _rotation_2d(angles_deg: torch.Tensor) -> torch.Tensor:
    """``[L, 2, 2]`` matrices ``[[cos, -sin], [sin, cos]]`` on ``(x, y)`` (float64)."""
    t = torch.deg2rad(angles_deg.to(torch.float64))
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _check_initial(initial: torch.Tensor, ndim: int, box: int) -> None:
    what = "[N, N, N] volume" if ndim == 3 else "[N, N] image"
    if not isinstance(initial, torch.Tensor) or not initial.is_floating_point():
        raise EMInputError(f"initial: expected a real float32/float64 torch.Tensor ({what})")
    if initial.dtype not in (torch.float32, torch.float64):
        raise EMInputError(f"initial: expected float32 or float64, got {initial.dtype}")
    if tuple(initial.shape) != (box,) * ndim:
        raise EMInputError(
            f"initial: expected a {what} with N = {box} (the observations' box), "
            f"got shape {tuple(initial.shape)}"
        )


def em_inplane(
    images: torch.Tensor,
    initial: torch.Tensor,
    sigma2: float | torch.Tensor,
    angles_deg: int | Sequence[float] | torch.Tensor = 72,
    *,
    assignment: str = "soft",
    n_iterations: int = 100,
    tolerance: float = 1e-3,
    truth: torch.Tensor | None = None,
    template: torch.Tensor | None = None,
    pad_factor: float = 2.0,
) -> EMResult:
    """EM estimate of an image from in-plane-rotated noisy copies (seed section 4, 2D).

    Model ``y_i(x) = I(R_theta_i x) + noise``, ``theta_i`` uniform on the angle grid (equal
    weights), white noise of known variance ``sigma2`` per pixel.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, N, N]`` observations ``[y, x]``.
    initial : torch.Tensor
        ``[N, N]`` starting image (template); its dtype (float32/float64) and device are used.
    sigma2 : float or torch.Tensor
        Noise variance per pixel (number or ``[N // 2 + 1]`` per shell).
    angles_deg : int or sequence of float or torch.Tensor
        In-plane grid in degrees, or its size ``L`` (``360 j / L``).
    assignment : {"soft", "mmse", "hard"}
        Posterior-weighted back-rotation (EM, the MMSE back-rotation operator), back-rotation
        by each observation's MMSE rotation (:func:`mmse_rotation`, off the grid), or by its
        argmax (MLE) grid rotation.
    n_iterations : int
        Largest number of iterations.
    tolerance : float
        Stop when the relative change of the estimate falls below it (seed: 1e-3).
    truth, template : torch.Tensor, optional
        ``[N, N]`` images to correlate every iterate with (diagnostics only).
    pad_factor : float
        Zero padding of the interpolated transforms.

    Returns
    -------
    EMResult
    """
    obs = _as_observations(images, 2, "images")
    box = int(obs.shape[-1])
    _check_initial(initial, 2, box)
    grid_deg = _angles_deg(angles_deg)
    rot = _rotation_2d(grid_deg)
    log_w = torch.full((rot.shape[0],), -math.log(rot.shape[0]), dtype=torch.float64)
    angles_t = grid_deg.to(device=initial.device, dtype=initial.dtype)

    def score(y: torch.Tensor, ref: torch.Tensor, s2) -> torch.Tensor:
        return score_inplane(y, ref, s2, angles_t, pad_factor=pad_factor)

    return _run_em(
        obs,
        initial,
        sigma2,
        rot,
        log_w,
        score,
        assignment=assignment,
        n_iterations=n_iterations,
        tolerance=tolerance,
        truth=truth,
        template=template,
        pad_factor=pad_factor,
    )


def _grid_rotations(grid: SO3Grid | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(grid, SO3Grid):
        return grid.matrices, torch.log(grid.weights.to(torch.float64))
    r = torch.as_tensor(grid)
    if r.ndim != 3 or tuple(r.shape[-2:]) != (3, 3):
        raise EMInputError(
            f"grid: expected an SO3Grid or [G, 3, 3] rotation matrices, got shape {tuple(r.shape)}"
        )
    return r, torch.full((r.shape[0],), -math.log(r.shape[0]), dtype=torch.float64)


def em_subtomograms(
    subtomograms: torch.Tensor,
    initial: torch.Tensor,
    sigma2: float | torch.Tensor,
    grid: SO3Grid | torch.Tensor,
    *,
    assignment: str = "soft",
    n_iterations: int = 100,
    tolerance: float = 1e-3,
    truth: torch.Tensor | None = None,
    template: torch.Tensor | None = None,
    pad_factor: float = 2.0,
) -> EMResult:
    """EM estimate of a volume from rotated noisy copies (seed section 4, cryo-ET model).

    Model ``y_i(x) = V(R_i x) + noise`` (cryopose poses, :func:`~cryopose.bayes.models.
    rotate_volume`), ``R_i`` on the grid with its quadrature weights as prior, white noise of
    known variance ``sigma2`` per voxel; no missing wedge.

    Parameters
    ----------
    subtomograms : torch.Tensor
        ``[B, N, N, N]`` observations ``[z, y, x]``.
    initial : torch.Tensor
        ``[N, N, N]`` starting volume (template); its dtype and device are used.
    sigma2 : float or torch.Tensor
        Noise variance per voxel (number or ``[N // 2 + 1]`` per shell).
    grid : SO3Grid or torch.Tensor
        Candidate rotations (an ``SO3Grid`` brings its weights; ``[G, 3, 3]``: equal weights).
    assignment, n_iterations, tolerance, truth, template, pad_factor
        As in :func:`em_inplane` (``truth``/``template`` are ``[N, N, N]``).

    Returns
    -------
    EMResult
    """
    obs = _as_observations(subtomograms, 3, "subtomograms")
    box = int(obs.shape[-1])
    _check_initial(initial, 3, box)
    rot, log_w = _grid_rotations(grid)

    def score(y: torch.Tensor, ref: torch.Tensor, s2) -> torch.Tensor:
        scorer = SubtomogramScorer(ref, pad_factor=pad_factor, dtype=ref.dtype)
        return scorer.score_rotations(y, s2, rot.to(device=ref.device, dtype=ref.dtype))

    return _run_em(
        obs,
        initial,
        sigma2,
        rot,
        log_w,
        score,
        assignment=assignment,
        n_iterations=n_iterations,
        tolerance=tolerance,
        truth=truth,
        template=template,
        pad_factor=pad_factor,
    )


# ---------------------------------------------------------------------------------------------
# Simulation and evaluation helpers
# ---------------------------------------------------------------------------------------------


def ball_signal_power(x: torch.Tensor) -> float:
    """Mean squared value of an ``[N] * d`` array over the pixels inside radius ``N / 2``.

    The numerator of the SNR of ``docs/conventions.md`` (disk for images, ball for volumes):
    ``SNR = ball_signal_power(clean) / sigma2``.
    """
    box = int(x.shape[-1])
    i = torch.arange(box, dtype=torch.float64, device=x.device) - box // 2
    mesh = torch.meshgrid(*([i] * x.ndim), indexing="ij")
    inside = torch.sqrt(sum(m**2 for m in mesh)) <= box / 2.0
    return float((x.to(torch.float64)[inside] ** 2).mean())


def _generator(seed: int | torch.Generator) -> torch.Generator:
    gen = resolve_generator(seed)
    if gen is None:
        raise EMInputError("seed: expected an int seed or a torch.Generator, got None")
    return gen


def _check_clean(x: torch.Tensor, ndim: int, name: str) -> int:
    what = "[N, N, N] volume" if ndim == 3 else "[N, N] image"
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64):
        raise EMInputError(f"{name}: expected a float32/float64 torch.Tensor ({what})")
    if x.ndim != ndim or len(set(x.shape)) != 1:
        raise EMInputError(f"{name}: expected a {what}, got shape {tuple(x.shape)}")
    return int(x.shape[-1])


def simulate_inplane_observations(
    image: torch.Tensor,
    n_images: int,
    sigma2: float,
    *,
    angles_deg: int | Sequence[float] | torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy in-plane-rotated copies ``y_i(x) = I(R_theta_i x) + noise`` of an image.

    Parameters
    ----------
    image : torch.Tensor
        ``[N, N]`` clean image; sets dtype and device.
    n_images : int
        Number of observations ``B``.
    sigma2 : float
        White-noise variance per pixel (0: noiseless).
    angles_deg : int or sequence or torch.Tensor, optional
        Draw the poses uniformly from this grid (degrees, or its size ``L``); ``None``: uniform
        on [0, 360).
    seed : int or torch.Generator
        Random source (CPU generator; same seed, same bytes).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``[B, N, N]`` images and their ``[B]`` poses ``theta_i`` in degrees (float64).
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise EMInputError(f"n_images: expected a positive int, got {n_images!r}")
    if not (math.isfinite(sigma2) and sigma2 >= 0):
        raise EMInputError(f"sigma2: expected a noise variance >= 0 per pixel, got {sigma2!r}")
    box = _check_clean(image, 2, "image")
    gen = _generator(seed)
    if angles_deg is None:
        theta = torch.rand(n_images, generator=gen, dtype=torch.float64) * 360.0
    else:
        grid = _angles_deg(angles_deg)
        theta = grid[torch.randint(grid.shape[0], (n_images,), generator=gen)]
    clean = _Rotator(_Ball(box, 2, image.dtype, image.device), 2.0).rotate(
        image, _rotation_2d(theta).to(device=image.device, dtype=image.dtype)
    )
    noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    return clean + math.sqrt(sigma2) * noise.to(clean), theta


def simulate_subtomogram_observations(
    volume: torch.Tensor,
    n_subtomograms: int,
    sigma2: float,
    *,
    grid: SO3Grid | torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy rotated copies ``y_i(x) = V(R_i x) + noise`` of a volume (no missing wedge).

    Parameters
    ----------
    volume : torch.Tensor
        ``[N, N, N]`` clean volume; sets dtype and device.
    n_subtomograms : int
        Number of observations ``B``.
    sigma2 : float
        White-noise variance per voxel (0: noiseless).
    grid : SO3Grid or torch.Tensor, optional
        Draw the poses uniformly from these rotations; ``None``: Haar-uniform on SO(3).
    seed : int or torch.Generator
        Random source (CPU generator; same seed, same bytes).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``[B, N, N, N]`` subtomograms and their ``[B, 3, 3]`` cryopose poses.
    """
    if isinstance(n_subtomograms, bool) or not isinstance(n_subtomograms, int) or (
        n_subtomograms < 1
    ):
        raise EMInputError(f"n_subtomograms: expected a positive int, got {n_subtomograms!r}")
    if not (math.isfinite(sigma2) and sigma2 >= 0):
        raise EMInputError(f"sigma2: expected a noise variance >= 0 per voxel, got {sigma2!r}")
    box = _check_clean(volume, 3, "volume")
    gen = _generator(seed)
    if grid is None:
        rot = random_rotations(n_subtomograms, generator=gen, dtype=torch.float64)
    else:
        matrices, _ = _grid_rotations(grid)
        rot = matrices.to(torch.float64).cpu()[
            torch.randint(matrices.shape[0], (n_subtomograms,), generator=gen)
        ]
    clean = _Rotator(_Ball(box, 3, volume.dtype, volume.device), 2.0).rotate(
        volume, rot.to(device=volume.device, dtype=volume.dtype)
    )
    noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    return clean + math.sqrt(sigma2) * noise.to(clean), rot


def align_to_reference(
    estimate: torch.Tensor,
    reference: torch.Tensor,
    *,
    n_angles: int = 720,
    healpix_order: int = 2,
    refine_steps_deg: Sequence[float] = (5.0, 2.0, 0.5),
    pad_factor: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate an estimate onto a reference (remove EM's global rotation ambiguity).

    Finds the pose ``R`` maximising ``<reference, estimate(R .)>`` and returns
    ``estimate(R .)`` (band-limited to ``|k| < N / 2``). 2D: exhaustive over ``n_angles``
    equally spaced angles. 3D: a HEALPix grid of the given order, then local grids (one step
    about the best, two steps in cone and in-plane angle) at each of ``refine_steps_deg``.
    The returned rotation is interpolated with ``pad_factor`` (4 by default: less interpolation
    error than the search's factor 2, so that an alignment near the identity does not add a
    visible error of its own).

    Parameters
    ----------
    estimate, reference : torch.Tensor
        ``[N, N]`` images or ``[N, N, N]`` volumes of the same shape.
    n_angles : int
        2D search size (0.5 degree steps by default).
    healpix_order : int
        3D coarse grid (2: 4,608 rotations, 15 degrees).
    refine_steps_deg : sequence of float
        3D local refinement steps in degrees.
    pad_factor : float
        Zero padding of the final rotation's interpolation.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The aligned estimate (same shape) and the pose: the angle in degrees (2D, 0-d) or the
        ``[3, 3]`` cryopose matrix (3D).
    """
    if tuple(estimate.shape) != tuple(reference.shape) or estimate.ndim not in (2, 3):
        raise EMInputError(
            f"estimate, reference: expected equal [N, N] or [N, N, N] shapes, got "
            f"{tuple(estimate.shape)} and {tuple(reference.shape)}"
        )
    ref = reference.to(device=estimate.device, dtype=estimate.dtype)
    if estimate.ndim == 2:
        angles = _angles_deg(n_angles).to(device=estimate.device, dtype=estimate.dtype)
        # With W = 1 the template norm does not depend on the angle: the score is the
        # cross-correlation <reference, estimate(R .)> (sigma2 = 1).
        scores = score_inplane(ref[None], estimate, 1.0, angles)[0]
        best = angles[torch.argmax(scores)]
        return _rotate_one(estimate, _rotation_2d(best[None]), pad_factor), best
    scorer = SubtomogramScorer(estimate, dtype=estimate.dtype)
    coarse = healpix_grid(healpix_order, dtype=estimate.dtype, device=estimate.device).matrices
    scores = scorer.score_rotations(ref[None], 1.0, coarse, norm_term=False)[0]
    best = coarse[torch.argmax(scores)]
    for step in refine_steps_deg:
        local = local_grid(best, 2.0 * step, 2.0 * step, step)
        scores = scorer.score_rotations(ref[None], 1.0, local, norm_term=False)[0]
        best = local[torch.argmax(scores)]
    return _rotate_one(estimate, best[None], pad_factor), best


def _rotate_one(x: torch.Tensor, rotation: torch.Tensor, pad_factor: float) -> torch.Tensor:
    """``x(R .)`` of one image or volume with the EM interpolator (``[1, d, d]`` rotation)."""
    rotator = _Rotator(_Ball(int(x.shape[-1]), x.ndim, x.dtype, x.device), pad_factor)
    return rotator.rotate(x, rotation.to(device=x.device, dtype=x.dtype))[0]
