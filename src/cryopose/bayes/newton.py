"""Gauss-Newton pose polishing and the Laplace (Gaussian) approximation of a sharp posterior mode.

A grid, however fine, caps high-SNR accuracy at a fraction of its spacing and represents a
posterior narrower than the spacing by one point. Near a mode the log-likelihood of a pose
``R exp([w]x)`` (right perturbation, ``w`` a rotation vector in radians) is close to quadratic,

    log p(y | R exp(w)) ~ l* - (w - w*)^T H (w - w*) / 2,

so a few Gauss-Newton steps find the mode ``w*`` without a grid, and ``H`` (the Fisher
information of the Gaussian likelihood, ``sum_k Re(J_k^H J_k) / sigma^2(k)``) gives the mode's
width. The template's derivative is that of the interpolated template: the slice of
``R exp(w)`` samples the volume transform at ``q = R exp(w) (k_x, k_y, 0)``, so
``dq/dw = -R [k]x`` and ``dX/dw = grad V(q)^T dq/dw`` with ``grad V`` the derivative of the
trilinear interpolant (:meth:`cryopose.imaging.Projector.sample_with_gradient`).

Steps are damped (Levenberg-Marquardt, a rejected step raises the damping and is retried from
the previous point) and coarse-to-fine in frequency: far from the mode the high frequencies of
the likelihood are not quadratic, so the first iterations use only ``|k| <= k_1``, with ``k_1``
about one over the starting error in radians, growing by sqrt(2) to the full band (a
continuation, :func:`band_schedule`). With several starts per image, the starts that cannot
catch up with the best one are dropped at each band change and those that reach the same
basin are merged entering the full band (:func:`gauss_newton_poses`).

Each evaluation (log-likelihood, gradient and Hessian of every live start) reads the template
and its gradient at ``|k|`` up to the band for every start: on the CPU a fused numba kernel
(:mod:`cryopose.bayes._newton_kernel`) does it in one pass per start from a cache-sized half
table of the transform; elsewhere batched torch code (``backend``).

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

from cryopose.bayes import _newton_kernel
from cryopose.bayes.scoring import ReferenceScorer
from cryopose.runtime import numba_ready
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


def band_schedule(
    start_error_deg: float, box: int, full_iterations: int = 1, growth: float = math.sqrt(2.0)
) -> list[float]:
    """Frequency band limits (Fourier pixels) of the Gauss-Newton iterations.

    Starts at ``k_1 = max(2, 1 / error_rad)`` (a rotation by the starting error moves ``k_1`` by
    about one Fourier pixel), grows by ``growth`` while below the full band ``box / 2``, then
    ``1 + full_iterations`` full-band evaluations (``inf``; the last evaluation only accepts
    or rejects the last step and gives the Hessian at the result).

    The slow growth is a continuation: at low SNR the full-band log-likelihood has many local
    maxima a few degrees apart (the noise decorrelates over ``1 / k`` rad), and following the
    maximum of the smoother band-limited likelihood while the band grows ends in the highest
    of them more often. Measured (1,000 ribosome particles, 64 px, SNR 0.1, 3 starts): with
    doubling, 22% of the particles ended in a local maximum more than 0.5 nat below the one
    next to the true pose and the MLE's median error was 3.2 deg; with ``sqrt(2)``, ~7-9% and
    ~2.9 deg, for ~15% more Newton work.
    """
    if not start_error_deg > 0:
        raise ValueError(f"start_error_deg: expected > 0, got {start_error_deg}")
    if not growth > 1:
        raise ValueError(f"growth: expected > 1, got {growth}")
    band = max(2.0, 1.0 / math.radians(start_error_deg))
    bands = []
    while band < box / 2:
        bands.append(band)
        band *= growth
    return bands + [math.inf] * (1 + max(0, int(full_iterations)))


def _cross_matrix_rows(kx: torch.Tensor, ky: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``-u^T [k]x`` for ``k = (kx, ky, 0)``: the derivative of ``V(R exp(w) k)`` in ``w``,
    given ``u = (grad V)^T R`` ``[..., P, 3]``."""
    ux, uy, uz = u.unbind(-1)
    return torch.stack([uz * ky, -uz * kx, uy * kx - ux * ky], dim=-1)


def _terms_torch(projector, cur, data_r, data_i, wk, ck, kx, ky):
    """Log-likelihood ``[A]``, gradient ``[A, 3]`` and Gauss-Newton Hessian ``[A, 3, 3]`` of
    the pairs (rotations ``cur``, data ``[A, P]``), batched torch code (any device)."""
    # template and its gradient at q = R (kx, ky, 0)
    q = cur[:, None, :, 0] * kx[:, None] + cur[:, None, :, 1] * ky[:, None]
    v = projector.sample_with_gradient_ri(q)  # [4, 2, A, P]
    xr, xi = (v[0, 0], v[0, 1]) if ck is None else (v[0, 0] * ck, v[0, 1] * ck)
    res_r, res_i = data_r - xr, data_i - xi
    ll = -0.5 * (wk * (res_r * res_r + res_i * res_i)).sum(-1)
    # u = grad^T R (rows), J = -u^T [k]x, per real / imaginary part: [2, A, P, 3]
    grad = v[1:].permute(1, 2, 3, 0)  # [2, A, P, 3]
    u = grad @ cur[None]
    jac = _cross_matrix_rows(kx, ky, u)  # [2, A, P, 3]
    wc = wk if ck is None else wk * ck  # [A, P]
    g = torch.einsum("ap,apj->aj", wc * res_r, jac[0]) + torch.einsum(
        "ap,apj->aj", wc * res_i, jac[1]
    )
    wcc = wk if ck is None else wk * ck * ck
    jw = jac * wcc[None, ..., None]
    h = jw[0].transpose(-1, -2) @ jac[0] + jw[1].transpose(-1, -2) @ jac[1]  # [A, 3, 3]
    return ll, g, h


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
    merge: bool = True,
    prune_nats: float | None = 8.0,
    backend: str = "auto",
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
    merge : bool
        Entering the full band, merge the starts of one image (with the same shift) that have
        converged to within a quarter of a Fourier pixel at the last finite band's edge
        (``0.25 / band`` rad) of a better one: the full-band iterations, most of the work,
        then run once per basin; a merged start returns its survivor's result.
    prune_nats : float or None
        At every band change, drop the starts whose band-limited log-likelihood plus Newton
        decrement (the quadratic model's estimate of their band-limited mode) is more than
        this many nats below the image's best start; they return the best start's result.
        Safe for the true pose: for any band, the expected log-likelihood gain of the true
        pose over another is ``E = sum |dX|^2 / (2 sigma^2) >= 0`` with variance ``2 E``, so
        it falls ``T`` nats behind with probability at most ``Phi(-sqrt(2 T))`` (3e-5 at
        the default T = 8, 1e-10 at T = 20). Measured (1,000 ribosome particles, 64 px, SNR
        0.1, 3 starts): T = 20 -> 8 -> 6 evaluate 18,308 / 15,712 / 14,419 template points per
        particle with MLE median / mean errors 2.98 / 9.23, 2.97 / 9.12, 2.98 / 9.10 deg.
        None: polish every start to the end.
    backend : {"auto", "numba", "torch"}
        How each evaluation (log-likelihood, gradient and Gauss-Newton Hessian of every start)
        is computed: ``"numba"``, the fused CPU kernel of :mod:`cryopose.bayes._newton_kernel`
        (measured: the polish of 1,000 particles at SNR 0.03 took 0.4 s instead of 3.3 s);
        ``"torch"``, batched tensor code (any device); ``"auto"``: numba
        on the CPU when it is installed, torch otherwise. Both compute the same sums (to
        float32 rounding in float32).

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
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend: expected 'auto', 'numba' or 'torch', got {backend!r}")
    use_numba = backend == "numba" or (
        backend == "auto" and scorer.device.type == "cpu" and numba_ready()
    )
    if use_numba and scorer.device.type != "cpu":
        raise ValueError(f"backend: 'numba' runs on the CPU, the scorer is on {scorer.device}")
    # template points sorted by radius: a band limit is a prefix of them
    radius = torch.sqrt(scorer._kx**2 + scorer._ky**2)
    radius, by_radius = torch.sort(radius, stable=True)
    kx_all, ky_all = scorer._kx[by_radius], scorer._ky[by_radius]  # [P]
    m = torch.nonzero(scorer._tmask.reshape(-1)).reshape(-1)[by_radius]
    y_all = y.reshape(b, -1)[:, m]  # [B, P]
    w_all = w.reshape(b, -1)[:, m]
    c_all = c.reshape(b, -1)[:, m] if c is not None else None
    projector = scorer.projector
    dev, dt = scorer.device, scorer.dtype

    # State of every (image, start) pair, flat b * K + k; only the alive pairs are evaluated.
    n_pairs = b * k_starts
    owner_all = torch.arange(b, device=dev).repeat_interleave(k_starts)
    alias = torch.arange(n_pairs, device=dev)  # result row of each pair: itself or survivor
    alive = torch.ones(n_pairs, dtype=torch.bool, device=dev)
    current = rot.reshape(n_pairs, 3, 3).clone()  # the point evaluated next
    pair_shift = shifts.reshape(n_pairs, 2)
    best_rot = current.clone()
    best_ll = torch.full((n_pairs,), -math.inf, dtype=dt, device=dev)
    best_g = torch.zeros(n_pairs, 3, dtype=dt, device=dev)
    best_h = torch.eye(3, dtype=dt, device=dev).expand(n_pairs, 3, 3).clone()
    damping = torch.full((n_pairs,), 1e-3, dtype=dt, device=dev)
    previous_band = None
    for it, band in enumerate(bands):
        if (k_starts > 1 and previous_band is not None and math.isfinite(previous_band)
                and band != previous_band
                and (prune_nats is not None or (merge and not math.isfinite(band)))):
            # band change: drop the starts that cannot catch up with their image's best
            # (upper estimate of each start's band-limited mode: value + Newton decrement)
            # and, entering the full band, merge the starts that share a basin
            upper = None
            if prune_nats is not None:
                diag = torch.diagonal(best_h, dim1=-2, dim2=-1)
                reg = torch.diag_embed(1e-9 * diag.mean(-1, keepdim=True).clamp_min(1e-30)
                                       .expand(-1, 3))
                decrement = 0.5 * (best_g * torch.linalg.solve(best_h + reg, best_g[..., None])[
                    ..., 0]).sum(-1)
                upper = (best_ll + decrement.clamp_min(0.0)).reshape(b, k_starts)
            kept, survivor = _merge_starts(
                best_rot.reshape(b, k_starts, 3, 3),
                torch.where(alive, best_ll, -math.inf).reshape(b, k_starts),
                pair_shift.reshape(b, k_starts, 2),
                0.25 / previous_band if (merge and not math.isfinite(band)) else None,
                upper=upper,
                prune_nats=prune_nats,
                alive=alive.reshape(b, k_starts),
            )
            alias = survivor[alias]
            alive = kept
        idx = torch.nonzero(alive).reshape(-1)
        owner, cur = owner_all[idx], current[idx]
        n_band = int(torch.searchsorted(radius, band, right=True)) if math.isfinite(band) \
            else radius.shape[0]
        kx, ky = kx_all[:n_band], ky_all[:n_band]
        # The shift phase goes on the data (|phase| = 1): r = y conj(phase) - C X(q).
        if shifts_px is None:
            data_r, data_i, data_row = y_all.real, y_all.imag, owner
        else:
            yk = y_all[owner, :n_band]
            psh = pair_shift[idx]
            phase = (2.0 * math.pi / scorer.box) * (psh[:, 0:1] * kx + psh[:, 1:2] * ky)
            cos, sin = torch.cos(phase), torch.sin(phase)  # [A, P]
            data_r = yk.real * cos - yk.imag * sin
            data_i = yk.real * sin + yk.imag * cos
            data_row = torch.arange(idx.shape[0], device=dev)
        if use_numba:
            ll, g, h = _newton_kernel.gauss_newton_terms(
                projector, cur, data_r, data_i, data_row, w_all, c_all, owner, kx_all, ky_all,
                n_band)
        else:
            ll, g, h = _terms_torch(projector, cur, data_r[data_row, :n_band],
                                    data_i[data_row, :n_band], w_all[owner, :n_band],
                                    None if c_all is None else c_all[owner, :n_band], kx, ky)
        if band != previous_band:
            accept = torch.ones_like(ll, dtype=torch.bool)
        else:
            accept = ll >= best_ll[idx]
        a3 = accept[:, None, None]
        rot_a = torch.where(a3, cur, best_rot[idx])
        h_a = torch.where(a3, h, best_h[idx])
        g_a = torch.where(accept[:, None], g, best_g[idx])
        best_rot[idx], best_h[idx], best_g[idx] = rot_a, h_a, g_a
        best_ll[idx] = torch.where(accept, ll, best_ll[idx])
        damp_a = torch.where(accept, damping[idx] / 3.0, damping[idx] * 10.0).clamp(1e-6, 1e6)
        damping[idx] = damp_a
        previous_band = band
        if it + 1 == len(bands):
            break
        # damped step from the best point; at most ~1 Fourier pixel at the band edge
        diag = torch.diagonal(h_a, dim1=-2, dim2=-1)
        scale = diag.mean(-1).clamp_min(1e-30)
        lhs = h_a + torch.diag_embed(damp_a[:, None] * diag + 1e-9 * scale[:, None])
        step = torch.linalg.solve(lhs, g_a[..., None])[..., 0]
        band_now = band if math.isfinite(band) else scorer.box / 2
        limit = 1.0 / band_now
        norm = step.norm(dim=-1, keepdim=True)
        step = step * torch.clamp(limit / norm.clamp_min(1e-30), max=1.0)
        current[idx] = rot_a @ rotvec_to_matrix(step)
    out_rot, out_ll, out_h = best_rot[alias], best_ll[alias], best_h[alias]
    # -|y - C X|^2 / 2 over the template points counts -|y|^2 / 2 there, which ``const`` (over
    # every coefficient) already holds: add it back so the value equals score_rotations'.
    y_norm = 0.5 * (w_all * (y_all.real**2 + y_all.imag**2)).sum(-1)
    return NewtonResult(
        rotations=out_rot.reshape(b, k_starts, 3, 3),
        hessian=out_h.reshape(b, k_starts, 3, 3),
        log_likelihood=out_ll.reshape(b, k_starts) + (const + y_norm)[:, None],
    )


def _merge_starts(
    rotations: torch.Tensor,
    log_lik: torch.Tensor,
    shifts: torch.Tensor,
    radius_rad: float | None,
    *,
    upper: torch.Tensor | None = None,
    prune_nats: float | None = None,
    alive: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy merge of the ``K`` starts of each image that share a basin, and pruning of the
    starts that cannot catch up with the best one.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[B, K, 3, 3]`` current best rotations.
    log_lik : torch.Tensor
        ``[B, K]`` their log-likelihoods.
    shifts : torch.Tensor
        ``[B, K, 2]`` their fixed shifts (only starts with equal shifts merge).
    radius_rad : float or None
        Starts within this geodesic distance of a kept, better start join it (None: no
        merging).
    upper : torch.Tensor, optional
        ``[B, K]`` upper estimates of what each start can still reach.
    prune_nats : float, optional
        Starts with ``upper < max(log_lik) - prune_nats`` join the best start.
    alive : torch.Tensor, optional
        ``[B, K]`` starts still in play (default all); the others are neither kept nor chosen
        as survivors (their own survivor entry is themselves).

    Returns
    -------
    kept : torch.Tensor
        ``[B * K]`` bool: the starts that stay in play.
    survivor : torch.Tensor
        ``[B * K]`` flat index ``b * K + k`` of the kept start each alive start takes its
        result from.
    """
    b, k = log_lik.shape
    device = log_lik.device
    rows = torch.arange(b, device=device)
    alive = torch.ones(b, k, dtype=torch.bool, device=device) if alive is None else alive
    order = torch.argsort(-log_lik, dim=1, stable=True)  # best first (dead ones are -inf)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k, device=device).expand(b, k).contiguous())
    if radius_rad is None:
        near = torch.zeros(b, k, k, dtype=torch.bool, device=device)
    else:
        traces = torch.einsum("bkij,blij->bkl", rotations, rotations)  # tr(R_k^T R_l)
        same_shift = (shifts[:, :, None] == shifts[:, None, :]).all(-1)
        near = same_shift & (traces > 1.0 + 2.0 * math.cos(radius_rad))  # [B, K, K]
    kept = torch.zeros(b, k, dtype=torch.bool, device=device)
    survivor = torch.arange(k, device=device).expand(b, k).clone()
    for position in range(k):  # K is small (the number of starts)
        i = order[:, position]
        candidates = near[rows, i] & kept  # only better starts are kept so far
        first = torch.where(candidates, rank, k).argmin(dim=1)  # best-ranked candidate
        has = candidates.any(dim=1)
        survivor[rows, i] = torch.where(has, first, i)
        kept[rows, i] = ~has & alive[rows, i]
    if upper is not None and prune_nats is not None:
        best = torch.where(alive, log_lik, -math.inf).amax(dim=1, keepdim=True)
        hopeless = alive & (upper < best - prune_nats)
        kept = kept & ~hopeless  # (never the best start: its upper >= its own value)
        # hopeless starts, and the starts merged into one, join the best start
        survivor = torch.where(hopeless | hopeless.gather(1, survivor), order[:, :1], survivor)
    flat = survivor + (rows * k)[:, None]
    return kept.reshape(-1), flat.reshape(-1)


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
