"""Fourier shell correlation (FSC) between two maps and the resolution where it crosses a level.

Shells are indexed by the radius of the centred 3D frequency in Fourier pixels of the ``N``-voxel
box, rounded to the nearest integer: shell ``s`` holds ``s - 0.5 <= |k| < s + 0.5`` and has
spatial frequency ``s / (N * pixel_size)`` (1/Angstrom), for ``s = 0 .. N // 2``. Then

``FSC(s) = Re sum F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2)``

(``0`` where a shell has no power in one map). The resolution at a threshold ``t`` is ``1 / f``
with ``f`` the frequency where the curve first falls below ``t`` (searched from shell 1 on),
linearly interpolated between the last shell at or above ``t`` and the first below it; when the
curve never falls below ``t`` the resolution is that of the last shell (Nyquist for even boxes).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cryopose.io.files import publish, temp_path

__all__ = [
    "FSCResult",
    "shell_index",
    "fourier_shell_correlation",
    "resolution_at",
    "fsc",
    "write_fsc_csv",
    "plot_fsc",
]


@dataclass
class FSCResult:
    """An FSC curve and its 0.143 and 0.5 resolutions.

    Attributes
    ----------
    frequency_per_angstrom : torch.Tensor
        ``[N // 2 + 1]`` shell frequencies in 1/Angstrom (float64, CPU).
    fsc : torch.Tensor
        ``[N // 2 + 1]`` correlations (float64, CPU).
    resolution_0143_angstrom, resolution_05_angstrom : float
        Resolutions (Angstrom) at the 0.143 and 0.5 crossings.
    pixel_size_angstrom : float
        Voxel size used.
    """

    frequency_per_angstrom: torch.Tensor
    fsc: torch.Tensor
    resolution_0143_angstrom: float
    resolution_05_angstrom: float
    pixel_size_angstrom: float

    def curve(self) -> list[dict[str, float]]:
        """Rows ``{shell, frequency_per_angstrom, resolution_angstrom, fsc}`` (JSON-ready)."""
        rows = []
        pairs = zip(self.frequency_per_angstrom.tolist(), self.fsc.tolist(), strict=True)
        for s, (f, c) in enumerate(pairs):
            rows.append(
                {
                    "shell": s,
                    "frequency_per_angstrom": f,
                    "resolution_angstrom": (1.0 / f) if f > 0 else math.inf,
                    "fsc": c,
                }
            )
        return rows

    def summary(self) -> dict:
        """``{resolution_0143_angstrom, resolution_05_angstrom, curve}`` for ``--json``."""
        curve = [
            {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
            for row in self.curve()
        ]
        return {
            "resolution_0143_angstrom": self.resolution_0143_angstrom,
            "resolution_05_angstrom": self.resolution_05_angstrom,
            "pixel_size_angstrom": self.pixel_size_angstrom,
            "curve": curve,
        }


def shell_index(
    shape: tuple[int, int, int],
    *,
    rfft: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer shell ``round(|k|)`` (Fourier pixels) of every voxel of a 3D DFT.

    Parameters
    ----------
    shape : tuple of int
        ``(N, N, N)`` real-space shape.
    rfft : bool
        Layout of ``torch.fft.rfftn`` (True, ``[N, N, N // 2 + 1]``, uncentred) or of
        :func:`cryopose.imaging.fft.fftn_centred` (False, ``[N, N, N]``, centred).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    torch.Tensor
        int64 shell indices.
    """
    n = shape[-1]
    if rfft:
        f = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)
        fx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)
        r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2
    else:
        f = torch.arange(n, dtype=torch.float64, device=device) - n // 2
        r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    return torch.round(torch.sqrt(r2)).to(torch.int64)


def _check_maps(map1: torch.Tensor, map2: torch.Tensor) -> int:
    for name, m in (("map1", map1), ("map2", map2)):
        if not isinstance(m, torch.Tensor) or m.ndim != 3 or len(set(m.shape)) != 1:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name}: expected a cubic [N, N, N] tensor, got {shape}")
    if map1.shape != map2.shape:
        raise ValueError(
            f"map2: shape {tuple(map2.shape)} differs from map1 {tuple(map1.shape)}; expected equal"
        )
    return int(map1.shape[0])


def fourier_shell_correlation(
    map1: torch.Tensor, map2: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """FSC per shell ``s = 0 .. N // 2`` between two ``[N, N, N]`` real maps.

    Parameters
    ----------
    map1, map2 : torch.Tensor
        Real maps ``[z, y, x]``, same shape, any device, float32 or float64.
    mask : torch.Tensor, optional
        ``[N, N, N]`` (soft) mask multiplied into both maps before the transform.

    Returns
    -------
    torch.Tensor
        ``[N // 2 + 1]`` FSC values (float64, on the maps' device).
    """
    n = _check_maps(map1, map2)
    a = map1.to(torch.float64)
    b = map2.to(device=a.device, dtype=torch.float64)
    if mask is not None:
        if tuple(mask.shape) != tuple(a.shape):
            raise ValueError(
                f"mask: shape {tuple(mask.shape)} differs from the maps {tuple(a.shape)}"
            )
        m = mask.to(device=a.device, dtype=torch.float64)
        a, b = a * m, b * m
    fa = torch.fft.rfftn(a)
    fb = torch.fft.rfftn(b)
    shells = shell_index(a.shape, rfft=True, device=a.device).reshape(-1)
    # rfft stores the half space: weight 2 for the columns whose mirror is not stored.
    weight = torch.full(fa.shape, 2.0, dtype=torch.float64, device=a.device)
    weight[..., 0] = 1.0
    if n % 2 == 0:
        weight[..., -1] = 1.0
    weight = weight.reshape(-1)
    keep = shells <= n // 2
    shells, weight = shells[keep], weight[keep]
    fa, fb = fa.reshape(-1)[keep], fb.reshape(-1)[keep]
    n_shells = n // 2 + 1
    cross = torch.zeros(n_shells, dtype=torch.float64, device=a.device)
    pa = torch.zeros_like(cross)
    pb = torch.zeros_like(cross)
    cross.index_add_(0, shells, weight * (fa * fb.conj()).real)
    pa.index_add_(0, shells, weight * fa.abs() ** 2)
    pb.index_add_(0, shells, weight * fb.abs() ** 2)
    denom = torch.sqrt(pa * pb)
    tiny = torch.finfo(torch.float64).tiny
    return torch.where(denom > tiny, cross / denom.clamp_min(tiny), torch.zeros_like(cross))


def resolution_at(
    fsc_curve: torch.Tensor, threshold: float, box: int, pixel_size_angstrom: float
) -> float:
    """Resolution (Angstrom) where ``fsc_curve`` first falls below ``threshold``.

    Linear interpolation in frequency between the last shell at or above the threshold and the
    first shell below it (shells from 1 on; shell 0 is ignored). If it never falls below, the
    last shell's resolution ``N * pixel_size / (N // 2)`` is returned.
    """
    values = fsc_curve.detach().to("cpu", torch.float64).tolist()
    last = len(values) - 1
    crossing = float(last)
    for s in range(1, len(values)):
        if values[s] < threshold:
            before = values[s - 1]
            frac = (before - threshold) / (before - values[s]) if before > values[s] else 0.0
            crossing = (s - 1) + min(max(frac, 0.0), 1.0)
            break
    if crossing <= 0:
        return math.inf
    return box * pixel_size_angstrom / crossing


def fsc(
    map1: torch.Tensor,
    map2: torch.Tensor,
    pixel_size_angstrom: float,
    mask: torch.Tensor | None = None,
) -> FSCResult:
    """FSC curve and resolutions at 0.143 and 0.5 between two maps.

    Parameters
    ----------
    map1, map2 : torch.Tensor
        ``[N, N, N]`` real maps.
    pixel_size_angstrom : float
        Voxel size in Angstrom.
    mask : torch.Tensor, optional
        Soft mask applied to both maps.

    Returns
    -------
    FSCResult
    """
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom: expected > 0, got {pixel_size_angstrom}")
    curve = fourier_shell_correlation(map1, map2, mask).cpu()
    n = int(map1.shape[0])
    freq = torch.arange(n // 2 + 1, dtype=torch.float64) / (n * pixel_size_angstrom)
    return FSCResult(
        frequency_per_angstrom=freq,
        fsc=curve,
        resolution_0143_angstrom=resolution_at(curve, 0.143, n, pixel_size_angstrom),
        resolution_05_angstrom=resolution_at(curve, 0.5, n, pixel_size_angstrom),
        pixel_size_angstrom=float(pixel_size_angstrom),
    )


def write_fsc_csv(result: FSCResult, path: str | Path) -> None:
    """Write the curve as CSV (``shell,frequency_per_angstrom,resolution_angstrom,fsc``),
    atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["shell", "frequency_per_angstrom", "resolution_angstrom", "fsc"])
            for row in result.curve():
                writer.writerow(
                    [
                        row["shell"],
                        f"{row['frequency_per_angstrom']:.8g}",
                        f"{row['resolution_angstrom']:.6g}",
                        f"{row['fsc']:.8f}",
                    ]
                )
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_fsc(result: FSCResult, path: str | Path, title: str | None = None) -> None:
    """Save the FSC curve with the 0.143 and 0.5 thresholds as an image (PNG), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.0, 3.5), dpi=120)
    ax.plot(result.frequency_per_angstrom.numpy(), result.fsc.numpy(), color="C0", lw=1.5)
    for t, style in ((0.143, ":"), (0.5, "--")):
        ax.axhline(t, color="grey", ls=style, lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(
        title
        or f"FSC 0.143: {result.resolution_0143_angstrom:.2f} Å, "
        f"0.5: {result.resolution_05_angstrom:.2f} Å",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = temp_path(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
