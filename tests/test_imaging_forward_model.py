"""The forward model against exact projections of Gaussian blobs (pins angles and origins).

A volume of 3D Gaussians ``a_j exp(-|x - c_j|^2 / (2 s^2))`` (x, c_j in Angstrom relative to the
box centre) has the exact projection ``image(x) = sum_z V(R (x, y, z)^T)``: the blob at c sits
where ``R x3 = c``, i.e. ``x3 = R^T c``, so it projects to a 2D Gaussian of the same width centred
at ``(R^T c)_{x,y}`` (= the x, y part of ``A c``, A = RELION's matrix) with amplitude
``a_j sqrt(2 pi) s / px`` in voxel-sum units. RELION's origin (ox, oy) then moves it to
``(R^T c)_{x,y} - (ox, oy)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar
from scipy.spatial.transform import Rotation

from cryopose.imaging import (
    Projector,
    apply_ctf,
    apply_origin,
    ctf_2d,
    irfft2_centred,
    phase_shift_fourier,
)
from cryopose.so3 import euler_to_matrix

PX = 2.0  # Angstrom per pixel
SIGMA = 5.0  # Angstrom
CENTRES = torch.tensor(
    [[8.0, -10.0, 4.0], [-12.0, 3.0, -7.0], [2.0, 13.0, 9.0], [-4.0, -6.0, -12.0]],
    dtype=torch.float64,
)  # Angstrom, (x, y, z); |c| <= 16 A = 8 px
AMPS = torch.tensor([1.0, 0.6, 1.4, 0.8], dtype=torch.float64)


def blob_volume(box: int, dtype: torch.dtype) -> torch.Tensor:
    i = (torch.arange(box, dtype=torch.float64) - box // 2) * PX
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    v = torch.zeros(box, box, box, dtype=torch.float64)
    for a, (cx, cy, cz) in zip(AMPS, CENTRES, strict=True):
        v += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * SIGMA**2))
    return v.to(dtype)


def analytic_images(box: int, centres_2d: torch.Tensor) -> torch.Tensor:
    """2D Gaussians at centres_2d [B, J, 2] (x, y in Angstrom), voxel-sum units, float64."""
    i = (torch.arange(box, dtype=torch.float64) - box // 2) * PX
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    cx = centres_2d[..., 0, None, None]
    cy = centres_2d[..., 1, None, None]
    g = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * SIGMA**2))
    return (AMPS[:, None, None] * math.sqrt(2 * math.pi) * SIGMA / PX * g).sum(dim=-3)


def projected_centres(rot: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor) -> torch.Tensor:
    """(R^T c)_{x,y} - origin for every rotation and blob: [B, J, 2]."""
    c3 = torch.einsum("bji,kj->bki", rot.double(), CENTRES)  # (R^T c)_i = sum_j R_ji c_j
    return c3[..., :2] - torch.stack([ox, oy], dim=-1).double()[:, None, :]


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.double().flatten(-2)
    b = b.double().flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b).flatten(-2).norm(dim=-1) / b.flatten(-2).norm(dim=-1)


def origins(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    ox = torch.rand(n, generator=g, dtype=torch.float64) * 12 - 6  # both signs, +-3 px
    oy = torch.rand(n, generator=g, dtype=torch.float64) * 12 - 6
    return ox.to(dtype), oy.to(dtype)


@pytest.mark.parametrize("box", [48, 49])
def test_projection_plus_origin_matches_analytic(box, dtype):
    n = 24
    rot = haar(n, seed=box, dtype=dtype)
    ox, oy = origins(n, dtype)
    proj = Projector(blob_volume(box, dtype))
    sim = apply_origin(proj.images(rot), ox, oy, PX)
    ref = analytic_images(box, projected_centres(rot, ox, oy))
    assert sim.dtype == dtype
    assert corr(sim, ref).min() > 0.99
    assert rel_err(sim, ref).max() < 0.03  # measured 1.1-1.3% (pad 2, trilinear + sinc^2)
    # the test discriminates: transposed rotations or flipped origins do not match
    wrong_rot = analytic_images(box, projected_centres(rot.transpose(-1, -2), ox, oy))
    wrong_origin = analytic_images(box, projected_centres(rot, -ox, -oy))
    assert corr(sim, wrong_rot).mean() < 0.85  # measured ~0.7
    assert corr(sim, wrong_origin).mean() < 0.7  # measured ~0.5


def test_relion_euler_angles_chain():
    """Euler angles -> cryopose R (so3) -> image equals the blobs at (A c)_{x,y}, with A built
    independently as scipy's ZYZ of the RELION angles, inverted (RELION's Euler_angles2matrix)."""
    box = 48
    angles = torch.tensor([[30.0, 60.0, -45.0], [-120.0, 150.0, 10.0], [75.0, 20.0, 160.0]],
                          dtype=torch.float64)
    a_relion = torch.from_numpy(
        Rotation.from_euler("ZYZ", angles.numpy(), degrees=True).inv().as_matrix()
    )
    rot = euler_to_matrix(angles)
    sim = Projector(blob_volume(box, torch.float64)).images(rot)
    centres_2d = torch.einsum("bij,kj->bki", a_relion, CENTRES)[..., :2]
    ref = analytic_images(box, centres_2d)
    assert corr(sim, ref).min() > 0.999


@pytest.mark.parametrize("box", [48, 49])
def test_ctf_forward_model_matches_analytic(box, dtype):
    """project -> CTF -> origin equals the analytic projection convolved with the CTF, in the
    real-space and in the Fourier-space (slices) path."""
    n = 12
    rot = haar(n, seed=100 + box, dtype=dtype)
    ox, oy = origins(n, dtype)
    g = torch.Generator().manual_seed(1)
    du = (12000 + 8000 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    ctf = ctf_2d(defocus_u_angstrom=du, defocus_v_angstrom=du - 800.0,
                 defocus_angle_deg=torch.linspace(-80, 80, n, dtype=dtype), voltage_kv=300.0,
                 cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=PX, box=box, bfactor=20.0)
    ref = apply_ctf(analytic_images(box, projected_centres(rot, ox, oy)), ctf.double())
    proj = Projector(blob_volume(box, dtype))
    real_path = apply_origin(apply_ctf(proj.images(rot), ctf), ox, oy, PX)
    fourier = phase_shift_fourier(proj.slices(rot) * ctf, -ox / PX, -oy / PX, box)
    fourier_path = irfft2_centred(fourier, box)
    for sim in (real_path, fourier_path):
        assert sim.dtype == dtype
        assert corr(sim, ref).min() > 0.99
        assert rel_err(sim, ref).max() < 0.05
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(real_path, fourier_path, atol=tol * float(ref.abs().max()))
