"""Iterative refinement of a map from cryo-EM projections: EM with soft, MMSE-point or hard
assignment.

Model (``docs/conventions.md``, "Likelihood"): the centred rfft ``Y_i`` of image ``i`` (centred
by its input RELION origin) is ``C_i S_t X_R + noise`` with ``X_R`` the central slice of the
map at rotation ``R``, ``S_t`` the phase factor of a template shift ``t`` (pixels) and Gaussian
noise of per-shell variance ``sigma2``.

One iteration (the seed's Algorithm 2 with projections, section 4), per half set ``h``:

E-step
    For every particle of half ``h``, the log-likelihood of every (grid rotation ``g``, shift
    ``t``) against the current half map ``V_h`` (:meth:`ReferenceScorer.score_grid`), and the
    posterior ``P_i(g, t) = q_g exp(l_i[g, t]) / Z_i`` with a uniform rotation and shift prior
    (``q_g`` the grid's quadrature weights). Weights below ``exp(-69)`` (1e-30) of a
    particle's largest are set to exactly 0 (they hold less than ``G T 1e-30`` of the mass).
M-step
    *soft* (the MMSE back-rotation operator): every grid rotation receives every image with its
    posterior weight. The weighted sums per grid rotation are formed as matrix products over
    the batch, ``num[g] += sum_t P[:, g, t]^T (C Y conj(S_t))`` and
    ``den[g] += (sum_t P[:, g, t])^T C^2`` (``[G, B] @ [B, K]`` over the ``K`` half-plane
    samples with ``|k| < N / 2``), and each grid rotation's summed slice is inserted once
    after the whole half set (:meth:`FourierAccumulator.insert_sums`): the cost does not
    depend on how spread the posteriors are.
    *mmse*: each image is inserted once at its MMSE pose, the posterior-mean rotation matrix
    rounded to SO(3) (Procrustes) and the posterior-mean shift, off the grid
    (:meth:`FourierAccumulator.insert`): the seed's MMSE estimator used inside the loop, as in
    its 3D experiment (``docs/em_soft_vs_hard.md``).
    *hard*: only the MLE grid point ``(g, t)`` of each image, weight 1 (the same sums with a
    one-hot posterior, formed by index additions).
    With a point group, each grid rotation's slice is inserted at all its symmetry mates
    ``s^T R_g``.
Map
    Wiener filter with the per-shell SSNR from the FSC of the two half maps, gridding
    correction (:func:`cryopose.reconstruct.fourier.reconstruct_particles`' scheme). Each half
    set is refined against its own half map only (gold standard); both start from the given
    reference, optionally low-passed (``initial_lowpass_angstrom``). No further low-pass or
    mask is applied between iterations: the FSC-based Wiener filter attenuates the shells the
    half maps do not agree on.

Poses written per iteration are the MMSE rotation and shift (soft, mmse) or the MLE grid
point (hard). Shifts are searched on a fixed grid about each particle's *input* origin (the search
centre does not move between iterations): the output origin is ``input origin - t * pixel``.

Memory: the sums of one half set, ``G x K`` complex plus real values (about 90 MB per half at
grid order 2 and 64 px, 730 MB at order 3); the half sets are processed one after the other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from cryopose.bayes.estimate import OUTPUT_COLUMNS
from cryopose.bayes.noise import estimate_noise_sigma2
from cryopose.bayes.posterior import PoseEstimates, summarize_posterior
from cryopose.bayes.scoring import ReferenceScorer, shift_grid
from cryopose.evaluate.fsc import write_fsc_csv
from cryopose.imaging.ctf import ctf_from_params
from cryopose.imaging.fft import irfft2_centred, rfft2_centred
from cryopose.imaging.filters import low_pass
from cryopose.imaging.shifts import phase_shift_fourier
from cryopose.io.errors import CryoposeInputError
from cryopose.io.mrc import write_volume
from cryopose.io.particles import ParticleImages, ParticleTable
from cryopose.io.star import write_star
from cryopose.reconstruct.fourier import (
    FourierAccumulator,
    Reconstruction,
    _finish,
    half_subsets,
)
from cryopose.so3.grids import SO3Grid, healpix_grid
from cryopose.so3.symmetry import point_group
from cryopose.volumes.transform import resample_volume

__all__ = [
    "RefineConfig",
    "RefineIteration",
    "RefineResult",
    "GridBackProjector",
    "assignment_weights",
    "refine",
    "iteration_paths",
]

_ASSIGNMENTS = ("soft", "mmse", "hard")
# exp(x) below this (relative to the row maximum) is exactly 0, as in cryopose.bayes.posterior.
_EXP_FLOOR = -69.0
# Elements of one [rows, K] block when moving grid sums to the accumulator.
_INSERT_BLOCK_ELEMENTS = 1 << 22


@dataclass
class RefineConfig:
    """Options of :func:`refine` (the ``cryopose refine`` flags).

    Attributes
    ----------
    iterations : int
        Number of EM iterations (>= 1).
    assignment : {"soft", "mmse", "hard"}
        Back-project with every posterior weight (soft, EM), at the MMSE pose only (mmse: the
        Procrustes-rounded posterior-mean rotation and the posterior-mean shift, off the grid,
        the seed's MMSE estimator inside the refinement loop) or at the MLE grid point only
        (hard).
    grid_order : int
        HEALPix order of the global rotation grid (1: 576 rotations, 30 degree step; 2: 4,608,
        15 degrees; 3: 36,864, 7.5 degrees).
    shift_range_angstrom : float
        Radius of the translation search about the input origins, Angstrom (0: none).
    shift_step_angstrom : float or None
        Step of the translation grid, Angstrom (default: the pixel size).
    max_frequency_angstrom : float or None
        Band limit of the likelihood in Angstrom (None: Nyquist). Reconstruction always uses
        every frequency up to Nyquist.
    initial_lowpass_angstrom : float or None
        Low-pass the input reference to this resolution (raised-cosine edge) before the first
        iteration (None: use it as given).
    symmetry : str
        Point group of the map (``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I``).
    noise_sigma : "auto" or float
        ``auto``: per-shell noise variance from the background outside the particle mask
        (:func:`cryopose.bayes.noise.estimate_noise_sigma2`, first 1,000 particles); a number:
        white-noise standard deviation per pixel.
    particle_diameter_angstrom : float or None
        Mask diameter of the noise estimate (default 0.9 of the box).
    batch_size : int
        Particles scored at once.
    device : str
        ``cpu`` or ``cuda``.
    seed : int
        Seed of the random half split (used when the table has no ``rlnRandomSubset``).
    dtype : torch.dtype
        Working precision (float32 or float64).
    pad_factor : float
        Padding of the reconstruction grid.
    """

    iterations: int = 3
    assignment: str = "soft"
    grid_order: int = 2
    shift_range_angstrom: float = 0.0
    shift_step_angstrom: float | None = None
    max_frequency_angstrom: float | None = None
    initial_lowpass_angstrom: float | None = None
    symmetry: str = "C1"
    noise_sigma: str | float = "auto"
    particle_diameter_angstrom: float | None = None
    batch_size: int = 128
    device: str = "cpu"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    pad_factor: float = 2.0

    def validate(self) -> None:
        """Raise :class:`CryoposeInputError` naming the first invalid option."""
        if isinstance(self.iterations, bool) or not (
            isinstance(self.iterations, int) and self.iterations >= 1
        ):
            raise CryoposeInputError(f"--iterations: expected an integer >= 1, got "
                                     f"{self.iterations!r}")
        if self.assignment not in _ASSIGNMENTS:
            raise CryoposeInputError(
                f"--assignment: expected soft, mmse or hard, got {self.assignment!r}"
            )
        if isinstance(self.grid_order, bool) or not (
            isinstance(self.grid_order, int) and 0 <= self.grid_order <= 4
        ):
            raise CryoposeInputError(f"--grid-order: expected 0..4, got {self.grid_order!r}")
        if not (self.shift_range_angstrom >= 0 and math.isfinite(self.shift_range_angstrom)):
            raise CryoposeInputError(
                f"--shift-range: expected >= 0 Angstrom, got {self.shift_range_angstrom}"
            )
        if self.shift_step_angstrom is not None and not self.shift_step_angstrom > 0:
            raise CryoposeInputError(
                f"--shift-step: expected > 0 Angstrom, got {self.shift_step_angstrom}"
            )
        for name, value in (
            ("--max-frequency", self.max_frequency_angstrom),
            ("--initial-lowpass", self.initial_lowpass_angstrom),
            ("particle_diameter_angstrom", self.particle_diameter_angstrom),
        ):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise CryoposeInputError(f"{name}: expected a positive value in Angstrom, "
                                         f"got {value}")
        if isinstance(self.batch_size, bool) or not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            raise CryoposeInputError(f"--batch-size: expected a positive integer, got "
                                     f"{self.batch_size!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise CryoposeInputError(f"dtype: expected torch.float32 or torch.float64, got "
                                     f"{self.dtype}")
        if not self.pad_factor >= 1.0:
            raise CryoposeInputError(f"pad_factor: expected >= 1, got {self.pad_factor}")
        if self.noise_sigma != "auto":
            try:
                value = float(self.noise_sigma)
            except (TypeError, ValueError):
                value = -1.0
            if not (value > 0 and math.isfinite(value)):
                raise CryoposeInputError(
                    f"--noise-sigma: expected auto or a positive number, got {self.noise_sigma!r}"
                )
            self.noise_sigma = value
        try:
            point_group(self.symmetry)
        except ValueError as exc:
            raise CryoposeInputError(f"--symmetry: {exc}") from None


@dataclass
class RefineIteration:
    """The outcome of one EM iteration.

    Attributes
    ----------
    iteration : int
        1-based iteration number.
    reconstruction : Reconstruction
        Full map, half maps (each from its own half set) and their FSC.
    table : ParticleTable
        Input table with the iteration's poses (MMSE for soft, MLE for hard), origins,
        ``rlnRandomSubset`` and the posterior summary columns of
        :data:`cryopose.bayes.estimate.OUTPUT_COLUMNS`.
    estimates : PoseEstimates
        Posterior summaries of every particle (table order).
    seconds : float
        Wall time of the iteration.
    """

    iteration: int
    reconstruction: Reconstruction
    table: ParticleTable
    estimates: PoseEstimates
    seconds: float


@dataclass
class RefineResult:
    """Output of :func:`refine`: one :class:`RefineIteration` per iteration, and the noise
    model used (``sigma2``: ``[N // 2 + 1]`` per-shell variance per pixel)."""

    iterations: list[RefineIteration]
    sigma2: torch.Tensor
    config: RefineConfig = field(repr=False)

    @property
    def final(self) -> RefineIteration:
        """The last iteration."""
        return self.iterations[-1]


def iteration_paths(out_dir: str | Path, iteration: int) -> dict[str, Path]:
    """Files written for a 1-based ``iteration`` under ``out_dir``.

    Keys ``map``, ``half1``, ``half2`` (MRC), ``star`` (RELION 3.1) and ``fsc`` (CSV of the
    half-map FSC): ``iter_001.mrc``, ``iter_001_half1.mrc``, ``iter_001_half2.mrc``,
    ``iter_001.star``, ``iter_001_fsc.csv``.
    """
    stem = Path(out_dir) / f"iter_{iteration:03d}"
    return {
        "map": stem.with_suffix(".mrc"),
        "half1": stem.with_name(stem.name + "_half1.mrc"),
        "half2": stem.with_name(stem.name + "_half2.mrc"),
        "star": stem.with_suffix(".star"),
        "fsc": stem.with_name(stem.name + "_fsc.csv"),
    }


# --------------------------------------------------------------------------------------------
# E-step weights and M-step sums
# --------------------------------------------------------------------------------------------


def assignment_weights(
    log_likelihood: torch.Tensor,
    assignment: str = "soft",
    log_quadrature_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Back-projection weights of every (grid rotation, shift) for each image.

    Parameters
    ----------
    log_likelihood : torch.Tensor
        ``[B, G, T]`` log-likelihoods (any per-image constant).
    assignment : {"soft", "hard"}
        ``soft``: the posterior masses ``q_g exp(l[g, t]) / Z`` (uniform rotation and shift
        prior; entries below 1e-30 of the row's largest are exactly 0). ``hard``: 1 at the MLE
        ``argmax_{g, t} l[g, t]``, 0 elsewhere.
    log_quadrature_weights : torch.Tensor, optional
        ``[G]`` log quadrature weights of the grid (default equal; soft only).

    Returns
    -------
    torch.Tensor
        ``[B, G, T]`` non-negative weights summing to 1 per image, in the input's dtype.
    """
    if not isinstance(log_likelihood, torch.Tensor) or log_likelihood.ndim != 3:
        shape = getattr(log_likelihood, "shape", type(log_likelihood).__name__)
        raise ValueError(f"log_likelihood: expected a [B, G, T] tensor, got {shape}")
    if assignment not in _ASSIGNMENTS:
        raise ValueError(f"assignment: expected soft or hard, got {assignment!r}")
    b, g, t = log_likelihood.shape
    if assignment == "hard":
        best = log_likelihood.reshape(b, g * t).argmax(dim=1)
        out = torch.zeros(b, g * t, dtype=log_likelihood.dtype, device=log_likelihood.device)
        out[torch.arange(b, device=out.device), best] = 1.0
        return out.reshape(b, g, t)
    x = log_likelihood.clone()
    if log_quadrature_weights is not None:
        lq = torch.as_tensor(log_quadrature_weights).to(dtype=x.dtype, device=x.device)
        if lq.shape != (g,):
            raise ValueError(f"log_quadrature_weights: expected [{g}], got {tuple(lq.shape)}")
        x += lq[None, :, None]
    peak = x.reshape(b, -1).amax(dim=1)
    if not bool(torch.isfinite(peak).all()):
        bad = int(torch.nonzero(~torch.isfinite(peak))[0, 0])
        raise ValueError(f"log_likelihood: image {bad} has no finite value; expected finite "
                         "log-likelihoods")
    x -= peak[:, None, None]
    below = x < _EXP_FLOOR
    w = x.clamp_(min=_EXP_FLOOR).exp_().masked_fill_(below, 0.0)
    total = w.reshape(b, -1).sum(dim=1, dtype=torch.float64)
    return w.div_(total.to(w.dtype)[:, None, None])


def _half_plane_mask(box: int, device: torch.device) -> torch.Tensor:
    """``[N, N // 2 + 1]`` centred-rfft samples with ``|k| < N / 2`` (those the accumulator
    inserts)."""
    ky = torch.arange(box, dtype=torch.float64, device=device) - box // 2
    kx = torch.arange(box // 2 + 1, dtype=torch.float64, device=device)
    return kx[None, :] ** 2 + ky[:, None] ** 2 < (box / 2) ** 2


class GridBackProjector:
    """Posterior-weighted sums of CTF-weighted images per grid rotation (the soft M-step).

    ``numerator[g] = sum_i sum_t w_i(g, t) C_i Y_i conj(S_t)`` and
    ``denominator[g] = sum_i (sum_t w_i(g, t)) C_i^2`` on the half-plane samples with
    ``|k| < N / 2``; :meth:`insert_into` then inserts each grid rotation's slice once.

    Parameters
    ----------
    box : int
        Image side ``N`` in pixels.
    n_rotations : int
        Grid size ``G``.
    shifts_px : torch.Tensor, optional
        ``[T, 2]`` template shifts ``(x, y)`` in pixels of the score grid (None: no shift).
    dtype : torch.dtype
        float32 or float64.
    device : torch.device or str, optional
    """

    def __init__(
        self,
        box: int,
        n_rotations: int,
        shifts_px: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.box = int(box)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mask = _half_plane_mask(self.box, self.device)
        k = int(self.mask.sum())
        self.n_rotations = int(n_rotations)
        self.numerator = torch.zeros(n_rotations, 2 * k, dtype=dtype, device=self.device)
        self.denominator = torch.zeros(n_rotations, k, dtype=dtype, device=self.device)
        self.mass = torch.zeros(n_rotations, dtype=torch.float64, device=self.device)
        self.n_images = 0
        n = self.box
        ky = (torch.arange(n, dtype=torch.float64, device=self.device) - n // 2)[:, None]
        kx = torch.arange(n // 2 + 1, dtype=torch.float64, device=self.device)[None, :]
        ky, kx = ky.expand(n, n // 2 + 1)[self.mask], kx.expand(n, n // 2 + 1)[self.mask]
        if shifts_px is None:
            shifts = torch.zeros(1, 2, dtype=torch.float64, device=self.device)
        else:
            shifts = torch.as_tensor(shifts_px).to(dtype=torch.float64, device=self.device)
            if shifts.ndim != 2 or shifts.shape[-1] != 2:
                raise ValueError(f"shifts_px: expected [T, 2], got {tuple(shifts.shape)}")
        # conj(S_t(k)) = exp(+2 pi i k . t / N): undoes the template shift (centres the image)
        phase = (2.0 * math.pi / n) * (shifts[:, 0:1] * kx[None] + shifts[:, 1:2] * ky[None])
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        self._unshift = torch.polar(torch.ones_like(phase), phase).to(cdt)  # [T, K]

    def add(
        self,
        weights: torch.Tensor,
        slices: torch.Tensor,
        ctf: torch.Tensor | None = None,
    ) -> None:
        """Accumulate a batch of images with their ``[B, G, T]`` weights.

        Parameters
        ----------
        weights : torch.Tensor
            ``[B, G, T]`` non-negative weights (e.g. :func:`assignment_weights`). Rows with a
            single non-zero entry (hard assignment) take an index-add path; otherwise one
            ``[G, B] @ [B, 2K]`` product per shift.
        slices : torch.Tensor
            ``[B, N, N // 2 + 1]`` complex centred-rfft images (centred by their origins).
        ctf : torch.Tensor, optional
            ``[B, N, N // 2 + 1]`` CTF (None: 1).
        """
        n = self.box
        t = self._unshift.shape[0]
        b = slices.shape[0]
        if slices.shape != (b, n, n // 2 + 1):
            raise ValueError(
                f"slices: expected [B, {n}, {n // 2 + 1}] centred rfft, got {tuple(slices.shape)}"
            )
        if weights.shape != (b, self.n_rotations, t):
            raise ValueError(
                f"weights: expected [{b}, {self.n_rotations}, {t}], got {tuple(weights.shape)}"
            )
        if b == 0:
            return
        cdt = self._unshift.dtype
        y = slices.to(device=self.device, dtype=cdt)[:, self.mask]  # [B, K]
        if ctf is None:
            c = torch.ones(y.shape, dtype=self.dtype, device=self.device)
        else:
            if ctf.shape != slices.shape:
                raise ValueError(f"ctf: expected shape {tuple(slices.shape)}, got "
                                 f"{tuple(ctf.shape)}")
            c = ctf.to(device=self.device, dtype=self.dtype)[:, self.mask]
        cy = c * y
        c2 = c * c
        w = weights.to(device=self.device, dtype=self.dtype)
        marginal = w.sum(dim=-1)  # [B, G]
        self.mass += marginal.sum(dim=0, dtype=torch.float64)
        self.n_images += b
        nonzero = (w > 0).reshape(b, -1).sum(dim=1)
        if bool((nonzero == 1).all()):
            best = w.reshape(b, -1).argmax(dim=1)
            g_idx, t_idx = best // t, best % t
            wb = w.reshape(b, -1)[torch.arange(b, device=self.device), best]
            z = cy * self._unshift[t_idx] * wb[:, None]
            self.numerator.index_add_(0, g_idx, torch.view_as_real(z).reshape(b, -1))
            self.denominator.index_add_(0, g_idx, c2 * wb[:, None])
            return
        for j in range(t):
            z = torch.view_as_real(cy * self._unshift[j]).reshape(b, -1)  # [B, 2K]
            self.numerator.addmm_(w[:, :, j].T, z)
        self.denominator.addmm_(marginal.T, c2)

    def insert_into(
        self, accumulator: FourierAccumulator, rotations: torch.Tensor
    ) -> None:
        """Insert every grid rotation's summed slice (those with non-zero mass) once.

        Parameters
        ----------
        accumulator : FourierAccumulator
            Same box; receives the slices.
        rotations : torch.Tensor
            ``[G, 3, 3]`` grid rotations, or ``[G, S, 3, 3]`` with symmetry mates.
        """
        n = self.box
        if accumulator.box != n:
            raise ValueError(f"accumulator: box {accumulator.box} differs from {n}")
        if rotations.shape[0] != self.n_rotations:
            raise ValueError(
                f"rotations: expected {self.n_rotations} grid rotations, got "
                f"{tuple(rotations.shape)}"
            )
        rows = torch.nonzero(self.mass > 0)[:, 0]
        k = self.denominator.shape[1]
        cdt = self._unshift.dtype
        block = max(1, _INSERT_BLOCK_ELEMENTS // max(1, n * (n // 2 + 1)))
        for s in range(0, rows.numel(), block):
            r = rows[s : s + block]
            num = torch.zeros(r.numel(), n, n // 2 + 1, dtype=cdt, device=self.device)
            den = torch.zeros(r.numel(), n, n // 2 + 1, dtype=self.dtype, device=self.device)
            num[:, self.mask] = torch.view_as_complex(self.numerator[r].reshape(-1, k, 2))
            den[:, self.mask] = self.denominator[r]
            accumulator.insert_sums(num, den, rotations[r.to(rotations.device)])
        accumulator.n_images += self.n_images


# --------------------------------------------------------------------------------------------
# The EM loop
# --------------------------------------------------------------------------------------------


def _prepare_reference(
    volume: torch.Tensor, volume_pixel_size: float, box: int, px: float
) -> torch.Tensor:
    if not isinstance(volume, torch.Tensor) or volume.ndim != 3 or len(set(volume.shape)) != 1:
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume)
        raise CryoposeInputError(f"reference: expected a cubic [N, N, N] volume, got {shape}")
    if not bool(torch.isfinite(volume).all()):
        raise CryoposeInputError("reference: contains non-finite values; expected finite")
    if not volume_pixel_size > 0:
        raise CryoposeInputError(
            f"reference: pixel size {volume_pixel_size}; expected > 0 Angstrom"
        )
    if volume.shape[0] != box or abs(volume_pixel_size - px) > 1e-4 * px:
        volume = resample_volume(volume.double(), volume_pixel_size, px, box)
    return volume


def _insert_at_poses(
    accumulator: FourierAccumulator,
    slices: torch.Tensor,
    ctf: torch.Tensor | None,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    group: torch.Tensor,
) -> None:
    """Insert each image once per symmetry mate at its own pose (``mmse`` assignment).

    ``slices`` are the centred rfft of images centred by their input origins; a template
    shift ``t`` (pixels: the particle sits at ``N // 2 + t``) is undone by moving the content
    by ``-t``. Rotations ``[B, 3, 3]`` are expanded to ``S^T R`` for every element ``S`` of
    ``group`` ``[S, 3, 3]``, as the grid rotations are.
    """
    rdt = torch.float64 if slices.dtype == torch.complex128 else torch.float32
    t = shifts_px.to(device=slices.device, dtype=rdt)
    centred = phase_shift_fourier(slices, -t[:, 0], -t[:, 1], slices.shape[-2])
    g = group.to(device=slices.device, dtype=rdt)
    poses = g.transpose(-1, -2)[None] @ rotations.to(dtype=rdt)[:, None]  # [B, S, 3, 3]
    accumulator.insert(centred, poses, ctf)


def _output_table(
    table: ParticleTable,
    estimates: PoseEstimates,
    assignment: str,
    origins_in_px: torch.Tensor,
    px: float,
    labels: np.ndarray,
) -> ParticleTable:
    if assignment in ("soft", "mmse"):
        rotations, shifts = estimates.rotations_mmse, estimates.shifts_mmse_px
    else:
        rotations, shifts = estimates.rotations_mle, estimates.shifts_mle_px
    # images were centred by +origin_in; a template shift t puts the particle at N//2 + t of
    # the centred image, i.e. the new origin is origin_in - t (pixels)
    origins = (origins_in_px - shifts.double().cpu()) * px
    out = table.with_poses(rotations.double().cpu(), origins)
    for attribute, column in OUTPUT_COLUMNS.items():
        out.data[column] = getattr(estimates, attribute).double().cpu().numpy()
    out.data["rlnRandomSubset"] = labels
    return out


def _reorder(parts: list[tuple[np.ndarray, PoseEstimates]], n: int) -> PoseEstimates:
    rows = np.concatenate([r for r, _ in parts])
    joined = PoseEstimates.concatenate([e for _, e in parts])
    order = torch.from_numpy(np.argsort(rows, kind="stable"))
    if rows.size != n:
        raise RuntimeError(f"refine: {rows.size} particle estimates for {n} particles")
    return PoseEstimates(**{f.name: getattr(joined, f.name)[order] for f in fields(joined)})


def refine(
    table: ParticleTable,
    reference: torch.Tensor,
    reference_pixel_size: float,
    config: RefineConfig | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> RefineResult:
    """Refine a map and the particle poses by EM (soft) or hard-assignment iterations.

    Parameters
    ----------
    table : ParticleTable
        Particles with CTF columns (optional) and origins (optional; images are centred by
        them and shifts are searched about them). One pixel size and box.
    reference : torch.Tensor
        ``[M, M, M]`` initial map ``[z, y, x]`` (voxel units of the images' projections);
        resampled to the particles' pixel size and box when they differ.
    reference_pixel_size : float
        Its voxel size in Angstrom.
    config : RefineConfig, optional
    out_dir : str or Path, optional
        When given (created if needed), each iteration writes the files of
        :func:`iteration_paths` as soon as it is done (atomically).
    progress : callable, optional
        Called with the number of particles finished after each batch (the total over the run
        is ``iterations * len(table)``).

    Returns
    -------
    RefineResult
    """
    config = config or RefineConfig()
    config.validate()
    where = str(table.source) if table.source is not None else "particle table"
    n = len(table)
    if n < 2:
        raise CryoposeInputError(f"{where}: {n} particles; expected at least 2 (two half sets)")
    pixel_sizes = np.unique(np.round(table.pixel_sizes(), 6))
    if len(pixel_sizes) != 1:
        raise CryoposeInputError(
            f"{where}: rlnImagePixelSize has {len(pixel_sizes)} values; expected one pixel size"
        )
    px, box = float(pixel_sizes[0]), int(table.box)
    device = torch.device(config.device)
    dtype = config.dtype
    volume = _prepare_reference(reference, float(reference_pixel_size), box, px)
    volume = volume.to(device=device, dtype=dtype)
    if config.initial_lowpass_angstrom is not None:
        volume = low_pass(volume, config.initial_lowpass_angstrom, px, ndim=3)
    grid: SO3Grid = healpix_grid(config.grid_order, dtype=dtype, device=device)
    log_q = torch.log(grid.weights.to(torch.float64))
    group = point_group(config.symmetry, dtype=dtype, device=device)
    group_arg = None if group.shape[0] == 1 else group
    insert_rotations = group.transpose(-1, -2)[None] @ grid.matrices[:, None]  # [G, S, 3, 3]
    if config.shift_range_angstrom > 0:
        step = config.shift_step_angstrom or px
        shifts = shift_grid(config.shift_range_angstrom, step, px).to(device=device, dtype=dtype)
    else:
        shifts = torch.zeros(1, 2, dtype=dtype, device=device)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    subset = (
        table.data["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in table.data.columns
        else None
    )
    try:
        labels = half_subsets(n, subset, config.seed)
    except ValueError as exc:
        raise CryoposeInputError(f"{where}: {exc}") from None
    for h in (1, 2):
        if not bool((labels == h).any()):
            raise CryoposeInputError(
                f"{where}: rlnRandomSubset has no particle in half set {h}; expected both 1 and 2"
            )
    origins_px = table.origins_angstrom(dtype=torch.float64) / px
    ctf_params = table.ctf_params(dtype=torch.float64) if table.has_ctf else None

    iterations: list[RefineIteration] = []
    with ParticleImages(table) as reader:
        if config.noise_sigma == "auto":
            diameter = config.particle_diameter_angstrom or 0.9 * box * px
            sample = reader.read(np.arange(min(n, 1000)), dtype=dtype, device=device)
            sigma2 = estimate_noise_sigma2(sample, diameter / (2 * px))
        else:
            sigma2 = torch.full(
                (box // 2 + 1,), float(config.noise_sigma) ** 2, dtype=dtype, device=device
            )
        halves = [volume, volume]
        for it in range(1, config.iterations + 1):
            start = time.perf_counter()
            accumulators = []
            parts: list[tuple[np.ndarray, PoseEstimates]] = []
            for h in (1, 2):
                rows_h = np.flatnonzero(labels == h)
                scorer = ReferenceScorer(
                    halves[h - 1], px, max_frequency_angstrom=config.max_frequency_angstrom,
                    pad_factor=config.pad_factor, device=device, dtype=dtype,
                )
                # mmse inserts each image directly; soft / hard sum per grid point first
                sums = None
                if config.assignment != "mmse":
                    sums = GridBackProjector(box, len(grid), shifts, dtype, device)
                acc = FourierAccumulator(box, config.pad_factor, dtype, device)
                for b0 in range(0, rows_h.size, config.batch_size):
                    rows = rows_h[b0 : b0 + config.batch_size]
                    images = reader.read(rows, dtype=dtype, device=device)
                    o = origins_px[rows].to(device=device, dtype=dtype)
                    ft = phase_shift_fourier(rfft2_centred(images), o[:, 0], o[:, 1], box)
                    centred = irfft2_centred(ft, box)
                    ctf = p = None
                    if ctf_params is not None:
                        p = {k: v[rows].to(device=device, dtype=dtype)
                             for k, v in ctf_params.items()}
                        ctf = ctf_from_params(
                            p, box, pixel_size_angstrom=px, dtype=dtype, device=device
                        )
                    log_lik = scorer.score_grid(centred, ctf, sigma2, grid, shifts, ctf_params=p)
                    est = summarize_posterior(
                        log_lik, grid, shifts, group=group_arg, n_candidates=1
                    )
                    if sums is None:
                        _insert_at_poses(acc, ft, ctf, est.rotations_mmse.to(device),
                                         est.shifts_mmse_px.to(device), group)
                    else:
                        weights = assignment_weights(log_lik, config.assignment, log_q)
                        sums.add(weights, ft, ctf)
                        del weights
                    parts.append((rows, est.to("cpu")))
                    if progress is not None:
                        progress(len(rows))
                if sums is not None:
                    sums.insert_into(acc, insert_rotations)
                del sums, scorer
                accumulators.append(acc)
            rec = _finish(tuple(accumulators), "fsc", px, True, n)
            estimates = _reorder(parts, n)
            out_table = _output_table(
                table, estimates, config.assignment, origins_px, px, labels
            )
            halves = [rec.half1, rec.half2]
            record = RefineIteration(it, rec, out_table, estimates, time.perf_counter() - start)
            iterations.append(record)
            if out_path is not None:
                _write_iteration(out_path, record, px)
    return RefineResult(iterations, sigma2.cpu(), config)


def _write_iteration(out_dir: Path, record: RefineIteration, px: float) -> None:
    paths = iteration_paths(out_dir, record.iteration)
    rec = record.reconstruction
    write_volume(paths["half1"], rec.half1.cpu(), px)
    write_volume(paths["half2"], rec.half2.cpu(), px)
    if rec.half_fsc is not None:
        write_fsc_csv(rec.half_fsc, paths["fsc"])
    write_star(record.table, paths["star"])
    write_volume(paths["map"], rec.volume.cpu(), px)
