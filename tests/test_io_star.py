"""RELION STAR particle files: 3.0 and 3.1 reading, 3.1 writing, accessors, bad input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from conftest import PARTICLES, haar, require
from scipy.spatial.transform import Rotation

from cryopose.io import (
    CryoposeInputError,
    MissingFileError,
    ParticleImages,
    ParticleStack,
    StarWriter,
    make_particle_table,
    read_particles,
    read_star,
    write_stack,
    write_star,
)


def _geodesic(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    m = r1.transpose(-1, -2) @ r2
    cos = ((m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    skew = torch.linalg.matrix_norm(m - m.transpose(-1, -2)) / (2 * 2**0.5)
    return torch.atan2(skew, cos)


def _assert_frames_equal(a: pd.DataFrame, b: pd.DataFrame, skip: tuple[str, ...] = ()) -> None:
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if column in skip:
            continue
        if pd.api.types.is_numeric_dtype(a[column]):
            np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), column)
        else:
            assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), column


def test_read_relion31_real_file():
    table = read_star(require(PARTICLES / "relion31.star"))
    assert len(table) == 5 and table.n_optics_groups == 1
    assert table.pixel_size == 2.806 and table.box == 256
    assert table.has_poses and table.has_origins and table.has_ctf
    # optics merged per particle
    assert (table.data["rlnVoltage"] == 300.0).all()
    assert (table.data["rlnSphericalAberration"] == 0.01).all()
    paths, indices = table.image_paths_and_indices()
    assert indices.tolist() == [1, 2, 3, 4, 5]
    assert {os.path.realpath(p) for p in paths} == {os.path.realpath(PARTICLES / "relion31.mrcs")}
    # first row as written in the file
    angles = table.euler_angles_deg()[0].tolist()
    assert angles == [-102.30296, 82.318041, 124.706463]
    assert table.origins_angstrom()[0].tolist() == [0.019324, -0.64686]
    ctf = table.ctf_params(dtype=torch.float32)
    assert ctf["defocus_u_angstrom"].dtype == torch.float32
    assert ctf["defocus_u_angstrom"][0].item() == pytest.approx(13108.082418)
    assert ctf["defocus_angle_deg"][0].item() == pytest.approx(-160.39)
    assert ctf["voltage_kv"][0].item() == 300.0
    assert ctf["amplitude_contrast"][0].item() == pytest.approx(0.1)
    assert ctf["pixel_size_angstrom"][0].item() == pytest.approx(2.806)
    # rotations: R = A^T, A = scipy ZYZ(rot, tilt, psi).inv() (shared CONVENTIONS.md)
    eul = table.euler_angles_deg().numpy()
    expected = Rotation.from_euler("ZYZ", eul, degrees=True).inv().as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(table.rotations().numpy(), expected, atol=1e-12)
    assert table.rotations(dtype=torch.float32).dtype == torch.float32


def test_relion31_round_trip_keeps_every_value(tmp_path):
    source = require(PARTICLES / "relion31.star")
    original = read_star(source)
    sub = tmp_path / "sub"
    sub.mkdir()
    out = sub / "out.star"
    write_star(original, out)
    again = read_star(out)
    _assert_frames_equal(original.optics, again.optics)
    _assert_frames_equal(original.data, again.data, skip=("rlnImageName",))
    # image names are rewritten relative to the new folder and point at the same files
    written = starfile.read(out, always_dict=True, parse_as_string=["rlnImageName"])
    first = written["particles"]["rlnImageName"].iloc[0]
    assert first.startswith("000001@") and not os.path.isabs(first.split("@")[1])
    p1, i1 = original.image_paths_and_indices()
    p2, i2 = again.image_paths_and_indices()
    assert [os.path.realpath(p) for p in p1] == [os.path.realpath(p) for p in p2]
    assert i1.tolist() == i2.tolist()
    # a second write from the same folder as the source reproduces the original names
    shutil.copy(source, tmp_path / "relion31.star")
    shutil.copy(PARTICLES / "relion31.mrcs", tmp_path / "relion31.mrcs")
    local = read_star(tmp_path / "relion31.star")
    write_star(local, tmp_path / "again.star")
    names = read_star(tmp_path / "again.star").data["rlnImageName"].tolist()
    assert names == local.data["rlnImageName"].tolist()
    assert sorted(os.listdir(tmp_path)) == ["again.star", "relion31.mrcs", "relion31.star", "sub"]


def test_relion30_reads_and_converts_to_31(tmp_path):
    table = read_star(require(PARTICLES / "empiar_10076_7.star"))
    assert len(table) == 7 and table.n_optics_groups == 1
    # pixel size = rlnDetectorPixelSize [um] * 1e4 / rlnMagnification
    assert table.pixel_size == pytest.approx(5 * 1e4 / 38168, rel=1e-15)
    assert table.box == 320  # from the stack header
    assert not table.has_poses and table.has_ctf
    assert "rlnMagnification" not in table.data.columns
    assert table.image_paths_and_indices()[1].tolist() == list(range(1, 8))
    out = tmp_path / "v31.star"
    write_star(table, out)
    blocks = starfile.read(out, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    assert "rlnVoltage" in blocks["optics"] and "rlnVoltage" not in blocks["particles"]
    again = read_star(out)
    for column in [
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
    ]:
        np.testing.assert_array_equal(
            again.data[column].to_numpy(np.float64), table.data[column].to_numpy(np.float64)
        )
    assert table.data["rlnDefocusU"].iloc[0] == 15301.1


def _relion30_text(origin_x: float) -> str:
    return (
        "data_\n\nloop_\n_rlnImageName #1\n_rlnOriginX #2\n_rlnOriginY #3\n_rlnVoltage #4\n"
        "_rlnSphericalAberration #5\n_rlnAmplitudeContrast #6\n_rlnMagnification #7\n"
        "_rlnDetectorPixelSize #8\n_rlnDefocusU #9\n_rlnDefocusV #10\n"
        f"1@s.mrcs {origin_x} -1.5 300 2.7 0.1 10000 14 10000 9000\n"
        f"2@s.mrcs 0.0 0.25 200 2.7 0.1 10000 14 11000 9000\n"
    )


def test_relion30_origins_in_pixels_become_angstrom_and_groups_split(tmp_path):
    path = tmp_path / "old.star"
    path.write_text(_relion30_text(2.0))
    table = read_star(path)  # no stack on disk: box unknown, everything else readable
    assert table.pixel_size == pytest.approx(14.0)
    np.testing.assert_allclose(table.origins_angstrom().numpy(), [[28.0, -21.0], [0.0, 3.5]])
    assert "rlnOriginX" not in table.data.columns
    # two voltages -> two optics groups, numbered in order of appearance
    assert table.n_optics_groups == 2
    assert table.data["rlnOpticsGroup"].tolist() == [1, 2]
    assert table.optics["rlnVoltage"].tolist() == [300, 200]
    with pytest.raises(CryoposeInputError, match="old.star: no particles|rlnImageSize"):
        _ = table.box


def _two_group_star(path, image_names=("1@s.mrcs", "2@s.mrcs", "3@s.mrcs"), extra="") -> None:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["g1", "g2"],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.0],
            "rlnAmplitudeContrast": [0.1, 0.07],
            "rlnImagePixelSize": [1.1, 2.2],
            "rlnImageSize": [8, 8],
            "rlnImageDimensionality": [2, 2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": list(image_names),
            "rlnOpticsGroup": [2, 1, 2],
            "rlnAngleRot": [10.0, -20.5, 170.25],
            "rlnAngleTilt": [0.0, 90.0, 180.0],
            "rlnAnglePsi": [-179.5, 33.3, 1e-7],
            "rlnOriginXAngst": [0.5, -1.25, 3.0],
            "rlnOriginYAngst": [0.0, 2.0, -0.125],
            "rlnDefocusU": [10000.0, 12000.5, 9000.25],
            "rlnDefocusV": [9500.0, 11000.0, 8999.0],
            "rlnDefocusAngle": [45.0, -10.0, 0.0],
            "rlnMyCustomScore": [0.1 + 0.2, 1e-300, -7.0],
            "rlnMyCustomNote": ["a", "two words", "c"],
        }
    )
    starfile.write({"optics": optics, "particles": particles}, path, float_format="%.17g")


def test_several_optics_groups_merge_and_round_trip(tmp_path):
    path = tmp_path / "two.star"
    _two_group_star(path)
    table = read_star(path)
    assert table.n_optics_groups == 2
    np.testing.assert_array_equal(table.pixel_sizes(), [2.2, 1.1, 2.2])
    assert table.data["rlnVoltage"].tolist() == [200.0, 300.0, 200.0]
    assert table.ctf_params()["spherical_aberration_mm"].tolist() == [2.0, 2.7, 2.0]
    assert table.ctf_params()["phase_shift_deg"].tolist() == [0.0, 0.0, 0.0]  # default
    with pytest.raises(CryoposeInputError, match="two.star: rlnImagePixelSize differs"):
        _ = table.pixel_size
    assert table.box == 8
    out = tmp_path / "two_out.star"
    write_star(table, out)
    again = read_star(out)
    _assert_frames_equal(table.optics, again.optics)
    _assert_frames_equal(table.data, again.data, skip=("rlnImageName",))
    assert again.data["rlnImageName"].tolist() == [
        "000001@s.mrcs",
        "000002@s.mrcs",
        "000003@s.mrcs",
    ]
    assert again.data["rlnMyCustomScore"].iloc[0] == 0.1 + 0.2  # shortest repr, exact
    assert again.data["rlnMyCustomNote"].tolist() == ["a", "two words", "c"]
    one = table.subset([1])
    assert one.optics["rlnOpticsGroup"].tolist() == [1] and one.pixel_size == 1.1


@pytest.mark.parametrize("box", [7, 8])
def test_poses_survive_star_round_trip(tmp_path, dtype, box):
    rotations = haar(50, seed=3, dtype=dtype)
    rotations[0] = torch.eye(3, dtype=dtype)  # tilt 0 (gimbal lock)
    rotations[1] = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=dtype))  # tilt 180
    origins = torch.linspace(-5, 5, 100, dtype=dtype).reshape(50, 2)
    write_stack(tmp_path / "sim.mrcs", np.zeros((50, box, box)), pixel_size=1.5)
    table = make_particle_table(
        tmp_path / "sim.mrcs",
        50,
        pixel_size_angstrom=1.5,
        box=box,
        rotations=rotations,
        origins_angstrom=origins,
        ctf={"defocus_u_angstrom": 15000.0, "defocus_v_angstrom": 14000.0},
    )
    write_star(table, tmp_path / "sim.star")
    again = read_particles(tmp_path / "sim.star")
    tol = 1e-6 if dtype == torch.float64 else 1e-3  # float32 input matrices are ~1e-7 off SO(3)
    assert _geodesic(again.rotations(), rotations.to(torch.float64)).max() < tol
    np.testing.assert_allclose(again.origins_angstrom().numpy(), origins.double().numpy())
    assert again.box == box and again.pixel_size == 1.5 and again.has_ctf
    assert again.data["rlnImageName"].iloc[0] == "000001@sim.mrcs"


def test_particle_images_use_one_based_indices(tmp_path):
    table = read_star(require(PARTICLES / "relion31.star"))
    with ParticleStack(PARTICLES / "relion31.mrcs") as stack:
        full = stack.read()
    with ParticleImages(table) as images:
        rows = [4, 0, 2, 2]
        np.testing.assert_array_equal(images.read(rows).numpy(), full[rows].numpy())
        np.testing.assert_array_equal(images.read().numpy(), full.numpy())


def test_particle_images_errors(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8)), pixel_size=1.0)
    path = tmp_path / "two.star"
    _two_group_star(path)  # index 3 of a 2-image stack
    with ParticleImages(read_star(path)) as images:
        images.read([0, 1])
        with pytest.raises(
            CryoposeInputError,
            match=r"s.mrcs: image index 3 \(1-based, from "
            r"rlnImageName in .*two.star\) is past the end of the stack of 2",
        ):
            images.read([2])
    write_stack(tmp_path / "s.mrcs", np.zeros((3, 6, 6)), pixel_size=1.0)
    with ParticleImages(read_star(path)) as images:
        with pytest.raises(
            CryoposeInputError, match="s.mrcs: stack box 6 px differs from the reference box 8 px"
        ):
            images.read([0])


def test_bad_star_files_give_named_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nope.star: STAR file not found"):
        read_star(tmp_path / "nope.star")
    blocks = starfile.read(require(PARTICLES / "relion31.star"), always_dict=True)
    bad = tmp_path / "relion31.star"
    starfile.write(
        {"optics": blocks["optics"], "particles": blocks["particles"].drop(columns="rlnImageName")},
        bad,
    )
    with pytest.raises(
        CryoposeInputError, match="relion31.star: missing column rlnImageName in data_particles"
    ):
        read_star(bad)
    starfile.write(
        {
            "optics": blocks["optics"],
            "particles": blocks["particles"].drop(columns="rlnOpticsGroup"),
        },
        bad,
    )
    with pytest.raises(CryoposeInputError, match="missing column rlnOpticsGroup in data_particles"):
        read_star(bad)
    particles = blocks["particles"].copy()
    particles.loc[3, "rlnOpticsGroup"] = 7
    starfile.write({"optics": blocks["optics"], "particles": particles}, bad)
    with pytest.raises(
        CryoposeInputError,
        match="rlnOpticsGroup 7 of particle row 4 in data_particles is not in data_optics",
    ):
        read_star(bad)
    path = tmp_path / "names.star"
    _two_group_star(path, image_names=("1@s.mrcs", "x@s.mrcs", "3@s.mrcs"))
    with pytest.raises(CryoposeInputError, match=r"names.star: rlnImageName 'x@s.mrcs' in row 2"):
        read_star(path)
    table = read_star(require(PARTICLES / "empiar_10076_7.star"))
    with pytest.raises(CryoposeInputError, match="missing column rlnAngleRot in data_particles"):
        table.rotations()
    with pytest.raises(CryoposeInputError, match="junk.mrc: unknown particle file type '.mrc'"):
        read_particles(tmp_path / "junk.mrc")
    (tmp_path / "blocks.star").write_text(
        "data_a\n\nloop_\n_rlnX #1\n1\n\ndata_b\n\nloop_\n_rlnX #1\n2\n"
    )
    with pytest.raises(CryoposeInputError, match=r"blocks.star: no data_particles block \(found "):
        read_star(tmp_path / "blocks.star")


def test_star_writer_streams_chunks_like_write_star(tmp_path):
    rotations = haar(10, seed=5)
    whole = make_particle_table(
        tmp_path / "s.mrcs", 10, pixel_size_angstrom=1.5, box=8, rotations=rotations
    )
    write_star(whole, tmp_path / "whole.star")
    with StarWriter(tmp_path / "chunks.star") as writer:
        for start, stop in [(0, 4), (4, 5), (5, 10)]:
            writer.write(
                make_particle_table(
                    tmp_path / "s.mrcs",
                    stop - start,
                    pixel_size_angstrom=1.5,
                    box=8,
                    rotations=rotations[start:stop],
                    first_index=start + 1,
                )
            )
        assert not (tmp_path / "chunks.star").exists()  # renamed at close
    a, b = read_star(tmp_path / "whole.star"), read_star(tmp_path / "chunks.star")
    _assert_frames_equal(a.data, b.data)
    _assert_frames_equal(a.optics, b.optics)
    assert b.image_paths_and_indices()[1].tolist() == list(range(1, 11))
    other_optics = make_particle_table(tmp_path / "s.mrcs", 2, pixel_size_angstrom=2.0, box=8)
    with pytest.raises(CryoposeInputError, match="bad.star: chunk columns"):
        with StarWriter(tmp_path / "bad.star") as writer:
            writer.write(whole)
            writer.write(other_optics)
    with pytest.raises(CryoposeInputError, match="bad.star: optics group 1 of a later chunk"):
        with StarWriter(tmp_path / "bad.star") as writer:
            writer.write(
                make_particle_table(tmp_path / "s.mrcs", 2, pixel_size_angstrom=1.5, box=8)
            )
            writer.write(other_optics)
    assert sorted(os.listdir(tmp_path)) == ["chunks.star", "whole.star"]
