"""cryoSPARC .cs particle files: field mapping, pose/shift/CTF conventions, conversion."""

from __future__ import annotations

import os

import numpy as np
import numpy.lib.recfunctions as rfn
import pytest
import torch
from conftest import PARTICLES, haar, require
from scipy.spatial.transform import Rotation

from cryopose.io import CryoposeInputError, read_cryosparc, read_particles, read_star, write_star


def _geodesic(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    m = r1.transpose(-1, -2) @ r2
    cos = ((m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    skew = torch.linalg.matrix_norm(m - m.transpose(-1, -2)) / (2 * 2**0.5)
    return torch.atan2(skew, cos)


def _save_cs(path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save(path) would append ".npy"
        np.save(handle, array)


def _with_alignments(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """empiar_10076_7.cs plus alignments3D/pose and /shift (float32, as cryoSPARC stores)."""
    base = np.load(require(PARTICLES / "empiar_10076_7.cs"))
    n = len(base)
    rotations = haar(n, seed=seed)
    # cryoSPARC stores the rotation vector of RELION's A = R^T (built here with scipy)
    pose = Rotation.from_matrix(rotations.numpy().transpose(0, 2, 1)).as_rotvec()
    pose = pose.astype(np.float32)
    shift = np.random.default_rng(seed).uniform(-8, 8, size=(n, 2)).astype(np.float32)
    dtype = base.dtype.descr + [
        ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/shift", "<f4", (2,)),
    ]
    array = np.zeros(n, dtype=dtype)
    for name in base.dtype.names:
        array[name] = base[name]
    array["alignments3D/pose"] = pose
    array["alignments3D/shift"] = shift
    return array, pose, shift


def test_read_cs_real_file_pins_ctf_against_relion30_star():
    """empiar_10076_7.cs and .star describe the same 7 particles (no poses in either)."""
    cs = read_cryosparc(require(PARTICLES / "empiar_10076_7.cs"))
    star = read_star(require(PARTICLES / "empiar_10076_7.star"))
    raw = np.load(PARTICLES / "empiar_10076_7.cs")
    assert len(cs) == len(star) == 7 and not cs.has_poses and cs.has_ctf
    assert cs.box == 320 == star.box
    # blob/idx is 0-based, rlnImageName 1-based
    paths_cs, idx_cs = cs.image_paths_and_indices()
    paths_star, idx_star = star.image_paths_and_indices()
    assert idx_cs.tolist() == (raw["blob/idx"].astype(int) + 1).tolist() == idx_star.tolist()
    assert paths_cs.tolist() == paths_star.tolist()
    # defocus U = df1, V = df2 (Angstrom), angle in degrees = df_angle_rad
    a, b = cs.ctf_params(), star.ctf_params()
    for key in [
        "defocus_u_angstrom",
        "defocus_v_angstrom",
        "voltage_kv",
        "spherical_aberration_mm",
        "amplitude_contrast",
    ]:
        np.testing.assert_array_equal(
            a[key].numpy().astype(np.float32), b[key].numpy().astype(np.float32)
        )
    np.testing.assert_allclose(
        a["defocus_angle_deg"].numpy(), b["defocus_angle_deg"].numpy(), atol=1e-5
    )
    assert cs.pixel_size == pytest.approx(star.pixel_size, rel=1e-6)
    # float32 values are carried as their shortest decimal, i.e. equal to the STAR text
    assert cs.data["rlnDefocusU"].iloc[0] == 15301.1 == star.data["rlnDefocusU"].iloc[0]


def test_cs_with_project_paths_and_2d_alignments():
    table = read_particles(require(PARTICLES / "cryosparc_J2_particles_exported.cs"))
    assert len(table) == 22 and table.box == 300 and not table.has_poses
    assert table.pixel_size == pytest.approx(1.345, rel=1e-6)
    name = table.data["rlnImageName"].iloc[0]
    assert name == "000001@J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"  # '>' gone
    paths, _ = table.image_paths_and_indices()
    assert paths[0] == os.path.normpath(PARTICLES / name.split("@")[1])
    other = read_cryosparc(PARTICLES / "cryosparc_J2_particles_exported.cs", image_root="/data")
    assert other.image_paths_and_indices()[0][0].startswith("/data/J1/imported/")


def test_cs_poses_shifts_and_ctf_map_to_relion(tmp_path):
    array, pose, shift = _with_alignments(seed=1)
    path = tmp_path / "aligned.cs"
    _save_cs(path, array)
    table = read_cryosparc(path)
    assert table.has_poses and table.has_origins
    # pose convention, pinned with scipy independently of cryopose.so3: R = A^T, A = exp(pose)
    expected = Rotation.from_rotvec(pose.astype(np.float64)).as_matrix().transpose(0, 2, 1)
    assert _geodesic(table.rotations(), torch.from_numpy(expected)).max() < 1e-6
    # the Euler angles are RELION's: scipy ZYZ(rot, tilt, psi).inv() == A
    eul = table.euler_angles_deg().numpy()
    a = Rotation.from_euler("ZYZ", eul, degrees=True).inv().as_matrix()
    np.testing.assert_allclose(a, expected.transpose(0, 2, 1), atol=1e-6)
    # origin (Angstrom) = shift (pixels) * blob/psize_A, same sign (pyem convention)
    psize = array["blob/psize_A"].astype(np.float64)
    np.testing.assert_allclose(table.origins_angstrom().numpy(), shift * psize[:, None], rtol=1e-6)
    # CTF: radians -> degrees
    np.testing.assert_allclose(
        np.deg2rad(table.data["rlnDefocusAngle"].to_numpy()), array["ctf/df_angle_rad"], rtol=1e-7
    )


def test_cs_to_star_round_trip_keeps_values(tmp_path):
    array, pose, shift = _with_alignments(seed=2)
    _save_cs(tmp_path / "aligned.cs", array)
    out = tmp_path / "star" / "aligned.star"
    out.parent.mkdir()
    write_star(read_cryosparc(tmp_path / "aligned.cs"), out)
    table = read_star(out)
    expected = Rotation.from_rotvec(pose.astype(np.float64)).as_matrix().transpose(0, 2, 1)
    assert _geodesic(table.rotations(), torch.from_numpy(expected)).max() < 1e-6
    psize = array["blob/psize_A"]
    np.testing.assert_allclose(
        table.origins_angstrom().numpy() / table.pixel_sizes()[:, None], shift, rtol=1e-6
    )
    f32 = {
        "rlnDefocusU": "ctf/df1_A",
        "rlnDefocusV": "ctf/df2_A",
        "rlnVoltage": "ctf/accel_kv",
        "rlnSphericalAberration": "ctf/cs_mm",
        "rlnAmplitudeContrast": "ctf/amp_contrast",
        "rlnImagePixelSize": "blob/psize_A",
        "rlnCtfBfactor": "ctf/bfactor",
    }
    for label, field in f32.items():
        np.testing.assert_array_equal(table.data[label].to_numpy().astype(np.float32), array[field])
    assert table.pixel_size == pytest.approx(float(psize[0]), rel=1e-7)
    assert table.data["rlnImageName"].iloc[0] == "000001@../empiar_10076_7.mrc"
    paths, idx = table.image_paths_and_indices()
    assert idx.tolist() == (array["blob/idx"].astype(int) + 1).tolist()
    assert paths[0] == os.path.normpath(tmp_path / "empiar_10076_7.mrc")


def test_bad_cs_files_give_named_errors(tmp_path):
    base = np.load(require(PARTICLES / "empiar_10076_7.cs"))
    _save_cs(tmp_path / "nopath.cs", rfn.drop_fields(base, "blob/path", usemask=False))
    with pytest.raises(CryoposeInputError, match="nopath.cs: missing field blob/path"):
        read_cryosparc(tmp_path / "nopath.cs")
    flat = base.copy()
    flat["blob/shape"][:, 0] = 100
    _save_cs(tmp_path / "flat.cs", flat)
    with pytest.raises(CryoposeInputError, match="flat.cs: blob/shape has non-square images"):
        read_cryosparc(tmp_path / "flat.cs")
    (tmp_path / "text.cs").write_text("not numpy")
    with pytest.raises(CryoposeInputError, match="text.cs: unreadable .cs file"):
        read_cryosparc(tmp_path / "text.cs")
    _save_cs(tmp_path / "plain.cs", np.zeros(3))
    with pytest.raises(CryoposeInputError, match="plain.cs: not a cryoSPARC table"):
        read_cryosparc(tmp_path / "plain.cs")
    with pytest.raises(FileNotFoundError, match="missing.cs: cryoSPARC file not found"):
        read_cryosparc(tmp_path / "missing.cs")
