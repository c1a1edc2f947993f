"""Values of a real image's 2D DFT at off-grid frequencies (polar rings, rotated grids).

:class:`PlaneSampler` zero pads each image to ``M = 2N`` pixels, divides it by the bilinear
kernel's footprint ``sinc^2(x / M) sinc^2(y / M)`` (the gridding correction: bilinear
interpolation of the padded transform then reproduces the unpadded band-limited transform to
second order), takes the half-plane transform ``rfft2`` and reads it bilinearly. The padded
transform is periodic in both frequencies, so a point near the Nyquist row reads the wrapped
row, and a point with ``kx < 0`` reads the mirrored point ``-k`` and conjugates
(``F(-k) = conj F(k)`` for a real image). Sampling ``k`` and ``-k`` therefore gives exactly
conjugate values: a ring sampled at an even number of angles needs its first half only
(``paired=True``).

On the CPU with numba (:func:`cryopose.runtime.numba_ready`) the reads run in a fused kernel
over precomputed cells; elsewhere ``torch.nn.functional.grid_sample`` does them (the same
values to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryopose.runtime import numba_ready

__all__ = ["PlaneSampler"]


class PlaneSampler:
    """Bilinear samples of the (2x padded, gridding-corrected) DFT of real ``N x N`` images.

    Parameters
    ----------
    box : int
        Image side ``N`` in pixels (even or odd).
    kx, ky : torch.Tensor
        ``[R, Q]`` frequencies in Fourier pixels of the ``N`` box (cycles per box), each
        coordinate within ``[-N / 2, N / 2]``.
    device : torch.device or str, optional
        Where the samples are computed (default: that of ``kx``).

    Notes
    -----
    Frequencies follow :func:`cryopose.imaging.rfft2_centred`: the phase origin is pixel
    ``(N // 2, N // 2)`` and ``F(k) = sum_x f(x) exp(-2 pi i k . x / N)``.
    """

    def __init__(
        self,
        box: int,
        kx: torch.Tensor,
        ky: torch.Tensor,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if kx.shape != ky.shape or kx.ndim != 2:
            raise ValueError(f"kx, ky: expected equal [R, Q] shapes, got {tuple(kx.shape)} and "
                             f"{tuple(ky.shape)}")
        limit = box / 2 + 1e-4
        if bool((kx.abs() > limit).any()) or bool((ky.abs() > limit).any()):
            raise ValueError(f"kx, ky: frequencies beyond the Nyquist limit {box / 2} of a "
                             f"{box}-pixel box")
        self.box = box
        self.pad = 2 * box
        self.device = torch.device(device) if device is not None else kx.device
        m = self.pad
        x = 2.0 * kx.to(self.device, torch.float64)
        y = 2.0 * ky.to(self.device, torch.float64)
        mirror = x < 0
        x = torch.where(mirror, -x, x)
        y = torch.where(mirror, -y, y)
        col = torch.floor(x).clamp(max=box - 1)  # table columns 0 .. N (= M / 2)
        row = torch.floor(y)
        self._col = col.long()
        self._row0 = torch.remainder(row, m).long()
        self._row1 = torch.remainder(row + 1, m).long()
        self._fx = x - col
        self._fy = y - row
        self._sign = torch.where(mirror, -1.0, 1.0).to(torch.float64)
        self._x, self._y = x, y  # mirrored padded coordinates (torch path)
        # gridding correction on the uncentred N x N image: pixel offsets 0 .. lo-1, -(N//2)..-1
        lo = box - box // 2
        off = torch.arange(box, dtype=torch.float64, device=self.device)
        off = torch.where(off < lo, off, off - box)
        s2 = torch.sinc(off / m) ** 2
        self._inv_footprint = 1.0 / (s2[:, None] * s2[None, :])
        self._cells: dict[torch.dtype, tuple] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, Q)``: the point layout."""
        return tuple(self._col.shape)

    def table(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Padded half-plane transforms of real images given by their centred spectra.

        Parameters
        ----------
        spectrum : torch.Tensor
            ``[B, N, N // 2 + 1]`` complex, the layout of :func:`cryopose.imaging.rfft2_centred`
            (a Hermitian half plane: the images are real).

        Returns
        -------
        torch.Tensor
            ``[B, 2N, N + 1]`` complex: ``rfft2`` of the zero-padded, footprint-corrected
            images with the phase origin at index 0 (rows in torch's native order).
        """
        n, m = self.box, self.pad
        if spectrum.ndim != 3 or spectrum.shape[-2:] != (n, n // 2 + 1):
            raise ValueError(f"spectrum: expected [B, {n}, {n // 2 + 1}] centred half spectra, "
                             f"got {tuple(spectrum.shape)}")
        u = torch.fft.irfft2(torch.fft.ifftshift(spectrum, dim=-2), s=(n, n))  # origin at 0
        u = u * self._inv_footprint.to(u.dtype)
        lo, hi = n - n // 2, n // 2
        padded = u.new_zeros(u.shape[0], m, m)
        padded[:, :lo, :lo] = u[:, :lo, :lo]
        padded[:, :lo, m - hi:] = u[:, :lo, lo:]
        padded[:, m - hi:, :lo] = u[:, lo:, :lo]
        padded[:, m - hi:, m - hi:] = u[:, lo:, lo:]
        return torch.fft.rfft2(padded)

    def _numba_cells(self, dtype: torch.dtype) -> tuple:
        """Flat (re, im) offsets of the cells' row-0 and row-1 corners in a flattened
        ``[2N, N + 1]`` complex table (int32), and ``fx, fy, sign`` in ``dtype``."""
        if dtype not in self._cells:
            width = 2 * (self.box + 1)  # floats per table row
            offsets = [(row * width + 2 * self._col).to(torch.int32).cpu().numpy()
                       for row in (self._row0, self._row1)]
            self._cells[dtype] = tuple(offsets) + tuple(
                t.to(dtype).cpu().numpy() for t in (self._fx, self._fy, self._sign))
        return self._cells[dtype]

    def _flat(self, table: torch.Tensor):
        """``[B, 2N, N + 1]`` complex -> ``[B, 2N (N + 1) 2]`` real numpy view (numba reads it
        at precomputed flat offsets: the callers check the shape first)."""
        return torch.view_as_real(table.contiguous()).reshape(table.shape[0], -1).numpy()

    def _check_table(self, table: torch.Tensor) -> None:
        if table.ndim != 3 or table.shape[-2:] != (self.pad, self.box + 1) or (
            not table.is_complex()
        ):
            raise ValueError(f"table: expected [B, {self.pad}, {self.box + 1}] complex (from "
                             f"PlaneSampler.table), got {tuple(table.shape)} {table.dtype}")

    def _weight(self, weight: torch.Tensor | None, b: int, dtype: torch.dtype) -> torch.Tensor:
        r = self._col.shape[0]
        if weight is None:
            return torch.ones(b, r, dtype=dtype, device=self.device)
        weight = torch.as_tensor(weight, dtype=dtype, device=self.device)
        if weight.shape != (b, r):
            raise ValueError(f"weight: expected [{b}, {r}] (images, point rows), got "
                             f"{tuple(weight.shape)}")
        return weight.contiguous()

    def _grid_sample(self, table: torch.Tensor) -> torch.Tensor:
        """Torch path: complex values at the mirrored points (before the sign)."""
        m = self.pad
        t = torch.fft.fftshift(table, dim=-2)  # row index = ky + M / 2
        t = torch.cat([t, t[:, :1]], dim=-2)  # periodic row M / 2 (= -M / 2)
        ri = torch.view_as_real(t).permute(0, 3, 1, 2)  # [B, 2, M + 1, N + 1]
        width = ri.shape[-1]
        dt = ri.dtype
        gx = (self._x * (2.0 / (width - 1)) - 1.0).to(dt)
        gy = ((self._y + m // 2) * (2.0 / m) - 1.0).to(dt)
        grid = torch.stack([gx, gy], dim=-1)[None].expand(ri.shape[0], -1, -1, -1)
        v = F.grid_sample(ri, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return torch.complex(v[:, 0], v[:, 1] * self._sign.to(dt))

    def sample(
        self, table: torch.Tensor, weight: torch.Tensor | None = None, *, paired: bool = False
    ) -> torch.Tensor:
        """Complex values at the points, optionally with their Friedel mates.

        Parameters
        ----------
        table : torch.Tensor
            ``[B, 2N, N + 1]`` from :meth:`table`.
        weight : torch.Tensor, optional
            ``[B, R]`` real factor per image and point row.
        paired : bool
            Also return the values at ``-k`` (the conjugates) after each row's ``Q`` points.

        Returns
        -------
        torch.Tensor
            ``[B, R, Q]`` complex, or ``[B, R, 2Q]`` with ``paired``.
        """
        self._check_table(table)
        b = table.shape[0]
        real_dtype = table.real.dtype
        w = self._weight(weight, b, real_dtype)
        r, q = self.shape
        if self.device.type == "cpu" and numba_ready():
            from cryopose.imaging._plane_numba import gather_complex

            out = torch.empty(b, r, 2 * q if paired else q, dtype=table.dtype)
            gather_complex(self._flat(table), *self._numba_cells(real_dtype), w.numpy(),
                           torch.view_as_real(out).numpy(), paired)
            return out
        v = self._grid_sample(table) * w[:, :, None]
        return torch.cat([v, v.conj()], dim=-1) if paired else v

    def sample_real(self, table: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Real parts ``[B, R, Q]`` of :meth:`sample` (equal at ``k`` and ``-k``)."""
        self._check_table(table)
        b = table.shape[0]
        real_dtype = table.real.dtype
        w = self._weight(weight, b, real_dtype)
        if self.device.type == "cpu" and numba_ready():
            from cryopose.imaging._plane_numba import gather_real

            cells = self._numba_cells(real_dtype)
            out = torch.empty(b, *self.shape, dtype=real_dtype)
            gather_real(self._flat(table), *cells[:4], w.numpy(), out.numpy())
            return out
        return self._grid_sample(table).real * w[:, :, None]
