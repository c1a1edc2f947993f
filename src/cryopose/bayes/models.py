"""The Bayesian seed's other observation models: cryo-ET subtomograms, 2D in-plane, volume pairs.

Same machinery as single-particle estimation (a Gaussian likelihood evaluated over a grid of
rotations, a posterior by log-sum-exp, MLE / MAP / MMSE and the posterior expected squared
chordal loss), applied to observations that are *not* projections (seed section 2.1.1,
appendix C):

* **Subtomogram alignment (cryo-ET)**: ``y(x) = V(R x) + noise``, a rotated 3D volume,
  optionally seen through a known Fourier weight ``W`` (a 0/1 missing-wedge mask from
  :func:`missing_wedge_mask`, or a 3D CTF): ``Y(k) = W(k) V_hat(R k) + noise``.
  :class:`SubtomogramScorer`, :func:`align_subtomograms`.
* **2D in-plane alignment (SO(2))**: ``y(x) = I(R_theta x) + noise`` for images.
  :func:`score_inplane`, :func:`align_images_2d`, :func:`summarize_angle_posterior`.
* **Two noisy volumes (seed appendix C)**: ``a = V + e1``, ``b(x) = V(R x) + e2``; since
  ``b(x) - a(R x) = e2(x) - e1(R x)``, the relative rotation has the subtomogram likelihood
  with ``a`` as the reference and the noise variances added (``2 sigma^2`` for equal noise).
  :func:`align_volumes`.

Rotation convention (``docs/conventions.md``, "Other observation models")
----------------------------------------------------------------------------
A subtomogram at cryopose pose ``R`` is ``y(x) = V(R x)``, with ``x = (x, y, z)`` in voxels from
the centre voxel ``N // 2`` (particle frame) and ``R x`` in the reference frame. This is the
single-particle pose extended to 3D: summing that subtomogram along z gives exactly the
projection image at pose ``R`` (``image(x, y) = sum_z V(R (x, y, z))``), so one set of RELION
angles means the same thing for a particle image and for a subtomogram. In the seed's notation
``y = g o V`` with ``g = R^T`` (``(g o V)(x) = V(g^-1 x)``). A blob of the reference at ``c``
appears in the subtomogram at ``R^T c``. Fourier side: ``Y(k) = V_hat(R k)``.

For images, pose ``theta`` (degrees) is ``y(x) = I(R_theta x)`` with
``R_theta = [[cos, -sin], [sin, cos]]`` acting on ``(x, y)`` pixels from the centre: the 2D
restriction of the 3D pose ``Rz(theta)`` (RELION ``psi`` at ``rot = tilt = 0``). The image
content therefore appears turned by ``-theta`` (clockwise with y up).

Likelihood normalisation (shared with :mod:`cryopose.bayes.scoring`)
----------------------------------------------------------------------
``sigma2`` is the noise variance per real-space voxel (pixel), a number or a per-shell table
``[N // 2 + 1]`` (shell = ``round(|k|)`` in Fourier voxels), optionally per observation
``[B, N // 2 + 1]``. With ``Y`` the unnormalised centred DFT,
``log p(y | R) = -sum_k |Y_k - W_k X_R(k)|^2 / (2 N^d sigma2(shell(k)))`` over the ball
``|k| <= k_max`` (default: ``|k| < N / 2``, the largest ball inside the box, where a rotated
template is defined), counted over the full spectrum (rfft half-space entries with ``kx > 0``
count twice). For data and templates band-limited to that ball and ``W = 1`` this equals the
real-space ``-||y - x||^2 / (2 sigma^2)`` exactly. Scores are returned **without** the
data term ``-sum |Y|^2 / ...`` (the same for every rotation of one observation; adding it in
float32 would destroy the resolution of the differences) unless ``include_data_term=True``.
The template-norm term ``sum W^2 |X_R|^2`` is kept: it is constant over ``R`` only for
``W = 1``; with a missing wedge it decides which rotations hide the reference's power in the
wedge, and dropping it biases the alignment.

Method: the reference is zero-padded to ``M = round(pad_factor * N)``, divided by the
trilinear kernel's ``sinc^2`` footprint (gridding correction), Fourier transformed once, and
the template ``X_R(k) = V_hat(R k)`` is sampled by trilinear (2D: bilinear) interpolation with
``torch.nn.functional.grid_sample`` in chunks of rotations. The cross term
``Re <W Y / sigma2, X_R>`` and the norm term ``<W^2 / sigma2, |X_R|^2>`` are two matrix
products per chunk ``[B, 2P] @ [2P, L]`` and ``[B, P] @ [P, L]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cryopose.bayes.posterior import PoseEstimates, summarize_posterior
from cryopose.imaging.fft import fftn_centred
from cryopose.so3.grids import SO3Grid

__all__ = [
    "SubtomogramScorer",
    "align_subtomograms",
    "align_volumes",
    "missing_wedge_mask",
    "rotate_volume",
    "rotate_image",
    "score_inplane",
    "summarize_angle_posterior",
    "align_images_2d",
    "InPlaneEstimates",
]

# Interpolated points per grid_sample call (bounds temporary memory to ~100 MB).
_MAX_POINTS_PER_CHUNK = 1 << 20

Sigma2 = float | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Fourier helpers
# ---------------------------------------------------------------------------------------------


def _rfftn_centred(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred half-space DFT over the last ``ndim`` axes (last axis ``kx = 0 .. N // 2``)."""
    dims = tuple(range(-ndim, 0))
    ft = torch.fft.rfftn(torch.fft.ifftshift(x, dim=dims), dim=dims)
    return torch.fft.fftshift(ft, dim=dims[:-1])


def _irfftn_centred(ft: torch.Tensor, box: int, ndim: int) -> torch.Tensor:
    """Inverse of :func:`_rfftn_centred`."""
    dims = tuple(range(-ndim, 0))
    x = torch.fft.irfftn(torch.fft.ifftshift(ft, dim=dims[:-1]), s=(box,) * ndim, dim=dims)
    return torch.fft.fftshift(x, dim=dims)


def _check_real(x: torch.Tensor, name: str, ndim: int) -> int:
    """Check a real ``[..., N] * ndim`` tensor; return N."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    what = "[..., N, N, N] volume(s)" if ndim == 3 else "[..., N, N] image(s)"
    if x.ndim < ndim or len(set(x.shape[-ndim:])) != 1:
        raise ValueError(f"{name}: expected {what}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a real float32/float64 tensor, got {x.dtype}")
    return int(x.shape[-1])


def _max_frequency_px(
    box: int, pixel_size_angstrom: float, max_frequency_angstrom: float | None
) -> float:
    """Radius of the likelihood's Fourier ball in Fourier voxels (``< N / 2``)."""
    if not (math.isfinite(pixel_size_angstrom) and pixel_size_angstrom > 0):
        raise ValueError(
            f"pixel_size_angstrom: expected a positive number, got {pixel_size_angstrom!r}"
        )
    if max_frequency_angstrom is None:
        return box / 2.0
    if not (math.isfinite(max_frequency_angstrom) and max_frequency_angstrom > 0):
        raise ValueError(
            "max_frequency_angstrom: expected a positive resolution in Angstrom, "
            f"got {max_frequency_angstrom!r}"
        )
    return min(box / 2.0, box * pixel_size_angstrom / max_frequency_angstrom)


class _FourierTemplates:
    """Padded, gridding-corrected centred DFT of a reference, sampled at ``R k``.

    The sample points are the centred-rfft half-space entries ``k`` with ``|k| < N / 2`` and
    ``|k| <= k_max`` (Fourier voxels), flattened in row-major order of the rfft layout.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        ndim: int,
        pad_factor: float,
        max_frequency_px: float,
    ) -> None:
        box = int(reference.shape[-1])
        if not pad_factor >= 1.0:
            raise ValueError(f"pad_factor: expected >= 1, got {pad_factor!r}")
        padded = max(box, int(round(pad_factor * box)))
        self.box, self.padded_box, self.ndim = box, padded, ndim
        self.dtype, self.device = reference.dtype, reference.device
        before = padded // 2 - box // 2
        after = padded - box - before
        x = F.pad(reference, [before, after] * ndim)
        axis = (torch.arange(padded, dtype=self.dtype, device=self.device) - padded // 2) / padded
        s2 = torch.sinc(axis) ** 2
        for d in range(ndim):
            shape = [1] * ndim
            shape[d] = padded
            x = x / s2.reshape(shape)
        ft = torch.view_as_real(fftn_centred(x, ndim=ndim))  # [M]*ndim + [2]
        # grid_sample layout [1, 2 (re, im), (D,) H, W], with index M appended on every axis
        # (= index 0: the DFT is M-periodic), so points between M/2 - 1 and M/2 interpolate
        # with their true neighbour instead of zero.
        ft = torch.movedim(ft, -1, 0).unsqueeze(0)
        self._ft_ri = F.pad(ft, (0, 1) * ndim, mode="circular").contiguous()

        centred = torch.arange(box, dtype=self.dtype, device=self.device) - box // 2
        half = torch.arange(box // 2 + 1, dtype=self.dtype, device=self.device)
        axes = [centred] * (ndim - 1) + [half]  # (kz,) ky, kx
        mesh = torch.meshgrid(*axes, indexing="ij")
        radius = torch.sqrt(sum(m**2 for m in mesh))
        self.mask = (radius < box / 2.0) & (radius <= max_frequency_px + 1e-9)
        # (x, y[, z]) coordinates of the sample points, [P, ndim].
        self.freq = torch.stack([m[self.mask] for m in reversed(mesh)], dim=-1)
        kx = self.freq[:, 0]
        self.multiplicity = torch.where(kx > 0, 2.0, 1.0).to(self.dtype)
        self.shell = torch.round(radius[self.mask]).long()
        self.n_points = int(self.freq.shape[0])

    def points(self, ft: torch.Tensor) -> torch.Tensor:
        """``[..., P]`` entries of a centred-rfft array ``[..., N, ..., N // 2 + 1]``."""
        return ft[..., self.mask]

    def data(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., P]`` centred DFT of real observations ``[..., N] * ndim`` at the points."""
        return self.points(_rfftn_centred(x.to(self.dtype), self.ndim))

    def sample(self, rotations: torch.Tensor) -> torch.Tensor:
        """``[L, P]`` complex templates ``V_hat(R k)`` for ``[L, ndim, ndim]`` rotations."""
        rot = rotations.to(dtype=self.dtype, device=self.device)
        q = torch.einsum("lij,pj->lpi", rot, self.freq)  # R k, [L, P, ndim]
        m = self.padded_box
        index = q * (m / self.box) + m // 2
        grid = index * (2.0 / m) - 1.0  # the array has M + 1 samples per axis
        shape = (1, 1, 1, -1, 3) if self.ndim == 3 else (1, 1, -1, 2)
        out = F.grid_sample(
            self._ft_ri,
            grid.reshape(shape),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        ).reshape(2, rot.shape[0], self.n_points)
        return torch.complex(out[0], out[1])

    def full(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``[L, P]`` point values into zero centred-rfft arrays ``[L, N, ..]``."""
        shape = (values.shape[0], *self.mask.shape)
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        out[:, self.mask] = values
        return out

    def chunk(self) -> int:
        return max(1, _MAX_POINTS_PER_CHUNK // max(self.n_points, 1))


def _inverse_variance(
    sigma2: Sigma2, templates: _FourierTemplates, n_obs: int
) -> torch.Tensor:
    """``[B or 1, P]`` weights ``multiplicity / (N^d sigma2(shell))`` of the Gaussian."""
    n_shells = templates.box // 2 + 1
    s = torch.as_tensor(sigma2, dtype=templates.dtype, device=templates.device)
    if s.ndim == 0:
        s = s.reshape(1, 1).expand(1, n_shells)
    elif s.ndim == 1 and s.shape[0] == n_shells:
        s = s.reshape(1, n_shells)
    elif s.ndim == 2 and s.shape[1] == n_shells and s.shape[0] in (1, n_obs):
        pass
    else:
        raise ValueError(
            f"sigma2: expected a number, [{n_shells}] per-shell variances or "
            f"[{n_obs} or 1, {n_shells}], got shape {tuple(s.shape)}"
        )
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError("sigma2: expected positive finite noise variances (per voxel)")
    norm = float(templates.box) ** templates.ndim
    return templates.multiplicity / (norm * s[:, templates.shell])


def _weight_points(
    weight: torch.Tensor | None, templates: _FourierTemplates, n_obs: int, name: str
) -> torch.Tensor | None:
    """``[B or 1, P]`` real Fourier weights (missing wedge, CTF) at the sample points."""
    if weight is None:
        return None
    w = torch.as_tensor(weight).to(device=templates.device)
    layout = tuple(templates.mask.shape)
    if w.is_complex() or w.ndim < len(layout) or tuple(w.shape[-len(layout) :]) != layout:
        raise ValueError(
            f"{name}: expected a real centred-rfft array [..., {', '.join(map(str, layout))}], "
            f"got shape {tuple(w.shape)}"
        )
    w = templates.points(w.to(templates.dtype)).reshape(-1, templates.n_points)
    if w.shape[0] not in (1, n_obs):
        raise ValueError(f"{name}: expected one weight array or one per observation ({n_obs})")
    return w


def _gaussian_scores(
    templates: _FourierTemplates,
    data: torch.Tensor,
    inv_var: torch.Tensor,
    weight: torch.Tensor | None,
    rotations: torch.Tensor,
    include_data_term: bool,
    norm_term: bool = True,
) -> torch.Tensor:
    """``[B, L]`` log-likelihoods of ``[B, P]`` data for ``[L, d, d]`` rotations (shared)."""
    a = data * inv_var if weight is None else data * (inv_var * weight)
    a_ri = torch.cat([a.real, a.imag], dim=-1)  # [B, 2P]
    n_w = inv_var if weight is None else inv_var * weight**2  # [B or 1, P]
    scores = []
    step = templates.chunk()
    for start in range(0, rotations.shape[0], step):
        x = templates.sample(rotations[start : start + step])  # [l, P]
        cross = a_ri @ torch.cat([x.real, x.imag], dim=-1).T  # Re <a, x>, [B, l]
        if norm_term:
            cross = cross - 0.5 * (n_w @ (x.real**2 + x.imag**2).T)  # [B or 1, l]
        scores.append(cross)
    out = torch.cat(scores, dim=-1) if scores else a.real.new_zeros(a.shape[0], 0)
    if include_data_term:
        out = out - 0.5 * (inv_var * (data.real**2 + data.imag**2)).sum(-1, keepdim=True)
    return out


def _rotations_of(grid: SO3Grid | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotation matrices ``[G, 3, 3]`` and log quadrature weights (None: equal) of a grid."""
    if isinstance(grid, SO3Grid):
        return grid.matrices, torch.log(grid.weights)
    r = torch.as_tensor(grid)
    if r.ndim != 3 or r.shape[-2:] != (3, 3):
        raise ValueError(
            f"grid: expected an SO3Grid or [G, 3, 3] rotation matrices, got shape {tuple(r.shape)}"
        )
    return r, None


# ---------------------------------------------------------------------------------------------
# cryo-ET subtomograms
# ---------------------------------------------------------------------------------------------


def missing_wedge_mask(
    box: int,
    tilt_range_deg: tuple[float, float] = (-60.0, 60.0),
    *,
    tilt_axis: str = "y",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """0/1 Fourier weight of a single-axis tilt series (the missing wedge is 0).

    The tilt image at angle ``theta`` samples the central section that contains the tilt axis
    and the direction obtained by turning the other in-plane axis towards z by ``theta``:
    for ``tilt_axis="y"`` the plane through ``(0, 1, 0)`` and ``(cos theta, 0, sin theta)``;
    for ``"x"`` through ``(1, 0, 0)`` and ``(0, cos theta, sin theta)``. A frequency is
    observed (weight 1) when it lies on a section with ``theta`` in ``tilt_range_deg``
    (inclusive); the tilt axis itself is always observed. For the symmetric default
    (-60, +60) the missing wedge is the set of frequencies within 30 degrees of ``kz``.

    Parameters
    ----------
    box : int
        N, the subtomogram side in voxels.
    tilt_range_deg : (float, float)
        Lowest and highest tilt in degrees, ``-90 <= low <= high <= 90``.
    tilt_axis : {"y", "x"}
        Tilt axis in the subtomogram (particle) frame.
    dtype, device
        Of the returned weight.

    Returns
    -------
    torch.Tensor
        ``[N, N, N // 2 + 1]`` weight in the centred rfft layout ``[kz, ky, kx]`` (``kz, ky``
        centred at index ``N // 2``, ``kx = 0 .. N // 2``), as used by
        :class:`SubtomogramScorer` (``fourier_weight``).
    """
    if isinstance(box, bool) or not isinstance(box, int) or box < 1:
        raise ValueError(f"box: expected a positive int (voxels), got {box!r}")
    low, high = (float(t) for t in tilt_range_deg)
    if not (-90.0 <= low <= high <= 90.0):
        raise ValueError(
            f"tilt_range_deg: expected -90 <= low <= high <= 90 degrees, got {tilt_range_deg!r}"
        )
    if tilt_axis not in ("x", "y"):
        raise ValueError(f"tilt_axis: expected 'x' or 'y', got {tilt_axis!r}")
    k = torch.arange(box, dtype=torch.float64) - box // 2
    kx = torch.arange(box // 2 + 1, dtype=torch.float64)
    gz, gy, gx = torch.meshgrid(k, k, kx, indexing="ij")
    other = gx if tilt_axis == "y" else gy
    angle = torch.rad2deg(torch.atan2(gz, other))
    angle = torch.remainder(angle + 90.0, 180.0) - 90.0  # line direction, in [-90, 90)
    eps = 1e-9
    inside = ((angle >= low - eps) & (angle <= high + eps)) | (
        (angle + 180.0 >= low - eps) & (angle + 180.0 <= high + eps)
    )
    on_axis = (gz == 0) & (other == 0)
    return (inside | on_axis).to(dtype=dtype, device=device)


def rotate_volume(
    volume: torch.Tensor, rotations: torch.Tensor, *, pad_factor: float = 2.0
) -> torch.Tensor:
    """Subtomograms of a volume at cryopose poses: ``y(x) = V(R x)`` (Fourier interpolation).

    Parameters
    ----------
    volume : torch.Tensor
        ``[N, N, N]`` real volume ``[z, y, x]``.
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices.
    pad_factor : float
        Zero-padding of the Fourier transform that is interpolated (trilinear, gridding
        corrected).

    Returns
    -------
    torch.Tensor
        ``[..., N, N, N]`` rotated volumes, low-passed to ``|k| < N / 2`` (the ball in which a
        rotation is defined). Summing one along z gives the projection image at the same pose.
    """
    box = _check_real(volume, "volume", 3)
    if volume.ndim != 3:
        raise ValueError(f"volume: expected one [N, N, N] volume, got shape {tuple(volume.shape)}")
    if rotations.ndim < 2 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations: expected [..., 3, 3], got shape {tuple(rotations.shape)}")
    tpl = _FourierTemplates(volume, 3, pad_factor, box / 2.0)
    rot = rotations.reshape(-1, 3, 3)
    out = [
        _irfftn_centred(tpl.full(tpl.sample(rot[s : s + tpl.chunk()])), box, 3)
        for s in range(0, rot.shape[0], tpl.chunk())
    ]
    return torch.cat(out).reshape(*rotations.shape[:-2], box, box, box)


class SubtomogramScorer:
    """Gaussian log-likelihood of subtomograms against a reference over sets of rotations.

    Model: ``Y(k) = W(k) V_hat(R k) + noise`` (``y(x) = V(R x)`` seen through the Fourier
    weight ``W``), white or per-shell Gaussian noise of variance ``sigma2`` per voxel; see the
    module docstring for the normalisation and the convention.

    Parameters
    ----------
    reference : torch.Tensor
        ``[N, N, N]`` real reference volume ``[z, y, x]`` (values ~0 at the box edge).
    pixel_size_angstrom : float
        Voxel size in Angstrom (only used to convert ``max_frequency_angstrom``).
    max_frequency_angstrom : float, optional
        Highest resolution used, in Angstrom (``None``: all of ``|k| < N / 2``).
    pad_factor : float
        Zero padding of the interpolated reference transform (2 is RELION's default).
    device : torch.device or str, optional
        Where to compute (default: the reference's device).
    dtype : torch.dtype
        float32 (default) or float64; scores are returned in this dtype.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        pixel_size_angstrom: float = 1.0,
        *,
        max_frequency_angstrom: float | None = None,
        pad_factor: float = 2.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        box = _check_real(reference, "reference", 3)
        if reference.ndim != 3:
            raise ValueError(
                f"reference: expected one [N, N, N] volume, got shape {tuple(reference.shape)}"
            )
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        device = reference.device if device is None else torch.device(device)
        self.box = box
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.max_frequency_px = _max_frequency_px(
            box, self.pixel_size_angstrom, max_frequency_angstrom
        )
        self.dtype = dtype
        self.device = device
        self._templates = _FourierTemplates(
            reference.to(device=device, dtype=dtype), 3, pad_factor, self.max_frequency_px
        )

    @property
    def n_fourier_points(self) -> int:
        """Number of half-space Fourier coefficients in the likelihood (``P``)."""
        return self._templates.n_points

    def score_rotations(
        self,
        subtomograms: torch.Tensor,
        sigma2: Sigma2,
        rotations: torch.Tensor,
        *,
        fourier_weight: torch.Tensor | None = None,
        include_data_term: bool = False,
        norm_term: bool = True,
    ) -> torch.Tensor:
        """Log-likelihoods of subtomograms at the given rotations.

        Parameters
        ----------
        subtomograms : torch.Tensor
            ``[..., N, N, N]`` real subtomograms (centred on the particle).
        sigma2 : float or torch.Tensor
            Noise variance per voxel: a number, ``[N // 2 + 1]`` per shell, or
            ``[B, N // 2 + 1]`` per subtomogram (``B`` = number of subtomograms).
        rotations : torch.Tensor
            ``[L, 3, 3]`` cryopose rotations shared by all subtomograms, or ``[..., L, 3, 3]``
            one set per subtomogram.
        fourier_weight : torch.Tensor, optional
            Known real Fourier weight ``W`` in the centred rfft layout ``[N, N, N // 2 + 1]``
            (one for all) or ``[..., N, N, N // 2 + 1]`` (one per subtomogram), e.g.
            :func:`missing_wedge_mask`. It is in the particle (subtomogram) frame.
        include_data_term : bool
            Add ``-sum |Y|^2 / (2 N^3 sigma2)`` (the rotation-independent part), so that the
            result is the full Gaussian exponent.
        norm_term : bool
            Keep the template-norm term ``-sum W^2 |X_R|^2 / (2 N^3 sigma2)`` (default). Drop
            it only when it is rotation-invariant in the model (no Fourier weight), e.g. for a
            *noisy* reference (:func:`align_volumes`), whose interpolated norm fluctuates with
            ``R`` by a sampling artefact. With a missing wedge dropping it biases the result.

        Returns
        -------
        torch.Tensor
            ``[..., L]`` log-likelihoods (in the scorer's dtype), up to a per-subtomogram
            constant unless ``include_data_term``.
        """
        _check_real(subtomograms, "subtomograms", 3)
        if subtomograms.shape[-1] != self.box:
            raise ValueError(
                f"subtomograms: expected box {self.box}, got shape {tuple(subtomograms.shape)}"
            )
        batch = subtomograms.shape[:-3]
        tpl = self._templates
        data = tpl.data(subtomograms.to(self.device)).reshape(-1, tpl.n_points)
        n_obs = data.shape[0]
        inv_var = _inverse_variance(sigma2, tpl, n_obs)
        weight = _weight_points(fourier_weight, tpl, n_obs, "fourier_weight")
        rot = torch.as_tensor(rotations)
        if rot.ndim < 3 or rot.shape[-2:] != (3, 3):
            raise ValueError(
                f"rotations: expected [L, 3, 3] or [..., L, 3, 3], got shape {tuple(rot.shape)}"
            )
        if rot.ndim == 3:
            out = _gaussian_scores(tpl, data, inv_var, weight, rot, include_data_term, norm_term)
            return out.reshape(*batch, rot.shape[0])
        if tuple(rot.shape[:-3]) != tuple(batch):
            raise ValueError(
                f"rotations: leading shape {tuple(rot.shape[:-3])} does not match the "
                f"subtomograms' {tuple(batch)}"
            )
        rot = rot.reshape(n_obs, -1, 3, 3)
        rows = []
        for b in range(n_obs):
            iv = inv_var[b : b + 1] if inv_var.shape[0] > 1 else inv_var
            w = None if weight is None else (weight[b : b + 1] if weight.shape[0] > 1 else weight)
            rows.append(
                _gaussian_scores(
                    tpl, data[b : b + 1], iv, w, rot[b], include_data_term, norm_term
                )
            )
        return torch.cat(rows).reshape(*batch, rot.shape[1])

    def score_grid(
        self,
        subtomograms: torch.Tensor,
        sigma2: Sigma2,
        grid: SO3Grid | torch.Tensor,
        *,
        fourier_weight: torch.Tensor | None = None,
        include_data_term: bool = False,
        norm_term: bool = True,
    ) -> torch.Tensor:
        """:meth:`score_rotations` over a grid (``SO3Grid`` or ``[G, 3, 3]``): ``[..., G]``."""
        rotations, _ = _rotations_of(grid)
        return self.score_rotations(
            subtomograms,
            sigma2,
            rotations,
            fourier_weight=fourier_weight,
            include_data_term=include_data_term,
            norm_term=norm_term,
        )


def _summarize(
    log_likelihood: torch.Tensor, grid: SO3Grid | torch.Tensor, options: dict[str, Any]
) -> PoseEstimates:
    """Posterior summaries of ``[B, G]`` log-likelihoods (an SO3Grid brings its weights)."""
    if isinstance(grid, SO3Grid):
        rotations = grid.to(device=log_likelihood.device, dtype=log_likelihood.dtype)
    else:
        rotations = torch.as_tensor(grid).to(
            device=log_likelihood.device, dtype=log_likelihood.dtype
        )
    return summarize_posterior(log_likelihood, rotations, None, **options)


def align_subtomograms(
    subtomograms: torch.Tensor,
    reference: torch.Tensor,
    sigma2: Sigma2,
    grid: SO3Grid | torch.Tensor,
    *,
    fourier_weight: torch.Tensor | None = None,
    pixel_size_angstrom: float = 1.0,
    max_frequency_angstrom: float | None = None,
    pad_factor: float = 2.0,
    dtype: torch.dtype = torch.float32,
    **posterior_options: Any,
) -> PoseEstimates:
    """Posterior pose estimates (MLE, MAP, MMSE, uncertainty) of subtomograms on a grid.

    Parameters
    ----------
    subtomograms : torch.Tensor
        ``[B, N, N, N]`` (or ``[N, N, N]``) real subtomograms ``y(x) = V(R x) + noise``.
    reference : torch.Tensor
        ``[N, N, N]`` reference volume ``V``.
    sigma2 : float or torch.Tensor
        Noise variance per voxel (number, ``[N // 2 + 1]`` or ``[B, N // 2 + 1]``).
    grid : SO3Grid or torch.Tensor
        Rotations to score; an ``SO3Grid`` contributes its quadrature weights, a ``[G, 3, 3]``
        tensor is weighted equally.
    fourier_weight : torch.Tensor, optional
        Missing-wedge mask or 3D CTF, ``[N, N, N // 2 + 1]`` or ``[B, N, N, N // 2 + 1]``.
    pixel_size_angstrom, max_frequency_angstrom, pad_factor, dtype
        See :class:`SubtomogramScorer`.
    **posterior_options
        Passed to :func:`cryopose.bayes.posterior.summarize_posterior` (``log_prior``,
        ``group``, ``n_candidates``, ``min_separation_deg``, ``credible_mass``, ...).

    Returns
    -------
    PoseEstimates
        One entry per subtomogram; rotations are cryopose matrices ``R`` with
        ``y(x) ~ V(R x)``. The shift fields are zero (no translation search).
    """
    single = subtomograms.ndim == 3
    sub = subtomograms.unsqueeze(0) if single else subtomograms
    if sub.ndim != 4:
        raise ValueError(
            f"subtomograms: expected [B, N, N, N] or [N, N, N], got {tuple(subtomograms.shape)}"
        )
    scorer = SubtomogramScorer(
        reference,
        pixel_size_angstrom,
        max_frequency_angstrom=max_frequency_angstrom,
        pad_factor=pad_factor,
        dtype=dtype,
        device=sub.device,
    )
    ll = scorer.score_grid(sub, sigma2, grid, fourier_weight=fourier_weight)
    return _summarize(ll, grid, dict(posterior_options))


def _per_shell(value: Sigma2, box: int, n_obs: int, name: str) -> torch.Tensor:
    """``[B or 1, N // 2 + 1]`` float64 per-shell table of a number or a (batched) table."""
    n_shells = box // 2 + 1
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.ndim == 0:
        v = v.reshape(1, 1).expand(1, n_shells)
    elif v.ndim == 1 and v.shape[0] == n_shells:
        v = v.reshape(1, n_shells)
    elif not (v.ndim == 2 and v.shape[1] == n_shells and v.shape[0] in (1, n_obs)):
        raise ValueError(
            f"{name}: expected a number, [{n_shells}] per-shell values or "
            f"[{n_obs} or 1, {n_shells}], got shape {tuple(v.shape)}"
        )
    if not bool(torch.all(torch.isfinite(v) & (v > 0))):
        raise ValueError(f"{name}: expected positive finite variances (per voxel)")
    return v


def align_volumes(
    volume_a: torch.Tensor,
    volume_b: torch.Tensor,
    sigma2: Sigma2,
    grid: SO3Grid | torch.Tensor,
    *,
    sigma2_b: Sigma2 | None = None,
    signal_variance: Sigma2 | None = None,
    pixel_size_angstrom: float = 1.0,
    max_frequency_angstrom: float | None = None,
    pad_factor: float = 2.0,
    dtype: torch.dtype = torch.float32,
    **posterior_options: Any,
) -> PoseEstimates:
    """Posterior of the relative rotation between two noisy volumes (seed appendix C).

    Model: ``a = V + e_a`` and ``b(x) = V(R x) + e_b`` with ``V`` unknown and independent,
    rotation-invariant (white or per-shell) noise. Then ``b(x) = a(R x) + e_b(x) - e_a(R x)``:
    the subtomogram likelihood with ``a`` as the reference and noise variance
    ``sigma2 + sigma2_b`` (``2 sigma2`` for equal noise; seed appendix C, a flat prior on
    ``V``). Using ``sigma2`` alone (treating ``a`` as a clean reference) is over-confident.

    The flat prior is right when the signal dominates the noise per Fourier coefficient. At
    low SNR give ``signal_variance`` (``tau2``, per voxel and shell, e.g. from the FSC of the
    two volumes): with the Gaussian prior ``V ~ N(0, tau2)`` marginalised exactly, the
    reference becomes the Wiener-filtered ``f a`` with ``f = tau2 / (tau2 + sigma2)`` and the
    noise variance ``sigma2_b + sigma2 tau2 / (tau2 + sigma2)`` (which tends to
    ``sigma2_b + sigma2`` as ``tau2 -> inf``).

    The template-norm term is dropped: for a continuous rotation ``||a(R .)||`` does not
    depend on ``R``, while its lattice value for a *noisy* ``a`` fluctuates with ``R``
    (rotated white noise is not white on the lattice), which would add spurious structure.

    Parameters
    ----------
    volume_a, volume_b : torch.Tensor
        ``[N, N, N]`` or ``[B, N, N, N]`` pairs of real volumes.
    sigma2 : float or torch.Tensor
        Noise variance per voxel of ``volume_a`` (number, ``[N // 2 + 1]`` or
        ``[B, N // 2 + 1]``); also of ``volume_b`` unless ``sigma2_b`` is given.
    grid : SO3Grid or torch.Tensor
        Candidate rotations.
    sigma2_b : float or torch.Tensor, optional
        Noise variance per voxel of ``volume_b`` (default: ``sigma2``).
    signal_variance : float or torch.Tensor, optional
        Prior signal variance per voxel (number or per shell); ``None``: flat prior.
    pixel_size_angstrom, max_frequency_angstrom, pad_factor, dtype
        See :class:`SubtomogramScorer`.
    **posterior_options
        Passed to :func:`cryopose.bayes.posterior.summarize_posterior`.

    Returns
    -------
    PoseEstimates
        Rotations ``R`` (cryopose matrices) with ``volume_b(x) ~ volume_a(R x)``, i.e.
        ``volume_b`` is ``volume_a`` seen at pose ``R`` (:func:`rotate_volume`).
    """
    box = _check_real(volume_a, "volume_a", 3)
    _check_real(volume_b, "volume_b", 3)
    if volume_a.shape != volume_b.shape or volume_a.ndim not in (3, 4):
        raise ValueError(
            f"volume_a, volume_b: expected equal shapes [N, N, N] or [B, N, N, N], got "
            f"{tuple(volume_a.shape)} and {tuple(volume_b.shape)}"
        )
    a = volume_a.reshape(-1, box, box, box)
    b = volume_b.reshape(-1, box, box, box)
    n_obs = a.shape[0]
    s_a = _per_shell(sigma2, box, n_obs, "sigma2")
    s_b = s_a if sigma2_b is None else _per_shell(sigma2_b, box, n_obs, "sigma2_b")
    if signal_variance is None:
        variance = s_a + s_b
        wiener = None
    else:
        tau2 = _per_shell(signal_variance, box, n_obs, "signal_variance")
        wiener = tau2 / (tau2 + s_a)
        variance = s_b + s_a * wiener
        # Per-voxel Wiener filter on the full rfft layout (corners use the last shell).
        k = torch.arange(box, dtype=torch.float64) - box // 2
        kx = torch.arange(box // 2 + 1, dtype=torch.float64)
        gz, gy, gx = torch.meshgrid(k, k, kx, indexing="ij")
        shells = torch.round(torch.sqrt(gz**2 + gy**2 + gx**2)).long().clamp(max=box // 2)
    rotations, _ = _rotations_of(grid)
    rows = []
    for i in range(n_obs):
        ref = a[i]
        if wiener is not None:
            f = wiener[i if wiener.shape[0] > 1 else 0][shells].to(device=ref.device)
            ref = _irfftn_centred(_rfftn_centred(ref, 3) * f.to(ref.dtype), box, 3)
        var_i = variance[i : i + 1] if variance.shape[0] > 1 else variance
        scorer = SubtomogramScorer(
            ref,
            pixel_size_angstrom,
            max_frequency_angstrom=max_frequency_angstrom,
            pad_factor=pad_factor,
            dtype=dtype,
            device=a.device,
        )
        rows.append(scorer.score_rotations(b[i : i + 1], var_i[0], rotations, norm_term=False))
    return _summarize(torch.cat(rows), grid, dict(posterior_options))


# ---------------------------------------------------------------------------------------------
# 2D in-plane alignment (SO(2))
# ---------------------------------------------------------------------------------------------


def _angles_rad(angles_deg: int | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """float64 radians of an angle grid (an int L means ``360 j / L``, j = 0..L-1)."""
    if isinstance(angles_deg, int) and not isinstance(angles_deg, bool):
        if angles_deg < 1:
            raise ValueError(f"angles_deg: expected a positive number of angles, got {angles_deg}")
        return torch.arange(angles_deg, dtype=torch.float64) * (2.0 * math.pi / angles_deg)
    a = torch.as_tensor(angles_deg, dtype=torch.float64).cpu()
    if a.ndim != 1 or a.numel() < 1 or not bool(torch.all(torch.isfinite(a))):
        raise ValueError(f"angles_deg: expected a 1-D tensor of finite degrees, got {a.shape}")
    return torch.deg2rad(a)


def _rotation_2d(theta: torch.Tensor) -> torch.Tensor:
    """``[L, 2, 2]`` matrices ``[[cos, -sin], [sin, cos]]`` acting on ``(x, y)``."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def rotate_image(
    image: torch.Tensor, angles_deg: Sequence[float] | torch.Tensor, *, pad_factor: float = 2.0
) -> torch.Tensor:
    """Images at in-plane poses: ``y(x) = I(R_theta x)`` (bilinear Fourier interpolation).

    Parameters
    ----------
    image : torch.Tensor
        ``[N, N]`` real image ``[y, x]``.
    angles_deg : sequence of float or torch.Tensor
        ``[L]`` poses ``theta`` in degrees (content appears turned by ``-theta``).
    pad_factor : float
        Zero padding of the interpolated transform.

    Returns
    -------
    torch.Tensor
        ``[L, N, N]`` images, low-passed to ``|k| < N / 2``.
    """
    box = _check_real(image, "image", 2)
    if image.ndim != 2:
        raise ValueError(f"image: expected one [N, N] image, got shape {tuple(image.shape)}")
    theta = _angles_rad(torch.as_tensor(angles_deg, dtype=torch.float64).reshape(-1))
    tpl = _FourierTemplates(image, 2, pad_factor, box / 2.0)
    x = tpl.sample(_rotation_2d(theta))
    full = tpl.full(x)
    dims = (-2, -1)
    return torch.fft.fftshift(
        torch.fft.irfft2(torch.fft.ifftshift(full, dim=-2), s=(box, box)), dim=dims
    )


def score_inplane(
    images: torch.Tensor,
    reference: torch.Tensor,
    sigma2: Sigma2,
    angles_deg: int | Sequence[float] | torch.Tensor = 360,
    *,
    ctf: torch.Tensor | None = None,
    pixel_size_angstrom: float = 1.0,
    max_frequency_angstrom: float | None = None,
    pad_factor: float = 2.0,
    include_data_term: bool = False,
) -> torch.Tensor:
    """Log-likelihoods of images ``y(x) = I(R_theta x) + noise`` over in-plane angles.

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` real images (centred).
    reference : torch.Tensor
        ``[N, N]`` reference image ``I``; computations use its dtype and device.
    sigma2 : float or torch.Tensor
        Noise variance per pixel (number, ``[N // 2 + 1]`` per shell or ``[B, N // 2 + 1]``).
    angles_deg : int or sequence of float or torch.Tensor
        Candidate angles in degrees, or their number ``L`` (equally spaced from 0).
    ctf : torch.Tensor, optional
        Real CTF in the centred rfft layout ``[N, N // 2 + 1]`` or ``[..., N, N // 2 + 1]``
        (:func:`cryopose.imaging.ctf_2d`), applied to the rotated reference.
    pixel_size_angstrom, max_frequency_angstrom
        Pixel size and highest resolution used (Angstrom; ``None``: all ``|k| < N / 2``).
    pad_factor : float
        Zero padding of the interpolated reference transform.
    include_data_term : bool
        Add the angle-independent ``-sum |Y|^2 / (2 N^2 sigma2)``.

    Returns
    -------
    torch.Tensor
        ``[..., L]`` log-likelihoods in the reference's dtype.
    """
    box = _check_real(reference, "reference", 2)
    if reference.ndim != 2:
        raise ValueError(
            f"reference: expected one [N, N] image, got shape {tuple(reference.shape)}"
        )
    _check_real(images, "images", 2)
    if images.shape[-1] != box:
        raise ValueError(f"images: expected box {box}, got shape {tuple(images.shape)}")
    k_max = _max_frequency_px(box, float(pixel_size_angstrom), max_frequency_angstrom)
    tpl = _FourierTemplates(reference, 2, pad_factor, k_max)
    batch = images.shape[:-2]
    data = tpl.data(images.to(reference.device)).reshape(-1, tpl.n_points)
    inv_var = _inverse_variance(sigma2, tpl, data.shape[0])
    weight = _weight_points(ctf, tpl, data.shape[0], "ctf")
    rot = _rotation_2d(_angles_rad(angles_deg))
    out = _gaussian_scores(tpl, data, inv_var, weight, rot, include_data_term)
    return out.reshape(*batch, rot.shape[0])


@dataclass(frozen=True)
class InPlaneEstimates:
    """Posterior summaries of in-plane (SO(2)) poses, one entry per image.

    Attributes
    ----------
    angle_mle_deg, angle_map_deg, angle_mmse_deg : torch.Tensor
        ``[B]`` angles in degrees in (-180, 180]: the grid argmax of the likelihood, of the
        posterior, and the posterior circular mean ``atan2(E sin, E cos)`` (the MMSE angle
        for the squared chordal loss of 2x2 rotation matrices).
    expected_loss : torch.Tensor
        ``[B]`` posterior expected squared chordal loss of the MMSE angle,
        ``E ||R_theta - R_mmse||_F^2 = 4 (1 - |E (cos, sin)|)``, in [0, 4].
    max_probability : torch.Tensor
        ``[B]`` largest posterior probability of a grid angle.
    credible_radius_deg : torch.Tensor
        ``[B]`` smallest arc half-width (degrees) about the MMSE angle holding
        ``credible_mass`` of the posterior (grid resolution).
    log_evidence : torch.Tensor
        ``[B]`` ``log sum_j w_j p(theta_j) exp(loglik_j)`` with equal weights ``1 / L``.
    posterior : torch.Tensor
        ``[B, L]`` posterior probabilities of the grid angles.
    angles_deg : torch.Tensor
        ``[L]`` the grid angles in degrees.
    """

    angle_mle_deg: torch.Tensor
    angle_map_deg: torch.Tensor
    angle_mmse_deg: torch.Tensor
    expected_loss: torch.Tensor
    max_probability: torch.Tensor
    credible_radius_deg: torch.Tensor
    log_evidence: torch.Tensor
    posterior: torch.Tensor
    angles_deg: torch.Tensor


def _wrap_deg(angle_rad: torch.Tensor) -> torch.Tensor:
    """Degrees in (-180, 180] of an angle in radians."""
    a = torch.rad2deg(torch.atan2(torch.sin(angle_rad), torch.cos(angle_rad)))
    return torch.where(a <= -180.0, a + 360.0, a)


def summarize_angle_posterior(
    log_likelihood: torch.Tensor,
    angles_deg: int | Sequence[float] | torch.Tensor,
    *,
    log_prior: torch.Tensor | None = None,
    credible_mass: float = 0.9,
) -> InPlaneEstimates:
    """MLE, MAP, MMSE and uncertainty of an angle from log-likelihoods on a grid of angles.

    The grid angles carry equal quadrature weights (equally spaced angles); ``log_prior`` is
    a log-density w.r.t. the normalised uniform measure on the circle (0 = uniform). Everything
    is computed with log-sum-exp in float64, so any SNR is safe.

    Parameters
    ----------
    log_likelihood : torch.Tensor
        ``[B, L]`` log-likelihoods (any per-row constant).
    angles_deg : int or sequence of float or torch.Tensor
        The ``L`` grid angles in degrees (or ``L`` for ``360 j / L``).
    log_prior : torch.Tensor, optional
        ``[L]`` or ``[B, L]`` log prior density at the grid angles.
    credible_mass : float
        Mass of the credible arc, in (0, 1].

    Returns
    -------
    InPlaneEstimates
    """
    ll = torch.as_tensor(log_likelihood)
    if ll.ndim != 2:
        raise ValueError(f"log_likelihood: expected [B, L], got shape {tuple(ll.shape)}")
    theta = _angles_rad(angles_deg).to(ll.device)
    if theta.shape[0] != ll.shape[1]:
        raise ValueError(
            f"angles_deg: {theta.shape[0]} angles for log_likelihood with {ll.shape[1]} columns"
        )
    if not 0.0 < credible_mass <= 1.0:
        raise ValueError(f"credible_mass: expected a mass in (0, 1], got {credible_mass!r}")
    out_dtype = ll.dtype if ll.is_floating_point() else torch.float64
    ll64 = ll.to(torch.float64)
    lp = ll64.clone()
    if log_prior is not None:
        prior = torch.as_tensor(log_prior, dtype=torch.float64, device=ll.device)
        if prior.shape not in ((ll.shape[1],), tuple(ll.shape)):
            raise ValueError(
                f"log_prior: expected [{ll.shape[1]}] or {list(ll.shape)}, got {tuple(prior.shape)}"
            )
        lp = lp + prior
    n = ll.shape[1]
    log_norm = torch.logsumexp(lp, dim=-1, keepdim=True)
    post = torch.exp(lp - log_norm)
    log_evidence = log_norm[:, 0] - math.log(n)
    mean_cos = post @ torch.cos(theta)
    mean_sin = post @ torch.sin(theta)
    resultant = torch.sqrt(mean_cos**2 + mean_sin**2).clamp(max=1.0)
    mmse = torch.atan2(mean_sin, mean_cos)
    # Credible arc: grid angles sorted by distance from the MMSE angle, cumulative mass.
    offset = theta - mmse[:, None]
    dist = torch.abs(torch.atan2(torch.sin(offset), torch.cos(offset)))
    order = torch.argsort(dist, dim=-1)
    cum = torch.cumsum(torch.gather(post, -1, order), dim=-1)
    first = torch.searchsorted(cum, torch.full_like(cum[:, :1], credible_mass * (1 - 1e-12)))
    radius = torch.gather(torch.gather(dist, -1, order), -1, first.clamp(max=n - 1))[:, 0]

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(out_dtype)

    return InPlaneEstimates(
        angle_mle_deg=cast(_wrap_deg(theta[torch.argmax(ll64, dim=-1)])),
        angle_map_deg=cast(_wrap_deg(theta[torch.argmax(lp, dim=-1)])),
        angle_mmse_deg=cast(_wrap_deg(mmse)),
        expected_loss=cast(4.0 * (1.0 - resultant)),
        max_probability=cast(post.max(dim=-1).values),
        credible_radius_deg=cast(torch.rad2deg(radius)),
        log_evidence=cast(log_evidence),
        posterior=cast(post),
        angles_deg=cast(torch.rad2deg(theta)),
    )


def align_images_2d(
    images: torch.Tensor,
    reference: torch.Tensor,
    sigma2: Sigma2,
    angles_deg: int | Sequence[float] | torch.Tensor = 360,
    *,
    ctf: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
    credible_mass: float = 0.9,
    pixel_size_angstrom: float = 1.0,
    max_frequency_angstrom: float | None = None,
    pad_factor: float = 2.0,
) -> InPlaneEstimates:
    """In-plane pose estimates of images ``y(x) = I(R_theta x) + noise`` (SO(2) posterior).

    :func:`score_inplane` followed by :func:`summarize_angle_posterior`; see those for the
    parameters. ``images`` is ``[B, N, N]`` (or ``[N, N]``).
    """
    single = images.ndim == 2
    imgs = images.unsqueeze(0) if single else images
    if imgs.ndim != 3:
        raise ValueError(f"images: expected [B, N, N] or [N, N], got {tuple(images.shape)}")
    ll = score_inplane(
        imgs,
        reference,
        sigma2,
        angles_deg,
        ctf=ctf,
        pixel_size_angstrom=pixel_size_angstrom,
        max_frequency_angstrom=max_frequency_angstrom,
        pad_factor=pad_factor,
    )
    return summarize_angle_posterior(
        ll, angles_deg, log_prior=log_prior, credible_mass=credible_mass
    )
