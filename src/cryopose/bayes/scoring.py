"""Gaussian log-likelihood of particle images against projections of a reference (the hot path).

Likelihood (``docs/conventions.md``, "Likelihood"): for an image ``y`` (``N x N`` pixels, DFT
``Y`` unnormalised, phase origin at pixel ``N // 2``), CTF ``C``, pose ``R`` and shift ``t``::

    log p(y | R, t) = - sum_{|k| <= k_max} |Y_k - C_k S_t(k) X_R(k)|^2 / (2 N^2 sigma2(shell(k)))

over the full 2D spectrum (on the stored rfft half-plane, columns ``0 < kx < N / 2`` count
twice), ``shell(k) = round(|k|)`` clamped to ``N // 2``, ``X_R`` the central slice of the
reference (:class:`cryopose.imaging.Projector`), ``S_t(k) = exp(-2 pi i k . t / N)`` (the
template shifted by ``+t`` pixels). With ``k_max`` = Nyquist and white noise ``sigma2 = s^2``
this equals the real-space ``-||y - x||^2 / (2 s^2)`` exactly. The returned values include the
``|Y|^2`` term, so they are this expression exactly (the Gaussian normaliser is dropped).

Expanded, ``log p = const_y + Re <w conj(Y) C S_t, X_R> - 1/2 <w |C|^2, |X_R|^2>`` with
``w = multiplicity / (N^2 sigma2)``: two matrix products over the Fourier samples, one per
image-and-shift row and one per image row, against all templates.

Two evaluation paths
--------------------
*Dense* (any rotation set): templates on the Cartesian half-plane, both terms as real GEMMs,
chunked over rotations and images.

*In-plane FFT* (HEALPix grids, :meth:`ReferenceScorer.score_grid`): for ``R = B_d Rz(psi)`` the
slice is ``X(r, phi) = T_d(r, phi + psi)`` in polar coordinates, ``T_d`` the ``psi = 0``
slice. Both terms become circular correlations over ``phi``: FFT over ``phi`` of the image-side
polar data ``a(r, phi)`` and of the templates, a complex GEMM over radii per angular frequency
``m``, ``|m| <= M``, and an inverse FFT over ``m`` evaluated at the grid's ``psi``. Templates are
sampled directly from the padded 3D transform at polar points; the image-side data
``conj(Y) C`` and ``|C|^2`` are interpolated from their Cartesian DFT after zero padding by 2 and
a bilinear gridding correction (like the projector); polar samples carry their exact annulus
area ``(b^2 - a^2) / 2 * dphi`` so the polar sum approximates the Cartesian one. The constant
``const_y`` is computed exactly on the Cartesian grid, so both paths share it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cryopose.imaging.fft import fft2_centred, irfft2_centred, rfft2_centred
from cryopose.imaging.projection import Projector
from cryopose.so3.grids import SO3Grid

__all__ = ["ReferenceScorer", "shift_grid"]

# Default bound on the temporary memory of one chunk, in bytes.
_CHUNK_BYTES = 256 * 1024 * 1024


def shift_grid(
    range_angstrom: float, step_angstrom: float, pixel_size: float
) -> torch.Tensor:
    """Translation grid: a square lattice of step ``step_angstrom`` inside a disk.

    Parameters
    ----------
    range_angstrom : float
        Radius of the disk in Angstrom (0 gives the single zero shift).
    step_angstrom : float
        Lattice step in Angstrom (> 0).
    pixel_size : float
        Pixel size in Angstrom.

    Returns
    -------
    torch.Tensor
        ``[T, 2]`` float64 shifts ``(x, y)`` in pixels, zero first, then by increasing radius.
        A shift ``t`` means the particle centre is displaced by ``+t`` from pixel ``N // 2``
        (RELION origin ``-t * pixel_size`` Angstrom).
    """
    if not step_angstrom > 0:
        raise ValueError(f"step_angstrom: expected > 0, got {step_angstrom}")
    if not range_angstrom >= 0:
        raise ValueError(f"range_angstrom: expected >= 0, got {range_angstrom}")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size: expected > 0 Angstrom, got {pixel_size}")
    n = int(math.floor(range_angstrom / step_angstrom + 1e-9))
    i = torch.arange(-n, n + 1, dtype=torch.float64) * step_angstrom
    gy, gx = torch.meshgrid(i, i, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
    rad = pts.norm(dim=-1)
    keep = rad <= range_angstrom * (1 + 1e-9)
    pts, rad = pts[keep], rad[keep]
    # stable order: radius, then angle
    ang = torch.atan2(pts[:, 1], pts[:, 0])
    order = sorted(range(pts.shape[0]), key=lambda j: (round(float(rad[j]), 9), float(ang[j])))
    return pts[order] / pixel_size


def _rz(psi_rad: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(psi_rad), torch.sin(psi_rad)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(*psi_rad.shape, 3, 3)


def _interleave(block: torch.Tensor, values: torch.Tensor) -> None:
    """Write complex ``values [M, R, D]`` into ``block [M, R, 2, 2D]`` (real) so that a real
    GEMM with rows ``(r, re / im of the image coefficient)`` gives the complex products with
    columns ``(d, re / im)``: ``(a_r + i a_i)(t_r + i t_i) = (a_r t_r - a_i t_i) + i (a_r t_i +
    a_i t_r)``."""
    view = block.view(*block.shape[:3], -1, 2)
    tr, ti = values.real, values.imag
    view[:, :, 0, :, 0] = tr
    view[:, :, 0, :, 1] = ti
    view[:, :, 1, :, 0] = -ti
    view[:, :, 1, :, 1] = tr


class ReferenceScorer:
    """Log-likelihoods of images for every rotation (and shift) of a grid, for one reference.

    Parameters
    ----------
    volume : torch.Tensor
        ``[N, N, N]`` reference map ``[z, y, x]`` (voxel units as in
        :class:`cryopose.imaging.Projector`; images are compared with its voxel-sum projections).
    pixel_size_angstrom : float
        Pixel size in Angstrom (of the volume and the images).
    max_frequency_angstrom : float, optional
        Band limit as a resolution in Angstrom: Fourier samples with
        ``|k| <= N * pixel_size / max_frequency_angstrom`` (Fourier pixels) are used. ``None``:
        every coefficient (Nyquist and the corners).
    pad_factor : float
        Projector padding (see :class:`cryopose.imaging.Projector`).
    device : torch.device or str, optional
        Where to compute (default: the volume's device).
    dtype : torch.dtype
        Compute precision, float32 (default) or float64. Results are returned in this dtype.
    radial_step_px : float
        Radial spacing of the polar templates in Fourier pixels (in-plane FFT path).
    max_chunk_bytes : int
        Bound on the temporary memory of one chunk (the output is extra).
    """

    def __init__(
        self,
        volume: torch.Tensor,
        pixel_size_angstrom: float,
        *,
        max_frequency_angstrom: float | None = None,
        pad_factor: float = 2.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        radial_step_px: float = 0.5,
        max_chunk_bytes: int = _CHUNK_BYTES,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        if not pixel_size_angstrom > 0:
            raise ValueError(f"pixel_size_angstrom: expected > 0, got {pixel_size_angstrom}")
        if not radial_step_px > 0:
            raise ValueError(f"radial_step_px: expected > 0, got {radial_step_px}")
        device = torch.device(device) if device is not None else volume.device
        self.device = device
        self.dtype = dtype
        self.cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.projector = Projector(volume.to(device=device, dtype=dtype), pad_factor=pad_factor)
        n = self.projector.box
        self.box = n
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.radial_step_px = float(radial_step_px)
        if max_frequency_angstrom is None:
            self.k_max_px = math.inf
        else:
            if not max_frequency_angstrom > 0:
                raise ValueError(
                    f"max_frequency_angstrom: expected > 0 Angstrom, got {max_frequency_angstrom}"
                )
            self.k_max_px = n * self.pixel_size_angstrom / float(max_frequency_angstrom)

        # Cartesian half-plane geometry.
        ky = torch.arange(n, dtype=torch.float64, device=device) - n // 2
        kx = torch.arange(n // 2 + 1, dtype=torch.float64, device=device)
        gy, gx = torch.meshgrid(ky, kx, indexing="ij")
        rad = torch.sqrt(gx**2 + gy**2)
        mult = torch.full_like(gx, 2.0)
        mult[:, 0] = 1.0
        if n % 2 == 0:
            mult[:, n // 2] = 1.0
        band = rad <= self.k_max_px * (1 + 1e-12)
        self._mult = (mult * band).to(dtype)  # [N, N//2+1], zero outside the band
        self._shell = torch.round(rad).clamp(max=n // 2).long()  # [N, N//2+1]
        # Samples where templates can be non-zero (projector: |k| < N/2) and inside the band.
        self._tmask = band & (rad < n / 2)
        self._kx = gx[self._tmask].to(dtype)
        self._ky = gy[self._tmask].to(dtype)

        # Polar geometry (in-plane FFT path).
        k_lim = min(self.k_max_px, n / 2)
        dr = self.radial_step_px
        n_r = max(1, int(math.ceil(k_lim / dr - 1e-9)))
        edges = torch.arange(n_r + 1, dtype=torch.float64, device=device) * dr
        edges = edges.clamp(max=k_lim)
        self._radii = ((edges[:-1] + edges[1:]) / 2).to(dtype)  # [R]
        self._ring_area = ((edges[1:] ** 2 - edges[:-1] ** 2) / 2).to(dtype)  # x dphi later
        self._ring_shell = torch.round(self._radii.double()).clamp(max=n // 2).long()
        self._m_max = int(math.ceil(math.pi * k_lim)) + 2
        self._template_cache: tuple | None = None

    # ------------------------------------------------------------------ helpers
    def _chunk(self, per_item_bytes: float, cap: int) -> int:
        return max(1, min(cap, int(self.max_chunk_bytes // max(per_item_bytes, 1.0))))

    def _prepare(
        self,
        images: torch.Tensor,
        ctf: torch.Tensor | None,
        sigma2: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fourier data, CTF, per-sample weights ``w = mult / (N^2 sigma2)`` and ``const_y``."""
        n = self.box
        if not isinstance(images, torch.Tensor) or images.ndim != 3 or images.shape[-2:] != (n, n):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images: expected a [B, {n}, {n}] tensor, got {shape}")
        b = images.shape[0]
        y = rfft2_centred(images.to(device=self.device, dtype=self.dtype))
        if ctf is None:
            c = None
        else:
            if ctf.shape[-2:] != (n, n // 2 + 1) or ctf.ndim != 3 or ctf.shape[0] not in (1, b):
                raise ValueError(
                    f"ctf: expected [B or 1, {n}, {n // 2 + 1}] centred rfft CTF, "
                    f"got {tuple(ctf.shape)}"
                )
            c = ctf.to(device=self.device, dtype=self.dtype).expand(b, -1, -1)
        s2 = torch.as_tensor(sigma2, dtype=self.dtype, device=self.device)
        if s2.ndim == 0:
            s2 = s2.expand(1, n // 2 + 1)
        elif s2.ndim == 1:
            s2 = s2[None]
        if s2.ndim != 2 or s2.shape[-1] != n // 2 + 1 or s2.shape[0] not in (1, b):
            raise ValueError(
                f"sigma2: expected a float or [B or 1, {n // 2 + 1}] per-shell noise variances, "
                f"got shape {tuple(s2.shape)}"
            )
        if not bool((s2 > 0).all()) or not bool(torch.isfinite(s2).all()):
            raise ValueError("sigma2: expected finite positive noise variances")
        inv = 1.0 / (s2.expand(b, -1) * float(n * n))  # [B, N//2+1]
        w = inv[:, self._shell] * self._mult  # [B, N, N//2+1]
        const = -0.5 * (w * (y.real**2 + y.imag**2)).sum(dim=(-2, -1))
        return y, c, w, const

    def _shift_phase(self, shifts: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor):
        """``exp(-2 pi i (kx tx + ky ty) / N)`` for shifts ``[..., T, 2]`` at points ``[K]``."""
        ph = (-2.0 * math.pi / self.box) * (
            shifts[..., 0:1] * kx.reshape(-1) + shifts[..., 1:2] * ky.reshape(-1)
        )
        return torch.polar(torch.ones_like(ph), ph)

    def _shifts(self, shifts_px: torch.Tensor | None, b: int) -> torch.Tensor:
        if shifts_px is None:
            return torch.zeros(1, 2, dtype=self.dtype, device=self.device)
        s = torch.as_tensor(shifts_px, dtype=self.dtype, device=self.device)
        if s.ndim not in (2, 3) or s.shape[-1] != 2 or (s.ndim == 3 and s.shape[0] != b):
            raise ValueError(f"shifts_px: expected [T, 2] or [B, T, 2] (x, y) pixels, got "
                             f"{tuple(s.shape)}")
        return s

    # ------------------------------------------------------------------ dense path
    def score_rotations(
        self,
        images: torch.Tensor,
        ctf: torch.Tensor | None,
        sigma2: torch.Tensor | float,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-likelihoods for explicit rotations (dense exact path).

        Parameters
        ----------
        images : torch.Tensor
            ``[B, N, N]`` real particle images (not centred).
        ctf : torch.Tensor or None
            ``[B or 1, N, N // 2 + 1]`` CTF in the centred rfft layout, or None (no CTF).
        sigma2 : torch.Tensor or float
            Noise variance per real-space pixel: a float (white) or ``[B or 1, N // 2 + 1]`` /
            ``[N // 2 + 1]`` per radial shell.
        rotations : torch.Tensor
            ``[L, 3, 3]`` shared or ``[B, L, 3, 3]`` per-particle cryopose rotations.
        shifts_px : torch.Tensor, optional
            ``[T, 2]`` or ``[B, T, 2]`` candidate shifts ``(x, y)`` in pixels (template shifted by
            ``+t``); None means the single zero shift.

        Returns
        -------
        torch.Tensor
            ``[B, L, T]`` log-likelihoods in the scorer's dtype.
        """
        y, c, w, const = self._prepare(images, ctf, sigma2)
        b = y.shape[0]
        shifts = self._shifts(shifts_px, b)
        rot = torch.as_tensor(rotations, dtype=self.dtype, device=self.device)
        if rot.shape[-2:] != (3, 3) or rot.ndim not in (3, 4) or (rot.ndim == 4
                                                                  and rot.shape[0] != b):
            raise ValueError(f"rotations: expected [L, 3, 3] or [B, L, 3, 3], got "
                             f"{tuple(rot.shape)}")
        m = self._tmask
        yk, wk = y[:, m], w[:, m]  # [B, K]
        ck = c[:, m] if c is not None else None
        a = torch.conj(yk) * wk if ck is None else torch.conj(yk) * (wk * ck)
        q = -0.5 * wk if ck is None else -0.5 * wk * ck**2  # [B, K]
        phase = self._shift_phase(shifts, self._kx, self._ky)  # [T, K] or [B, T, K]
        at = a[:, None, :] * phase  # [B, T, K]
        t = at.shape[1]
        k = a.shape[-1]
        left = torch.cat([at.real, -at.imag], dim=-1)  # [B, T, 2K]
        elem = 4 if self.dtype == torch.float32 else 8
        if rot.ndim == 3:
            n_l = rot.shape[0]
            # rotations as rows: (templates [Lc, 2K]) @ (data [2K, B T]) runs ~40% faster
            # than data @ templates^T on CPU BLAS (measured, 2 cores: 168-180 vs 111-131
            # GFLOP/s on these shapes)
            out = torch.empty(b, n_l, t, dtype=self.dtype, device=self.device)
            lc = self._chunk(3 * k * elem * 3 + b * t * elem, n_l)
            left2 = left.reshape(b * t, 2 * k)
            for s in range(0, n_l, lc):
                x = self._templates(rot[s : s + lc])  # [Lc, K]
                xr = torch.cat([x.real, x.imag], dim=-1)  # [Lc, 2K]
                cross = (xr @ left2.T).reshape(-1, b, t)
                norm = (x.real**2 + x.imag**2) @ q.T  # [Lc, B]
                out[:, s : s + lc] = (cross + norm[:, :, None]).permute(1, 0, 2)
        else:
            n_l = rot.shape[1]
            out = torch.empty(b, n_l, t, dtype=self.dtype, device=self.device)
            lc = self._chunk(b * 3 * k * elem * 3, n_l)
            for s in range(0, n_l, lc):
                x = self._templates(rot[:, s : s + lc])  # [B, Lc, K]
                xr = torch.cat([x.real, x.imag], dim=-1).transpose(1, 2)  # [B, 2K, Lc]
                cross = torch.bmm(left, xr)  # [B, T, Lc]
                norm = torch.bmm(q[:, None, :], (x.real**2 + x.imag**2).transpose(1, 2))
                out[:, s : s + lc] = (cross + norm).transpose(1, 2)
        return out + const[:, None, None]

    # ------------------------------------------------------------------ local in-plane path
    def score_local(
        self,
        images: torch.Tensor,
        ctf: torch.Tensor | None,
        sigma2: torch.Tensor | float,
        directions: torch.Tensor,
        inplane_rad: torch.Tensor,
        shifts_px: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-likelihoods for per-particle rotations ``directions[b, v] @ Rz(inplane[j])``.

        Local refinement grids are products of viewing-direction offsets and in-plane
        offsets. The slice of ``R = W Rz(theta)`` is ``X_W(Rz(theta) k)``, so the in-plane
        offsets are applied to the image side instead: the image data ``conj(Y) C`` and
        ``|C|^2`` are interpolated at ``Rz(-theta) k`` (2x zero padding, ``sinc^2`` gridding
        correction, bilinear, as in the polar path) and the template ``X_W`` is projected once
        per direction. This costs one 3D slice per direction instead of one per rotation; the
        result approximates :meth:`score_rotations` to the accuracy of the 2D interpolation.

        Parameters
        ----------
        images, ctf, sigma2
            As in :meth:`score_rotations`.
        directions : torch.Tensor
            ``[B, V, 3, 3]`` per-particle rotations ``W`` (or ``[V, 3, 3]`` shared).
        inplane_rad : torch.Tensor
            ``[P]`` in-plane angles ``theta`` in radians (shared by all particles).
        shifts_px : torch.Tensor, optional
            ``[T, 2]`` shared candidate shifts in pixels (None: the zero shift only).

        Returns
        -------
        torch.Tensor
            ``[B, V, P, T]`` log-likelihoods (same per-image constant as
            :meth:`score_rotations`).
        """
        y, c, w, const = self._prepare(images, ctf, sigma2)
        b = y.shape[0]
        shifts = self._shifts(shifts_px, b)
        if shifts.ndim != 2:
            raise ValueError("shifts_px: score_local takes shared [T, 2] shifts")
        rot = torch.as_tensor(directions, dtype=self.dtype, device=self.device)
        if rot.ndim == 3:
            rot = rot.expand(b, *rot.shape)
        if rot.ndim != 4 or rot.shape[-2:] != (3, 3) or rot.shape[0] != b:
            raise ValueError(f"directions: expected [V, 3, 3] or [B, V, 3, 3], got "
                             f"{tuple(directions.shape)}")
        theta = torch.as_tensor(inplane_rad, dtype=torch.float64, device=self.device)
        if theta.ndim != 1:
            raise ValueError(f"inplane_rad: expected [P] angles, got {tuple(theta.shape)}")
        n_v, n_p, n_t = rot.shape[1], theta.shape[0], shifts.shape[0]
        m = self._tmask
        kx, ky = self._kx.double(), self._ky.double()
        cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
        # Rz(-theta) k for every template sample k: [P, K]
        rx = (cos * kx + sin * ky).to(self.dtype)
        ry = (-sin * kx + cos * ky).to(self.dtype)
        wk = w[:, m]  # [B, K] (rotation invariant: depends on |k| and the half-plane mult)
        spec = torch.conj(y) * (c if c is not None else 1.0)
        a = self._interp_polar(spec, rx, ry) * wk[:, None, :]  # [B, P, K]
        if c is None:
            q = (-0.5 * wk)[:, None, :].expand(b, n_p, -1)
        else:
            csq = self._interp_polar((c**2).to(self.cdtype), rx, ry).real
            q = -0.5 * wk[:, None, :] * csq  # [B, P, K]
        phase = self._shift_phase(shifts, rx, ry).reshape(n_t, n_p, -1)  # [T, P, K]
        at = a[:, :, None] * phase.transpose(0, 1)[None]  # [B, P, T, K]
        k = at.shape[-1]
        left = torch.cat([at.real, -at.imag], dim=-1).reshape(b, n_p * n_t, 2 * k)
        elem = 4 if self.dtype == torch.float32 else 8
        vc = self._chunk(b * 3 * k * elem * 3, n_v)
        out = torch.empty(b, n_v, n_p, n_t, dtype=self.dtype, device=self.device)
        for s in range(0, n_v, vc):
            x = self._templates(rot[:, s : s + vc])  # [B, Vc, K]
            xr = torch.cat([x.real, x.imag], dim=-1).transpose(1, 2)  # [B, 2K, Vc]
            cross = torch.bmm(left, xr).reshape(b, n_p, n_t, -1)
            norm = torch.bmm(q, (x.real**2 + x.imag**2).transpose(1, 2))  # [B, P, Vc]
            out[:, s : s + vc] = (cross + norm[:, :, None]).permute(0, 3, 1, 2)
        return out + const[:, None, None, None]

    # ------------------------------------------------------------------ polar path
    def _polar_points(self, n_phi: int) -> tuple[torch.Tensor, torch.Tensor]:
        phi = torch.arange(n_phi, dtype=torch.float64, device=self.device) * (2 * math.pi / n_phi)
        r = self._radii.double()
        px = r[:, None] * torch.cos(phi)[None, :]
        py = r[:, None] * torch.sin(phi)[None, :]
        return px.to(self.dtype), py.to(self.dtype)  # [R, Phi]

    def _templates(self, rotations: torch.Tensor) -> torch.Tensor:
        """Central-slice values ``[..., K]`` at the template points of ``rotations``
        ``[..., 3, 3]`` (what ``projector.slices(rotations)[..., _tmask]`` holds)."""
        return self.projector.slice_values(rotations, self._kx, self._ky)

    def _interp_polar(self, spec_half: torch.Tensor, px: torch.Tensor, py: torch.Tensor):
        """Interpolate Hermitian centred-rfft spectra ``[B, N, N//2+1]`` at polar points.

        Zero-pads the real-space function to ``2N``, divides by the bilinear kernel's
        ``sinc^2`` footprint and samples the padded DFT bilinearly.
        """
        n = self.box
        mpad = 2 * n
        real = irfft2_centred(spec_half, n)  # [B, N, N]
        before = mpad // 2 - n // 2
        real = F.pad(real, [before, mpad - n - before] * 2)
        i = (torch.arange(mpad, dtype=self.dtype, device=self.device) - mpad // 2) / mpad
        s2 = torch.sinc(i) ** 2
        real = real / (s2[:, None] * s2[None, :])
        ft = fft2_centred(real)  # [B, 2N, 2N]
        ri = torch.view_as_real(ft).permute(0, 3, 1, 2)  # [B, 2, 2N, 2N]
        gx = (px * 2 + mpad // 2) * (2.0 / (mpad - 1)) - 1.0
        gy = (py * 2 + mpad // 2) * (2.0 / (mpad - 1)) - 1.0
        grid = torch.stack([gx, gy], dim=-1)[None].expand(ri.shape[0], -1, -1, -1)
        v = F.grid_sample(ri, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.complex(v[:, 0], v[:, 1])  # [B, R, Phi]

    def score_grid(
        self,
        images: torch.Tensor,
        ctf: torch.Tensor | None,
        sigma2: torch.Tensor | float,
        grid: SO3Grid,
        shifts_px: torch.Tensor | None = None,
        *,
        inplane_fft: bool | None = None,
    ) -> torch.Tensor:
        """Log-likelihoods for every rotation of a grid and every shift.

        Parameters
        ----------
        images, ctf, sigma2
            As in :meth:`score_rotations`.
        grid : SO3Grid
            Rotation grid; ``G`` follows ``grid.matrices``.
        shifts_px : torch.Tensor, optional
            ``[T, 2]`` candidate shifts ``(x, y)`` in pixels (None: the zero shift only).
        inplane_fft : bool, optional
            Use the polar in-plane FFT path (default: when the grid has more than one in-plane
            angle) or the dense path.

        Returns
        -------
        torch.Tensor
            ``[B, G, T]`` log-likelihoods (same per-image constant as :meth:`score_rotations`).
        """
        use_fft = grid.n_inplane > 1 if inplane_fft is None else inplane_fft
        if not use_fft:
            return self.score_rotations(images, ctf, sigma2, grid.matrices, shifts_px)
        y, c, w, const = self._prepare(images, ctf, sigma2)
        b = y.shape[0]
        shifts = self._shifts(shifts_px, b)
        if shifts.ndim != 2:
            raise ValueError("shifts_px: score_grid takes shared [T, 2] shifts")
        n_t = shifts.shape[0]
        n_d, n_p = grid.n_directions, grid.n_inplane
        mats = grid.matrices.to(device=self.device, dtype=torch.float64).reshape(n_d, n_p, 3, 3)
        psi0 = torch.deg2rad(grid.euler_deg.to(device=self.device, dtype=torch.float64)
                             .reshape(n_d, n_p, 3)[:, 0, 2])
        base = mats[:, 0] @ _rz(psi0).transpose(-1, -2)  # [D, 3, 3]
        step = 2 * math.pi / n_p
        phase = float(psi0[0]) / step  # in-plane offset in grid steps (same for all d)

        m_max = self._m_max
        n_phi = n_p * max(1, math.ceil((2 * m_max + 2) / n_p))
        px, py = self._polar_points(n_phi)
        n_r = px.shape[0]
        dphi = 2 * math.pi / n_phi
        # Template polar FTs over phi, m = 0..M: [M+1, R, D] (cross) and even m (norm).
        ms = torch.arange(m_max + 1, device=self.device)
        even = ms[::2]
        key = (id(grid.matrices), n_d, n_p, n_phi)
        if self._template_cache is not None and self._template_cache[0] == key:
            tcross, tnorm = self._template_cache[1], self._template_cache[2]
        else:
            tcross, tnorm = self._polar_templates(base, m_max, even, n_phi)
            self._template_cache = (key, tcross, tnorm, grid.matrices)
        # Image side, polar, weights (area, 1/(N^2 sigma2(shell)) on the full plane).
        ring_w = (self._ring_area * dphi)[None, :]  # [1, R]
        s2inv = self._ring_inv_var(sigma2, b)  # [B, R]
        wr = s2inv * ring_w  # [B, R]
        spec = torch.conj(y) * (c if c is not None else 1.0)
        out = torch.empty(b, n_d, n_p, n_t, dtype=self.dtype, device=self.device)
        shift_ph = self._shift_phase(shifts, px, py).reshape(n_t, n_r, n_phi)
        per_image = n_r * n_phi * 8 * (3 + 2 * n_t) + (m_max + 1) * n_d * 8 * (n_t + 1) * 2
        bc = self._chunk(per_image, b)
        # first ring carrying each angular frequency m (ring bands grow outwards)
        ring_band = (self._ring_samples(n_phi) - 1) // 2  # largest |m| kept per ring
        first_ring = torch.searchsorted(ring_band.cpu(), ms.cpu(), right=False)
        sub = max(1, n_p // max(1, math.ceil(n_p / 16)))  # m blocks of <= 16
        fold_phase = torch.exp(2j * math.pi * ms.double() * phase / n_p).to(self.cdtype)
        wm = torch.full((m_max + 1,), 2.0, dtype=torch.float64, device=self.device)
        wm[0] = 1.0
        coef = wm.to(self.cdtype) * fold_phase / n_phi
        real_dtype = self.dtype
        self.last_gemm_flops = 0  # floating-point operations of the GEMMs below (benchmarks)
        for s in range(0, b, bc):
            ap = self._interp_polar(spec[s : s + bc], px, py) * wr[s : s + bc, :, None]
            at = ap[:, None] * shift_ph[None]  # [Bc, T, R, Phi]
            af = torch.fft.ifft(at, dim=-1, norm="forward")[..., : m_max + 1]  # a_{-m}
            bt = at.shape[0] * n_t
            af = af.reshape(bt, n_r, m_max + 1).permute(2, 0, 1)  # [M+1, BT, R]
            af = af * coef[:, None, None]  # fold weights and in-plane phase, per m
            # Real GEMM on interleaved (re, im) pairs: [M+1, BT, 2R] @ [M+1, 2R, 2D] gives the
            # complex products interleaved; frequencies m = j (mod P) accumulate in place
            # (baddbmm), so the [M+1, BT, D] products are never stored.
            left = torch.view_as_real(af).reshape(m_max + 1, bt, 2 * n_r)
            # Ring r carries |m| < S_r / 2 only: blocks of m skip the inner rings (zero rows).
            folded = torch.zeros(n_p, bt, 2 * n_d, dtype=real_dtype, device=self.device)
            for m0 in range(0, m_max + 1, n_p):
                rows = min(n_p, m_max + 1 - m0)
                for a in range(0, rows, sub):
                    lo, hi = m0 + a, m0 + min(a + sub, rows)
                    r0 = 2 * int(first_ring[lo])
                    if r0 < 2 * n_r:
                        folded[a : a + hi - lo].baddbmm_(left[lo:hi, :, r0:], tcross[lo:hi, r0:])
                        self.last_gemm_flops += 2 * (hi - lo) * bt * (2 * n_r - r0) * 2 * n_d
            if c is None:
                # radial: only m = 0
                qf = (wr[s : s + bc] * (-0.5 * n_phi)).to(self.cdtype)[None]  # [1, Bc, R]
                n_e = 1
            else:
                csq = c[s : s + bc] ** 2
                qp = self._interp_polar(csq.to(self.cdtype), px, py).real
                qp = qp * wr[s : s + bc, :, None] * (-0.5)
                qf = torch.fft.ifft(qp.to(self.cdtype), dim=-1, norm="forward")[..., even]
                # keep the even angular frequencies that carry the astigmatic CTF
                mag = qf.abs().amax(dim=(0, 1))
                keep = torch.nonzero(mag > 1e-7 * mag[0]).reshape(-1)
                n_e = int(keep.max()) + 1 if keep.numel() else 1
                qf = qf[..., :n_e].permute(2, 0, 1).contiguous()  # [E, Bc, R]
            qf = qf * coef[even[:n_e], None, None]
            # [E, Bc, D], even m = 2e = 0, 2, ...: real interleaved GEMMs as for the cross
            # term; |X|^2 on ring r carries |m| <= 2 band_r, so row e starts at first_ring[e]
            nb = qf.shape[1]
            left_n = torch.view_as_real(qf).reshape(n_e, nb, 2 * n_r)
            nm_ri = torch.zeros(n_e, nb, 2 * n_d, dtype=real_dtype, device=self.device)
            for lo in range(0, n_e, sub):
                hi = min(lo + sub, n_e)
                r0 = 2 * int(first_ring[lo])
                if r0 < 2 * n_r:
                    nm_ri[lo:hi].baddbmm_(left_n[lo:hi, :, r0:], tnorm[lo:hi, r0:])
                    self.last_gemm_flops += 2 * (hi - lo) * nb * (2 * n_r - r0) * 2 * n_d
            nm = torch.view_as_complex(nm_ri.view(n_e, nb, n_d, 2))
            # The norm term's frequencies 2e fold into the same P bins as the cross term's (for
            # every shift), so one inverse FFT over the in-plane angle gives both:
            # out[b, d, j, t] = Re ifft(cross bins + norm bins)[j, b * T + t, d]
            folded_c = torch.view_as_complex(folded.reshape(n_p, nb, n_t, n_d, 2))
            period = n_p // math.gcd(n_p, 2)  # norm rows before the bins repeat
            for e0 in range(0, n_e, period):
                block = nm[e0 : e0 + period]
                bins = (torch.arange(e0, e0 + block.shape[0], device=self.device) * 2) % n_p
                folded_c[bins] += block[:, :, None, :]
            total = torch.fft.ifft(folded_c, dim=0, norm="forward").real  # [P, Bc, T, D]
            out[s : s + bc] = total.permute(1, 3, 0, 2)
        out = out.reshape(b, n_d * n_p, n_t)
        return out.add_(const[:, None, None])

    def _ring_samples(self, n_phi: int) -> torch.Tensor:
        """Angular samples per ring for the polar templates: ``[R]`` even counts ``<= n_phi``.

        A central slice of a map supported in a ball of radius ``N / 2`` (real-space pixels)
        has angular frequencies up to about ``pi rho`` on the ring of radius ``rho`` (Fourier
        pixels). Ring ``r`` is sampled at ``S_r >= 2 (pi rho_out + 2) + 2`` points (a multiple
        of 8; ``rho_out`` its outer edge) and keeps ``|m| < S_r / 2``: inner rings need far
        fewer samples than the outermost (about 44% of the points overall).
        """
        outer = self._radii.double() + 0.5 * self.radial_step_px
        m_ring = torch.ceil(math.pi * outer) + 2.0
        samples = 8 * torch.ceil((2.0 * m_ring + 2.0) / 8.0)
        return samples.clamp(max=n_phi).long()

    def _polar_templates(self, base, m_max, even, n_phi):
        """Angular Fourier coefficients of the polar templates and of their squared moduli.

        Each ring is sampled at its own count ``S_r`` (:meth:`_ring_samples`), its angular
        spectrum kept for ``|m| < S_r / 2`` (the rest is zero) and resampled to the common
        ``n_phi`` angles by trigonometric interpolation for the squared moduli.
        """
        n_d, n_r = base.shape[0], self._radii.numel()
        samples = self._ring_samples(n_phi)
        groups = [(int(s), torch.nonzero(samples == s).reshape(-1)) for s in samples.unique()]
        # cross templates as real interleaved blocks [M+1, R, 2, 2D] (viewed [M+1, 2R, 2D])
        tcross = torch.empty(m_max + 1, n_r, 2, 2 * n_d, dtype=self.dtype, device=self.device)
        tnorm = torch.empty(even.numel(), n_r, 2, 2 * n_d, dtype=self.dtype, device=self.device)
        dc = self._chunk(n_r * n_phi * 40, n_d)
        for s in range(0, n_d, dc):
            bs = base[s : s + dc].to(self.dtype)
            spec = torch.zeros(bs.shape[0], n_r, n_phi, dtype=self.cdtype, device=self.device)
            for count, rings in groups:
                # Friedel: the point at phi + pi is -q and V(-q) = conj(V(q)) (real volume),
                # so an even count samples half the ring
                half = count // 2 if count % 2 == 0 else count
                x, y = (c[rings, :half] for c in self._polar_points(count))
                first = self.projector.slice_values(bs, x.reshape(-1), y.reshape(-1)).reshape(
                    bs.shape[0], *x.shape)  # [Dc, Rg, S / 2] (S when odd)
                tp = torch.cat([first, first.conj()], dim=-1) if count % 2 == 0 else first
                f = torch.fft.fft(tp, dim=-1) * (n_phi / count)  # n_phi-point coefficients
                keep = (count - 1) // 2  # |m| < S / 2
                spec[:, rings, : keep + 1] = f[..., : keep + 1]
                spec[:, rings, n_phi - keep :] = f[..., count - keep :]
            tf = spec[..., : m_max + 1].permute(2, 1, 0)  # [M+1, R, Dc]
            _interleave(tcross[:, :, :, 2 * s : 2 * (s + tf.shape[-1])], tf)
            tp = torch.fft.ifft(spec, dim=-1)  # [Dc, R, n_phi] band-limited templates
            nf = torch.fft.fft(tp.real**2 + tp.imag**2, dim=-1)[..., even]
            _interleave(tnorm[:, :, :, 2 * s : 2 * (s + tf.shape[-1])], nf.permute(2, 1, 0))
        return (tcross.reshape(m_max + 1, 2 * n_r, 2 * n_d),
                tnorm.reshape(even.numel(), 2 * n_r, 2 * n_d))

    def _ring_inv_var(self, sigma2: torch.Tensor | float, b: int) -> torch.Tensor:
        n = self.box
        s2 = torch.as_tensor(sigma2, dtype=self.dtype, device=self.device)
        if s2.ndim == 0:
            s2 = s2.expand(1, n // 2 + 1)
        elif s2.ndim == 1:
            s2 = s2[None]
        return 1.0 / (s2.expand(b, -1)[:, self._ring_shell] * float(n * n))
