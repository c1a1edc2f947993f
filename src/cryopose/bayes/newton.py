"""Gauss-Newton pose polishing and the Laplace (Gaussian) approximation of a sharp posterior mode.

A grid, however fine, caps high-SNR accuracy at a fraction of its spacing and represents a
posterior narrower than the spacing by one point. Near a mode the log-likelihood of a pose
``R exp([w]x)`` (right perturbation, ``w`` a rotation vector in radians) is close to quadratic,

    log p(y | R exp(w)) ~ l* - (w - w*)^T H (w - w*) / 2,

so a few Gauss-Newton steps find the mode ``w*`` without a grid, and ``H`` (the Fisher
information of the Gaussian likelihood, ``sum_k Re(J_k^H J_k) / sigma^2(k)``) gives the mode's
width. The template's derivative is exact up to interpolation: the slice of ``R exp(w)`` samples
the volume transform at ``q = R exp(w) (k_x, k_y, 0)``, so ``dq/dw = -R [k]x`` and
``dX/dw = grad V(q)^T dq/dw`` with ``grad V`` interpolated from the transform of
``-2 pi i x v(x)`` (:meth:`cryopose.imaging.Projector.sample_with_gradient`).

Steps are damped (Levenberg-Marquardt, a rejected step raises the damping and is retried from
the previous point) and coarse-to-fine in frequency: far from the mode the high frequencies of
the likelihood are not quadratic, so the first iterations use only ``|k| <= k_1``, with ``k_1``
about one over the starting error in radians, doubling to the full band.

:func:`laplace_cubature` turns a mode and its ``H`` into 7 quadrature points (the mode and
``+-2 sqrt(lambda_i) v_i`` along the eigenvectors of ``H^-1``) with Haar-mass weights such that
the quadrature is exact for a Gaussian posterior and integrates polynomials of degree 3 in
``w`` exactly; :mod:`cryopose.bayes.estimate` inserts them in place of the grid points of a
mode narrower than the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryopose.bayes.scoring import ReferenceScorer
from cryopose.so3.conversions import rotvec_to_matrix

__all__ = ["NewtonResult", "gauss_newton_poses", "laplace_cubature", "band_schedule"]


@dataclass
class NewtonResult:
    """Output of :func:`gauss_newton_poses` (leading shape ``[B, K]``).

    Attributes
    ----------
    rotations : torch.Tensor
        ``[B, K, 3, 3]`` polished rotations (the last accepted iterate).
    hessian : torch.Tensor
        ``[B, K, 3, 3]`` Gauss-Newton Hessian ``H`` of the negative log-likelihood at
        ``rotations`` with respect to the right rotation vector (per rad^2), full band.
    log_likelihood : torch.Tensor
        ``[B, K]`` log-likelihood at ``rotations`` and the given shift (same per-image constant
        as :meth:`ReferenceScorer.score_rotations`).
    """

    rotations: torch.Tensor
    hessian: torch.Tensor
    log_likelihood: torch.Tensor


def band_schedule(start_error_deg: float, box: int, full_iterations: int = 2) -> list[float]:
    """Frequency band limits (Fourier pixels) of the Gauss-Newton iterations.

    Starts at ``k_1 = max(2, 1 / error_rad)`` (a rotation by the starting error moves ``k_1`` by
    about one Fourier pixel), doubles up to the full band (``inf``), then ``full_iterations``
    more full-band iterations (the last evaluation only accepts or rejects the last step and
    gives the Hessian at the result).
    """
    if not start_error_deg > 0:
        raise ValueError(f"start_error_deg: expected > 0, got {start_error_deg}")
    band = max(2.0, 1.0 / math.radians(start_error_deg))
    bands = []
    while band < 0.8 * (box / 2):  # a band within 20% of the full one is the full one
        bands.append(band)
        band *= 2.0
    return bands + [math.inf] * (1 + max(0, int(full_iterations)))


def _cross_matrix_rows(kx: torch.Tensor, ky: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``-u^T [k]x`` for ``k = (kx, ky, 0)``: the derivative of ``V(R exp(w) k)`` in ``w``,
    given ``u = (grad V)^T R`` ``[..., P, 3]``."""
    ux, uy, uz = u.unbind(-1)
    return torch.stack([uz * ky, -uz * kx, uy * kx - ux * ky], dim=-1)


def gauss_newton_poses(
    scorer: ReferenceScorer,
    images: torch.Tensor,
    ctf: torch.Tensor | None,
    sigma2: torch.Tensor | float,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None = None,
    *,
    bands: list[float] | None = None,
    start_error_deg: float = 7.5,
) -> NewtonResult:
    """Polish poses by damped Gauss-Newton on the exact likelihood of the scorer.

    Parameters
    ----------
    scorer : ReferenceScorer
        Reference, band limit, pixel size (its likelihood is the one maximised).
    images, ctf, sigma2
        As in :meth:`ReferenceScorer.score_rotations` (``[B, N, N]`` images).
    rotations : torch.Tensor
        ``[B, K, 3, 3]`` starting rotations (``K`` starts per image).
    shifts_px : torch.Tensor, optional
        ``[B, K, 2]`` fixed template shifts ``(x, y)`` in pixels per start (None: zero).
    bands : list of float, optional
        Band limit (Fourier pixels, ``inf`` = the scorer's band) of each evaluation; default
        :func:`band_schedule` of ``start_error_deg``.
    start_error_deg : float
        Typical distance of the starts from the mode (e.g. the grid spacing), in degrees.

    Returns
    -------
    NewtonResult
    """
    y, c, w, const = scorer._prepare(images, ctf, sigma2)
    b = y.shape[0]
    rot = torch.as_tensor(rotations, dtype=scorer.dtype, device=scorer.device)
    if rot.ndim != 4 or rot.shape[0] != b or rot.shape[-2:] != (3, 3):
        raise ValueError(f"rotations: expected [B, K, 3, 3] with B = {b}, got {tuple(rot.shape)}")
    k_starts = rot.shape[1]
    if shifts_px is None:
        shifts = torch.zeros(b, k_starts, 2, dtype=scorer.dtype, device=scorer.device)
    else:
        shifts = torch.as_tensor(shifts_px, dtype=scorer.dtype, device=scorer.device)
        if shifts.shape != (b, k_starts, 2):
            raise ValueError(f"shifts_px: expected [B, K, 2] = [{b}, {k_starts}, 2], "
                             f"got {tuple(shifts.shape)}")
    bands = band_schedule(start_error_deg, scorer.box) if bands is None else list(bands)
    if not bands:
        raise ValueError("bands: expected at least one evaluation")
    m = scorer._tmask
    kx_all, ky_all = scorer._kx, scorer._ky  # [P]
    radius = torch.sqrt(kx_all**2 + ky_all**2)
    y_all = y[:, m]  # [B, P]
    w_all = w[:, m]
    c_all = c[:, m] if c is not None else None
    projector = scorer.projector
    eye = torch.eye(3, dtype=scorer.dtype, device=scorer.device)

    best_rot = rot.clone()
    best_ll = torch.full((b, k_starts), -math.inf, dtype=scorer.dtype, device=scorer.device)
    best_g = torch.zeros(b, k_starts, 3, dtype=scorer.dtype, device=scorer.device)
    best_h = eye.expand(b, k_starts, 3, 3).clone()
    damping = torch.full((b, k_starts), 1e-3, dtype=scorer.dtype, device=scorer.device)
    previous_band = None
    current = rot
    for it, band in enumerate(bands):
        sel = torch.nonzero(radius <= band).reshape(-1) if math.isfinite(band) else None
        kx = kx_all if sel is None else kx_all[sel]
        ky = ky_all if sel is None else ky_all[sel]
        yk = y_all if sel is None else y_all[:, sel]
        wk = w_all if sel is None else w_all[:, sel]
        ck = c_all if (c_all is None or sel is None) else c_all[:, sel]
        # The shift phase goes on the data (|phase| = 1): r = y conj(phase) - C X(q).
        yr, yi = yk.real[:, None, :], yk.imag[:, None, :]
        if shifts_px is None:
            data_r, data_i = yr, yi
        else:
            phase = (2.0 * math.pi / scorer.box) * (
                shifts[..., 0:1] * kx + shifts[..., 1:2] * ky
            )
            cos, sin = torch.cos(phase), torch.sin(phase)  # [B, K, P]
            data_r, data_i = yr * cos - yi * sin, yr * sin + yi * cos
        ctf_k = ck[:, None, :] if ck is not None else None
        # template and its gradient at q = R (kx, ky, 0)
        q = current[..., None, :, 0] * kx[:, None] + current[..., None, :, 1] * ky[:, None]
        v = projector.sample_with_gradient_ri(q)  # [4, 2, B, K, P]
        xr, xi = (v[0, 0], v[0, 1]) if ctf_k is None else (v[0, 0] * ctf_k, v[0, 1] * ctf_k)
        res_r, res_i = data_r - xr, data_i - xi
        wkb = wk[:, None, :]
        ll = -0.5 * (wkb * (res_r * res_r + res_i * res_i)).sum(-1)
        # u = grad^T R (rows), J = -u^T [k]x, per real / imaginary part: [B, K, P, 3]
        grad = v[1:].permute(1, 2, 3, 4, 0)  # [2, B, K, P, 3]
        u = grad @ current[None]
        jac = _cross_matrix_rows(kx, ky, u)  # [2, B, K, P, 3]
        wc = wkb if ctf_k is None else wkb * ctf_k  # [B, K, P]
        g = torch.einsum("bkp,bkpj->bkj", wc * res_r, jac[0]) + torch.einsum(
            "bkp,bkpj->bkj", wc * res_i, jac[1]
        )
        wcc = wkb if ctf_k is None else wkb * ctf_k * ctf_k
        jw = jac * wcc[None, ..., None]
        h = jw[0].transpose(-1, -2) @ jac[0] + jw[1].transpose(-1, -2) @ jac[1]  # [B, K, 3, 3]
        if band != previous_band:
            accept = torch.ones(b, k_starts, dtype=torch.bool, device=scorer.device)
        else:
            accept = ll >= best_ll
        a4 = accept[..., None, None]
        best_rot = torch.where(a4, current, best_rot)
        best_ll = torch.where(accept, ll, best_ll)
        best_g = torch.where(accept[..., None], g, best_g)
        best_h = torch.where(a4, h, best_h)
        damping = torch.where(accept, damping / 3.0, damping * 10.0).clamp(1e-6, 1e6)
        previous_band = band
        if it + 1 == len(bands):
            break
        # damped step from the best point; at most ~1 Fourier pixel at the band edge
        diag = torch.diagonal(best_h, dim1=-2, dim2=-1)
        scale = diag.mean(-1).clamp_min(1e-30)
        lhs = best_h + torch.diag_embed(damping[..., None] * diag + 1e-9 * scale[..., None])
        step = torch.linalg.solve(lhs, best_g[..., None])[..., 0]
        band_now = band if math.isfinite(band) else scorer.box / 2
        limit = 1.0 / band_now
        norm = step.norm(dim=-1, keepdim=True)
        step = step * torch.clamp(limit / norm.clamp_min(1e-30), max=1.0)
        current = best_rot @ rotvec_to_matrix(step)
    # -|y - C X|^2 / 2 over the template points counts -|y|^2 / 2 there, which ``const`` (over
    # every coefficient) already holds: add it back so the value equals score_rotations'.
    y_norm = 0.5 * (w_all * (y_all.real**2 + y_all.imag**2)).sum(-1)
    return NewtonResult(
        rotations=best_rot,
        hessian=best_h,
        log_likelihood=best_ll + (const + y_norm)[:, None],
    )


def laplace_cubature(
    centres: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seven quadrature points and Haar-mass weights for a Gaussian mode.

    For ``w ~ N(0, S)``, ``S = H^-1 = V diag(lambda) V^T``, the points are ``w = 0`` (cubature
    weight 1/4) and ``+-2 sqrt(lambda_i) v_i`` (1/8 each): the unscented rule with
    ``kappa = 1``, exact for polynomials of degree 3. Integrals against Haar measure use the
    importance weights ``c_p J(w_p) / (8 pi^2 phi(w_p))`` with ``phi`` the Gaussian density and
    ``J(w) = 2 (1 - cos|w|) / |w|^2`` the Haar Jacobian of the exponential map, so
    ``sum_p weight_p f(R_p) = int f dHaar`` exactly when ``f`` is this Gaussian.

    Parameters
    ----------
    centres : torch.Tensor
        ``[..., 3, 3]`` mode rotations ``R*``.
    hessian : torch.Tensor
        ``[..., 3, 3]`` positive-definite ``H`` (per rad^2).

    Returns
    -------
    rotations : torch.Tensor
        ``[..., 7, 3, 3]`` points ``R* exp(w_p)``.
    log_weights : torch.Tensor
        ``[..., 7]`` log Haar mass of each point (normalised Haar measure, total 1).
    sigma_max_rad : torch.Tensor
        ``[...]`` the mode's largest standard deviation ``sqrt(max lambda)``.
    """
    h = 0.5 * (hessian + hessian.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(h)
    lam = 1.0 / evals.clamp_min(1e-300)  # variances along the eigenvectors
    spread = 2.0 * torch.sqrt(lam)  # [..., 3]
    axes = evecs * spread[..., None, :]  # columns: 2 sqrt(lambda_i) v_i
    offsets = torch.cat(
        [torch.zeros_like(axes[..., :1, :]), axes.transpose(-1, -2), -axes.transpose(-1, -2)],
        dim=-2,
    )  # [..., 7, 3]
    rotations = centres[..., None, :, :] @ rotvec_to_matrix(offsets)
    cub = torch.tensor([0.25] + [0.125] * 6, dtype=h.dtype, device=h.device)
    # log phi(w_p) = -w^T S^-1 w / 2 - log((2 pi)^1.5 sqrt(det S)); w^T S^-1 w = 0 or 4
    quad = torch.cat([torch.zeros_like(spread[..., :1]), torch.full_like(spread, 4.0).repeat(
        *([1] * (spread.ndim - 1)), 2)], dim=-1)
    log_det_s = torch.log(lam).sum(-1, keepdim=True)
    log_phi = -0.5 * quad - 1.5 * math.log(2 * math.pi) - 0.5 * log_det_s
    theta = offsets.norm(dim=-1)
    small = theta < 1e-4
    safe = torch.where(small, torch.ones_like(theta), theta)
    jac = torch.where(small, 1.0 - theta**2 / 12.0, 2.0 * (1.0 - torch.cos(safe)) / safe**2)
    log_w = torch.log(cub) + torch.log(jac) - math.log(8 * math.pi**2) - log_phi
    return rotations, log_w, torch.sqrt(lam.amax(-1))
