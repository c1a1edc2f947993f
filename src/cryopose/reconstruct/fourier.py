"""Direct Fourier reconstruction from images, poses and CTFs (Wiener-regularised, gridded).

Model (conventions: ``docs/conventions.md``): the centred rfft ``Y_i`` of image ``i``, centred by
its RELION origin (phase factor shifting by ``+origin / pixel_size``), is ``C_i * S_i + noise``
with ``C_i`` its CTF and ``S_i = Projector(V).slices(R_i)`` the central slice of the volume's
transform at ``R_i (kx, ky, 0)^T`` (voxel-sum units, ``R = A.T``).

Insertion: every half-plane frequency ``|k| < N / 2`` of every image (and its Friedel mate
``-k`` with the conjugate value, except on the ``kx = 0`` column which already holds both) is
spread by trilinear weights ``t`` onto a ``M = pad_factor * N`` 3D grid at
``M // 2 + (M / N) R k`` (a ``scatter_add_``)::

    numerator   += t * w_i * C_i(k) * Y_i(k)
    denominator += t * w_i * C_i(k)^2

with ``w_i`` the per-particle weight (1 by default). Only the stored half plane is scattered:
the trilinear kernel is symmetric, so the mates' sums are the point reflection ``i -> 2 (M //
2) - i`` of the half-plane sums (conjugated for the numerator), added once when the grids are
read. Points on the ``kx = 0`` column are scattered with weight 1/2 (their reflection gives the
other half); this takes the column's Hermitian part, which is the value itself for the
transform of a real image (with a CTF even in ``k``).
Symmetry: a map with ``V(g x) = V(x)`` gives the same image at ``R`` and ``g.T @ R``, so each
image is inserted at every ``g.T @ R_i``, ``g`` in the point group.

Wiener filter (per shell ``s`` of the ``N`` box, ``s = round(|k|)``)::

    V_hat = numerator / (denominator + mean_s(denominator) / SSNR(s))

``mean_s`` is the denominator's mean over the shell's voxels: with ``sigma^2`` the noise
variance per Fourier pixel and ``P`` the signal power, the unregularised estimate
``numerator / denominator`` has noise ``sigma^2 / denominator``, so the Wiener term
``sigma^2 / P`` equals ``mean_s(denominator) / SSNR(s)`` where ``SSNR(s)`` is the SNR of the
full map in that shell. ``SSNR(s)`` is either a constant (``ssnr=float``) or estimated from
the half-maps: ``SSNR_full = 2 FSC / (1 - FSC)`` with ``FSC`` the half-map FSC (clamped to
``[1e-3, 0.999]``); each half-map itself uses ``SSNR_half = FSC / (1 - FSC)``. Half-maps are
always accumulated (one pass over the data gives both).

Gridding correction: ``V_hat`` on the padded grid is (for densely sampled Fourier space) the
true transform convolved with the normalised trilinear kernel, so after the inverse FFT the
padded real-space volume is divided by ``prod_axis sinc^2((i - M // 2) / M)``, then cropped to
the central ``N^3``. Outside ``|k| < N / 2`` the transform is set to zero.

Speed: the index_add scatter is used rather than
:func:`cryopose.imaging.backproject_slices` (the adjoint through autograd of grid_sample),
which is much slower and has no Friedel/denominator bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cryopose.evaluate.fsc import FSCResult, fourier_shell_correlation, fsc
from cryopose.imaging.ctf import ctf_from_params
from cryopose.imaging.fft import rfft2_centred
from cryopose.imaging.shifts import phase_shift_fourier
from cryopose.imaging.trilinear import trilinear_corners
from cryopose.io import ParticleImages, ParticleTable
from cryopose.so3.symmetry import point_group

__all__ = [
    "FourierAccumulator",
    "Reconstruction",
    "reconstruct_images",
    "reconstruct_particles",
    "half_subsets",
]

# Inserted (point, rotation) pairs per scatter call (x 8 trilinear corners): bounds temporary
# memory (~100 MB) and keeps the scattered values cache-friendly.
_MAX_POINTS_PER_CHUNK = 1 << 18
_FSC_CLAMP = (1e-3, 0.999)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class FourierAccumulator:
    """Numerator and CTF^2 denominator of a direct Fourier reconstruction on a padded grid.

    Parameters
    ----------
    box : int
        Image and volume side ``N`` in pixels.
    pad_factor : float
        Padded grid side ``M = round(pad_factor * N)`` (2 is RELION's default).
    dtype : torch.dtype
        float32 or float64 (the numerator is the matching complex dtype).
    device : torch.device or str, optional
        Where the grids live (``"cpu"`` or ``"cuda"``).
    """

    def __init__(
        self,
        box: int,
        pad_factor: float = 2.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not (isinstance(box, int) and box >= 2):
            raise ValueError(f"box: expected an int >= 2, got {box!r}")
        if not pad_factor >= 1.0:
            raise ValueError(f"pad_factor: expected >= 1, got {pad_factor}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.box = box
        self.padded_box = max(box, int(round(pad_factor * box)))
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Storage side M + 2 with a one-voxel margin: every trilinear corner of a point with
        # |k| < N / 2 falls inside, so the scatter needs no bounds checks (margin cropped later).
        # Only the stored half plane of each image is inserted; the Friedel mates (value conj,
        # coordinate -R k) are the point reflection of these sums, added when read
        # (:attr:`numerator`, :attr:`denominator`).
        side = self.padded_box + 2
        self._num_half = torch.zeros(side**3, dtype=_complex_dtype(dtype), device=self.device)
        self._den_half = torch.zeros(side**3, dtype=dtype, device=self.device)
        self.n_images = 0
        # Half-plane sample points of the N image inside |k| < N / 2 (pixels of the N box).
        ky = torch.arange(box, dtype=dtype, device=self.device) - box // 2
        kx = torch.arange(box // 2 + 1, dtype=dtype, device=self.device)
        gy, gx = torch.meshgrid(ky, kx, indexing="ij")
        self._mask = gx**2 + gy**2 < (box / 2) ** 2
        self._kx = gx[self._mask]
        self._ky = gy[self._mask]
        # kx = 0 column: k and -k are both stored, so each is inserted with weight 1/2 and the
        # reflection supplies the other half (the column's Hermitian part, i.e. the value
        # itself for the transform of a real image).
        self._half_weight = torch.where(self._kx > 0, 1.0, 0.5).to(dtype)

    # ---- stored sums -------------------------------------------------------------------
    @property
    def numerator(self) -> torch.Tensor:
        """Flat ``[(M + 2)^3]`` complex numerator grid (``[z, y, x]`` order, one-voxel margin),
        Friedel mates included (a new tensor, computed from the stored half-plane sums)."""
        return self._num_half + self._reflect(self._num_half).conj()

    @property
    def denominator(self) -> torch.Tensor:
        """Flat ``[(M + 2)^3]`` real CTF^2 denominator grid, Friedel mates included (a new
        tensor, computed from the stored half-plane sums)."""
        return self._den_half + self._reflect(self._den_half)

    def _reflect(self, flat: torch.Tensor) -> torch.Tensor:
        """Point reflection ``i -> 2 (M // 2) - i`` of a flat stored grid about the centre voxel.

        Storage index ``t = i + 1`` (margin). Even ``M``: ``t -> M + 2 - t`` on ``t >= 1`` (the
        ``t = 0`` plane is never written: every corner has ``i >= 0``). Odd ``M``: ``t -> M + 1 -
        t``, the whole axis.
        """
        side = self.padded_box + 2
        grid = flat.reshape(side, side, side)
        if self.padded_box % 2:
            return grid.flip((0, 1, 2)).reshape(-1)
        out = torch.zeros_like(grid)
        out[1:, 1:, 1:] = grid[1:, 1:, 1:].flip((0, 1, 2))
        return out.reshape(-1)

    # ---- insertion ---------------------------------------------------------------------
    def _scatter(self, coords: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> None:
        """Trilinear scatter of values at ``coords`` ``[P, 3]`` (x, y, z padded-grid index):
        the 8 corners at once, one ``scatter_add_`` for the numerator and one for the
        denominator."""
        # +1: the one-voxel storage margin
        index, weight = trilinear_corners(coords + 1.0, self.padded_box + 2)
        index = index.reshape(-1)
        num_w = torch.view_as_complex(torch.view_as_real(num)[:, None, :] * weight[:, :, None])
        self._num_half.scatter_add_(0, index, num_w.reshape(-1))
        self._den_half.scatter_add_(0, index, (den[:, None] * weight).reshape(-1))

    def insert(
        self,
        slices: torch.Tensor,
        rotations: torch.Tensor,
        ctf: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Insert centred-rfft slices at their poses.

        Parameters
        ----------
        slices : torch.Tensor
            ``[B, N, N // 2 + 1]`` complex centred-rfft images ``Y`` (already centred by their
            origins; layout of :func:`cryopose.imaging.fft.rfft2_centred`).
        rotations : torch.Tensor
            ``[B, 3, 3]`` cryopose rotations ``R``, or ``[B, G, 3, 3]`` to insert each image at
            ``G`` poses (symmetry mates).
        ctf : torch.Tensor, optional
            ``[B, N, N // 2 + 1]`` real CTF values (``None``: 1, no CTF).
        weights : torch.Tensor, optional
            ``[B]`` non-negative per-particle weights (``None``: 1).
        """
        n = self.box
        if slices.ndim != 3 or slices.shape[-2:] != (n, n // 2 + 1):
            raise ValueError(
                f"slices: expected [B, {n}, {n // 2 + 1}] centred rfft, got {tuple(slices.shape)}"
            )
        b = slices.shape[0]
        if rotations.ndim == 3:
            rotations = rotations[:, None]
        if rotations.ndim != 4 or rotations.shape[0] != b or rotations.shape[-2:] != (3, 3):
            raise ValueError(
                f"rotations: expected [{b}, 3, 3] or [{b}, G, 3, 3], got {tuple(rotations.shape)}"
            )
        cdt = _complex_dtype(self.dtype)
        y = slices.to(device=self.device, dtype=cdt)[:, self._mask]  # [B, P]
        if ctf is None:
            c = torch.ones(y.shape, dtype=self.dtype, device=self.device)
        else:
            if ctf.shape != slices.shape:
                raise ValueError(
                    f"ctf: expected shape {tuple(slices.shape)}, got {tuple(ctf.shape)}"
                )
            c = ctf.to(device=self.device, dtype=self.dtype)[:, self._mask]
        if weights is not None:
            w = torch.as_tensor(weights, dtype=self.dtype, device=self.device).reshape(-1)
            if w.shape != (b,):
                raise ValueError(f"weights: expected [{b}], got {tuple(w.shape)}")
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError("weights: expected finite non-negative values")
            c_w = c * w[:, None]
        else:
            c_w = c
        num = c_w * y  # [B, P]
        den = c_w * c
        self._insert_masked(num, den, rotations)
        self.n_images += b

    def insert_sums(
        self,
        numerator: torch.Tensor,
        denominator: torch.Tensor,
        rotations: torch.Tensor,
        n_images: int = 0,
    ) -> None:
        """Insert precomputed numerator and denominator slices at their poses.

        For EM with soft assignment: the slice of grid rotation ``R_g`` is the posterior-weighted
        sum over images, ``numerator_g = sum_i p_ig C_i Y_i`` and ``denominator_g = sum_i p_ig
        C_i^2``, inserted once. ``insert(Y, R, C, w)`` equals ``insert_sums(w C Y, w C^2, R)``.

        Parameters
        ----------
        numerator : torch.Tensor
            ``[B, N, N // 2 + 1]`` complex centred-rfft numerator slices.
        denominator : torch.Tensor
            ``[B, N, N // 2 + 1]`` real denominator slices (non-negative).
        rotations : torch.Tensor
            ``[B, 3, 3]`` or ``[B, G, 3, 3]`` cryopose rotations (as in :meth:`insert`).
        n_images : int
            Added to :attr:`n_images` (the slices themselves may sum many images).
        """
        n = self.box
        expected = (n, n // 2 + 1)
        if numerator.ndim != 3 or numerator.shape[-2:] != expected:
            raise ValueError(
                f"numerator: expected [B, {n}, {n // 2 + 1}] centred rfft, "
                f"got {tuple(numerator.shape)}"
            )
        if denominator.shape != numerator.shape:
            raise ValueError(
                f"denominator: expected shape {tuple(numerator.shape)}, "
                f"got {tuple(denominator.shape)}"
            )
        b = numerator.shape[0]
        if rotations.ndim == 3:
            rotations = rotations[:, None]
        if rotations.ndim != 4 or rotations.shape[0] != b or rotations.shape[-2:] != (3, 3):
            raise ValueError(
                f"rotations: expected [{b}, 3, 3] or [{b}, G, 3, 3], got {tuple(rotations.shape)}"
            )
        cdt = _complex_dtype(self.dtype)
        num = numerator.to(device=self.device, dtype=cdt)[:, self._mask]
        den = denominator.to(device=self.device, dtype=self.dtype)[:, self._mask]
        self._insert_masked(num, den, rotations)
        self.n_images += int(n_images)

    def _insert_masked(
        self, num: torch.Tensor, den: torch.Tensor, rotations: torch.Tensor
    ) -> None:
        """Scatter ``[B, P]`` numerator / denominator values of the masked half-plane points at
        ``[B, G, 3, 3]`` rotations (Friedel mates are added when the sums are read)."""
        n = self.box
        b, g = rotations.shape[:2]
        num = num * self._half_weight
        den = den * self._half_weight
        p = self._kx.numel()
        rot = rotations.to(device=self.device, dtype=self.dtype)
        scale = self.padded_box / n
        centre = float(self.padded_box // 2)
        per_chunk = max(1, _MAX_POINTS_PER_CHUNK // max(p, 1))
        flat_rot = rot.reshape(b * g, 3, 3)
        kx, ky = self._kx, self._ky
        for start in range(0, b * g, per_chunk):
            r = flat_rot[start : start + per_chunk]
            coords = (r[:, None, :, 0] * kx[None, :, None] + r[:, None, :, 1] * ky[None, :, None])
            coords = coords * scale + centre
            if g == 1:
                num_c, den_c = num[start : start + per_chunk], den[start : start + per_chunk]
            else:
                idx = torch.arange(start, start + r.shape[0], device=self.device) // g
                num_c, den_c = num[idx], den[idx]
            self._scatter(coords.reshape(-1, 3), num_c.reshape(-1), den_c.reshape(-1))

    def add_(self, other: FourierAccumulator) -> FourierAccumulator:
        """Add another accumulator's sums into this one (same box, padding, dtype)."""
        if (other.box, other.padded_box) != (self.box, self.padded_box):
            raise ValueError(
                f"other: expected an accumulator of box {self.box} padded to "
                f"{self.padded_box}, got box {other.box} padded to {other.padded_box}"
            )
        self._num_half += other._num_half.to(self._num_half.device, self._num_half.dtype)
        self._den_half += other._den_half.to(self._den_half.device, self._den_half.dtype)
        self.n_images += other.n_images
        return self

    # ---- solution ----------------------------------------------------------------------
    def _shells(self) -> torch.Tensor:
        """Shell ``round(|k|)`` (Fourier pixels of the N box) of every padded-grid voxel."""
        m = self.padded_box
        f = (torch.arange(m, dtype=self.dtype, device=self.device) - m // 2) * (self.box / m)
        r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
        return r.reshape(-1)

    def volume(
        self,
        ssnr: float | torch.Tensor = 1000.0,
        gridding_correction: bool = True,
    ) -> torch.Tensor:
        """The regularised reconstruction ``[N, N, N]`` (voxel units of the input volume).

        Parameters
        ----------
        ssnr : float or torch.Tensor
            Spectral SNR of the full map: a constant, or ``[N // 2 + 1]`` values per shell
            (see the module docstring). The Wiener term is ``mean_shell(den) / ssnr``.
        gridding_correction : bool
            Divide by the trilinear kernel's real-space ``sinc^2`` footprint.

        Returns
        -------
        torch.Tensor
            Real volume ``[z, y, x]`` in this accumulator's dtype and device.
        """
        n, m = self.box, self.padded_box
        n_shells = n // 2 + 1
        ssnr_t = torch.as_tensor(ssnr, dtype=torch.float64, device=self.device)
        if ssnr_t.ndim == 0:
            ssnr_t = ssnr_t.expand(n_shells)
        if ssnr_t.shape != (n_shells,):
            raise ValueError(
                f"ssnr: expected a float or [{n_shells}] values, got {tuple(ssnr_t.shape)}"
            )
        if not bool((ssnr_t > 0).all()):
            raise ValueError("ssnr: expected positive values")
        # Shell round(|k|) of every voxel; voxels outside |k| < N / 2 go to an extra bin
        # ``n_shells`` whose regularisation is infinite (their value becomes 0).
        radius = self._shells()
        shell = torch.round(radius).to(torch.int64).clamp_max(n // 2)
        shell = torch.where(radius < n / 2, shell, n_shells)
        side = m + 2
        den = self.denominator.reshape(side, side, side)[1:-1, 1:-1, 1:-1].reshape(-1)
        den_sum = torch.zeros(n_shells + 1, dtype=torch.float64, device=self.device)
        count = torch.zeros_like(den_sum)
        den_sum.index_add_(0, shell, den.to(torch.float64))
        count.index_add_(0, shell, torch.ones_like(den, dtype=torch.float64))
        mean_den = den_sum[:n_shells] / count[:n_shells].clamp_min(1.0)
        floor = 1e-6 * float(den.max()) if den.numel() else 0.0
        reg = (mean_den / ssnr_t).clamp_min(floor if floor > 0 else 1e-30)
        reg = torch.cat([reg, reg.new_full((1,), math.inf)]).to(self.dtype)
        num = self.numerator.reshape(side, side, side)[1:-1, 1:-1, 1:-1].reshape(-1)
        ft = (num / (den + reg[shell])).reshape(m, m, m)
        del num, den, shell, radius
        # centred transform: ifftshift, ifftn, then crop the centred N^3 box straight from the
        # unshifted result (fftshift moves index j to (j + M // 2) mod M)
        padded = torch.fft.ifftn(torch.fft.ifftshift(ft), dim=(-3, -2, -1)).real
        del ft
        start = m // 2 - n // 2
        index = (torch.arange(start, start + n, device=self.device) - m // 2) % m
        vol = padded.index_select(0, index).index_select(1, index).index_select(2, index)
        if gridding_correction:
            x = (torch.arange(n, dtype=self.dtype, device=self.device) + (start - m // 2)) / m
            s2 = torch.sinc(x) ** 2
            vol = vol / (s2[:, None, None] * s2[None, :, None] * s2[None, None, :])
        return vol.to(self.dtype).contiguous()


@dataclass
class Reconstruction:
    """A reconstructed map, its half-maps and their FSC.

    Attributes
    ----------
    volume : torch.Tensor
        ``[N, N, N]`` full map.
    half1, half2 : torch.Tensor
        Half-maps (each from its subset only, Wiener-filtered with the half-map SSNR).
    half_fsc : FSCResult or None
        FSC between the half-maps (``None`` without a pixel size).
    ssnr : torch.Tensor
        ``[N // 2 + 1]`` SSNR of the full map used in the Wiener filter.
    n_particles : int
        Images inserted (before symmetry expansion).
    """

    volume: torch.Tensor
    half1: torch.Tensor
    half2: torch.Tensor
    half_fsc: FSCResult | None
    ssnr: torch.Tensor
    n_particles: int


def half_subsets(
    n: int, random_subset: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Half-set label (1 or 2) of each of ``n`` particles.

    Parameters
    ----------
    n : int
        Number of particles.
    random_subset : numpy.ndarray, optional
        ``rlnRandomSubset`` values (1 or 2); used as given when present.
    seed : int
        Seed of the random split otherwise: a seeded permutation, alternately assigned, so the
        halves differ in size by at most one.

    Returns
    -------
    numpy.ndarray
        ``[n]`` int64 labels in ``{1, 2}``.
    """
    if random_subset is not None:
        labels = np.asarray(random_subset, dtype=np.int64).reshape(-1)
        if labels.shape != (n,) or not np.isin(labels, (1, 2)).all():
            raise ValueError("rlnRandomSubset: expected 1 or 2 for every particle")
        return labels
    order = np.random.default_rng(seed).permutation(n)
    labels = np.empty(n, dtype=np.int64)
    labels[order] = 1 + (np.arange(n) % 2)
    return labels


def _ssnr_from_fsc(curve: torch.Tensor, full: bool) -> torch.Tensor:
    c = curve.clamp(*_FSC_CLAMP)
    return (2.0 * c if full else c) / (1.0 - c)


def _finish(
    halves: tuple[FourierAccumulator, FourierAccumulator],
    ssnr: float | str,
    pixel_size_angstrom: float | None,
    gridding_correction: bool,
    n_particles: int,
) -> Reconstruction:
    acc1, acc2 = halves
    full = FourierAccumulator(acc1.box, acc1.padded_box / acc1.box, acc1.dtype, acc1.device)
    full.add_(acc1).add_(acc2)
    n_shells = acc1.box // 2 + 1
    if isinstance(ssnr, str):
        if ssnr != "fsc":
            raise ValueError(f"ssnr: expected a positive number or 'fsc', got {ssnr!r}")
        # First pass: half-maps with a weak constant regularisation, then their FSC.
        h1 = acc1.volume(1000.0, gridding_correction)
        h2 = acc2.volume(1000.0, gridding_correction)
        curve = fourier_shell_correlation(h1, h2).to(torch.float64)
        ssnr_full = _ssnr_from_fsc(curve, full=True)
        ssnr_half = _ssnr_from_fsc(curve, full=False)
    else:
        ssnr_full = torch.full((n_shells,), float(ssnr), dtype=torch.float64, device=acc1.device)
        ssnr_half = ssnr_full / 2.0
    h1 = acc1.volume(ssnr_half, gridding_correction)
    h2 = acc2.volume(ssnr_half, gridding_correction)
    vol = full.volume(ssnr_full, gridding_correction)
    half_fsc = fsc(h1, h2, pixel_size_angstrom) if pixel_size_angstrom else None
    return Reconstruction(vol, h1, h2, half_fsc, ssnr_full.cpu(), n_particles)


def _symmetry_rotations(
    rotations: torch.Tensor, symmetry: str | torch.Tensor | None
) -> torch.Tensor:
    """``[B, G, 3, 3]`` poses ``g.T @ R`` for every ``g`` of the point group."""
    if symmetry is None:
        return rotations[:, None]
    group = (
        point_group(symmetry, dtype=rotations.dtype, device=rotations.device)
        if isinstance(symmetry, str)
        else symmetry.to(dtype=rotations.dtype, device=rotations.device)
    )
    return group.transpose(-1, -2)[None] @ rotations[:, None]


def reconstruct_images(
    images: torch.Tensor,
    rotations: torch.Tensor,
    *,
    ctf: torch.Tensor | None = None,
    shifts_px: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    symmetry: str | None = "C1",
    subsets: np.ndarray | None = None,
    seed: int = 0,
    ssnr: float | str = "fsc",
    pixel_size_angstrom: float | None = None,
    pad_factor: float = 2.0,
    gridding_correction: bool = True,
    batch_size: int = 256,
) -> Reconstruction:
    """Reconstruct from an in-memory stack (works on the images' device and dtype).

    Parameters
    ----------
    images : torch.Tensor
        ``[n, N, N]`` real particle images.
    rotations : torch.Tensor
        ``[n, 3, 3]`` cryopose rotations ``R``.
    ctf : torch.Tensor, optional
        ``[n, N, N // 2 + 1]`` CTF on the centred rfft grid (``None``: no CTF).
    shifts_px : torch.Tensor, optional
        ``[n, 2]`` ``(x, y)`` shifts in pixels that *centre* each image (RELION: ``+origin /
        pixel_size``).
    weights : torch.Tensor, optional
        ``[n]`` per-particle weights.
    symmetry : str, optional
        Point group (``"C1"``/``None``: none).
    subsets : numpy.ndarray, optional
        Half-set labels 1/2; default: seeded random split (:func:`half_subsets`).
    seed : int
        Seed of the random half split.
    ssnr : float or "fsc"
        Constant spectral SNR of the full map, or ``"fsc"`` to estimate it per shell from the
        half-maps.
    pixel_size_angstrom : float, optional
        For the half-map FSC resolutions.
    pad_factor, gridding_correction
        See :class:`FourierAccumulator` and :meth:`FourierAccumulator.volume`.
    batch_size : int
        Images per insertion call.

    Returns
    -------
    Reconstruction
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected [n, N, N], got {tuple(images.shape)}")
    n, box = images.shape[0], int(images.shape[-1])
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"rotations: expected [{n}, 3, 3], got {tuple(rotations.shape)}")
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    labels = half_subsets(n, subsets, seed)
    accs = tuple(FourierAccumulator(box, pad_factor, dtype, images.device) for _ in range(2))
    sym = None if symmetry is None or str(symmetry).upper() == "C1" else symmetry
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        ft = rfft2_centred(images[sl].to(dtype))
        if shifts_px is not None:
            s = shifts_px[sl].to(device=images.device, dtype=dtype)
            ft = phase_shift_fourier(ft, s[:, 0], s[:, 1], box)
        rot = _symmetry_rotations(rotations[sl].to(device=images.device, dtype=dtype), sym)
        for h, acc in zip((1, 2), accs, strict=True):
            pick = torch.from_numpy(np.flatnonzero(labels[sl] == h)).to(images.device)
            if pick.numel() == 0:
                continue
            acc.insert(
                ft[pick],
                rot[pick],
                None if ctf is None else ctf[sl][pick],
                None if weights is None else torch.as_tensor(weights)[sl].to(images.device)[pick],
            )
    return _finish(accs, ssnr, pixel_size_angstrom, gridding_correction, n)


def reconstruct_particles(
    table: ParticleTable,
    *,
    symmetry: str = "C1",
    weights: np.ndarray | torch.Tensor | None = None,
    ssnr: float | str = "fsc",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    pad_factor: float = 2.0,
    gridding_correction: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Reconstruction:
    """Reconstruct the particles of a :class:`cryopose.io.ParticleTable`, streaming the stack.

    Poses from ``rlnAngleRot/Tilt/Psi``, origins from ``rlnOriginX/YAngst`` (images are
    centred by ``+origin``), CTF from the table when its columns are present (else none), half
    sets from ``rlnRandomSubset`` when present (else a seeded random split).

    Parameters
    ----------
    table : cryopose.io.ParticleTable
        Particles (one pixel size and box).
    symmetry : str
        Point group of the map.
    weights : array-like, optional
        ``[n]`` per-particle weights.
    ssnr, seed, pad_factor, gridding_correction, batch_size
        See :func:`reconstruct_images`.
    device : torch.device or str
        ``"cpu"`` or ``"cuda"``.
    dtype : torch.dtype
        Working precision.
    progress : callable, optional
        Called with the number of particles done after each batch.

    Returns
    -------
    Reconstruction
    """
    n = len(table)
    if n == 0:
        raise ValueError(f"{table.source or 'particle table'}: no particles to reconstruct")
    if not table.has_poses:
        raise ValueError(
            f"{table.source or 'particle table'}: missing rlnAngleRot/rlnAngleTilt/rlnAnglePsi; "
            "expected poses to reconstruct"
        )
    box, px = table.box, table.pixel_size
    device = torch.device(device)
    rotations = table.rotations(dtype=torch.float64)
    origins_px = table.origins_angstrom(dtype=torch.float64) / px
    ctf_params = table.ctf_params(dtype=torch.float64) if table.has_ctf else None
    columns = table.data.columns
    subset = table.data["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in columns else None
    labels = half_subsets(n, subset, seed)
    if weights is not None:
        weights = torch.from_numpy(np.array(weights, dtype=np.float64, copy=True))
        if weights.shape != (n,):
            raise ValueError(f"weights: expected [{n}] values, got {tuple(weights.shape)}")
    accs = tuple(FourierAccumulator(box, pad_factor, dtype, device) for _ in range(2))
    sym = None if str(symmetry).upper() == "C1" else symmetry
    with ParticleImages(table) as stack:
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            images = stack.read(rows, dtype=dtype, device=device)
            ft = rfft2_centred(images)
            o = origins_px[rows].to(device=device, dtype=dtype)
            ft = phase_shift_fourier(ft, o[:, 0], o[:, 1], box)
            ctf = None
            if ctf_params is not None:
                p = {k: v[rows].to(device=device, dtype=dtype) for k, v in ctf_params.items()}
                ctf = ctf_from_params(p, box, pixel_size_angstrom=px, dtype=dtype, device=device)
            rot = _symmetry_rotations(rotations[rows].to(device=device, dtype=dtype), sym)
            w = None if weights is None else weights[rows].to(device=device, dtype=dtype)
            for h, acc in zip((1, 2), accs, strict=True):
                pick_np = np.flatnonzero(labels[rows] == h)
                if pick_np.size == 0:
                    continue
                pick = torch.from_numpy(pick_np).to(device)
                acc.insert(
                    ft[pick],
                    rot[pick],
                    None if ctf is None else ctf[pick],
                    None if w is None else w[pick],
                )
            if progress is not None:
                progress(len(rows))
    return _finish(accs, ssnr, px, gridding_correction, n)

