"""Rotation conventions: RELION Euler angles, quaternions, rotation vectors, cryoSPARC poses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import haar
from scipy.spatial.transform import Rotation

from cryopose import so3


def relion_euler_angles2matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix (src/euler.cpp), element by element from its definition."""
    a, b, g = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def random_angles(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    angles = torch.stack([360 * u[:, 0] - 180, 180 * u[:, 1], 360 * u[:, 2] - 180], dim=-1)
    # gimbal lock and its neighbourhood, where naive formulas lose all precision
    angles[:50, 1] = 0.0
    angles[50:100, 1] = 180.0
    angles[100:150, 1] = 1e-3
    angles[150:200, 1] = 180.0 - 1e-3
    angles[200:250, 1] = 0.3
    return angles.to(dtype)


def test_relion_euler_definition(dtype):
    angles = random_angles(300, 0, dtype)
    ours = so3.euler_to_matrix(angles)
    assert ours.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for (rot, tilt, psi), r in zip(angles.double().tolist(), ours.double(), strict=True):
        a = relion_euler_angles2matrix(rot, tilt, psi)
        np.testing.assert_allclose(r.numpy(), a.T, atol=tol)  # cryopose R = A^T


def test_scipy_intrinsic_zyz_is_our_matrix():
    angles = random_angles(100, 1, torch.float64)
    scipy_r = Rotation.from_euler("ZYZ", angles.numpy(), degrees=True).as_matrix()
    np.testing.assert_allclose(so3.euler_to_matrix(angles).numpy(), scipy_r, atol=1e-12)


def test_known_matrices():
    # rot = 90: Rz(90) takes x to y
    r = so3.euler_to_matrix(torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(
        r @ torch.tensor([1.0, 0, 0], dtype=torch.float64), [0, 1, 0], atol=1e-15
    )
    # tilt = 90: Ry(90) takes z to x
    r = so3.euler_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(
        r @ torch.tensor([0.0, 0, 1], dtype=torch.float64), [1, 0, 0], atol=1e-15
    )


def test_euler_round_trip(dtype):
    angles = random_angles(2000, 2, dtype)
    r = so3.euler_to_matrix(angles)
    back = so3.matrix_to_euler(r)
    # matrix -> euler -> matrix is exact everywhere (gimbal lock included)
    assert so3.geodesic_distance(so3.euler_to_matrix(back), r).max() < 1e-6
    # angle ranges
    assert (back[:, 1] >= 0).all() and (back[:, 1] <= 180).all()
    assert (back[:, [0, 2]] > -180).all() and (back[:, [0, 2]] <= 180).all()
    # away from gimbal lock the angles themselves come back (to 1e-6 rad)
    ok = (angles[:, 1] > 1) & (angles[:, 1] < 179)
    diff = torch.remainder(back[ok] - angles[ok] + 180, 360) - 180
    assert torch.deg2rad(diff.abs()).max() < 1e-6
    # at gimbal lock RELION's choice: rot = 0, and rot + psi (tilt 0) is preserved
    lock = back[:50]
    assert lock[:, 0].abs().max() < 1e-9
    d = torch.remainder(lock[:, 2] - (angles[:50, 0] + angles[:50, 2]) + 180, 360) - 180
    assert torch.deg2rad(d.abs()).max() < 1e-6


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4)])
def test_batched_shapes(shape):
    angles = torch.zeros(*shape, 3, dtype=torch.float64) + torch.tensor(
        [10.0, 20.0, 30.0], dtype=torch.float64
    )
    r = so3.euler_to_matrix(angles)
    assert r.shape == (*shape, 3, 3)
    assert so3.matrix_to_euler(r).shape == (*shape, 3)
    assert so3.matrix_to_quaternion(r).shape == (*shape, 4)
    assert so3.matrix_to_rotvec(r).shape == (*shape, 3)


def test_quaternion_round_trip_and_order(dtype):
    r = haar(1000, 3, dtype)
    q = so3.matrix_to_quaternion(r)
    assert (q[:, 3] >= 0).all()
    assert so3.geodesic_distance(so3.quaternion_to_matrix(q), r).max() < 1e-6
    # scalar-last, matching scipy's as_quat()
    np.testing.assert_allclose(
        np.abs(q.double().numpy()),
        np.abs(Rotation.from_matrix(r.double().numpy()).as_quat()),
        atol=1e-6 if dtype == torch.float32 else 1e-12,
    )
    # rotation by angle t about z is (0, 0, sin(t/2), cos(t/2))
    t = 0.7
    rz = so3.axis_angle_to_matrix(torch.tensor([0.0, 0, 1], dtype=dtype), torch.tensor(t))
    np.testing.assert_allclose(
        so3.matrix_to_quaternion(rz).double().numpy(),
        [0, 0, math.sin(t / 2), math.cos(t / 2)],
        atol=1e-6,
    )


def test_rotvec_round_trip_including_near_pi(dtype):
    r = haar(1000, 4, dtype)
    g = torch.Generator().manual_seed(5)
    axes = torch.randn(100, 3, generator=g, dtype=dtype)
    near_pi = so3.axis_angle_to_matrix(axes, torch.full((100,), math.pi - 1e-5, dtype=dtype))
    tiny = so3.axis_angle_to_matrix(axes, torch.full((100,), 1e-7, dtype=dtype))
    for rr in (r, near_pi, tiny):
        v = so3.matrix_to_rotvec(rr)
        assert so3.geodesic_distance(so3.rotvec_to_matrix(v), rr).max() < 1e-6
        assert v.norm(dim=-1).max() <= math.pi + 1e-6


def test_cryosparc_pose_is_rotvec_of_relion_matrix(dtype):
    angles = random_angles(200, 6, torch.float64)
    a = torch.tensor(np.stack([relion_euler_angles2matrix(*x) for x in angles.tolist()]))
    pose = torch.tensor(Rotation.from_matrix(a.numpy()).as_rotvec(), dtype=dtype)
    r = so3.cryosparc_pose_to_matrix(pose)
    assert so3.geodesic_distance(r.double(), a.transpose(-1, -2)).max() < 1e-6
    back = so3.matrix_to_cryosparc_pose(r)
    assert (
        so3.geodesic_distance(so3.rotvec_to_matrix(back), so3.rotvec_to_matrix(pose)).max() < 1e-6
    )
    assert torch.equal(so3.matrix_to_relion_matrix(r), r.transpose(-1, -2))
    assert torch.equal(so3.relion_matrix_to_matrix(so3.matrix_to_relion_matrix(r)), r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotvec_to_matrix_equals_scipy_from_tiny_to_pi(dtype):
    # angles from 1e-9 rad (Taylor branch) to pi, random axes; any leading shape
    g = torch.Generator().manual_seed(11)
    axes = torch.nn.functional.normalize(torch.randn(500, 3, generator=g, dtype=torch.float64),
                                         dim=-1)
    angles = torch.logspace(-9, math.log10(math.pi), 500, dtype=torch.float64)
    v = axes * angles[:, None]
    ref = torch.from_numpy(Rotation.from_rotvec(v.numpy()).as_matrix())
    got = so3.rotvec_to_matrix(v.to(dtype).reshape(5, 100, 3)).reshape(500, 3, 3).double()
    assert (got - ref).abs().max() < (1e-14 if dtype == torch.float64 else 1e-6)
    with pytest.raises(ValueError, match="rotvec"):
        so3.rotvec_to_matrix(torch.zeros(4, 2))
