"""`cryopose compare`: pose-error figures, joins, symmetry, alignment and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import haar
from typer.testing import CliRunner

from cryopose import so3
from cryopose.cli.main import app
from cryopose.evaluate import compare_poses
from cryopose.io import make_particle_table, write_star
from cryopose.so3.symmetry import point_group

runner = CliRunner()


def perturb(rotations: torch.Tensor, angles_deg: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axes = torch.randn(rotations.shape[0], 3, generator=g, dtype=torch.float64)
    return rotations @ so3.axis_angle_to_matrix(axes, torch.deg2rad(angles_deg))


def test_figures_from_known_errors():
    truth = haar(1000, 0)
    errors = torch.linspace(0.0, 20.0, 1000, dtype=torch.float64)
    result = compare_poses(perturb(truth, errors, 1), truth)
    assert result.n == 1000
    assert result.mean_deg == pytest.approx(10.0, abs=1e-6)
    assert result.median_deg == pytest.approx(10.0, abs=1e-6)
    assert result.max_deg == pytest.approx(20.0, abs=1e-6)
    assert result.p90_deg == pytest.approx(float(np.percentile(errors.numpy(), 90)), abs=1e-6)
    assert result.frac_lt_5deg == pytest.approx(float((errors < 5).double().mean()), abs=2e-3)
    assert result.frac_lt_10deg == pytest.approx(0.5, abs=2e-3)
    chordal = (2 * math.sqrt(2) * torch.sin(torch.deg2rad(errors) / 2)) ** 2
    assert result.chordal_mse == pytest.approx(float(chordal.mean()), rel=1e-9)
    assert result.shift_rmse_angstrom is None and not result.hand_flipped


@pytest.mark.parametrize("symbol", ["C4", "D7", "I"])
def test_symmetry_equivalent_poses_have_zero_error(symbol):
    truth = haar(200, 2)
    group = point_group(symbol, dtype=torch.float64)
    pick = torch.randint(0, group.shape[0], (200,), generator=torch.Generator().manual_seed(3))
    equivalent = group[pick].transpose(-1, -2) @ truth  # RELION A g  <->  cryopose g^T R
    assert compare_poses(equivalent, truth, symmetry=symbol).max_deg < 1e-5
    assert compare_poses(equivalent, truth).mean_deg > 1.0


def test_alignment_removes_global_rotation_and_hand():
    truth = haar(500, 4)
    q = haar(1, 5)[0]
    j = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    estimated = j @ (q @ truth) @ j
    assert compare_poses(estimated, truth).mean_deg > 10
    assert compare_poses(estimated, truth, align="rotation").mean_deg > 10
    result = compare_poses(estimated, truth, align="rotation+hand")
    assert result.max_deg < 1e-6 and result.hand_flipped
    angle = math.degrees(float(so3.geodesic_distance(q, torch.eye(3, dtype=torch.float64))))
    assert result.align_rotation_deg == pytest.approx(angle, abs=1e-4)


def write(path, rotations, origins=None, names=True):
    n = rotations.shape[0]
    table = make_particle_table(
        path.parent / "particles.mrcs",
        n,
        pixel_size_angstrom=2.0,
        box=64,
        rotations=rotations,
        origins_angstrom=origins,
    )
    if not names:
        table.data = table.data.drop(columns=["rlnImageName"])
    write_star(table, path)
    return table


def test_cli_json_join_by_image_name(tmp_path):
    truth = haar(300, 6)
    errors = torch.full((300,), 3.0, dtype=torch.float64)
    origins = torch.zeros(300, 2, dtype=torch.float64)
    write(tmp_path / "truth.star", truth, origins)
    shifted = origins + torch.tensor([3.0, 4.0], dtype=torch.float64)  # 5 A off everywhere
    est_table = write(tmp_path / "est.star", perturb(truth, errors, 7), shifted)
    # shuffle the rows and drop a third: the join must use rlnImageName, not row order
    order = torch.randperm(300, generator=torch.Generator().manual_seed(8))[:200].numpy()
    est_table.data = est_table.data.iloc[order].reset_index(drop=True)
    write_star(est_table, tmp_path / "est.star")
    result = runner.invoke(
        app, ["compare", str(tmp_path / "est.star"), str(tmp_path / "truth.star"), "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert set(figures) == {
        "n",
        "mean_deg",
        "median_deg",
        "p90_deg",
        "max_deg",
        "frac_lt_5deg",
        "frac_lt_10deg",
        "chordal_mse",
        "shift_rmse_angstrom",
        "align_rotation_deg",
        "hand_flipped",
    }
    assert figures["n"] == 200
    assert figures["mean_deg"] == pytest.approx(3.0, abs=1e-6)
    assert figures["frac_lt_5deg"] == 1.0
    assert figures["shift_rmse_angstrom"] == pytest.approx(5.0, abs=1e-9)
    assert figures["align_rotation_deg"] == 0.0 and figures["hand_flipped"] is False
    table = runner.invoke(
        app, ["compare", str(tmp_path / "est.star"), str(tmp_path / "truth.star")]
    )
    assert table.exit_code == 0 and "median error" in table.stdout


def test_cli_row_order_fallback_warns(tmp_path):
    truth = haar(50, 9)
    write(tmp_path / "truth.star", truth, names=False)
    write(tmp_path / "est.star", truth, names=False)
    result = runner.invoke(
        app, ["compare", str(tmp_path / "est.star"), str(tmp_path / "truth.star"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "row order" in result.stderr
    assert json.loads(result.stdout)["max_deg"] < 1e-6


def test_cli_bad_input(tmp_path):
    truth = haar(10, 10)
    write(tmp_path / "truth.star", truth)
    missing = runner.invoke(
        app, ["compare", str(tmp_path / "nope.star"), str(tmp_path / "truth.star")]
    )
    assert missing.exit_code == 1 and "nope.star" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    no_angles = write(tmp_path / "noangles.star", truth)
    no_angles.data = no_angles.data.drop(columns=["rlnAngleTilt"])
    write_star(no_angles, tmp_path / "noangles.star")
    res = runner.invoke(
        app, ["compare", str(tmp_path / "noangles.star"), str(tmp_path / "truth.star")]
    )
    assert res.exit_code == 1 and "rlnAngleTilt" in res.stderr
    other = write(tmp_path / "other.star", truth)
    other.data["rlnImageName"] = [f"{i}@elsewhere.mrcs" for i in range(1, 11)]
    write_star(other, tmp_path / "other.star")
    res = runner.invoke(
        app, ["compare", str(tmp_path / "other.star"), str(tmp_path / "truth.star")]
    )
    assert res.exit_code == 1 and "no rlnImageName in common" in res.stderr
    res = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "truth.star"),
            str(tmp_path / "truth.star"),
            "--align",
            "sideways",
        ],
    )
    assert res.exit_code == 1 and "--align" in res.stderr
