"""The cryo-EM forward model: projection, CTF, shifts, noise and filters.

All functions are batched over leading dimensions and work on CPU and CUDA tensors in float32
and float64. Conventions (array centres, rotation ``R = A.T``, RELION's CTF and origins, SNR):
``docs/conventions.md``, section "Imaging".
"""

from cryopose.imaging.ctf import (
    apply_ctf,
    ctf_2d,
    ctf_at_frequencies,
    ctf_from_params,
    electron_wavelength_angstrom,
)
from cryopose.imaging.fft import (
    fft2_centred,
    fftn_centred,
    frequency_grid_2d,
    ifft2_centred,
    ifftn_centred,
    irfft2_centred,
    radial_frequency_2d,
    rfft2_centred,
)
from cryopose.imaging.filters import fourier_crop, low_pass, normalise, soft_circular_mask
from cryopose.imaging.noise import (
    add_noise,
    coloured_noise,
    disk_mask,
    noise_sigma,
    signal_power,
    white_noise,
)
from cryopose.imaging.plane import PlaneSampler
from cryopose.imaging.projection import Projector, backproject, backproject_slices, project
from cryopose.imaging.shifts import (
    apply_origin,
    centre_by_origin,
    phase_shift_fourier,
    shift_images,
)
from cryopose.imaging.trilinear import trilinear_corners

__all__ = [
    "PlaneSampler",
    "Projector",
    "trilinear_corners",
    "project",
    "backproject",
    "backproject_slices",
    "ctf_2d",
    "ctf_from_params",
    "ctf_at_frequencies",
    "apply_ctf",
    "electron_wavelength_angstrom",
    "shift_images",
    "phase_shift_fourier",
    "centre_by_origin",
    "apply_origin",
    "signal_power",
    "noise_sigma",
    "white_noise",
    "coloured_noise",
    "add_noise",
    "disk_mask",
    "fourier_crop",
    "soft_circular_mask",
    "low_pass",
    "normalise",
    "fft2_centred",
    "ifft2_centred",
    "rfft2_centred",
    "irfft2_centred",
    "fftn_centred",
    "ifftn_centred",
    "frequency_grid_2d",
    "radial_frequency_2d",
]
