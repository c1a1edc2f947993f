"""``cryopose info`` and ``cryopose convert`` on the real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PARTICLES, require
from typer.testing import CliRunner

from cryopose.cli.main import app
from cryopose.io import read_particles, read_star, write_volume

runner = CliRunner()

EXPECTED = {
    # file: (kind, n_particles, box, pixel size, has_poses)
    "relion31.star": ("relion_star", 5, 256, 2.806, True),
    "empiar_10076_7.star": ("relion_star", 7, 320, 5e4 / 38168, False),
    "empiar_10076_7.cs": ("cryosparc_cs", 7, 320, 1.3099979, False),
    "cryosparc_J2_particles_exported.cs": ("cryosparc_cs", 22, 300, 1.345, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_info_json_on_particle_files(name):
    result = runner.invoke(app, ["info", str(require(PARTICLES / name)), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    kind, n, box, pixel_size, has_poses = EXPECTED[name]
    assert summary["kind"] == kind
    assert summary["n_particles"] == n and summary["box"] == box
    assert summary["pixel_size_angstrom"] == pytest.approx(pixel_size, rel=1e-6)
    assert summary["n_optics_groups"] == 1
    assert summary["has_poses"] is has_poses and summary["has_ctf"] is True
    assert "rlnDefocusU" in summary["ctf_fields"]
    low, high = summary["ranges"]["rlnDefocusU"]
    assert 1e4 < low <= high < 2e4


def test_info_on_stacks_volumes_and_several_optics_groups(tmp_path):
    for name, n, box in [("empiar_10076_7.mrc", 7, 320), ("relion31.mrcs", 5, 256)]:
        result = runner.invoke(app, ["info", str(require(PARTICLES / name)), "--json"])
        summary = json.loads(result.stdout)
        assert (summary["kind"], summary["n_particles"], summary["box"]) == ("mrc_stack", n, box)
    write_volume(tmp_path / "map.mrc", np.zeros((6, 6, 6)), pixel_size=1.25)
    summary = json.loads(runner.invoke(app, ["info", str(tmp_path / "map.mrc"), "--json"]).stdout)
    assert summary["kind"] == "mrc_volume" and summary["n_particles"] is None
    assert summary["box"] == 6 and summary["pixel_size_angstrom"] == 1.25
    star = tmp_path / "two.star"
    star.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n"
        "1 1.0 64\n2 2.0 32\n"
        "\ndata_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n1@b.mrcs 2\n"
    )
    summary = json.loads(runner.invoke(app, ["info", str(star), "--json"]).stdout)
    assert summary["pixel_size_angstrom"] == [1.0, 2.0] and summary["box"] == [64, 32]
    assert summary["n_optics_groups"] == 2 and summary["has_ctf"] is False
    table_output = runner.invoke(app, ["info", str(require(PARTICLES / "relion31.star"))]).stdout
    assert "rlnAngleTilt" in table_output and "2.806" in table_output


@pytest.mark.parametrize("command", ["info", "convert"])
def test_errors_are_one_line_with_exit_code_1(tmp_path, command):
    missing = tmp_path / "absent.star"
    args = [command, str(missing)] + ([str(tmp_path / "out.star")] if command == "convert" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "absent.star: STAR file not found" in result.stderr
    bad = tmp_path / "relion31.star"
    bad.write_text("data_particles\nloop_\n_rlnOpticsGroup\n1\n")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 1
    assert "relion31.star: missing column rlnImageName in data_particles" in result.stderr


def test_convert_cs_and_relion30_to_31(tmp_path):
    cs_path = require(PARTICLES / "empiar_10076_7.cs")
    out = tmp_path / "from_cs.star"
    result = runner.invoke(app, ["convert", str(cs_path), str(out)])
    assert result.exit_code == 0, result.output
    cs, star = read_particles(cs_path), read_star(out)
    for label in [
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnVoltage",
    ]:
        np.testing.assert_array_equal(star.data[label].to_numpy(), cs.data[label].to_numpy())
    assert star.image_paths_and_indices()[0].tolist() == cs.image_paths_and_indices()[0].tolist()

    out30 = tmp_path / "from30.star"
    star30 = require(PARTICLES / "empiar_10076_7.star")
    assert runner.invoke(app, ["convert", str(star30), str(out30)]).exit_code == 0
    assert "data_optics" in out30.read_text() and "rlnMagnification" not in out30.read_text()
    np.testing.assert_array_equal(
        read_star(out30).data["rlnDefocusU"].to_numpy(), read_star(star30).data["rlnDefocusU"]
    )
    # --image-root: blob/path is taken relative to that folder
    out_root = tmp_path / "rooted.star"
    args = ["convert", str(cs_path), str(out_root), "--image-root", str(tmp_path / "imgs")]
    assert runner.invoke(app, args).exit_code == 0
    assert read_star(out_root).data["rlnImageName"].iloc[0] == "000001@imgs/empiar_10076_7.mrc"
    result = runner.invoke(app, ["convert", str(cs_path), str(tmp_path / "out.txt")])
    assert result.exit_code == 1 and "out.txt: output must be a .star file" in result.stderr
