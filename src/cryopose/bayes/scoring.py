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
``m``, ``|m| <= M``, and an inverse DFT over ``m`` evaluated at the grid's ``psi``. Frequencies
``m`` (and the norm term's ``2e``) that alias to the same in-plane bin ``m mod P`` share one
GEMM with their radii side by side (:class:`_BinPlan`); the inverse DFT over the ``P`` bins is
one small GEMM per particle that writes the output in its final layout. Templates are sampled
directly from the padded 3D transform at polar points; the image-side data ``conj(Y) C`` is
read at half a turn of each ring from its 2x padded, gridding-corrected 2D transform
(:class:`cryopose.imaging.PlaneSampler`; the other half is the conjugate), and so is ``|C|^2``
unless the CTF parameters are given (then it is evaluated there exactly,
:func:`cryopose.imaging.ctf_at_frequencies`); polar samples carry
their exact annulus area ``(b^2 - a^2) / 2 * dphi`` so the polar sum approximates the Cartesian
one. The constant ``const_y`` is computed exactly on the Cartesian grid, so both paths share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cryopose.imaging.ctf import ctf_at_frequencies
from cryopose.imaging.fft import rfft2_centred
from cryopose.imaging.plane import PlaneSampler
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


def _complex_piece(block_t: torch.Tensor, values: torch.Tensor, sign: float) -> None:
    """Write complex ``values [Rp, D]`` (``t``) into the transposed real block ``block_t [2D,
    2Rp]`` so that a real GEMM with rows ``(r, re / im of the image coefficient a)`` gives the
    products with columns ``(re / im, d)``: ``(a_r + i a_i)(t_r + i t_i) = (a_r t_r - a_i t_i)
    + i (a_r t_i + a_i t_r)``; ``sign = -1`` negates the imaginary columns (the conjugate
    product)."""
    n_rows, n_d = values.shape
    view = block_t.view(2, n_d, n_rows, 2)  # [re | im column, d, r, re | im row]
    tr, ti = values.real.T, values.imag.T  # [D, Rp]
    view[0, :, :, 0] = tr
    view[0, :, :, 1] = -ti
    view[1, :, :, 0] = sign * ti
    view[1, :, :, 1] = sign * tr


def _dft_matrix(n_p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[2 (P // 2 + 1), P]``: rows ``2p`` and ``2p + 1`` are ``cos`` and ``-sin`` of ``2 pi p
    j / P`` for the half-spectrum bins ``p``, so that ``Re sum_p H_p exp(+2 pi i p j / P) =
    [Re H_0, Im H_0, Re H_1, ...] @ W`` (the real part of an unnormalised inverse DFT as one
    GEMM over interleaved (re, im) rows)."""
    pj = torch.outer(torch.arange(n_p // 2 + 1, dtype=torch.float64),
                     torch.arange(n_p, dtype=torch.float64))
    ang = (2 * math.pi / n_p) * torch.remainder(pj, n_p)
    w = torch.stack([torch.cos(ang), -torch.sin(ang)], dim=1).reshape(-1, n_p)
    return w.to(device=device, dtype=dtype)


class _BinPlan:
    """The in-plane GEMMs grouped by output bin.

    Angular frequency ``m`` of the cross term and ``2e`` of the norm term land in in-plane
    bin ``p = m mod P`` (``2e mod P``) of ``F``, and the output is ``Re sum_p F_p exp(2 pi i
    p j / P)``. Only the real part is needed, so bins ``p`` and ``P - p`` are stored as one,
    ``H_p = F_p + conj(F_{P-p})`` for ``p = 0 .. P // 2`` (``Re sum_p F_p w^pj = Re sum_{p <=
    P/2} H_p w^pj`` with ``H_0 = F_0`` and, for even ``P``, ``H_{P/2} = F_{P/2}``): a frequency
    landing in ``p > P / 2`` enters bin ``P - p`` conjugated (its template block with the
    imaginary output columns negated). Bin ``p`` is one GEMM: the image rows of all its
    frequencies side by side (each from its first non-zero ring, see
    :meth:`ReferenceScorer._ring_samples`) times the templates stacked to match, ``[BT, K_p]
    @ [K_p, 2D]``: half the bins of ``F``, each written once, and ``K_p`` of several hundred
    keeps the GEMM compute-bound. Built from the complex templates ``tcross [M+1, R, D]`` and
    ``tnorm [E, R, D]`` (:meth:`ReferenceScorer._polar_templates`) as real blocks
    (:func:`_complex_piece`); norm pieces follow the cross pieces, in increasing ``e``.
    """

    def __init__(self, tcross, tnorm, first_ring, n_p: int) -> None:
        m1, n_r, n_d = tcross.shape
        self.m1, self.n_e, self.n_r, self.n_d = m1, tnorm.shape[0], n_r, n_d
        self.n_bins = n_p // 2 + 1
        cross: list[list[tuple[int, int]]] = [[] for _ in range(self.n_bins)]
        norm: list[list[tuple[int, int]]] = [[] for _ in range(self.n_bins)]
        parts: list[list[tuple[torch.Tensor, float]]] = [[] for _ in range(self.n_bins)]

        def place(values: torch.Tensor, p: int) -> tuple[int, tuple[torch.Tensor, float]]:
            # frequencies in bin p > P / 2 enter bin P - p conjugated
            return (p, (values, 1.0)) if 2 * p <= n_p else (n_p - p, (values, -1.0))

        for m in range(m1):
            ring = int(first_ring[m])
            if ring < n_r:
                j, piece = place(tcross[m, ring:], m % n_p)
                cross[j].append((m, 2 * ring))
                parts[j].append(piece)
        for e in range(self.n_e):
            ring = int(first_ring[e])
            if ring < n_r:
                j, piece = place(tnorm[e, ring:], (2 * e) % n_p)
                norm[j].append((e, 2 * ring))
                parts[j].append(piece)  # (after every cross piece of bin j)
        self.cross, self.norm = cross, norm
        # Real blocks (cross pieces first, then norm pieces in increasing e: the order fill()
        # stacks rows), stored transposed, [2D, K_p]: OpenBLAS runs [BT, K] @ [2D, K]^T at
        # 150-160 GFLOP/s here against ~100 for a row-major [K, 2D] right operand (measured).
        self.blocks: list[torch.Tensor | None] = []
        real = tcross.real.dtype
        for pieces in parts:
            if not pieces:
                self.blocks.append(None)
                continue
            block_t = torch.empty(2 * n_d, sum(2 * v.shape[0] for v, _ in pieces), dtype=real,
                                  device=tcross.device)
            at = 0
            for values, sign in pieces:
                _complex_piece(block_t[:, at : at + 2 * values.shape[0]], values, sign)
                at += 2 * values.shape[0]
            self.blocks.append(block_t)

    def fill(self, bins, left, left_n) -> int:
        """Write ``bins [BT, H, 2D]`` (``H = P // 2 + 1``, columns re | im of ``H_p``) from
        image rows ``left [M+1, BT, 2R]`` and norm rows ``left_n [E', B, 2R]`` (``E' <= E``:
        the norm pieces with ``e < E'``; ``BT = B T``, the norm term is the same for every
        shift). Returns the GEMM flops executed."""
        n_e, nb = left_n.shape[0], left_n.shape[1]
        n_t = bins.shape[0] // nb
        flops = 0
        for j, block in enumerate(self.blocks):
            pieces = [left[m, :, r0:] for m, r0 in self.cross[j]]
            norm = [left_n[e, :, r0:] for e, r0 in self.norm[j] if e < n_e]
            if n_t == 1:
                pieces += norm
            if not pieces:
                bins[:, j].zero_()
                continue
            lhs = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
            k = lhs.shape[1]
            torch.mm(lhs, block[:, :k].T, out=bins[:, j])  # (BLAS writes the strided rows)
            flops += 2 * lhs.shape[0] * k * block.shape[0]
            if n_t > 1 and norm:
                rhs = torch.cat(norm, dim=1) if len(norm) > 1 else norm[0]
                term = rhs @ block[:, k : k + rhs.shape[1]].T  # [B, 2D]
                bins[:, j].view(nb, n_t, -1).add_(term[:, None])
                flops += 2 * nb * rhs.shape[1] * block.shape[0]
        return flops


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
        self._sampler_cache: tuple | None = None

    # ------------------------------------------------------------------ helpers
    def _chunk(self, per_item_bytes: float, cap: int) -> int:
        """Items per chunk: at most ``max_chunk_bytes`` each, ``cap`` items split evenly (no
        small last chunk)."""
        most = max(1, min(cap, int(self.max_chunk_bytes // max(per_item_bytes, 1.0))))
        return -(-cap // -(-cap // most)) if cap > 0 else most

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
        # rows (re, -im) interleaved per sample, the layout of the templates' (re, im) pairs:
        # Re(at x) = re(at) re(x) - im(at) im(x) is one dot product with no template copy
        left = torch.view_as_real(at.conj().resolve_conj()).reshape(b, t, 2 * k)
        elem = 4 if self.dtype == torch.float32 else 8
        out = torch.empty(b, rot.shape[-3], t, dtype=self.dtype, device=self.device)
        if rot.ndim == 3:
            n_l = rot.shape[0]
            lc = self._chunk(3 * k * elem * 2 + 2 * b * t * elem, n_l)
            left2 = left.reshape(b * t, 2 * k)
            for s in range(0, n_l, lc):
                x = self._templates(rot[s : s + lc])  # [Lc, K]
                xr = torch.view_as_real(x).reshape(-1, 2 * k)  # [Lc, 2K] (a view)
                x2 = x.real**2 + x.imag**2  # [Lc, K]
                if t == 1:  # both terms accumulate in place in the output's rows
                    o = out[:, s : s + lc, 0]  # [B, Lc], row stride L
                    torch.mm(left2, xr.T, out=o)
                    o.addmm_(q, x2.T)
                else:
                    cross = torch.mm(left2, xr.T).view(b, t, -1)  # [B, T, Lc]
                    cross.add_((q @ x2.T)[:, None])
                    out[:, s : s + lc] = cross.transpose(1, 2)
        else:
            n_l = rot.shape[1]
            lc = self._chunk(b * 3 * k * elem * 2 + 2 * b * t * elem, n_l)
            for s in range(0, n_l, lc):
                x = self._templates(rot[:, s : s + lc])  # [B, Lc, K]
                xr = torch.view_as_real(x).reshape(b, -1, 2 * k)  # [B, Lc, 2K] (a view)
                x2 = x.real**2 + x.imag**2  # [B, Lc, K]
                cross = torch.bmm(left, xr.transpose(1, 2))  # [B, T, Lc]
                cross.baddbmm_(q[:, None, :].expand(b, t, -1), x2.transpose(1, 2))
                out[:, s : s + lc] = cross.transpose(1, 2)
        return out.add_(const[:, None, None])

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
        ``|C|^2`` are interpolated at ``Rz(-theta) k`` (:class:`cryopose.imaging.PlaneSampler`,
        as in the polar path) and the template ``X_W`` is projected once
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
        sampler = PlaneSampler(self.box, rx, ry, device=self.device)
        a = sampler.sample(sampler.table(spec)) * wk[:, None, :]  # [B, P, K]
        if c is None:
            q = (-0.5 * wk)[:, None, :].expand(b, n_p, -1)
        else:
            csq = sampler.sample_real(sampler.table((c**2).to(self.cdtype)))
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
    def _polar_n_phi(self, n_p: int) -> int:
        """Common angular sampling of the polar rings: an even multiple of the in-plane count
        ``n_p`` with at least ``2 M + 2`` angles (the ring's second half is ``-(first)``)."""
        turns = max(1, math.ceil((2 * self._m_max + 2) / n_p))
        return n_p * (turns + (n_p * turns) % 2)

    def _grid_base(self, grid: SO3Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Viewing-direction rotations ``[D, 3, 3]`` of a grid with its in-plane angle removed,
        and that first in-plane angle (radians; the same for every direction)."""
        n_d, n_p = grid.n_directions, grid.n_inplane
        mats = grid.matrices.to(device=self.device, dtype=torch.float64).reshape(n_d, n_p, 3, 3)
        psi0 = torch.deg2rad(grid.euler_deg.to(device=self.device, dtype=torch.float64)
                             .reshape(n_d, n_p, 3)[:, 0, 2])
        return mats[:, 0] @ _rz(psi0).transpose(-1, -2), psi0[0]

    def _polar_sampler(self, n_phi: int) -> PlaneSampler:
        """Sampler of the image side at the first half turn of every ring (``n_phi`` even)."""
        if self._sampler_cache is None or self._sampler_cache[0] != n_phi:
            self._sampler_cache = (n_phi, PlaneSampler(self.box, *self._polar_half(n_phi),
                                                       device=self.device))
        return self._sampler_cache[1]

    def _polar_half(self, n_phi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``kx, ky`` ``[R, Phi / 2]`` (Fourier pixels): the first half turn of every ring,
        the points :meth:`_polar_sampler` reads."""
        px, py = self._polar_points(n_phi)
        return px[:, : n_phi // 2], py[:, : n_phi // 2]

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

    def score_grid(
        self,
        images: torch.Tensor,
        ctf: torch.Tensor | None,
        sigma2: torch.Tensor | float,
        grid: SO3Grid,
        shifts_px: torch.Tensor | None = None,
        *,
        inplane_fft: bool | None = None,
        ctf_params: Mapping[str, torch.Tensor] | None = None,
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
        ctf_params : mapping of str to torch.Tensor, optional
            The ``[B]`` parameters ``ctf`` was computed from (:func:`cryopose.imaging.
            ctf_from_params`; the scorer's pixel size applies). The in-plane path then evaluates
            ``|C|^2`` at its polar points from them (:func:`cryopose.imaging.
            ctf_at_frequencies`) instead of interpolating ``ctf^2``: exact there and ~6x
            cheaper. They must describe ``ctf``.

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
        if ctf_params is not None:
            if c is None:
                raise ValueError("ctf_params: given without ctf")
            for k, v in ctf_params.items():
                if torch.as_tensor(v).shape != (b,):
                    raise ValueError(f"ctf_params[{k!r}]: expected [{b}] (one per image), got "
                                     f"{tuple(torch.as_tensor(v).shape)}")
        n_t = shifts.shape[0]
        n_d, n_p = grid.n_directions, grid.n_inplane
        base, psi0 = self._grid_base(grid)
        phase = float(psi0) / (2 * math.pi / n_p)  # in-plane offset in grid steps (all d)
        m_max = self._m_max
        n_phi = self._polar_n_phi(n_p)
        sampler = self._polar_sampler(n_phi)
        n_r = sampler.shape[0]
        dphi = 2 * math.pi / n_phi
        ms = torch.arange(m_max + 1, device=self.device)
        even = ms[::2]
        key = (id(grid.matrices), n_d, n_p, n_phi)
        if self._template_cache is not None and self._template_cache[0] == key:
            plan = self._template_cache[1]
        else:
            self._template_cache = None  # free the previous grid's blocks first
            tcross, tnorm = self._polar_templates(base, n_phi)
            # first ring carrying each angular frequency m (ring bands grow outwards)
            ring_band = (self._ring_samples(n_phi) - 1) // 2  # largest |m| kept per ring
            first_ring = torch.searchsorted(ring_band.cpu(), ms.cpu(), right=False)
            plan = _BinPlan(tcross, tnorm, first_ring, n_p)
            del tcross, tnorm
            self._template_cache = (key, plan, grid.matrices)
        # Image side, polar, weights (area, 1/(N^2 sigma2(shell)) on the full plane).
        ring_w = (self._ring_area * dphi)[None, :]  # [1, R]
        s2inv = self._ring_inv_var(sigma2, b)  # [B, R]
        wr = s2inv * ring_w  # [B, R]
        spec = torch.conj(y) * (c if c is not None else 1.0)
        out = torch.empty(b, n_d, n_p, n_t, dtype=self.dtype, device=self.device)
        if n_t == 1 and bool((shifts == 0).all()):
            shift_ph = None  # no phase factors to apply
        else:
            px, py = self._polar_points(n_phi)
            shift_ph = self._shift_phase(shifts, px, py).reshape(n_t, n_r, n_phi)
        elem, n = torch.finfo(self.dtype).bits // 8, self.box
        per_image = elem * (
            2 * (2 * n) * (n + 1) * 2 + (2 * n) ** 2  # padded image and its half transform
            + n_r * n_phi * 2 * (1 + 2 * n_t)  # ring samples, shifted, angular FT
            + (m_max + 1) * n_r * 2 * n_t  # GEMM rows
            + (n_p // 2 + 1) * 2 * n_d * n_t + n_p * n_d * n_t  # bins and the output
        )
        bc = self._chunk(per_image, b)
        fold_phase = torch.exp(2j * math.pi * ms.double() * phase / n_p).to(self.cdtype)
        wm = torch.full((m_max + 1,), 2.0, dtype=torch.float64, device=self.device)
        wm[0] = 1.0
        coef = wm.to(self.cdtype) * fold_phase / n_phi
        real_dtype = self.dtype
        idft = _dft_matrix(n_p, real_dtype, self.device)  # [2H, P]
        self.last_gemm_flops = 0  # floating-point operations of the GEMMs below (benchmarks)
        for s in range(0, b, bc):
            ap = sampler.sample(sampler.table(spec[s : s + bc]), wr[s : s + bc], paired=True)
            at = ap[:, None] if shift_ph is None else ap[:, None] * shift_ph[None]  # [Bc,T,R,Phi]
            af = torch.fft.ifft(at, dim=-1, norm="forward")[..., : m_max + 1]  # a_{-m}
            bt = at.shape[0] * n_t
            af = af.reshape(bt, n_r, m_max + 1).permute(2, 0, 1)  # [M+1, BT, R]
            # fold weights and in-plane phase per m, written contiguous for the GEMM rows
            af = torch.mul(af, coef[:, None, None], out=torch.empty(
                af.shape, dtype=af.dtype, device=self.device))
            left = torch.view_as_real(af).reshape(m_max + 1, bt, 2 * n_r)  # rows (re, im) pairs
            if c is None:
                # radial: only m = 0
                qf = (wr[s : s + bc] * (-0.5 * n_phi)).to(self.cdtype)[None]  # [1, Bc, R]
            else:
                # |C|^2 is real and even: its ring values repeat after half a turn, so the
                # first half gives the even angular frequencies (sum_j x_j e^{+2 pi i j m / Phi}
                # over the turn = 2 conj(rfft(first half))[m / 2]).
                if ctf_params is None:
                    table = sampler.table((c[s : s + bc] ** 2).to(self.cdtype))
                    qh = sampler.sample_real(table, wr[s : s + bc] * (-1.0))  # 2 x (-1/2)
                else:
                    rows = {k: v[s : s + bc] for k, v in ctf_params.items()}
                    qh = ctf_at_frequencies(
                        rows, *self._polar_half(n_phi), self.box, squared=True,
                        pixel_size_angstrom=self.pixel_size_angstrom, dtype=real_dtype,
                        device=self.device)
                    qh.mul_(wr[s : s + bc, :, None] * (-1.0))
                qf = torch.fft.rfft(qh, dim=-1).conj()[..., : even.numel()]
                qf = qf.permute(2, 0, 1)  # [E, Bc, R]
            n_e = qf.shape[0]
            qf = torch.mul(qf, coef[even[:n_e], None, None], out=torch.empty(
                qf.shape, dtype=qf.dtype, device=self.device))
            nb = qf.shape[1]
            left_n = torch.view_as_real(qf).reshape(n_e, nb, 2 * n_r)
            bins = torch.empty(bt, plan.n_bins, 2 * n_d, dtype=real_dtype, device=self.device)
            self.last_gemm_flops += plan.fill(bins, left, left_n)
            # out[b, d, j, t] = Re sum_p bins[b T + t, p] exp(+2 pi i p j / P), p <= P / 2:
            # per particle one GEMM [D, 2H] @ [2H, P], the bins read in place (rows (p, re|im))
            parts = bins.view(bt, 2 * plan.n_bins, n_d).transpose(1, 2)  # [BT, D, 2H]
            if n_t == 1:
                torch.bmm(parts, idft.expand(bt, -1, -1), out=out[s : s + bc].view(nb, n_d, n_p))
            else:
                total = torch.bmm(parts, idft.expand(bt, -1, -1))  # [BT, D, P]
                out[s : s + bc] = total.view(nb, n_t, n_d, n_p).permute(0, 2, 3, 1)
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

    def _polar_templates(self, base: torch.Tensor, n_phi: int) -> tuple[torch.Tensor, ...]:
        """Angular Fourier coefficients of the polar templates, ``[M+1, R, D]`` complex (``m =
        0 .. M``), and of their squared moduli, ``[E, R, D]`` (even ``m = 0, 2, ...``).

        Each ring is sampled at its own count ``S_r`` (:meth:`_ring_samples`), its angular
        spectrum kept for ``|m| < S_r / 2`` (the rest is zero) and resampled to the common
        ``n_phi`` angles by trigonometric interpolation for the squared moduli.
        """
        n_d, n_r, m_max = base.shape[0], self._radii.numel(), self._m_max
        even = torch.arange(0, m_max + 1, 2, device=self.device)
        samples = self._ring_samples(n_phi)
        groups = [(int(s), torch.nonzero(samples == s).reshape(-1)) for s in samples.unique()]
        tcross = torch.empty(m_max + 1, n_r, n_d, dtype=self.cdtype, device=self.device)
        tnorm = torch.empty(even.numel(), n_r, n_d, dtype=self.cdtype, device=self.device)
        dc = self._chunk(n_r * n_phi * 40, n_d)
        for s in range(0, n_d, dc):
            bs = base[s : s + dc].to(self.dtype)
            spec = torch.zeros(bs.shape[0], n_r, n_phi, dtype=self.cdtype, device=self.device)
            for count, rings in groups:
                # Friedel: the point at phi + pi is -q and V(-q) = conj(V(q)) (real volume),
                # so half the ring is sampled (counts are even)
                x, y = (c[rings, : count // 2] for c in self._polar_points(count))
                first = self.projector.slice_values(bs, x.reshape(-1), y.reshape(-1)).reshape(
                    bs.shape[0], *x.shape)  # [Dc, Rg, S / 2]
                tp = torch.cat([first, first.conj()], dim=-1)
                f = torch.fft.fft(tp, dim=-1) * (n_phi / count)  # n_phi-point coefficients
                keep = (count - 1) // 2  # |m| < S / 2
                spec[:, rings, : keep + 1] = f[..., : keep + 1]
                spec[:, rings, n_phi - keep :] = f[..., count - keep :]
            tcross[..., s : s + bs.shape[0]] = spec[..., : m_max + 1].permute(2, 1, 0)
            tp = torch.fft.ifft(spec, dim=-1)  # [Dc, R, n_phi] band-limited templates
            nf = torch.fft.rfft(tp.real**2 + tp.imag**2, dim=-1)[..., even]  # (real input)
            tnorm[..., s : s + bs.shape[0]] = nf.permute(2, 1, 0)
        return tcross, tnorm

    def _ring_inv_var(self, sigma2: torch.Tensor | float, b: int) -> torch.Tensor:
        n = self.box
        s2 = torch.as_tensor(sigma2, dtype=self.dtype, device=self.device)
        if s2.ndim == 0:
            s2 = s2.expand(1, n // 2 + 1)
        elif s2.ndim == 1:
            s2 = s2[None]
        return 1.0 / (s2.expand(b, -1)[:, self._ring_shell] * float(n * n))
