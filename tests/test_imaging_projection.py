"""Projection operator: library convention, adjoint identity, layouts, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haar

from cryopose.imaging import (
    Projector,
    backproject,
    backproject_slices,
    irfft2_centred,
    project,
    rfft2_centred,
)


def gaussian_blobs(box: int, centres_px, sigma_px: float, dtype=torch.float64) -> torch.Tensor:
    """Volume [z, y, x] of unit-height Gaussian blobs at (x, y, z) pixel offsets from box // 2."""
    i = torch.arange(box, dtype=dtype) - box // 2
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    v = torch.zeros(box, box, box, dtype=dtype)
    for amp, (cx, cy, cz) in zip([1.0, 0.7, 1.3, 0.5], centres_px, strict=False):
        v += amp * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_px**2))
    return v


CENTRES = [(4.0, -5.0, 2.0), (-6.0, 2.0, -3.0), (1.0, 6.0, -4.0)]  # |c| + 3 sigma < 16


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(-2) - a.flatten(-2).mean(-1, keepdim=True)
    b = b.flatten(-2) - b.flatten(-2).mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_torch_fourier_slice_convention_matches_ours():
    """torch-fourier-slice's project_3d_to_2d uses the same R (left-multiplying xyz) as us;
    passing R^T instead would give different images (so the check discriminates)."""
    tfs = pytest.importorskip("torch_fourier_slice")
    box = 48
    vol = gaussian_blobs(box, CENTRES, 2.5, torch.float32)
    rot = haar(6, seed=3, dtype=torch.float32)
    ours = project(vol, rot)
    lib = tfs.project_3d_to_2d(vol, rot, pad_factor=2.0)
    lib_t = tfs.project_3d_to_2d(vol, rot.transpose(-1, -2), pad_factor=2.0)
    assert corr(ours, lib).min() > 0.999
    assert corr(ours, lib_t).max() < 0.9
    assert torch.allclose(ours, lib, atol=0.02 * float(ours.abs().max()))


@pytest.mark.parametrize("box", [32, 33])
def test_identity_rotation_is_sum_along_z(box, dtype):
    """At R = I the image is sum_z V (voxel-sum units), centre N // 2 kept, for even/odd N."""
    vol = gaussian_blobs(box, CENTRES, 2.0, dtype)
    img = project(vol, torch.eye(3, dtype=dtype))
    ref = vol.sum(dim=0)
    # on-grid samples are attenuated by the sinc^2 gridding correction; without it exact
    exact = project(vol, torch.eye(3, dtype=dtype), gridding_correction=False)
    # (not 1e-12 in float64: the blobs' tails are cut at the box edge and the disk |k| < N / 2)
    assert torch.allclose(exact, ref, atol=2e-6 * float(ref.abs().max()))
    # with it (default, as RELION), on-grid samples of off-centre content are amplified by
    # 1 / sinc^2: a few % here (blobs ~7 px off-centre in a 2N padded box)
    assert ((img - ref).norm() / ref.norm()) < 0.1
    assert img.dtype == dtype


@pytest.mark.parametrize("box", [16, 17])
def test_backproject_is_exact_adjoint_of_project(box):
    g = torch.Generator().manual_seed(box)
    v = torch.randn(box, box, box, generator=g, dtype=torch.float64)
    u = torch.randn(3, 2, box, box, generator=g, dtype=torch.float64)
    rot = haar(6, seed=box).reshape(3, 2, 3, 3)
    lhs = (project(v, rot) * u).sum()
    rhs = (v * backproject(u, rot)).sum()
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    # also float32 (relative 1e-4) and a pad factor that is not an integer
    v32, u32, r32 = v.float(), u.float(), rot.float()
    lhs = (project(v32, r32, pad_factor=1.5) * u32).sum()
    rhs = (v32 * backproject(u32, r32, pad_factor=1.5)).sum()
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)


@pytest.mark.parametrize("box", [16, 17])
def test_backproject_slices_is_exact_adjoint(box):
    g = torch.Generator().manual_seed(7 + box)
    v = torch.randn(box, box, box, generator=g, dtype=torch.float64)
    s = torch.randn(4, box, box // 2 + 1, generator=g, dtype=torch.complex128)
    rot = haar(4, seed=11)
    lhs = (torch.conj(s) * Projector(v).slices(rot)).real.sum()
    rhs = (v * backproject_slices(s, rot, box)).sum()
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_backprojection_of_projections_is_adjoint_not_inverse():
    """P^T P v correlates with v (a blurred version), a property a wrong adjoint (e.g. using R^T
    or a flipped axis) breaks."""
    box = 24
    vol = gaussian_blobs(box, [(4.0, -5.0, 2.0), (-6.0, 3.0, -3.0)], 2.0)
    rot = haar(200, seed=5)
    bp = backproject(project(vol, rot), rot)
    c = torch.nn.functional.cosine_similarity(
        bp.flatten() - bp.mean(), vol.flatten() - vol.mean(), 0
    )
    assert c > 0.8


@pytest.mark.parametrize("box", [24, 25])
def test_slices_are_rfft_of_images(box, dtype):
    vol = gaussian_blobs(box, CENTRES, 2.0, dtype)
    proj = Projector(vol)
    rot = haar(5, seed=1, dtype=dtype)
    s = proj.slices(rot)
    assert s.shape == (5, box, box // 2 + 1)
    assert s.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    img = proj.images(rot)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(rfft2_centred(img), s, atol=tol * float(s.abs().max()))
    assert torch.allclose(irfft2_centred(s, box), img)
    # zero outside the Nyquist disk
    ky = torch.arange(box) - box // 2
    kx = torch.arange(box // 2 + 1)
    outside = ky[:, None] ** 2 + kx[None, :] ** 2 >= (box / 2) ** 2
    assert s[:, outside].abs().max() == 0


def test_batch_shapes_and_projector_reuse():
    box = 20
    vol = gaussian_blobs(box, CENTRES, 2.0, torch.float32)
    rot = haar(6, seed=2, dtype=torch.float32)
    proj = Projector(vol)
    a = proj.images(rot.reshape(2, 3, 3, 3))
    b = project(vol, rot)
    assert a.shape == (2, 3, box, box)
    assert torch.allclose(a.reshape(6, box, box), b)
    single = proj.images(rot[4])
    assert single.shape == (box, box)
    assert torch.allclose(single, b[4], atol=1e-6)


def test_projection_accuracy_improves_with_padding():
    """Measured vs the analytic projection: pad 2 better than pad 1 (~1% vs ~5% rel. error)."""
    box, sigma = 40, 2.0
    vol = gaussian_blobs(box, CENTRES, sigma)
    rot = haar(10, seed=4)
    i = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    ref = torch.zeros(10, box, box, dtype=torch.float64)
    for amp, c in zip([1.0, 0.7, 1.3], CENTRES, strict=True):
        p = rot.transpose(-1, -2) @ torch.tensor(c, dtype=torch.float64)
        r2 = (xx - p[:, 0, None, None]) ** 2 + (yy - p[:, 1, None, None]) ** 2
        ref += amp * math.sqrt(2 * math.pi) * sigma * torch.exp(-r2 / (2 * sigma**2))
    err = {pf: float((project(vol, rot, pad_factor=pf) - ref).norm() / ref.norm())
           for pf in (1.0, 2.0)}
    assert err[2.0] < 0.02
    assert err[2.0] < 0.5 * err[1.0]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="volume"):
        Projector(torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="rotations"):
        project(torch.zeros(4, 4, 4), torch.zeros(3, 3, 2))
    with pytest.raises(ValueError, match="pad_factor"):
        Projector(torch.zeros(4, 4, 4), pad_factor=0.5)
    with pytest.raises(ValueError, match="images"):
        backproject(torch.zeros(2, 4, 4), torch.zeros(3, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    box = 24
    vol = gaussian_blobs(box, CENTRES, 2.0, torch.float32)
    rot = haar(4, seed=9, dtype=torch.float32)
    cpu = project(vol, rot)
    gpu = project(vol.cuda(), rot.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4 * float(cpu.abs().max()))
    bp = backproject(cpu.cuda(), rot.cuda())
    assert torch.allclose(bp.cpu(), backproject(cpu, rot), atol=1e-3 * float(bp.abs().max()))


@pytest.mark.parametrize("box", [16, 17])
def test_slices_and_gradients_are_hermitian_up_to_the_band_edge(box):
    """V(-q) = conj V(q) for a real volume, also where q lies between M/2 - 1 and M/2 of the
    padded grid (the DFT is M-periodic: that neighbour is index -M/2, not zero).

    ``R Rz(pi)`` maps every slice point ``k = (kx, ky, 0)`` to ``-R k``."""
    g = torch.Generator().manual_seed(5)
    vol = torch.randn(box, box, box, generator=g, dtype=torch.float64)  # power up to the edge
    proj = Projector(vol)
    rz_pi = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    rot = haar(64, 6)
    a = proj.slices(rot)
    b = proj.slices(rot @ rz_pi)
    scale = a.abs().max()
    assert float((b - a.conj()).abs().max() / scale) < 1e-12
    # some points do reach the last padded interval (else the test would not test it)
    q = torch.einsum("nij,pj->npi", rot[:, :, :2], torch.stack([proj._kx, proj._ky], -1))
    assert bool((q * (proj.padded_box / box) > proj.padded_box // 2 - 1).any())
    # gradient table: value(-q) = conj value(q), dV/dq(-q) = -conj dV/dq(q)
    v_plus = proj.sample_with_gradient_ri(q.reshape(-1, 3))
    v_minus = proj.sample_with_gradient_ri(-q.reshape(-1, 3))
    assert torch.allclose(v_minus[0, 0], v_plus[0, 0], atol=1e-12 * float(scale), rtol=0)
    assert torch.allclose(v_minus[0, 1], -v_plus[0, 1], atol=1e-12 * float(scale), rtol=0)
    # gradients (of the trilinear interpolant): away from the grid nodes, where the
    # interpolant has a kink and the one-sided slope is returned (here only q = 0)
    node = ((q * (proj.padded_box / box)).reshape(-1, 3).frac().abs() < 1e-12).any(-1)
    assert int(node.sum()) == rot.shape[0]  # the origin of every slice
    gp, gm = v_plus[1:, :, ~node], v_minus[1:, :, ~node]
    gscale = float(gp.abs().max())
    assert torch.allclose(gm[:, 0], -gp[:, 0], atol=1e-12 * gscale, rtol=0)
    assert torch.allclose(gm[:, 1], gp[:, 1], atol=1e-12 * gscale, rtol=0)


def _disk_and_far_points(proj: Projector, n_rot: int, seed: int, dtype) -> torch.Tensor:
    """Slice points of random poses (|q| < N / 2, both signs of q_z), random points of the
    ball |q| < N / 2, and points beyond the padded grid's margin (value 0)."""
    box = proj.box
    rot = haar(n_rot, seed).to(dtype)
    q = torch.einsum("nij,pj->npi", rot[:, :, :2], torch.stack([proj._kx, proj._ky], -1))
    g = torch.Generator().manual_seed(seed)
    ball = torch.randn(500, 3, generator=g, dtype=torch.float64)
    ball = ball / ball.norm(dim=-1, keepdim=True) * torch.rand(500, 1, generator=g,
                                                               dtype=torch.float64) * box / 2
    far = torch.tensor([[1.2 * box, 0.0, -0.3], [0.1, -box, 0.2], [0.0, 0.3, -0.9 * box]],
                       dtype=torch.float64)
    return torch.cat([q.reshape(-1, 3), ball.to(dtype) * 0.999, far.to(dtype)])


@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("pad", [2.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_gather_equals_the_block_table_gather(box, pad, dtype):
    """The CPU kernel (Hermitian half table, ``q_z < 0`` read as ``conj V(-q)``) returns the
    block table's trilinear values: even and odd padded boxes (17 x 1.0 is odd: the last half
    pixel of the disk reaches the periodic low margin), float32 and float64."""
    from cryopose.runtime import numba_ready

    assert numba_ready()
    g = torch.Generator().manual_seed(3)
    vol = torch.randn(box, box, box, generator=g, dtype=dtype)
    proj = Projector(vol, pad_factor=pad)
    points = _disk_and_far_points(proj, 20, 4, dtype)
    assert bool((points[:, 2] < 0).any()) and bool((points[:, 2] > 0).any())
    fast = proj.sample_ri(points)  # numba
    block = proj._sample_block(points, gradient=False)
    scale = float(block.abs().max())
    tol = (1e-12 if dtype == torch.float64 else 3e-6) * scale
    assert fast.dtype == dtype and fast.shape == (2, points.shape[0])
    assert float((fast - block).abs().max()) <= tol
    assert float(fast[:, -3:].abs().max()) == 0.0  # beyond the margin
    # and both equal the grid_sample slices (the operator tested against the library)
    rot = haar(5, 9).to(dtype)
    q = torch.einsum("nij,pj->npi", rot[:, :, :2], torch.stack([proj._kx, proj._ky], -1))
    sl = proj.slices(rot)[:, proj._mask]
    v = proj.sample_ri(q)
    assert torch.allclose(torch.complex(v[0], v[1]), sl, rtol=0, atol=tol)


def test_numba_gather_is_thread_independent_and_can_be_turned_off(monkeypatch):
    from cryopose.runtime import numba_ready

    g = torch.Generator().manual_seed(1)
    proj = Projector(torch.randn(16, 16, 16, generator=g))
    points = _disk_and_far_points(proj, 50, 2, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = proj.sample_ri(points)
        torch.set_num_threads(2)
        two = proj.sample_ri(points)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    monkeypatch.setenv("CRYOPOSE_NUMBA", "0")
    assert not numba_ready()
    assert torch.equal(proj.sample_ri(points), proj._sample_block(points, gradient=False))


@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numba", ["1", "0"])
def test_slice_values_are_the_slices_at_their_points(box, dtype, numba, monkeypatch):
    # the fused kernel (numba) and the torch gather both return slices(R)[..., mask]
    monkeypatch.setenv("CRYOPOSE_NUMBA", numba)
    g = torch.Generator().manual_seed(7)
    proj = Projector(torch.randn(box, box, box, generator=g, dtype=dtype))
    rot = haar(6, 8).to(dtype).reshape(2, 3, 3, 3)  # any leading batch shape
    values = proj.slice_values(rot, proj._kx, proj._ky)
    assert values.shape == (2, 3, proj._kx.numel()) and values.dtype == proj.slices(rot).dtype
    want = proj.slices(rot)[..., proj._mask]
    tol = (1e-12 if dtype == torch.float64 else 3e-6) * float(want.abs().max())
    assert float((values - want).abs().max()) <= tol
    # points beyond the padded grid's margin: 0
    far = proj.slice_values(rot[0, :1], torch.tensor([3.0 * box]), torch.tensor([0.5]))
    assert float(far.abs().max()) == 0.0
