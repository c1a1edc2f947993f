"""RELION's contrast transfer function (sign, units and astigmatism convention).

For spatial frequency ``k = (kx, ky)`` in 1/Angstrom, ``phi = atan2(ky, kx)``::

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))           (V in volts, lambda in A)
    defocus(phi) = -[(U + V)/2 + (U - V)/2 cos(2 (phi - alpha))]  (U, V in A, > 0 underfocus)
    chi = pi lambda defocus |k|^2 + pi/2 Cs lambda^3 |k|^4 - phase_shift - atan(w / sqrt(1 - w^2))
    CTF = -sin(chi) exp(-B |k|^2 / 4)

with ``Cs`` in Angstrom (mm * 1e7), ``w`` the amplitude contrast and ``alpha`` the defocus
angle (``rlnDefocusAngle``, degrees from the x axis), so ``CTF(0) = +w`` and the first lobe is
positive for underfocus; defocus ``U`` applies along the direction at angle ``alpha`` from x.

Our own implementation (torch-ctf 0.6 agrees with this formula to ~1e-3 but always returns
float32, so it is not used).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cryopose.imaging.fft import frequency_grid_2d, irfft2_centred, rfft2_centred

__all__ = [
    "ctf_from_params", "ctf_at_frequencies", "electron_wavelength_angstrom", "ctf_2d",
    "apply_ctf"]

_Number = float | torch.Tensor


def electron_wavelength_angstrom(voltage_kv: _Number) -> torch.Tensor | float:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    if isinstance(volts, torch.Tensor):
        return 12.2643247 / torch.sqrt(volts * (1.0 + 0.978466e-6 * volts))
    return 12.2643247 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def _as_tensor(value: _Number, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite values")
    return t


def ctf_2d(
    *,
    defocus_u_angstrom: _Number,
    defocus_v_angstrom: _Number,
    defocus_angle_deg: _Number,
    voltage_kv: _Number,
    cs_mm: _Number,
    amplitude_contrast: _Number,
    pixel_size_angstrom: float,
    box: int,
    phase_shift_deg: _Number = 0.0,
    bfactor: _Number = 0.0,
    rfft: bool = True,
    centred: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION's CTF on the DFT grid of ``box x box`` images, batched over particles.

    Every physical parameter may be a float or a tensor; tensors broadcast against each other
    and give the leading batch shape.

    Parameters
    ----------
    defocus_u_angstrom, defocus_v_angstrom : float or torch.Tensor
        ``rlnDefocusU``/``rlnDefocusV`` in Angstrom (positive = underfocus).
    defocus_angle_deg : float or torch.Tensor
        ``rlnDefocusAngle`` in degrees: direction of ``U`` measured from the x axis
        (counter-clockwise towards +y).
    voltage_kv : float or torch.Tensor
        Acceleration voltage in kV.
    cs_mm : float or torch.Tensor
        Spherical aberration in mm.
    amplitude_contrast : float or torch.Tensor
        Fraction in [0, 1).
    pixel_size_angstrom : float
        Pixel size in Angstrom.
    box : int
        Image side in pixels.
    phase_shift_deg : float or torch.Tensor
        Additional phase shift (phase plate) in degrees.
    bfactor : float or torch.Tensor
        Envelope B-factor in Angstrom^2 (``exp(-B k^2 / 4)``).
    rfft : bool
        Half-plane ``[..., box, box // 2 + 1]`` (True) or full ``[..., box, box]`` layout.
    centred : bool
        Zero frequency at row (and column, full layout) ``box // 2``; matches
        :func:`cryopose.imaging.fft.rfft2_centred`. False gives torch's native order.
    dtype, device
        Output dtype/device; by default those of the first tensor argument, else torch's
        default dtype on CPU.

    Returns
    -------
    torch.Tensor
        ``[..., box, box // 2 + 1]`` (or ``[..., box, box]``) real CTF values.
    """
    params = {
        "defocus_u_angstrom": defocus_u_angstrom,
        "defocus_v_angstrom": defocus_v_angstrom,
        "defocus_angle_deg": defocus_angle_deg,
        "voltage_kv": voltage_kv,
        "cs_mm": cs_mm,
        "amplitude_contrast": amplitude_contrast,
        "phase_shift_deg": phase_shift_deg,
        "bfactor": bfactor,
    }
    tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
    if dtype is None:
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        dtype = floats[0] if floats else torch.get_default_dtype()
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    if not (isinstance(box, int) and box > 0):
        raise ValueError(f"box: expected a positive int, got {box!r}")
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom: expected > 0, got {pixel_size_angstrom}")
    p = {k: _as_tensor(v, k, dtype, device) for k, v in params.items()}
    ky, kx = frequency_grid_2d(
        box, pixel_size_angstrom, rfft=rfft, centred=centred, dtype=torch.float64, device=device
    )
    return _ctf_values(p, kx, ky, dtype)


def _ctf_values(
    p: Mapping[str, torch.Tensor], kx: torch.Tensor, ky: torch.Tensor, dtype: torch.dtype,
    squared: bool = False,
) -> torch.Tensor:
    """The CTF formula (module docstring), once for every caller: parameters ``p`` keyed as
    :func:`ctf_2d`'s arguments (tensors broadcasting to a batch shape ``S``), frequencies
    ``kx, ky`` ``[*K]`` in 1/Angstrom; returns ``[*S, *K]`` in ``dtype``.

    ``chi`` is linear in ``(k^2, kx^2 - ky^2, 2 kx ky, k^4, 1)`` with per-particle coefficients
    (``(U - V)/2 cos(2 (phi - alpha)) k^2 = (U - V)/2 [cos 2 alpha (kx^2 - ky^2) + sin 2 alpha
    2 kx ky]``), computed in float64, so all particles' phases are one ``[S, 5] @ [5, K]``
    product. ``squared``: ``CTF^2`` as ``(1 - cos 2 chi) / 2`` times the squared envelope.
    """
    w = p["amplitude_contrast"]
    if ((w < 0) | (w >= 1)).any():
        raise ValueError("amplitude_contrast: expected values in [0, 1)")
    if (p["voltage_kv"] <= 0).any():
        raise ValueError("voltage_kv: expected > 0")
    q = dict(zip(p, torch.broadcast_tensors(*(v.double() for v in p.values())), strict=True))
    grid_shape = kx.shape
    fx = kx.to(device=w.device, dtype=torch.float64).reshape(-1)
    fy = ky.to(device=w.device, dtype=torch.float64).reshape(-1)
    k2 = fx * fx + fy * fy
    features = torch.stack([k2, fx * fx - fy * fy, 2.0 * fx * fy, k2 * k2, torch.ones_like(k2)])
    lam = electron_wavelength_angstrom(q["voltage_kv"])
    mean = 0.5 * (q["defocus_u_angstrom"] + q["defocus_v_angstrom"])
    half = 0.5 * (q["defocus_u_angstrom"] - q["defocus_v_angstrom"])
    two_alpha = 2.0 * torch.deg2rad(q["defocus_angle_deg"])
    wq = q["amplitude_contrast"]
    coef = torch.stack([
        -math.pi * lam * mean,
        -math.pi * lam * half * torch.cos(two_alpha),
        -math.pi * lam * half * torch.sin(two_alpha),
        (math.pi / 2) * q["cs_mm"] * 1e7 * lam**3,
        -torch.deg2rad(q["phase_shift_deg"]) - torch.atan(wq / torch.sqrt(1 - wq**2)),
    ], dim=-1)  # [*S, 5]
    chi = (coef.to(dtype) @ features.to(dtype))  # [*S, K]
    bfactor = q["bfactor"][..., None]
    if squared:
        out = torch.cos_(chi.mul_(2.0)).sub_(1.0).mul_(-0.5)
        if bool((bfactor != 0).any()):
            out.mul_(torch.exp(-0.5 * bfactor * k2).to(dtype))
    else:
        out = torch.sin_(chi).neg_()
        if bool((bfactor != 0).any()):
            out.mul_(torch.exp(-0.25 * bfactor * k2).to(dtype))
    return out.reshape(*coef.shape[:-1], *grid_shape)


def apply_ctf(images: torch.Tensor, ctf_rfft_centred: torch.Tensor) -> torch.Tensor:
    """Multiply real ``[..., N, N]`` images by a CTF in Fourier space.

    Parameters
    ----------
    images : torch.Tensor
        ``[..., N, N]`` real images.
    ctf_rfft_centred : torch.Tensor
        ``[..., N, N // 2 + 1]`` CTF from :func:`ctf_2d` with ``rfft=True, centred=True``
        (broadcast against the images' batch shape).

    Returns
    -------
    torch.Tensor
        ``[..., N, N]`` real images ``irfft(rfft(images) * ctf)``.
    """
    box = int(images.shape[-1])
    if ctf_rfft_centred.shape[-2:] != (box, box // 2 + 1):
        raise ValueError(
            f"ctf_rfft_centred: expected [..., {box}, {box // 2 + 1}], "
            f"got {tuple(ctf_rfft_centred.shape)}"
        )
    return irfft2_centred(rfft2_centred(images) * ctf_rfft_centred, box)


def ctf_from_params(
    params: Mapping[str, torch.Tensor],
    box: int,
    *,
    pixel_size_angstrom: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION CTFs ``[B, N, N // 2 + 1]`` (centred rfft layout) from per-particle parameters.

    Parameters
    ----------
    params : mapping of str to torch.Tensor
        ``[B]`` tensors keyed as :meth:`cryopose.io.ParticleTable.ctf_params` returns them:
        ``defocus_u_angstrom``, ``defocus_v_angstrom``, ``defocus_angle_deg``, ``voltage_kv``,
        ``spherical_aberration_mm``, ``amplitude_contrast``, ``phase_shift_deg``,
        ``bfactor_angstrom2``, ``scale`` (multiplies the CTF) and ``pixel_size_angstrom``.
    box : int
        Image side N in pixels.
    pixel_size_angstrom : float, optional
        Overrides ``params["pixel_size_angstrom"]`` (which must then be constant).
    dtype, device
        Output dtype and device (default: those of the parameters).
    """
    _check_keys(params, pixel_size_angstrom)
    p = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in params.items()}
    px = _batch_pixel_size(p, pixel_size_angstrom)
    ctf = ctf_2d(
        defocus_u_angstrom=p["defocus_u_angstrom"],
        defocus_v_angstrom=p["defocus_v_angstrom"],
        defocus_angle_deg=p["defocus_angle_deg"],
        voltage_kv=p["voltage_kv"],
        cs_mm=p["spherical_aberration_mm"],
        amplitude_contrast=p["amplitude_contrast"],
        phase_shift_deg=p["phase_shift_deg"],
        bfactor=p["bfactor_angstrom2"],
        pixel_size_angstrom=px,
        box=box,
        dtype=dtype,
        device=device,
    )
    return ctf * p["scale"][..., None, None]


_PARAM_KEYS = ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
               "spherical_aberration_mm", "amplitude_contrast", "phase_shift_deg",
               "bfactor_angstrom2", "scale")


def _check_keys(params: Mapping[str, torch.Tensor], pixel_size_angstrom: float | None) -> None:
    needed = _PARAM_KEYS + (() if pixel_size_angstrom is not None else ("pixel_size_angstrom",))
    missing = [k for k in needed if k not in params]
    if missing:
        raise ValueError(f"params: missing {', '.join(missing)} (the keys of "
                         f"ParticleTable.ctf_params)")


def _batch_pixel_size(p: Mapping[str, torch.Tensor], pixel_size_angstrom: float | None) -> float:
    if pixel_size_angstrom is not None:
        return pixel_size_angstrom
    sizes = p["pixel_size_angstrom"]
    px = float(sizes.reshape(-1)[0])
    if not bool(torch.all(sizes == px)):
        raise ValueError("pixel_size_angstrom: expected one pixel size for the batch")
    return px


def ctf_at_frequencies(
    params: Mapping[str, torch.Tensor],
    kx: torch.Tensor,
    ky: torch.Tensor,
    box: int,
    *,
    pixel_size_angstrom: float | None = None,
    squared: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION CTFs (or their squares) at off-grid frequencies, from per-particle parameters.

    The same function as :func:`ctf_from_params` (module docstring; one implementation,
    ``_ctf_values``), evaluated at any points: all particles' phases are one ``[B, 5] @ [5,
    K]`` product.

    Parameters
    ----------
    params : mapping of str to torch.Tensor
        ``[B]`` tensors keyed as for :func:`ctf_from_params`.
    kx, ky : torch.Tensor
        Frequencies ``[*K]`` in Fourier pixels of a ``box``-pixel image (cycles per box: the
        units of the DFT grid's indices, :func:`cryopose.imaging.rfft2_centred`).
    box : int
        Image side N in pixels (with the pixel size, the Fourier pixel ``1 / (N px)``).
    pixel_size_angstrom : float, optional
        Overrides ``params["pixel_size_angstrom"]`` (which must then be constant).
    squared : bool
        Return ``CTF^2``, computed as ``(1 - cos 2 chi) / 2`` times the squared envelope and
        scale.
    dtype, device
        Output dtype and device (default: those of the parameters).

    Returns
    -------
    torch.Tensor
        ``[B, *K]`` real.
    """
    _check_keys(params, pixel_size_angstrom)
    p = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in params.items()}
    px = _batch_pixel_size(p, pixel_size_angstrom)
    if kx.shape != ky.shape:
        raise ValueError(f"kx, ky: expected equal shapes, got {tuple(kx.shape)} and "
                         f"{tuple(ky.shape)}")
    names = {"spherical_aberration_mm": "cs_mm", "bfactor_angstrom2": "bfactor"}
    core = {names.get(k, k): p[k] for k in _PARAM_KEYS if k != "scale"}
    unit = 1.0 / (box * px)  # 1/Angstrom per Fourier pixel
    real = p["defocus_u_angstrom"].dtype
    out = _ctf_values(core, kx.double() * unit, ky.double() * unit, real, squared=squared)
    scale = p["scale"].to(real)
    if bool((scale != 1).any()):
        out = out * (scale * scale if squared else scale).reshape(
            *scale.shape, *([1] * kx.ndim))
    return out
