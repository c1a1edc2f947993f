"""Probability distributions on SO(3): uniform (Haar) and isotropic Gaussian IG(eta).

Reference measure
-----------------
All densities on SO(3) are with respect to the **normalised Haar measure** (total mass 1), so
the uniform distribution has density 1 (log-density 0). A rotation by angle ``w`` about a
uniformly random axis has, under Haar, angle density ``(1 - cos w) / pi`` on [0, pi] and
angle CDF ``(w - sin w) / pi``.

Isotropic Gaussian IG(eta)
--------------------------
IG(eta) about a mean ``M`` is the heat kernel on SO(3) at time ``eps = eta^2 / 2`` (the
Laplacian normalised so that geodesic distance is the rotation angle). Its density at ``R``
depends only on the angle ``w`` between ``R`` and ``M``::

    p(R) = S(w) = sum_{l >= 0} (2l + 1) exp(-l (l + 1) eps) sin((l + 1/2) w) / sin(w / 2)

and its angle has density ``f(w) = (1 - cos w) / pi * S(w)`` on [0, pi]. For small eta the
angle is close to Maxwell-distributed with scale eta (the tangent vector is close to an
isotropic 3D Gaussian with standard deviation eta per component), so the angle's standard
deviation is ``sqrt(3 - 8 / pi) eta ~= 0.673 eta``. Convolving IG(eta1) with IG(eta2) gives
IG(sqrt(eta1^2 + eta2^2)).

``S`` is evaluated by one of two formulas:

* ``"series"``: the character series above, truncated at ``l_max`` where the remaining terms
  are below 1e-16 in absolute value (``l_max ~ sqrt(40 / eps)``: 5 terms at eta = 2,
  97 at eta = 0.1, 200 at eta = 0.05). Accurate for large eta; needs many terms and loses
  relative precision in the far tail for small eta.
* ``"closed_form"``: the Poisson-summed series (Matthies et al. 1988; Leach et al. 2022),
  keeping the three images ``k = -1, 0, 1`` of ``sum_k (-1)^k (w + 2 pi k) exp(-(w + 2 pi
  k)^2 / (4 eps))``. The first neglected image is smaller by ``~exp(-2 pi^2 / eps)``
  relative to the kept ones, so the form is exact to double precision for eta <= 1 and
  drifts from the series as eta grows. Largest relative difference over [0, pi] (measured):
  4e-15 at eta = 1, 4e-8 at eta = 1.5, 9e-7 at eta = 1.66 (the 1e-6 limit), 8e-5 at
  eta = 2, 2e-2 at eta = 3.

``"auto"`` uses the closed form for ``eta < CLOSED_FORM_MAX_ETA = 1`` and the series above; at
the switch both agree to better than 1e-12 relative (tested), well inside the range
eta <= 1.66 where they agree to 1e-6. Everything is evaluated in
float64 and in log space (no overflow for eta down to 1e-6, no underflow far from the mean),
then cast to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from cryopose.so3.conversions import rotvec_to_matrix
from cryopose.so3.distances import geodesic_distance, pairwise_geodesic_blocks
from cryopose.so3.random import (
    GeneratorLike,
    _rand,
    _randn,
    _shape_tuple,
    resolve_generator,
)

__all__ = [
    "CLOSED_FORM_MAX_ETA",
    "haar_angle_density",
    "haar_angle_cdf",
    "uniform_log_density",
    "iso_gaussian_log_kernel",
    "iso_gaussian_angle_log_density",
    "iso_gaussian_angle_density",
    "iso_gaussian_angle_cdf",
    "iso_gaussian_angle_std",
    "iso_gaussian_log_density",
    "sample_iso_gaussian",
    "smoothed_histogram",
]

Method = Literal["auto", "series", "closed_form"]

#: eta below which ``method="auto"`` uses the closed form (radians).
CLOSED_FORM_MAX_ETA = 1.0
_MIN_ETA = 1e-6  # radians; a positive floor keeps log(eps) and w^2 / (4 eps) meaningful
_MAX_SERIES_TERMS = 200_000


def _check_eta(eta: float | torch.Tensor) -> torch.Tensor:
    eta_t = torch.as_tensor(eta, dtype=torch.float64)
    if not bool(torch.all(torch.isfinite(eta_t))) or bool(torch.any(eta_t < _MIN_ETA)):
        raise ValueError(f"eta: expected finite values >= {_MIN_ETA} radians, got {eta!r}")
    return eta_t


# --------------------------------------------------------------------------------------------
# Haar (uniform)
# --------------------------------------------------------------------------------------------


def haar_angle_density(angle_rad: torch.Tensor) -> torch.Tensor:
    """Density of the rotation angle of a Haar-uniform rotation, ``(1 - cos w) / pi``.

    Parameters
    ----------
    angle_rad : torch.Tensor
        Angles ``w`` in radians, in [0, pi].

    Returns
    -------
    torch.Tensor
        Density per radian (integrates to 1 over [0, pi]).
    """
    return 2.0 * torch.sin(0.5 * angle_rad) ** 2 / math.pi


def haar_angle_cdf(angle_rad: torch.Tensor) -> torch.Tensor:
    """CDF of the Haar rotation angle, ``(w - sin w) / pi`` for ``w`` in [0, pi] (radians)."""
    return (angle_rad - torch.sin(angle_rad)) / math.pi


def uniform_log_density(rotations: torch.Tensor) -> torch.Tensor:
    """Log-density of the uniform distribution w.r.t. normalised Haar measure: zeros.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``[...]`` zeros (dtype and device of ``rotations``).
    """
    return torch.zeros(rotations.shape[:-2], dtype=rotations.dtype, device=rotations.device)


# --------------------------------------------------------------------------------------------
# Isotropic Gaussian: the kernel S(w) in log space
# --------------------------------------------------------------------------------------------


def _log_w_over_2sin_half(w: torch.Tensor) -> torch.Tensor:
    """log(w / (2 sin(w / 2))), stable at w = 0 (limit 0)."""
    small = w < 1e-4
    w_safe = torch.where(small, torch.ones_like(w), w)
    exact = torch.log(w_safe / (2.0 * torch.sin(0.5 * w_safe)))
    return torch.where(small, w * w / 24.0, exact)


def _log_kernel_closed_form(w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log S(w) from the three-image Poisson sum (float64 inputs)."""
    pi = math.pi
    # D/w with D = exp(-pi^2/eps) ((w - 2 pi) exp(pi w / eps) + (w + 2 pi) exp(-pi w / eps)),
    # written with non-positive exponents only (no overflow for tiny eps).
    x = pi * w / eps
    e1 = torch.exp(pi * (w - pi) / eps)  # exp(-pi^2/eps) exp(+x)
    e2 = torch.exp(-pi * (w + pi) / eps)  # exp(-pi^2/eps) exp(-x)
    small = x < 1e-8
    w_safe = torch.where(small, torch.ones_like(w), w)
    # (e1 - e2) / w = e1 * (1 - exp(-2x)) / w, with the w -> 0 limit e1 * 2 pi / eps.
    diff_over_w = torch.where(small, e1 * (2.0 * pi / eps), e1 * (-torch.expm1(-2.0 * x)) / w_safe)
    d_over_w = e1 + e2 - 2.0 * pi * diff_over_w
    return (
        0.5 * math.log(pi)
        - 1.5 * torch.log(eps)
        + 0.25 * eps
        - w * w / (4.0 * eps)
        + torch.log1p(-d_over_w)
        + _log_w_over_2sin_half(w)
    )


def _series_l_max(eps_min: float) -> int:
    # terms are bounded by (2l + 1)^2 exp(-l (l + 1) eps); stop when that is < 1e-16.
    l_max = 1
    while (2 * l_max + 1) ** 2 * math.exp(-l_max * (l_max + 1) * eps_min) > 1e-16:
        l_max = max(l_max + 1, int(l_max * 1.05))
        if l_max > _MAX_SERIES_TERMS:
            raise ValueError(
                f"eta: the character series needs more than {_MAX_SERIES_TERMS} terms at "
                f"eta = {math.sqrt(2 * eps_min):.3g}; use method='closed_form'"
            )
    return l_max


def _log_kernel_series(w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log S(w) from the character series (float64 inputs, broadcast already)."""
    l_max = _series_l_max(float(eps.min()))
    flat_w = w.reshape(-1)
    flat_eps = eps.reshape(-1)
    total = torch.zeros_like(flat_w)
    # sin((l + 1/2) w) / sin(w / 2) is 2l + 1 at w = 0; below w = 1e-7 the relative error of
    # evaluating it at w = 1e-7 instead is < l^2 1e-14 / 6.
    w_eval = flat_w.clamp_min(1e-7)
    sin_half = torch.sin(0.5 * w_eval)
    chunk = 256
    for l0 in range(0, l_max + 1, chunk):
        ells = torch.arange(l0, min(l0 + chunk, l_max + 1), dtype=torch.float64, device=w.device)
        weight = (2.0 * ells + 1.0) * torch.exp(-ells * (ells + 1.0) * flat_eps[:, None])
        char = torch.sin((ells + 0.5) * w_eval[:, None]) / sin_half[:, None]
        total = total + (weight * char).sum(-1)
    # S > 0 mathematically; rounding can only make a tail value <= 0 when it is below 1e-300.
    return torch.log(total.clamp_min(1e-300)).reshape(w.shape)


def iso_gaussian_log_kernel(
    angle_rad: torch.Tensor, eta: float | torch.Tensor, *, method: Method = "auto"
) -> torch.Tensor:
    """Log-density of IG(eta) at rotation angle ``w`` from its mean, w.r.t. normalised Haar.

    Parameters
    ----------
    angle_rad : torch.Tensor
        Geodesic angles ``w`` from the mean, radians, in [0, pi].
    eta : float or torch.Tensor
        IG width in radians (broadcast against ``angle_rad``), ``>= 1e-6``.
    method : {"auto", "series", "closed_form"}
        Formula for ``S(w)`` (see module docstring).

    Returns
    -------
    torch.Tensor
        ``log S(w)`` in ``angle_rad``'s dtype and device (computed in float64).
    """
    if method not in ("auto", "series", "closed_form"):
        raise ValueError(f"method: expected 'auto', 'series' or 'closed_form', got {method!r}")
    angle = torch.as_tensor(angle_rad)
    out_dtype = angle.dtype if angle.is_floating_point() else torch.get_default_dtype()
    eta_t = _check_eta(eta).to(angle.device)
    w = angle.to(torch.float64).clamp(0.0, math.pi)
    w, eta_b = torch.broadcast_tensors(w, eta_t)
    eps = 0.5 * eta_b * eta_b
    if method == "auto" and eta_t.numel() == 1:
        method = "closed_form" if float(eta_t) < CLOSED_FORM_MAX_ETA else "series"
    if method == "closed_form":
        out = _log_kernel_closed_form(w, eps)
    elif method == "series":
        out = _log_kernel_series(w, eps)
    else:
        use_closed = eta_b < CLOSED_FORM_MAX_ETA
        out = torch.empty_like(w)
        if bool(use_closed.any()):
            out[use_closed] = _log_kernel_closed_form(w[use_closed], eps[use_closed])
        if bool((~use_closed).any()):
            out[~use_closed] = _log_kernel_series(w[~use_closed], eps[~use_closed])
    return out.to(out_dtype)


def iso_gaussian_angle_log_density(
    angle_rad: torch.Tensor, eta: float | torch.Tensor, *, method: Method = "auto"
) -> torch.Tensor:
    """Log-density (per radian) of the rotation angle of an IG(eta) rotation.

    ``log f(w) = log((1 - cos w) / pi) + log S(w)``; ``-inf`` at ``w = 0``.

    Parameters
    ----------
    angle_rad : torch.Tensor
        Angles in radians, in [0, pi].
    eta : float or torch.Tensor
        IG width in radians.
    method : {"auto", "series", "closed_form"}
        Formula for the kernel (see module docstring).
    """
    angle = torch.as_tensor(angle_rad)
    w = angle.to(torch.float64).clamp(0.0, math.pi)
    log_haar = math.log(2.0 / math.pi) + 2.0 * torch.log(torch.sin(0.5 * w))
    out = log_haar + iso_gaussian_log_kernel(w, eta, method=method)
    return out.to(angle.dtype if angle.is_floating_point() else torch.get_default_dtype())


def iso_gaussian_angle_density(
    angle_rad: torch.Tensor, eta: float | torch.Tensor, *, method: Method = "auto"
) -> torch.Tensor:
    """Density (per radian, on [0, pi]) of the rotation angle of an IG(eta) rotation.

    ``f(w) = (1 - cos w) / pi * S(w)``; see :func:`iso_gaussian_angle_log_density`.
    """
    return torch.exp(iso_gaussian_angle_log_density(angle_rad, eta, method=method))


def _angle_table(
    eta: float, n_points: int = 16385, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Angles, CDF and density of IG(eta) on a fine grid (float64, CDF normalised to end at 1).

    The grid ends at ``min(pi, 14 eta)``: beyond ``14 eta`` the angle's tail mass is below
    1e-40 for every eta < pi / 14. The CDF is the cumulative Simpson rule on pairs of
    intervals, interpolated quadratically at odd nodes, so its error is O(h^4).
    """
    w_hi = min(math.pi, 14.0 * eta)
    n = n_points if n_points % 2 == 1 else n_points + 1
    w = torch.linspace(0.0, w_hi, n, dtype=torch.float64, device=device)
    f = iso_gaussian_angle_density(w, eta)
    h = w_hi / (n - 1)
    f0, f1, f2 = f[0:-2:2], f[1:-1:2], f[2::2]
    # Simpson over [w_{2i}, w_{2i+2}] and the partial integral over [w_{2i}, w_{2i+1}] from
    # the same quadratic interpolant.
    full = h / 3.0 * (f0 + 4.0 * f1 + f2)
    half = h / 12.0 * (5.0 * f0 + 8.0 * f1 - f2)
    cdf_even = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), full.cumsum(0)])
    cdf = torch.empty(n, dtype=torch.float64, device=device)
    cdf[0::2] = cdf_even
    cdf[1::2] = cdf_even[:-1] + half
    total = cdf[-1]
    cdf, _ = torch.cummax(cdf / total, 0)  # monotone despite rounding
    return w, cdf, f / total


def _hermite(
    x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, dp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic Hermite interpolation of values ``fp`` with slopes ``dp`` at increasing ``xp``.

    Returns the value and its derivative at ``x`` (clamped to ``[xp[0], xp[-1]]``). With exact
    slopes the error is O(h^4).
    """
    flat = x.reshape(-1).clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, flat, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    h = x1 - x0
    t = ((flat - x0) / h).clamp(0.0, 1.0)
    y0, y1, d0, d1 = fp[idx - 1], fp[idx], dp[idx - 1] * h, dp[idx] * h
    t2, t3 = t * t, t * t * t
    value = (
        (2 * t3 - 3 * t2 + 1) * y0
        + (t3 - 2 * t2 + t) * d0
        + (3 * t2 - 2 * t3) * y1
        + (t3 - t2) * d1
    )
    slope = (
        (6 * t2 - 6 * t) * y0
        + (3 * t2 - 4 * t + 1) * d0
        + (6 * t - 6 * t2) * y1
        + (3 * t2 - 2 * t) * d1
    ) / h
    return value.reshape(x.shape), slope.reshape(x.shape)


def _inverse_cdf(
    u: torch.Tensor, w_tab: torch.Tensor, cdf_tab: torch.Tensor, pdf_tab: torch.Tensor
) -> torch.Tensor:
    """Angles with CDF ``u``: linear inverse interpolation, then two safeguarded Newton steps
    on the Hermite CDF (kept inside the bracketing table interval)."""
    w = _interp(u, cdf_tab, w_tab)
    idx = torch.searchsorted(cdf_tab, u, right=True).clamp(1, w_tab.numel() - 1)
    lo, hi = w_tab[idx - 1], w_tab[idx]
    for _ in range(2):
        value, slope = _hermite(w, w_tab, cdf_tab, pdf_tab)
        step = (value - u) / torch.where(slope > 0, slope, torch.ones_like(slope))
        w = torch.where(slope > 0, w - step, w)
        w = torch.minimum(torch.maximum(w, lo), hi)
    return w


def iso_gaussian_angle_cdf(angle_rad: torch.Tensor, eta: float) -> torch.Tensor:
    """CDF of the rotation angle of an IG(eta) rotation (tabulated, error < 1e-9).

    A 16385-point table of the CDF (Simpson) and density, evaluated by cubic Hermite
    interpolation.

    Parameters
    ----------
    angle_rad : torch.Tensor
        Angles in radians.
    eta : float
        IG width in radians (a scalar).

    Returns
    -------
    torch.Tensor
        ``P(angle <= angle_rad)``.
    """
    angle = torch.as_tensor(angle_rad)
    eta_f = float(_check_eta(eta))
    w_tab, cdf_tab, pdf_tab = _angle_table(eta_f, device=angle.device)
    w = angle.to(torch.float64).clamp(0.0, math.pi)
    out, _ = _hermite(w, w_tab, cdf_tab, pdf_tab)
    return out.to(angle.dtype if angle.is_floating_point() else torch.get_default_dtype())


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (``numpy.interp`` semantics) for increasing ``xp``."""
    flat = x.reshape(-1)
    idx = torch.searchsorted(xp, flat, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    dx = x1 - x0
    t = torch.where(dx > 0, (flat - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)), 0.0)
    out = y0 + t.clamp(0.0, 1.0) * (y1 - y0)
    return out.reshape(x.shape)


def iso_gaussian_angle_std(eta: float) -> float:
    """Standard deviation (radians) of the rotation angle of IG(eta), by quadrature.

    For small eta this is ``sqrt(3 - 8 / pi) eta ~= 0.673 eta``.
    """
    eta_f = float(_check_eta(eta))
    w, cdf, _ = _angle_table(eta_f)
    # E[w^k] = integral of k w^(k-1) (1 - F(w)) dw, trapezoid on the fine grid.
    survival = 1.0 - cdf
    mean = torch.trapezoid(survival, w)
    second = torch.trapezoid(2.0 * w * survival, w)
    return float(torch.sqrt(second - mean * mean))


# --------------------------------------------------------------------------------------------
# Isotropic Gaussian on rotations
# --------------------------------------------------------------------------------------------


def iso_gaussian_log_density(
    rotations: torch.Tensor,
    mean_rotation: torch.Tensor,
    eta: float | torch.Tensor,
    *,
    method: Method = "auto",
) -> torch.Tensor:
    """Log-density of IG(eta) about ``mean_rotation`` w.r.t. normalised Haar measure.

    ``log p(R) = log S(w)`` with ``w`` the geodesic angle between ``R`` and the mean (computed
    with an ``atan2`` form, accurate near 0), so ``p = f(w) / ((1 - cos w) / pi)``.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.
    mean_rotation : torch.Tensor
        ``[..., 3, 3]`` mean rotations (broadcast against ``rotations``).
    eta : float or torch.Tensor
        IG width in radians (broadcast against the batch shape).
    method : {"auto", "series", "closed_form"}
        Formula for the kernel (see module docstring).

    Returns
    -------
    torch.Tensor
        ``[...]`` log-densities (dtype of ``rotations``).
    """
    _check_matrices(rotations, "rotations")
    _check_matrices(mean_rotation, "mean_rotation")
    w = geodesic_distance(rotations, mean_rotation.to(rotations.dtype))
    return iso_gaussian_log_kernel(w, eta, method=method)


def _check_matrices(matrices: torch.Tensor, name: str) -> None:
    if matrices.ndim < 2 or tuple(matrices.shape[-2:]) != (3, 3):
        raise ValueError(
            f"{name}: expected a [..., 3, 3] tensor, got shape {tuple(matrices.shape)}"
        )


def sample_iso_gaussian(
    shape: int | Sequence[int],
    eta: float,
    mean_rotation: torch.Tensor | None = None,
    *,
    generator: GeneratorLike = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw rotations from IG(eta) about ``mean_rotation``.

    The rotation angle is drawn by inverting the tabulated angle CDF of
    :func:`iso_gaussian_angle_cdf` (linear inverse interpolation refined by Newton steps), the
    axis uniformly on the sphere, and the sample
    is ``mean_rotation @ E`` with ``E`` the rotation by that angle about that axis (a
    perturbation in the particle frame, as in :func:`cryopose.so3.grids.local_grid`). IG is
    invariant under conjugation, so ``E @ mean_rotation`` has the same distribution.

    Parameters
    ----------
    shape : int or sequence of int
        Batch shape of the samples.
    eta : float
        IG width in radians (scalar, ``>= 1e-6``).
    mean_rotation : torch.Tensor, optional
        ``[..., 3, 3]`` mean rotation(s), broadcastable to ``[*shape, 3, 3]`` (default
        identity).
    generator : torch.Generator or int or None
        Random source (same seed, same samples on every device).
    dtype, device
        Output dtype and device (default: those of ``mean_rotation`` when given, else float32
        on the CPU).

    Returns
    -------
    torch.Tensor
        ``[*shape, 3, 3]`` rotation matrices.
    """
    shape = _shape_tuple(shape)
    eta_f = float(_check_eta(eta))
    if mean_rotation is not None:
        _check_matrices(mean_rotation, "mean_rotation")
        if device is None:
            device = mean_rotation.device
        if dtype is None:
            dtype = mean_rotation.dtype
    if dtype is None:
        dtype = torch.float32
    gen = resolve_generator(generator)
    axis = _randn((*shape, 3), gen)
    axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    u = _rand(shape, gen)
    w_tab, cdf_tab, pdf_tab = _angle_table(eta_f, device=u.device)
    angle = _inverse_cdf(u, w_tab, cdf_tab, pdf_tab)
    perturbation = rotvec_to_matrix(axis * angle[..., None])
    if mean_rotation is None:
        return perturbation.to(dtype=dtype, device=device)
    mean64 = mean_rotation.to(dtype=torch.float64, device=perturbation.device)
    return (mean64 @ perturbation).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Kernel density on a grid
# --------------------------------------------------------------------------------------------


def smoothed_histogram(
    rotations: torch.Tensor,
    grid: torch.Tensor | object,
    kernel_eta: float,
    weights: torch.Tensor | None = None,
    *,
    block_size: int = 2048,
) -> torch.Tensor:
    """Kernel density of rotations on grid points, as probabilities over the grid.

    ``p_j = q_j * density(G_j) / sum_k q_k * density(G_k)`` with ``q`` the grid's quadrature
    weights and ``density(G) = sum_n a_n S(w(G, R_n)) / sum_n a_n`` the IG(kernel_eta) kernel
    density (w.r.t. normalised Haar) of the rotations ``R_n`` with weights ``a_n``. Computed
    in log space (``logsumexp``), block by block, so memory is ``O(block_size^2)`` whatever the
    number of rotations and grid points, and a kernel much narrower than the grid spacing still
    gives finite probabilities.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[n, 3, 3]`` (or ``[..., 3, 3]``, flattened) rotation matrices.
    grid : SO3Grid or torch.Tensor
        A :class:`cryopose.so3.grids.SO3Grid` (its ``weights`` are used) or ``[m, 3, 3]``
        matrices (equal quadrature weights).
    kernel_eta : float
        Kernel width (IG eta) in radians.
    weights : torch.Tensor, optional
        ``[n]`` non-negative weights of the rotations (default all 1).
    block_size : int
        Rows and columns of each distance block.

    Returns
    -------
    torch.Tensor
        ``[m]`` probabilities summing to 1 (dtype and device of the grid matrices).
    """
    grid_matrices = getattr(grid, "matrices", grid)
    if not isinstance(grid_matrices, torch.Tensor):
        raise ValueError(f"grid: expected an SO3Grid or a [m, 3, 3] tensor, got {type(grid)}")
    _check_matrices(grid_matrices, "grid")
    _check_matrices(rotations, "rotations")
    grid_matrices = grid_matrices.reshape(-1, 3, 3)
    rots = rotations.reshape(-1, 3, 3).to(dtype=grid_matrices.dtype, device=grid_matrices.device)
    m, n = grid_matrices.shape[0], rots.shape[0]
    if n == 0:
        raise ValueError("rotations: expected at least one rotation, got 0")
    device = grid_matrices.device
    quad = getattr(grid, "weights", None)
    if quad is None:
        log_quad = torch.full((m,), -math.log(m), dtype=torch.float64, device=device)
    else:
        log_quad = torch.log(quad.to(dtype=torch.float64, device=device))
    if weights is None:
        log_a = torch.zeros(n, dtype=torch.float64, device=device)
    else:
        a = weights.reshape(-1).to(dtype=torch.float64, device=device)
        if a.shape[0] != n or bool(torch.any(a < 0)) or not bool(a.sum() > 0):
            raise ValueError(
                f"weights: expected {n} non-negative values with a positive sum, "
                f"got shape {tuple(weights.shape)}"
            )
        log_a = torch.log(a)
    log_a = log_a - torch.logsumexp(log_a, 0)
    eta_f = float(_check_eta(kernel_eta))
    log_density = torch.full((m,), -math.inf, dtype=torch.float64, device=device)
    for rows, cols, angles in pairwise_geodesic_blocks(grid_matrices, rots, block_size=block_size):
        log_k = iso_gaussian_log_kernel(angles.to(torch.float64), eta_f) + log_a[cols]
        log_density[rows] = torch.logaddexp(log_density[rows], torch.logsumexp(log_k, 1))
    log_p = log_quad + log_density
    return torch.softmax(log_p, 0).to(grid_matrices.dtype)
