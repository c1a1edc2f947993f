"""Pose estimation for a particle data set: global grid search, multi-start local refinement,
posterior summaries, and the output table.

The posterior is one quadrature over SO(3) that gets finer where the mass is. It starts as
the global HEALPix grid (equal weights ``1/G``). Each refinement level picks centres (the
distinct top candidates at the first level, the current MAP afterwards), removes the existing
points inside a geodesic ball of radius ``r`` about each centre, and adds a finer local grid
inside the ball, each new point weighted by the ball's Haar volume ``(r - sin r)/pi`` divided
by the number of points. The mass far from the candidates keeps its coarse but honest
representation (so low-SNR uncertainty is not truncated), while high-SNR estimates are no
longer limited by the global grid spacing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cryopose.bayes.newton import NewtonResult, gauss_newton_poses, laplace_cubature
from cryopose.bayes.noise import estimate_noise_sigma2
from cryopose.bayes.posterior import (
    PoseEstimates,
    _GridPlusExtra,
    marginalize_shifts,
    summarize_posterior,
    top_candidates,
)
from cryopose.bayes.priors import parse_prior
from cryopose.bayes.scoring import ReferenceScorer, shift_grid
from cryopose.imaging.ctf import ctf_from_params
from cryopose.io.errors import CryoposeInputError
from cryopose.io.particles import ParticleImages, ParticleTable
from cryopose.runtime import numba_ready
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.grids import SO3Grid, healpix_grid, local_grid_offsets
from cryopose.so3.symmetry import point_group
from cryopose.volumes.transform import resample_volume

__all__ = [
    "EstimateConfig", "EstimateResult", "estimate_poses", "OUTPUT_COLUMNS", "load_cpu_kernels",
]

#: Columns added to the output STAR file (besides angles and origins).
OUTPUT_COLUMNS = {
    "max_probability": "rlnMaxValueProbDistribution",
    "expected_loss": "rlnCryoposeExpectedLoss",
    "credible_radius_deg": "rlnCryoposeCredibleRadiusDeg",
    "mass_outside_20deg": "rlnCryoposeMassOutside20Deg",
    "log_evidence": "rlnCryoposeLogEvidence",
}


@dataclass
class EstimateConfig:
    """Options of :func:`estimate_poses` (the ``cryopose estimate`` flags).

    Attributes
    ----------
    method : {"mmse", "map", "mle"}
        Which estimate becomes the output pose.
    prior : str
        ``uniform``, ``iso-gaussian:ETA[@ROT,TILT,PSI]`` or ``empirical``.
    grid_order : int
        HEALPix order of the global grid (2: 4,608 rotations, 15 degree in-plane step; 3:
        36,864, 7.5 degrees).
    local_refine : bool
        Refine on finer local grids around the top candidates.
    refine_levels : int
        Number of nested local grid levels before the Newton finish; each divides the step by
        ``refine_factor`` (0: Newton straight from the global grid).
    n_starts : int
        Distinct top candidates of the global posterior that refinement starts from.
    fast_coarse_levels : bool
        Score all refinement levels but the last with
        :meth:`~cryopose.bayes.scoring.ReferenceScorer.score_local` (one projection per
        viewing direction, in-plane offsets by 2D interpolation of the images): ~2.4x faster
        refinement, identical on noiseless data, but on SNR 0.1 data a few multimodal
        particles pick another mode (mean error 3.34 -> 3.63 deg on 192 particles); off by
        default.
    newton_finish : bool
        After the grid levels, polish each start by Gauss-Newton on the likelihood and, for
        modes narrower than a quarter of the local point spacing, replace their grid points
        by a 7-point Laplace cubature (:mod:`cryopose.bayes.newton`): sub-grid MLE / MAP /
        MMSE and an expected loss that sees the mode's width.
    candidate_max_frequency_angstrom : float or None
        Band limit (Angstrom) of a second likelihood used only to pick the refinement starts
        on the global grid; the posterior keeps the full-band likelihood. A full-band
        likelihood sampled on a coarse grid ranks modes by how close a grid point falls to
        their peak, a low-passed one by their mass. Measured both ways (ribosome, 64 px, SNR
        0.016, order 3): 0.60 -> 0.81 calibration with the earlier refinement, but worse
        (MMSE chordal MSE 0.75 -> 0.98) with the Newton finish; off by default (None).
    shift_range_angstrom, shift_step_angstrom : float
        Translation search (disk of this radius, this step; step defaults to the pixel size).
    noise_sigma : "auto" or float
        ``auto`` estimates sigma^2 per Fourier shell from the background outside the particle
        mask; a number is the white-noise standard deviation per pixel.
    particle_diameter_angstrom : float or None
        Mask diameter for the noise estimate (default 0.9 of the box).
    symmetry : str
        Point group of the reference.
    max_frequency_angstrom : float or None
        Band limit of the likelihood (Angstrom; None: Nyquist).
    batch_size : int
        Particles scored at once.
    device : str
        ``cpu`` or ``cuda``.
    """

    method: str = "mmse"
    prior: str = "uniform"
    grid_order: int = 3
    local_refine: bool = True
    refine_levels: int = 0
    refine_factor: float = 3.0
    n_starts: int = 3
    fast_coarse_levels: bool = False
    newton_finish: bool = True
    candidate_max_frequency_angstrom: float | None = None
    shift_range_angstrom: float = 0.0
    shift_step_angstrom: float | None = None
    noise_sigma: str | float = "auto"
    particle_diameter_angstrom: float | None = None
    symmetry: str = "C1"
    max_frequency_angstrom: float | None = None
    batch_size: int = 128
    device: str = "cpu"

    def validate(self) -> None:
        """Raise :class:`CryoposeInputError` naming the first invalid option."""
        if self.method not in ("mmse", "map", "mle"):
            raise CryoposeInputError(f"--method: expected mmse, map or mle, got {self.method!r}")
        if not 0 <= self.grid_order <= 4:
            raise CryoposeInputError(f"--grid-order: expected 0..4, got {self.grid_order}")
        if self.refine_levels < 0:
            raise CryoposeInputError(f"--refine-levels: expected >= 0, got {self.refine_levels}")
        if self.candidate_max_frequency_angstrom is not None and not (
            self.candidate_max_frequency_angstrom > 0
        ):
            raise CryoposeInputError("--candidate-max-frequency: expected > 0 Angstrom")
        if self.n_starts < 1:
            raise CryoposeInputError(f"--starts: expected >= 1, got {self.n_starts}")
        if self.shift_range_angstrom < 0:
            raise CryoposeInputError("--shift-range: expected >= 0 Angstrom")
        if self.shift_step_angstrom is not None and self.shift_step_angstrom <= 0:
            raise CryoposeInputError("--shift-step: expected > 0 Angstrom")
        if self.batch_size < 1:
            raise CryoposeInputError("--batch-size: expected a positive integer")
        if self.noise_sigma != "auto":
            try:
                self.noise_sigma = float(self.noise_sigma)
            except (TypeError, ValueError):
                self.noise_sigma = -1.0
            if not (self.noise_sigma > 0 and math.isfinite(self.noise_sigma)):
                raise CryoposeInputError("--noise-sigma: expected auto or a positive number")


@dataclass
class EstimateResult:
    """Output of :func:`estimate_poses`."""

    table: ParticleTable
    estimates: PoseEstimates
    sigma2: torch.Tensor
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _ball_volume(radius_rad: float) -> float:
    """Normalised Haar volume of a geodesic ball of this radius in SO(3)."""
    return (radius_rad - math.sin(radius_rad)) / math.pi


def _local_offsets(radius_deg: float, step_deg: float, dtype, device):
    """Offsets ``E`` (``R = C @ E``) of a local grid filling the geodesic ball of ``radius``.

    Returns
    -------
    offsets : torch.Tensor
        ``[L, 3, 3]`` kept offsets.
    directions : torch.Tensor
        ``[V, 3, 3]`` viewing-direction offsets ``W_v`` (in-plane angle 0).
    inplane_rad : torch.Tensor
        ``[P]`` in-plane angles: the full product is ``W_v @ Rz(inplane_j)``, flat ``v * P + j``.
    keep : torch.Tensor
        ``[L]`` flat indices of the kept offsets in the product.
    """
    grid = local_grid_offsets(radius_deg, radius_deg, step_deg, dtype=dtype, device=device)
    offsets = grid.matrices.reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=dtype, device=device)
    keep = torch.nonzero(
        geodesic_distance(offsets, eye) <= math.radians(radius_deg) + 1e-9
    ).reshape(-1)
    product = offsets.reshape(grid.n_directions, grid.n_inplane, 3, 3)
    directions = product[:, grid.center_index]
    rel = directions[0].transpose(-1, -2) @ product[0]  # Rz(inplane_j)
    inplane = torch.atan2(rel[:, 1, 0], rel[:, 0, 0])
    return offsets[keep], directions, inplane, keep


class _Quadrature:
    """Per-particle rotation points, log-likelihoods and log weights that refine in place.

    Points ``0 .. G-1`` are the shared global grid (``[G, 3, 3]``, never copied per particle;
    a removed point keeps its slot with weight 0), the rest are per-particle extra points
    ``[B, E, 3, 3]`` (local grids, Laplace cubatures).
    """

    def __init__(
        self,
        grid: torch.Tensor,
        log_lik: torch.Tensor,
        log_weights: torch.Tensor,
        log_prior: torch.Tensor,
        extra: torch.Tensor | None = None,
    ):
        b = log_lik.shape[0]
        self.grid = grid  # [G, 3, 3] (G may be 0)
        self._grid32 = grid.reshape(-1, 9).float()  # for the ball tests
        self._grid32_t: torch.Tensor | None = None  # [9, G] (numba ball test), on first use
        self.extra = grid.new_zeros(b, 0, 3, 3) if extra is None else extra  # [B, E, 3, 3]
        self.log_lik = log_lik  # [B, G + E, T]
        self.log_weights = log_weights  # [B, G + E] log Haar mass of each point's cell
        self.log_prior = log_prior  # [B, G + E] log prior density (w.r.t. normalised Haar)

    @property
    def n_points(self) -> int:
        return self.grid.shape[0] + self.extra.shape[1]

    @property
    def rotations(self) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """What :func:`summarize_posterior` takes: the ``(grid, extra)`` pair, or the
        per-particle points alone when there is no shared grid part."""
        return self.extra if self.grid.shape[0] == 0 else (self.grid, self.extra)

    def rotation_at(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``[..., 3, 3]`` rotations of points ``index`` of particles ``rows`` (broadcast)."""
        return _GridPlusExtra(self.grid, self.extra).at(rows, index)

    def replace_ball(
        self,
        centres: torch.Tensor,
        radius_rad: float | torch.Tensor,
        rotations: torch.Tensor,
        log_lik: torch.Tensor,
        log_prior: torch.Tensor,
        *,
        log_weights: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
    ) -> None:
        """Drop points within ``radius`` of each centre ``[B, K, 3, 3]``; add ``rotations``
        ``[B, K*L, 3, 3]`` (L per centre) with weight ball-volume / L each, or the given
        ``log_weights`` ``[B, K*L]``. Inactive centres (``active [B, K]`` False) remove nothing
        and their points get weight zero (they still count for the MLE / MAP)."""
        b, k = centres.shape[:2]
        flat_centres = centres.reshape(b, k, 9).to(self.grid.dtype)
        # d(C, R) < r  <=>  tr(C^T R) > 1 + 2 cos r: GEMMs for all centres
        if isinstance(radius_rad, torch.Tensor):  # per centre [B, K]
            threshold = (1.0 + 2.0 * torch.cos(radius_rad.to(flat_centres.dtype)))[:, None, :]
            radius_rad = float(radius_rad.max())  # (only used for uniform weights below)
        else:
            threshold = 1.0 + 2.0 * math.cos(radius_rad)
        centres_t = flat_centres.transpose(1, 2)  # [B, 9, K]
        # grid part: one float32 GEMM [G, 9] x [9, B K] (a broadcast matmul would run B small
        # float64 ones; a trace off by 1e-6 only moves a point on the ball's very edge)
        cut = threshold.float() if isinstance(threshold, torch.Tensor) else threshold
        centres32 = flat_centres.reshape(b * k, 9).float()
        n_grid = self._grid32.shape[0]
        if n_grid and centres32.device.type == "cpu" and numba_ready():
            # one pass per particle (numba) instead of the [B, K, G] GEMM, test and reductions
            from cryopose.bayes._posterior_numba import ball_mask

            cut_bk = (cut.reshape(b, k) if isinstance(cut, torch.Tensor)
                      else torch.full((b, k), float(cut)))
            if active is not None:
                cut_bk = torch.where(active, cut_bk, math.inf)
            if self._grid32_t is None:
                self._grid32_t = self._grid32.T.contiguous()
            mask = torch.empty(b, n_grid, dtype=torch.uint8)
            ball_mask(self._grid32_t.numpy(), centres32.reshape(b, k, 9).contiguous().numpy(),
                      cut_bk.float().contiguous().numpy(), mask.numpy())
            inside = mask.bool()
        else:
            grid_inside = (centres32 @ self._grid32.T).reshape(b, k, n_grid) > (
                cut.reshape(b, k, 1) if isinstance(cut, torch.Tensor) else cut)  # [B, K, G]
            if active is not None:
                grid_inside = grid_inside & active[:, :, None]
            inside = grid_inside.any(dim=1)  # [B, G]
        if self.extra.shape[1]:
            extra_each = torch.bmm(self.extra.reshape(b, -1, 9), centres_t) > threshold
            if active is not None:
                extra_each = extra_each & active[:, None, :]
            inside = torch.cat([inside, extra_each.any(dim=-1)], dim=1)
        self.log_weights = self.log_weights.masked_fill(inside, -math.inf)
        per_centre = rotations.shape[1] // k
        if log_weights is None:
            log_w = math.log(_ball_volume(radius_rad) / per_centre)
            new_w = torch.full(rotations.shape[:2], log_w, dtype=self.log_weights.dtype,
                               device=self.log_weights.device)
        else:
            new_w = log_weights.to(self.log_weights.dtype)
        # overlapping balls: a new point inside an earlier-listed ball of this level is dropped
        rotations = rotations.to(self.grid.dtype)
        new_traces = torch.bmm(rotations.reshape(b, -1, 9), centres_t)
        owner = torch.arange(k, device=rotations.device).repeat_interleave(per_centre)  # [K*L]
        earlier = torch.arange(k, device=rotations.device)[None, :] < owner[:, None]  # [K*L, K]
        near = (new_traces > threshold) & earlier[None]
        if active is not None:
            near = near & active[:, None, :]
            own_active = active.repeat_interleave(per_centre, dim=1)  # [B, K*L]
            new_w = new_w.masked_fill(~own_active, -math.inf)
        new_w = new_w.masked_fill(near.any(dim=-1), -math.inf)
        self.extra = torch.cat([self.extra, rotations], dim=1)
        self.log_lik = torch.cat([self.log_lik, log_lik.to(self.log_lik.dtype)], dim=1)
        self.log_weights = torch.cat([self.log_weights, new_w], dim=1)
        self.log_prior = torch.cat([self.log_prior, log_prior.to(self.log_prior.dtype)], dim=1)


def _ctf_batch(
    ctf_params: dict[str, torch.Tensor] | None, rows: np.ndarray, box: int, device
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """The CTFs of ``rows`` and their parameters (on ``device``; None without CTF)."""
    if ctf_params is None:
        return None, None
    index = torch.from_numpy(rows)
    batch = {k: v[index].to(device) for k, v in ctf_params.items()}
    return ctf_from_params(batch, box, dtype=torch.float32, device=device), batch


def _prepare_reference(volume: torch.Tensor, volume_pixel_size: float, box: int, px: float):
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise CryoposeInputError(f"reference: expected a cubic volume, got {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise CryoposeInputError("reference: contains non-finite values")
    if volume.shape[0] != box or abs(volume_pixel_size - px) > 1e-4 * px:
        volume = resample_volume(volume, volume_pixel_size, px, box)
    return volume.to(torch.float32)


def estimate_poses(
    table: ParticleTable,
    reference: torch.Tensor,
    reference_pixel_size: float,
    config: EstimateConfig | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> EstimateResult:
    """Estimate the pose of every particle of ``table`` against ``reference``.

    Parameters
    ----------
    table : ParticleTable
        Particles (images, CTF, optics); one pixel size and box for all.
    reference : torch.Tensor
        ``[N, N, N]`` map ``[z, y, x]``; resampled to the particles' pixel size and box if
        needed.
    reference_pixel_size : float
        Its pixel size in Angstrom.
    config : EstimateConfig
    progress : callable, optional
        Called with the number of particles finished after each batch.

    Returns
    -------
    EstimateResult
        The output table keeps every input column, replaces angles and origins by the chosen
        estimate and adds the columns of :data:`OUTPUT_COLUMNS`.
    """
    config = config or EstimateConfig()
    config.validate()
    start = time.perf_counter()
    device = torch.device(config.device)
    pixel_sizes = np.unique(np.round(table.pixel_sizes(), 6))
    if len(pixel_sizes) != 1:
        raise CryoposeInputError(
            f"{table.source}: rlnImagePixelSize has {len(pixel_sizes)} values; "
            "expected one pixel size (split the optics groups)"
        )
    px, box = float(pixel_sizes[0]), int(table.box)
    volume = _prepare_reference(reference, reference_pixel_size, box, px).to(device)
    scorer = ReferenceScorer(
        volume, px, max_frequency_angstrom=config.max_frequency_angstrom, device=device
    )
    candidate_scorer = None
    if config.candidate_max_frequency_angstrom is not None and config.local_refine:
        candidate_scorer = ReferenceScorer(
            volume, px, max_frequency_angstrom=config.candidate_max_frequency_angstrom,
            device=device,
        )
    grid: SO3Grid = healpix_grid(config.grid_order, dtype=torch.float32, device=device)
    group = point_group(config.symmetry, dtype=torch.float64)
    group_arg = None if group.shape[0] == 1 else group
    if config.shift_range_angstrom > 0:
        shifts = shift_grid(config.shift_range_angstrom, config.shift_step_angstrom or px, px).to(
            device=device, dtype=torch.float32
        )
    else:
        shifts = None
    prior = parse_prior(config.prior)
    timings = {"score": 0.0, "refine": 0.0, "summarize": 0.0}

    n = len(table)
    rows_all = np.arange(n)
    ctf_params = table.ctf_params(dtype=torch.float32) if table.has_ctf else None
    with ParticleImages(table) as reader:
        # noise model
        if config.noise_sigma == "auto":
            diameter = config.particle_diameter_angstrom or 0.9 * box * px
            sample = reader.read(rows_all[: min(n, 1000)]).to(device)
            sigma2 = estimate_noise_sigma2(sample, diameter / (2 * px)).to(device)
        else:
            sigma2 = torch.full((box // 2 + 1,), float(config.noise_sigma) ** 2, device=device)

        if getattr(prior, "requires_fit", False):
            prior = _fit_empirical(
                prior, reader, table, ctf_params, scorer, grid, sigma2, shifts, config
            )
        log_prior_grid = prior.log_prior(grid.matrices.double()).to(device)

        final_parts: list[PoseEstimates] = []
        refining = config.local_refine and (config.refine_levels > 0 or config.newton_finish)
        for b0 in range(0, n, config.batch_size):
            rows = rows_all[b0 : b0 + config.batch_size]
            images = reader.read(rows).to(device)
            ctf, ctf_rows = _ctf_batch(ctf_params, rows, box, device)
            t0 = time.perf_counter()
            log_lik = scorer.score_grid(images, ctf, sigma2, grid, shifts, ctf_params=ctf_rows)
            timings["score"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if refining:
                # only the starts are needed from the global grid: its full summary would be
                # discarded (the refined quadrature contains the grid and is summarised); the
                # shifts are summed out once for the starts and the significant points
                marginal = marginalize_shifts(log_lik)
                candidates = top_candidates(
                    marginal if candidate_scorer is None else candidate_scorer.score_grid(
                        images, ctf, sigma2, grid, shifts, ctf_params=ctf_rows),
                    grid,
                    log_prior=log_prior_grid,
                    group=group_arg,
                    n_candidates=config.n_starts,
                )
                # the grid's values on the exact likelihood's scale (refinement mixes them)
                offset = _grid_offset(scorer, images, ctf, sigma2, shifts, grid, marginal,
                                      candidates)
                log_lik.sub_(offset[:, None, None])
                if log_lik.shape[-1] > 1:  # (for one shift marginal is a view of log_lik)
                    marginal.sub_(offset[:, None])
            else:
                global_est = summarize_posterior(
                    log_lik,
                    grid,
                    shifts,
                    log_prior=log_prior_grid,
                    group=group_arg,
                    n_candidates=config.n_starts,
                )
            timings["summarize"] += time.perf_counter() - t0
            if refining:
                t0 = time.perf_counter()
                final = _refine(
                    scorer,
                    images,
                    ctf,
                    sigma2,
                    shifts,
                    grid,
                    log_lik,
                    log_prior_grid,
                    candidates,
                    prior,
                    group_arg,
                    config,
                    keep=_significant_points(grid, marginal, log_prior_grid),
                )
                timings["refine"] += time.perf_counter() - t0
            else:
                final = global_est
            final_parts.append(final.to("cpu"))
            if progress is not None:
                progress(len(rows))

    estimates = PoseEstimates.concatenate(final_parts)
    out = _output_table(table, estimates, config.method, px)
    return EstimateResult(
        table=out,
        estimates=estimates,
        sigma2=sigma2.cpu(),
        seconds=time.perf_counter() - start,
        timings=timings,
    )


def _grid_offset(
    scorer: ReferenceScorer,
    images: torch.Tensor,
    ctf: torch.Tensor | None,
    sigma2: torch.Tensor,
    shifts: torch.Tensor | None,
    grid: SO3Grid,
    marginal: torch.Tensor,
    candidates: torch.Tensor,
) -> torch.Tensor:
    """Per-image offset ``[B]`` of the global grid's log-likelihoods (in-plane FFT path) from
    the exact (dense) ones, the mean over the refinement starts of the shift-marginalised
    difference.

    The refined posterior mixes the grid's values with exactly scored points (local balls,
    the Laplace cubature of polished modes), so both must be on one scale. The polar path
    misses the Cartesian sum by an offset that is nearly the same for every rotation of an
    image (its ring quadrature of the low frequencies, where the spectra peak at k = 0):
    measured on 64-px ribosome images at SNR 0.1 with the true noise variance, +1.96 nats
    (sd 0.49 between images, 0.35 within one). Uncorrected, the grid's modes got e^2 times
    their mass against the polished ones: calibration 1.75, MMSE median error 3.65 deg,
    against 1.08 and 3.13 deg with this correction and 1.03 / 3.16 with the whole grid
    scored exactly (dense path, ~3x slower).
    """
    starts = grid.matrices.to(device=marginal.device)[candidates]  # [B, K, 3, 3]
    exact = marginalize_shifts(scorer.score_rotations(images, ctf, sigma2, starts, shifts))
    polar = marginal.gather(1, candidates.to(marginal.device))
    return (polar.double() - exact.double()).mean(dim=1).to(marginal.dtype)


def _significant_points(
    grid: SO3Grid, log_lik: torch.Tensor, log_prior_grid: torch.Tensor
) -> torch.Tensor:
    """``[B, G]`` bool: the grid points that can matter to each particle.

    A point whose shift-marginalised likelihood and posterior mass are both below 1e-10 of the
    particle's largest cannot matter: all of them together hold at most ``G * 1e-10`` (4e-6 for
    36,864 points) of the largest point's weight, and the refinement only raises the peak.
    (At 1e-14, the cut :func:`summarize_posterior` makes, 41 % of the particles at SNR 0.1
    kept more than 1/8 of the order-3 grid, median 3,631 points; at 1e-10, 3 %, median 634.)
    """
    log_w = torch.log(grid.weights.to(device=log_lik.device, dtype=torch.float64))
    lp = log_prior_grid.to(device=log_lik.device, dtype=torch.float64)
    ll3 = log_lik[..., None] if log_lik.ndim == 2 else log_lik
    # (a constant -log T: the cut is relative; 23 nats, far above float32's resolution)
    marginal = marginalize_shifts(ll3)
    cut = math.log(1e-10)
    keep = marginal >= marginal.amax(1, keepdim=True) + cut
    mass = lp + log_w  # [G] or [B, G]
    if bool((mass.amax(-1) > mass.amin(-1)).any()):  # (a flat prior and weights add nothing)
        joint = marginal.double() + mass
        keep |= joint >= joint.amax(1, keepdim=True) + cut
    return keep


def load_cpu_kernels(dtype: torch.dtype = torch.float32) -> bool:
    """Compile (first time on a machine, ~9 s) or load from numba's disk cache (~0.6 s) every
    CPU kernel that :func:`estimate_poses` can use, for ``dtype``, on tiny inputs.

    Otherwise each kernel is compiled or loaded the first time a batch needs it (a broad
    posterior, a Laplace ball...), in the middle of the first run. Benchmarks call this before
    timing. Returns False when numba is off (:func:`cryopose.runtime.numba_ready`).
    """
    if not numba_ready():
        return False
    from cryopose.bayes._posterior_numba import ball_mask

    scorer = ReferenceScorer(torch.rand(8, 8, 8, dtype=dtype), 4.0, dtype=dtype)
    scorer.projector.sample_ri(torch.zeros(1, 3, dtype=dtype))
    scorer.projector.slice_values(torch.eye(3, dtype=dtype)[None], torch.zeros(1, dtype=dtype),
                                  torch.zeros(1, dtype=dtype))
    gauss_newton_poses(scorer, torch.rand(1, 8, 8, dtype=dtype), None, 1.0,
                       torch.eye(3, dtype=dtype).expand(1, 1, 3, 3), bands=[math.inf])
    grid = healpix_grid(0, dtype=dtype)
    ctf = torch.ones(1, 8, 5, dtype=dtype)
    scorer.score_grid(torch.rand(1, 8, 8, dtype=dtype), ctf, 1.0, grid)  # image-side polar reads
    flat = torch.zeros(2, len(grid), dtype=dtype)
    summarize_posterior(flat, grid)  # dense rows: the cone kernel
    summarize_posterior(flat, grid, group="C2")  # dense rows with symmetry: credible rows
    ball_mask(grid.matrices.reshape(-1, 9).T.contiguous().float().numpy(),
              torch.zeros(1, 1, 9).numpy(), torch.zeros(1, 1).numpy(),
              torch.empty(1, len(grid), dtype=torch.uint8).numpy())
    return True


def _grid_quadrature(
    grid: SO3Grid, log_lik: torch.Tensor, log_prior_grid: torch.Tensor, keep: torch.Tensor
) -> _Quadrature:
    """The global grid as the starting quadrature of every particle.

    When every particle keeps at most 1/8 of the grid (``keep`` ``[B, G]``, from
    :func:`_significant_points`: sharp posteriors), the kept points become per-particle points
    (a few hundred instead of 36,864 for every later pass); otherwise the grid stays shared
    (no per-particle copy).
    """
    b, n_grid = log_lik.shape[:2]
    g = grid.matrices.to(torch.float64)
    log_w = torch.log(grid.weights.to(device=g.device, dtype=torch.float64))
    lp = log_prior_grid.to(device=g.device, dtype=torch.float64)
    lp_rows = lp.expand(b, -1) if lp.ndim == 1 else lp
    n_keep = int(keep.sum(1).max())
    if 8 * n_keep > n_grid:
        # (expanded views: replace_ball builds new tensors, never writes into these)
        return _Quadrature(g, log_lik, log_w.expand(b, -1), lp_rows)
    # each row's kept points first, in grid order (padding: point 0 with weight zero)
    at_row, at_point = torch.nonzero(keep, as_tuple=True)
    slot = keep.cumsum(dim=1, dtype=torch.int32)[at_row, at_point].long() - 1
    order = torch.zeros(b, n_keep, dtype=torch.long, device=keep.device)
    kept = torch.zeros(b, n_keep, dtype=torch.bool, device=keep.device)
    order[at_row, slot] = at_point
    kept[at_row, slot] = True
    rows = torch.arange(b, device=g.device)[:, None]
    return _Quadrature(
        g.new_zeros(0, 3, 3),
        log_lik[rows, order],
        torch.where(kept, log_w[order], -math.inf),
        lp_rows[rows, order],
        extra=g[order],
    )


def _refine(
    scorer: ReferenceScorer,
    images: torch.Tensor,
    ctf: torch.Tensor | None,
    sigma2: torch.Tensor,
    shifts: torch.Tensor | None,
    grid: SO3Grid,
    log_lik: torch.Tensor,
    log_prior_grid: torch.Tensor,
    candidates: torch.Tensor,
    prior,
    group: torch.Tensor | None,
    config: EstimateConfig,
    keep: torch.Tensor | None = None,
    split: bool = True,
) -> PoseEstimates:
    """Coarse-to-fine local refinement from the distinct top candidates (module docstring).

    A batch is refined in two groups when it holds both particles whose posterior is sharp (at
    most 1/8 of the grid can matter, :func:`_significant_points`) and others: one broad
    posterior makes the whole batch's quadrature the shared grid (every later pass over
    36,864 points per particle), while apart the sharp particles keep a few hundred points
    each. At SNR 0.1 a few particles of every batch of 128 are broad. Each particle's result
    is the same either way (its quadrature holds the same significant points). ``keep``:
    the significant points, when the caller has them; ``split``: False for the groups
    themselves.
    """
    b = images.shape[0]
    if keep is None:
        keep = _significant_points(grid, log_lik, log_prior_grid)
    if split:
        sharp = 8 * keep.sum(1) <= keep.shape[1]
        if 0 < int(sharp.sum()) < b:
            s2 = torch.as_tensor(sigma2)
            per_image_s2 = s2.ndim == 2 and s2.shape[0] == b
            parts, order = [], []
            for rows in (torch.nonzero(sharp)[:, 0], torch.nonzero(~sharp)[:, 0]):
                parts.append(_refine(
                    scorer, images[rows],
                    None if ctf is None else (ctf[rows] if ctf.shape[0] == b else ctf),
                    s2[rows] if per_image_s2 else s2, shifts, grid, log_lik[rows],
                    log_prior_grid if log_prior_grid.ndim == 1 else log_prior_grid[rows],
                    candidates[rows], prior, group, config, keep=keep[rows], split=False,
                ))
                order.append(rows)
            return PoseEstimates.concatenate(parts).take(torch.argsort(torch.cat(order)))
    dtype = torch.float64
    device = log_lik.device
    quad = _grid_quadrature(grid, log_lik, log_prior_grid, keep)
    rows = torch.arange(b, device=device)
    # candidates (global indices; missing ones padded with the MAP) -> quadrature positions
    candidates = candidates.to(device)  # [B, K] global grid indices (none missing)
    centres = grid.matrices.to(dtype)[candidates]  # [B, K, 3, 3]
    radius_deg = grid.inplane_step_deg
    step_deg = radius_deg / config.refine_factor
    finest_deg = radius_deg  # spacing of the points about the current estimate
    est = None
    for level in range(config.refine_levels):
        offsets, directions, inplane, keep = _local_offsets(radius_deg, step_deg, dtype, device)
        k = centres.shape[1]
        local = (centres[:, :, None] @ offsets).reshape(b, k * offsets.shape[0], 3, 3)
        if config.fast_coarse_levels and level + 1 < config.refine_levels:
            # coarse levels (they only place the next ball): one projection per viewing
            # direction, the in-plane offsets rotate the image side (approximate, 2D interp.)
            dirs = (centres[:, :, None] @ directions).reshape(b, -1, 3, 3)
            local_lik = scorer.score_local(images, ctf, sigma2, dirs.float(), inplane, shifts)
            local_lik = local_lik.reshape(b, k, -1, local_lik.shape[-1])[:, :, keep]
            local_lik = local_lik.reshape(b, k * offsets.shape[0], -1).double()
        else:
            local_lik = scorer.score_rotations(images, ctf, sigma2, local.float(), shifts)
            local_lik = local_lik.double()
        local_prior = prior.log_prior(local).to(device=device, dtype=dtype)
        quad.replace_ball(centres, math.radians(radius_deg), local, local_lik, local_prior)
        finest_deg = step_deg
        last = level + 1 == config.refine_levels
        est = summarize_posterior(
            quad.log_lik,
            quad.rotations,
            shifts,
            log_prior=quad.log_prior,
            log_quadrature_weights=quad.log_weights,
            group=group,
            n_candidates=config.n_starts if (last and config.newton_finish) else 1,
            min_separation_deg=radius_deg,
        )
        if not last:
            # next level: one ball about the current MAP, finer
            idx = est.index_map.to(device)
            centres = quad.rotation_at(rows, idx)[:, None]
            radius_deg = step_deg
            step_deg = step_deg / config.refine_factor
    if config.newton_finish:
        if est is None:
            starts = centres
            start_lik = log_lik[rows[:, None], candidates]  # [B, K, T]
        else:
            cand = est.top_candidates.to(device)
            cand = torch.where(cand < 0, est.index_map[:, None].to(device), cand)
            starts = quad.rotation_at(rows[:, None], cand)
            start_lik = quad.log_lik[rows[:, None], cand]
        start_value, best_t = start_lik.max(dim=-1)  # [B, K]
        est = _newton_finish(
            scorer, images, ctf, sigma2, shifts, quad, starts, best_t, finest_deg, prior,
            group, config, start_value=start_value,
        )
    # (refine_levels >= 1 or newton_finish, so est is set); without the Newton finish the
    # point-density MAP / MLE of the last summary already reflect every level
    return est


def _newton_finish(
    scorer: ReferenceScorer,
    images: torch.Tensor,
    ctf: torch.Tensor | None,
    sigma2: torch.Tensor,
    shifts: torch.Tensor | None,
    quad: _Quadrature,
    starts: torch.Tensor,
    best_t: torch.Tensor,
    spacing_deg: float,
    prior,
    group: torch.Tensor | None,
    config: EstimateConfig,
    start_value: torch.Tensor | None = None,
) -> PoseEstimates:
    """Gauss-Newton from each start, then a Laplace cubature for every mode narrower than a
    quarter of the point spacing about it (:mod:`cryopose.bayes.newton`).

    ``start_value`` ``[B, K]``: the starts' log-likelihoods on the grid. The band continuation
    can carry a start out of its basin to a lower full-band maximum (measured: 7% of the starts
    at SNR 0.03, 2% at 0.1 ended more than 1 nat below their start); such starts are polished
    again at the full band alone and keep the better of the two results.
    """
    b, k = starts.shape[:2]
    device = starts.device
    start_shifts = None if shifts is None else shifts.to(device)[best_t]  # [B, K, 2]
    res = gauss_newton_poses(
        scorer, images, ctf, sigma2, starts.float(), start_shifts, start_error_deg=spacing_deg
    )
    if start_value is not None:
        res = _second_chance(scorer, images, ctf, sigma2, starts, start_shifts, start_value, res)
    hessian = res.hessian.double()
    modes = res.rotations.double()
    points, log_w, sigma_max = laplace_cubature(modes, hessian)
    positive = (torch.linalg.eigvalsh(0.5 * (hessian + hessian.transpose(-1, -2))) > 0).all(-1)
    spacing = math.radians(spacing_deg)
    # A polished mode narrower than the point spacing is represented better by its Laplace
    # cubature than by the few points that sample it (whose values lie far below its peak);
    # the points within max(spacing, 3 sigma) of it are replaced.
    sharp = positive & torch.isfinite(log_w).all(-1) & (sigma_max < spacing)
    radius = torch.clamp(3.0 * sigma_max, min=spacing)
    flat = points.reshape(b, k * 7, 3, 3)
    if shifts is None:
        # one shift: the Laplace model itself (exact at the mode; w^T H w = 4 at the others)
        centre = res.log_likelihood.double()[..., None]  # [B, K, 1]
        lik = torch.cat([centre, (centre - 2.0).expand(-1, -1, 6)], dim=-1)
        lik = lik.reshape(b, k * 7, 1)
    else:
        # shifts are marginalised: evaluate the points exactly for every shift
        lik = scorer.score_rotations(images, ctf, sigma2, flat.float(), shifts).double()
    lp = prior.log_prior(flat).to(device=device, dtype=torch.float64)
    log_w = torch.where(torch.isfinite(log_w), log_w, -math.inf).reshape(b, k * 7)
    first_new = quad.n_points
    quad.replace_ball(modes, radius, flat, lik, lp, log_weights=log_w, active=sharp)
    est = summarize_posterior(
        quad.log_lik,
        quad.rotations,
        shifts,
        log_prior=quad.log_prior,
        log_quadrature_weights=quad.log_weights,
        group=group,
        n_candidates=config.n_starts,
        min_separation_deg=spacing_deg,
    )
    # MLE / MAP: the best of the polished local maxima (all scored by the exact dense
    # likelihood; the grid's values come from the in-plane FFT path and are not compared).
    rows = torch.arange(b, device=device)
    centre_lik = lik.reshape(b, k, 7, -1)[:, :, 0]  # [B, K, T]
    centre_prior = lp.reshape(b, k, 7)[:, :, 0]
    best_lik, t_mle = centre_lik.max(dim=-1)  # [B, K]
    k_mle = best_lik.argmax(dim=1)
    k_map = (best_lik + centre_prior).argmax(dim=1)
    shift_values = None if shifts is None else shifts.to(device=device, dtype=torch.float64)
    for name, k_best in (("mle", k_mle), ("map", k_map)):
        setattr(est, f"rotations_{name}", modes[rows, k_best].to(est.rotations_mle.dtype))
        setattr(est, f"index_{name}", first_new + k_best * 7)
        if shift_values is not None:
            chosen = shift_values[t_mle[rows, k_best]]
            setattr(est, f"shifts_{name}_px", chosen.to(est.shifts_mle_px.dtype))
    # the largest posterior probability of one mode: a sharp mode's mass is spread over its
    # 7 cubature points, so sum them (RELION's rlnMaxValueProbDistribution is per sample)
    n_shifts = quad.log_lik.shape[-1]  # uniform shift prior 1/T, as in summarize_posterior
    log_joint = (
        torch.logsumexp(quad.log_lik[:, first_new:], dim=-1)
        - math.log(n_shifts)
        + quad.log_prior[:, first_new:]
        + quad.log_weights[:, first_new:]
    ).reshape(b, k, 7)
    mode_mass = torch.exp(torch.logsumexp(log_joint, dim=-1) - est.log_evidence[:, None])
    mode_mass = torch.where(sharp, mode_mass, 0.0).amax(dim=1)
    est.max_probability = torch.maximum(
        est.max_probability, mode_mass.to(est.max_probability.dtype)
    ).clamp(max=1.0)
    return est


def _second_chance(scorer, images, ctf, sigma2, starts, start_shifts, start_value, res,
                   full_band_steps: int = 2):
    """Polish again, at the full band only, the starts whose Gauss-Newton result ended below
    their own exact log-likelihood (the band continuation carried them out of the start's
    basin to a lower full-band maximum), and keep the better result (rotation, Hessian and
    log-likelihood) per start.

    The grid values (in-plane FFT path) pick the suspects, with a 1-nat allowance; the exact
    (dense) values decide, since the grid's differ from them by a fraction of the likelihood's
    spread (~0.7 nat rms at SNR 0.03, hundreds of nats on noiseless data)."""
    lower = res.log_likelihood.double() < start_value.double() + 1.0  # [B, K] suspects
    if not bool(lower.any()):
        return res
    s2 = torch.as_tensor(sigma2)
    per_image = s2.ndim == 2 and s2.shape[0] == images.shape[0] > 1

    def pick(bi, ki):  # images, CTF, noise, start [n, 1, 3, 3] and shift of these starts
        return (images[bi], None if ctf is None else ctf[bi], s2[bi] if per_image else s2,
                starts[bi, ki][:, None].float(),
                None if start_shifts is None else start_shifts[bi, ki][:, None])

    bi, ki = torch.nonzero(lower, as_tuple=True)
    exact = scorer.score_rotations(*pick(bi, ki))[:, 0, 0].double()
    below = exact > res.log_likelihood[bi, ki].double()
    if not bool(below.any()):
        return res
    bi, ki = bi[below], ki[below]
    again = gauss_newton_poses(scorer, *pick(bi, ki), bands=[math.inf] * (1 + full_band_steps),
                               merge=False, prune_nats=None)
    better = again.log_likelihood[:, 0] > res.log_likelihood[bi, ki]
    bi, ki = bi[better], ki[better]
    rotations, hessian = res.rotations.clone(), res.hessian.clone()
    log_likelihood = res.log_likelihood.clone()
    rotations[bi, ki] = again.rotations[better, 0]
    hessian[bi, ki] = again.hessian[better, 0]
    log_likelihood[bi, ki] = again.log_likelihood[better, 0]
    return NewtonResult(rotations=rotations, hessian=hessian, log_likelihood=log_likelihood)


def _fit_empirical(prior, reader, table, ctf_params, scorer, grid, sigma2, shifts, config):
    """First pass for the empirical prior: shift-marginalised log-likelihoods over the grid."""
    n = len(table)
    batches = []
    for b0 in range(0, n, config.batch_size):
        rows = np.arange(b0, min(n, b0 + config.batch_size))
        images = reader.read(rows).to(scorer.device)
        ctf, ctf_rows = _ctf_batch(ctf_params, rows, int(table.box), scorer.device)
        log_lik = scorer.score_grid(images, ctf, sigma2, grid, shifts, ctf_params=ctf_rows)
        batches.append(torch.logsumexp(log_lik, dim=-1).cpu())
    return prior.learn(torch.cat(batches), grid)


def _output_table(
    table: ParticleTable, estimates: PoseEstimates, method: str, px: float
) -> ParticleTable:
    rotations = getattr(estimates, f"rotations_{method}")
    shifts = getattr(estimates, f"shifts_{method}_px")
    # a template shift of +t pixels means the particle sits at N//2 + t: RELION origin = -t px
    origins = -shifts.double() * px
    out = table.with_poses(rotations.double(), origins)
    for attribute, column in OUTPUT_COLUMNS.items():
        out.data[column] = getattr(estimates, attribute).double().numpy()
    return out
