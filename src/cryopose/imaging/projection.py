"""Projection of a volume along a pose by central-slice extraction, and its exact adjoint.

Convention (``docs/conventions.md``): with a cryopose rotation ``R`` (``= A.T``, ``A`` RELION's
Euler matrix), the projection image is ``image(x, y) = sum_z V(R (x, y, z)^T)`` with ``x, y, z``
pixel coordinates relative to the box centre ``N // 2``; its centred 2D DFT samples the
volume's centred 3D DFT at ``R (kx, ky, 0)^T`` (central-slice theorem). Images are in *voxel
sum* units: a projection at ``R = I`` of a smooth volume equals ``volume.sum(dim=0)`` (multiply
by the pixel size for the physical line integral in Angstrom).

Method (RELION-style Fourier-space projection): the volume is zero-padded to
``M = round(pad_factor * N)`` (centre kept at ``M // 2``), divided by the trilinear kernel's
real-space footprint ``sinc^2`` per axis (gridding correction), Fourier transformed once
(:class:`Projector`), and each slice is sampled by trilinear interpolation at the frequencies
of the final ``N``-pixel box, inside the disk ``|k| < N / 2`` (beyond it the slice is zero).

Why not torch-fourier-slice's extraction: version 0.6 casts rotation matrices to float32,
rejects complex128 volumes (no float64), assumes an even padded size (odd boxes come out
half a pixel off in Fourier space), subtracts a border mean (an affine, not linear, operator)
and its ``insert_central_slices_rfft_3d`` is not the adjoint of its extraction. We therefore
sample with ``torch.nn.functional.grid_sample`` and obtain the adjoint by automatic
differentiation of the same linear code path, so ``<P v, u> = <v, P^T u>`` holds to rounding.
``tests/test_imaging_projection.py`` pins torch-fourier-slice's rotation convention as equal to
ours (its ``project_3d_to_2d`` agrees with :func:`project` for even boxes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cryopose.imaging.fft import fftn_centred, irfft2_centred
from cryopose.runtime import numba_ready

__all__ = ["Projector", "project", "backproject", "backproject_slices"]

# Interpolated points per grid_sample call (bounds the temporary memory to ~100 MB).
_MAX_POINTS_PER_CHUNK = 1 << 21
#: Points per pass of :meth:`Projector.sample_with_gradient_ri` (its temporaries, ~0.5 MB each,
#: stay in the L2/L3 cache: 1.5x faster than 2^19 on 2 cores).
_GATHER_CHUNK = 1 << 16


def _check_volume(volume: torch.Tensor) -> int:
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"volume: expected a torch.Tensor, got {type(volume).__name__}")
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(
            f"volume: expected a cubic [N, N, N] tensor, got shape {tuple(volume.shape)}"
        )
    if not volume.is_floating_point():
        raise ValueError(f"volume: expected float32 or float64, got {volume.dtype}")
    return int(volume.shape[0])


def _check_rotations(rotations: torch.Tensor) -> None:
    if rotations.ndim < 2 or rotations.shape[-2:] != (3, 3):
        raise ValueError(
            f"rotations: expected [..., 3, 3] rotation matrices, got shape {tuple(rotations.shape)}"
        )


def _bilinear(
    corners: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, gradient: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Bilinear value and its x / y derivatives (per grid step) from corners ``[4, 2, P]``
    ordered ``(y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)``, fractions ``[P]`` (the
    derivatives are None unless ``gradient``). ``lerp`` keeps each step one pass."""
    a, b, c, d = corners.unbind(0)
    low = torch.lerp(a, b, fx)
    high = torch.lerp(c, d, fx)
    value = torch.lerp(low, high, fy)
    if not gradient:
        return value, None, None
    return value, torch.lerp(b - a, d - c, fy), high - low


def _sinc2_correction(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``prod_axis sinc^2((i - size // 2) / size)``: the trilinear kernel's footprint."""
    x = (torch.arange(size, dtype=dtype, device=device) - size // 2) / size
    s2 = torch.sinc(x) ** 2
    return s2[:, None, None] * s2[None, :, None] * s2[None, None, :]


class Projector:
    """A volume's padded, gridding-corrected 3D Fourier transform, ready for slicing.

    Parameters
    ----------
    volume : torch.Tensor
        ``[N, N, N]`` real volume indexed ``[z, y, x]``, float32 or float64, on any device. Its
        values should fall to ~0 at the box edge (no border-mean subtraction is done).
    pad_factor : float
        The volume is zero-padded to ``M = round(pad_factor * N)`` voxels before the FFT
        (2 is RELION's default and gives ~1e-3 relative error on smooth maps).
    gridding_correction : bool
        Divide the padded volume by the trilinear kernel's ``sinc^2`` footprint before the FFT.

    Attributes
    ----------
    box : int
        N, the image side in pixels.
    padded_box : int
        M.
    """

    def __init__(
        self, volume: torch.Tensor, pad_factor: float = 2.0, gridding_correction: bool = True
    ) -> None:
        box = _check_volume(volume)
        if not pad_factor >= 1.0:
            raise ValueError(f"pad_factor: expected >= 1, got {pad_factor}")
        padded_box = max(box, int(round(pad_factor * box)))
        self.box = box
        self.padded_box = padded_box
        self.pad_factor = pad_factor
        self.gridding_correction = gridding_correction
        self.dtype = volume.dtype
        self.device = volume.device

        before = padded_box // 2 - box // 2
        after = padded_box - box - before
        padded = F.pad(volume, [before, after] * 3)
        if gridding_correction:
            padded = padded / _sinc2_correction(padded_box, volume.dtype, volume.device)
        ft = fftn_centred(padded, ndim=3)
        # grid_sample layout [batch=1, channel=(re, im), D=z, H=y, W=x] with a one-voxel
        # periodic margin on every axis (the DFT is M-periodic): index M (frequency M - M // 2,
        # i.e. -M // 2) above and index -1 below, so a point between the last frequency and the
        # next interpolates with its true neighbour instead of zero. Index i of this grid is
        # frequency i - 1 - M // 2; the margin is reached from |q| > M // 2 - 1 (even M) or
        # |q| > (M - 1) / 2 (odd M: on both sides), still inside the slice disk |q| < M / 2.
        ft_ri = torch.view_as_real(ft).permute(3, 0, 1, 2).unsqueeze(0)
        self._ft_ri = F.pad(ft_ri, (1, 1, 1, 1, 1, 1), mode="circular").contiguous()

        # Half-plane (centred rfft) sample grid of the N-pixel image, inside |k| < N / 2.
        ky = torch.arange(box, dtype=volume.dtype, device=volume.device) - box // 2
        kx = torch.arange(box // 2 + 1, dtype=volume.dtype, device=volume.device)
        gy, gx = torch.meshgrid(ky, kx, indexing="ij")
        self._mask = gx**2 + gy**2 < (box / 2) ** 2
        self._kx = gx[self._mask]
        self._ky = gy[self._mask]
        self._block_ri: torch.Tensor | None = None
        self._half_ri: tuple[torch.Tensor, int] | None = None

    def grid_coordinates(self, q: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` coordinates (``align_corners=True``) in ``_ft_ri`` of frequencies
        ``q`` ``[..., 3]`` (x, y, z) in Fourier pixels of the N box."""
        m = self.padded_box
        return (q * (m / self.box) + (m // 2 + 1)) * (2.0 / (m + 1)) - 1.0

    def _block_table(self) -> torch.Tensor:
        """``[(M + 2)^3, 8]`` block table: row ``[z, y, x]`` holds (re, im) of ``V`` at the
        four corners ``(y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)`` of plane ``z`` of the
        padded grid with the periodic one-voxel margin of ``_ft_ri``. Two row gathers (planes
        ``z`` and ``z + 1``) give all 8 trilinear corners of a point: 64 bytes instead of 8
        scattered reads (the gather is memory-latency bound; same size as a value-and-gradient
        table)."""
        if self._block_ri is None:
            m = self.padded_box
            side = m + 2
            values = self._ft_ri[0].permute(1, 2, 3, 0)  # [z, y, x, (re, im)], with margins
            table = torch.zeros(side, side, side, 4, 2, dtype=self.dtype, device=self.device)
            table[:, :, :, 0] = values
            table[:, :, :-1, 1] = values[:, :, 1:]
            table[:, :-1, :, 2] = values[:, 1:]
            table[:, :-1, :-1, 3] = values[:, 1:, 1:]
            self._block_ri = table.reshape(-1, 8)
        return self._block_ri

    def half_values(self) -> tuple[torch.Tensor, int]:
        """The padded transform's non-negative-``z`` half, for fused CPU kernels.

        Returns
        -------
        values : torch.Tensor
            ``[M + 1 - M // 2, M + 2, M + 2, 2]`` (re, im) of the margin-padded grid of
            :meth:`_block_table` (index ``i`` is frequency ``i - 1 - M // 2`` padded pixels,
            periodic margins), planes ``z >= M // 2 + 1`` (``q_z >= 0``) only: 4x
            smaller than the block table, so a slice gather stays in the CPU cache. A point
            with ``q_z < 0`` reads ``V(q) = conj(V(-q))`` (the volume is real); trilinear
            weights are symmetric under ``q -> -q``, so that is exactly the full-grid value.
        z0 : int
            Margin-grid index of the first plane (the ``q_z = 0`` plane).
        """
        if self._half_ri is None:
            z0 = self.padded_box // 2 + 1
            # corner 0 of the block table's rows, read from the margin grid itself (the block
            # table, 8x the grid, is never built on this path: 4.3 GB for a 256-px box)
            values = self._ft_ri[0].permute(1, 2, 3, 0)  # [z, y, x, (re, im)], with margins
            self._half_ri = (values[z0:].contiguous(), z0)
        return self._half_ri

    def sample_with_gradient(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The volume's transform and its gradient at arbitrary frequencies.

        Parameters
        ----------
        points : torch.Tensor
            ``[..., 3]`` frequencies ``q = (q_x, q_y, q_z)`` in Fourier pixels of the N box (the
            slice of pose ``R`` samples ``q = R (k_x, k_y, 0)``).

        Returns
        -------
        values : torch.Tensor
            ``[...]`` complex ``V(q)``, trilinearly interpolated (as in :meth:`slices`).
        gradient : torch.Tensor
            ``[..., 3]`` complex ``dV/dq`` per Fourier pixel of the N box: the exact derivative
            of the trilinear interpolant (piecewise bilinear in the other two coordinates),
            so it is the gradient of the values returned, not an interpolated derivative.
        """
        shape = points.shape[:-1]
        v = self.sample_with_gradient_ri(points).reshape(4, 2, -1)
        c = torch.complex(v[:, 0], v[:, 1])  # [4, P]
        return c[0].reshape(shape), c[1:].T.reshape(*shape, 3)

    def sample_with_gradient_ri(self, points: torch.Tensor) -> torch.Tensor:
        """:meth:`sample_with_gradient` as one real tensor ``[4, 2, ...]``: (value, d/dq_x,
        d/dq_y, d/dq_z) x (real, imaginary) at ``points`` ``[..., 3]``.

        Trilinear interpolation of the M-periodic grid (as :meth:`slices`, which uses
        ``grid_sample``, wherever ``|q| < M // 2`` padded pixels; 0 beyond the one-voxel
        margin) from the block table of :meth:`_block_table`, two row gathers per point.
        """
        return self._sample_block(points, gradient=True)

    def sample_ri(self, points: torch.Tensor) -> torch.Tensor:
        """The interpolated transform alone, ``[2, ...]`` (real, imaginary) at ``points``
        ``[..., 3]`` (Fourier pixels of the N box): the values of :meth:`sample_with_gradient`
        and of :meth:`slices` (to rounding). On the CPU with numba (:func:`cryopose.runtime.
        numba_ready`) a fused kernel reads the Hermitian half table of :meth:`half_values`
        (cache-resident: ~5x faster); elsewhere the block table of :meth:`_block_table` (faster
        than ``grid_sample``). Not differentiable (use :meth:`slices` for autograd)."""
        if self.device.type == "cpu" and numba_ready():
            return self._sample_numba(points)
        return self._sample_block(points, gradient=False)

    def slice_values(self, rotations: torch.Tensor, kx: torch.Tensor,
                     ky: torch.Tensor) -> torch.Tensor:
        """Central-slice values at chosen in-plane frequencies.

        Parameters
        ----------
        rotations : torch.Tensor
            ``[..., 3, 3]`` cryopose rotation matrices ``R``.
        kx, ky : torch.Tensor
            ``[P]`` in-plane frequencies in Fourier pixels of the N box.

        Returns
        -------
        torch.Tensor
            ``[..., P]`` complex ``V(R (kx, ky, 0))``: the values of :meth:`sample_ri` at
            those points (so :meth:`slices` where ``(kx, ky)`` are its grid points). On the
            CPU with numba one fused pass per rotation (the points are never stored).
        """
        _check_rotations(rotations)
        batch = rotations.shape[:-2]
        rot = rotations.to(dtype=self.dtype, device=self.device).reshape(-1, 3, 3)
        kx = kx.to(dtype=self.dtype, device=self.device).reshape(-1)
        ky = ky.to(dtype=self.dtype, device=self.device).reshape(-1)
        if self.device.type == "cpu" and numba_ready():
            from cryopose.imaging._gather_numba import sample_slices

            values, _ = self.half_values()
            out = torch.empty(rot.shape[0], kx.shape[0], 2, dtype=self.dtype)
            if out.numel():
                m = self.padded_box
                sample_slices(values.numpy(), float(m // 2 + 1), float(m / self.box),
                              rot.contiguous().numpy(), kx.contiguous().numpy(),
                              ky.contiguous().numpy(), out.numpy())
            return torch.view_as_complex(out).reshape(*batch, kx.shape[0])
        q = rot[:, None, :, 0] * kx[:, None] + rot[:, None, :, 1] * ky[:, None]
        v = self._sample_block(q, gradient=False)
        return torch.complex(v[0], v[1]).reshape(*batch, kx.shape[0])

    def _sample_numba(self, points: torch.Tensor) -> torch.Tensor:
        """:meth:`sample_ri` by the numba kernel on the Hermitian half table (CPU)."""
        from cryopose.imaging._gather_numba import sample_half

        values, _ = self.half_values()
        shape = points.shape[:-1]
        flat = points.to(self.dtype).reshape(-1, 3).contiguous()
        out = torch.empty(2, flat.shape[0], dtype=self.dtype)
        if flat.shape[0]:
            m = self.padded_box
            sample_half(values.numpy(), float(m // 2 + 1), float(m / self.box), flat.numpy(),
                        out.numpy())
        return out.reshape(2, *shape)

    def _sample_block(self, points: torch.Tensor, gradient: bool) -> torch.Tensor:
        table = self._block_table()
        m = self.padded_box
        side = m + 2
        scale = m / self.box
        shape = points.shape[:-1]
        index = points.to(self.dtype).reshape(-1, 3) * scale + (m // 2 + 1)
        n = index.shape[0]
        n_out = 4 if gradient else 1
        out = torch.empty(n_out, 2, n, dtype=self.dtype, device=self.device)
        chunk = _GATHER_CHUNK  # the ~40 elementwise passes below stay in cache
        for s in range(0, n, chunk):
            idx = index[s : s + chunk]
            # points farther out than the margin get value and gradient 0
            low, high = torch.aminmax(idx)
            outside = ((idx < 0) | (idx > m + 1)).any(-1) if (low < 0 or high > m + 1) else None
            base = torch.floor(idx).clamp_(0, side - 2)
            frac = (idx - base).clamp_(0.0, 1.0).T.contiguous()  # [3, k]
            b = base.to(torch.int64)
            flat = (b[:, 2] * side + b[:, 1]) * side + b[:, 0]
            # corners as contiguous [4, 2, k] rows (elementwise work on unit-stride vectors)
            lower = table.index_select(0, flat).T.reshape(4, 2, -1)
            upper = table.index_select(0, flat + side * side).T.reshape(4, 2, -1)
            fx, fy, fz = frac[0], frac[1], frac[2]
            v0, dx0, dy0 = _bilinear(lower, fx, fy, gradient)
            v1, dx1, dy1 = _bilinear(upper, fx, fy, gradient)
            part = out[:, :, s : s + chunk]
            torch.lerp(v0, v1, fz, out=part[0])
            if gradient:
                torch.lerp(dx0, dx1, fz, out=part[1])
                torch.lerp(dy0, dy1, fz, out=part[2])
                torch.sub(v1, v0, out=part[3])
                part[1:].mul_(scale)
            if outside is not None:
                out[..., s : s + chunk].masked_fill_(outside, 0.0)
        return out.reshape(n_out, 2, *shape) if gradient else out.reshape(2, *shape)

    def slices(self, rotations: torch.Tensor) -> torch.Tensor:
        """Central slices: the centred rfft of the projection images.

        Parameters
        ----------
        rotations : torch.Tensor
            ``[..., 3, 3]`` cryopose rotation matrices ``R``.

        Returns
        -------
        torch.Tensor
            ``[..., N, N // 2 + 1]`` complex, in the layout of
            :func:`cryopose.imaging.fft.rfft2_centred` (rows ``ky`` centred at ``N // 2``,
            columns ``kx = 0 .. N // 2``, phase origin at the image centre), equal to
            ``rfft2_centred(self.images(rotations))``; zero outside ``|k| < N / 2``.
        """
        _check_rotations(rotations)
        batch_shape = rotations.shape[:-2]
        rot = rotations.to(dtype=self.dtype, device=self.device).reshape(-1, 3, 3)
        n_rot = rot.shape[0]
        n_points = self._kx.numel()
        chunk = max(1, _MAX_POINTS_PER_CHUNK // max(n_points, 1))
        values = []
        for start in range(0, n_rot, chunk):
            r = rot[start : start + chunk]
            # (x, y, z) of R (kx, ky, 0)^T in padded-grid Fourier pixels.
            q = (
                r[:, None, :, 0] * self._kx[None, :, None]
                + r[:, None, :, 1] * self._ky[None, :, None]
            )
            grid = self.grid_coordinates(q)
            sampled = F.grid_sample(
                self._ft_ri,
                grid.reshape(1, 1, 1, -1, 3),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )[0, :, 0, 0, :]
            values.append(torch.complex(sampled[0], sampled[1]).reshape(r.shape[0], n_points))
        vals = torch.cat(values, dim=0) if values else self._ft_ri.new_zeros(0, n_points)
        out_dtype = torch.complex128 if self.dtype == torch.float64 else torch.complex64
        out = torch.zeros(
            (n_rot, self.box, self.box // 2 + 1), dtype=out_dtype, device=self.device
        )
        out = out.masked_scatter(self._mask.expand_as(out), vals.to(out_dtype))
        return out.reshape(*batch_shape, self.box, self.box // 2 + 1)

    def images(self, rotations: torch.Tensor) -> torch.Tensor:
        """Real-space projections ``[..., N, N]`` (voxel-sum units) for ``[..., 3, 3]`` poses."""
        return irfft2_centred(self.slices(rotations), self.box)


def project(
    volume: torch.Tensor | Projector,
    rotations: torch.Tensor,
    pad_factor: float = 2.0,
    gridding_correction: bool = True,
) -> torch.Tensor:
    """Project a volume along cryopose rotations.

    Parameters
    ----------
    volume : torch.Tensor or Projector
        ``[N, N, N]`` volume ``[z, y, x]`` or a precomputed :class:`Projector` (then the
        other keyword arguments are ignored).
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose matrices ``R = A.T``.
    pad_factor, gridding_correction
        See :class:`Projector`.

    Returns
    -------
    torch.Tensor
        ``[..., N, N]`` images ``image(x, y) = sum_z V(R (x, y, z)^T)`` (voxel-sum units).
    """
    if not isinstance(volume, Projector):
        volume = Projector(volume, pad_factor=pad_factor, gridding_correction=gridding_correction)
    return volume.images(rotations)


def _adjoint(
    forward: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    box: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``P^T data`` for the linear map ``forward`` (real volume -> real or complex data)."""
    v0 = torch.zeros((box, box, box), dtype=dtype, device=data.device, requires_grad=True)
    with torch.enable_grad():
        y = forward(v0)
        if torch.is_complex(y):
            inner = (torch.conj(data.to(y.dtype)) * y).real.sum()
        else:
            inner = (data.to(y.dtype) * y).sum()
        (grad,) = torch.autograd.grad(inner, v0)
    return grad


def backproject(
    images: torch.Tensor,
    rotations: torch.Tensor,
    pad_factor: float = 2.0,
    gridding_correction: bool = True,
) -> torch.Tensor:
    """Exact adjoint of :func:`project`: sum of back-projected images.

    Returns ``P^T u`` with ``<P v, u> = <v, P^T u>`` for the real Euclidean inner products
    (sum over all voxels, resp. all pixels of all images), where ``P`` is :func:`project` with
    the same ``pad_factor`` and ``gridding_correction``. It is *not* a reconstruction (no
    Fourier-space weighting / CTF correction).

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` real images.
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose rotations with the same leading shape as ``images``.
    pad_factor, gridding_correction
        See :class:`Projector`.

    Returns
    -------
    torch.Tensor
        ``[N, N, N]`` volume ``[z, y, x]`` with the images' dtype and device.
    """
    _check_rotations(rotations)
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected [..., N, N], got shape {tuple(images.shape)}")
    if images.shape[:-2] != rotations.shape[:-2]:
        raise ValueError(
            f"images: leading shape {tuple(images.shape[:-2])} does not match rotations "
            f"{tuple(rotations.shape[:-2])}"
        )
    box = int(images.shape[-1])
    dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()

    def forward(v: torch.Tensor) -> torch.Tensor:
        return Projector(v, pad_factor, gridding_correction).images(rotations)

    return _adjoint(forward, images, box, dtype)


def backproject_slices(
    slices: torch.Tensor,
    rotations: torch.Tensor,
    box: int,
    pad_factor: float = 2.0,
    gridding_correction: bool = True,
) -> torch.Tensor:
    """Exact adjoint of :meth:`Projector.slices` (volume -> centred-rfft central slices).

    The inner product on the slice side is ``Re sum conj(a) b`` over the stored half-plane
    entries ``[..., N, N // 2 + 1]`` (each entry counted once, not Hermitian-weighted).

    Parameters
    ----------
    slices : torch.Tensor
        ``[..., N, N // 2 + 1]`` complex centred-rfft data.
    rotations : torch.Tensor
        ``[..., 3, 3]`` cryopose rotations, same leading shape.
    box : int
        N.
    pad_factor, gridding_correction
        See :class:`Projector`.

    Returns
    -------
    torch.Tensor
        ``[N, N, N]`` real volume.
    """
    _check_rotations(rotations)
    if slices.shape[-2:] != (box, box // 2 + 1):
        raise ValueError(
            f"slices: expected [..., {box}, {box // 2 + 1}] for box {box}, "
            f"got {tuple(slices.shape)}"
        )
    dtype = torch.float64 if slices.dtype == torch.complex128 else torch.float32

    def forward(v: torch.Tensor) -> torch.Tensor:
        return Projector(v, pad_factor, gridding_correction).slices(rotations)

    return _adjoint(forward, slices, box, dtype)
