"""FSC between maps: analytic curves, low-pass crossings, files and the ``cryopose fsc`` command."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from cryopose.cli.main import app
from cryopose.evaluate.fsc import (
    fourier_shell_correlation,
    fsc,
    plot_fsc,
    resolution_at,
    write_fsc_csv,
)
from cryopose.imaging import low_pass, soft_circular_mask
from cryopose.io import write_volume

PX = 2.0


def noise_map(box: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(box, box, box, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("box", [24, 25])
def test_map_against_itself_is_one_everywhere(box, dtype):
    v = noise_map(box, 1, dtype)
    result = fsc(v, v.clone(), PX)
    assert result.fsc.shape == (box // 2 + 1,)
    torch.testing.assert_close(result.fsc, torch.ones(box // 2 + 1, dtype=torch.float64))
    # Never crosses: the last shell's resolution (Nyquist for even boxes).
    assert result.resolution_0143_angstrom == pytest.approx(box * PX / (box // 2))
    assert result.resolution_05_angstrom == pytest.approx(box * PX / (box // 2))


@pytest.mark.parametrize("box", [32, 33])
def test_scale_sign_and_independence(box):
    a, b = noise_map(box, 2), noise_map(box, 3)
    ones = torch.ones(box // 2 + 1, dtype=torch.float64)
    torch.testing.assert_close(fourier_shell_correlation(a, 3.5 * a), ones)
    torch.testing.assert_close(fourier_shell_correlation(a, -a), -ones)
    # Independent white noise: |FSC| ~ 1/sqrt(voxels in shell), small beyond the first shells.
    curve = fourier_shell_correlation(a, b)
    assert curve[4:].abs().max() < 0.15
    # Half signal, half independent noise of equal power: FSC ~ 1/2 in every shell.
    mixed = fourier_shell_correlation(a + b, a + noise_map(box, 4))
    assert (mixed[4:] - 0.5).abs().max() < 0.15


@pytest.mark.parametrize("box", [32, 33])
@pytest.mark.parametrize("resolution_px", [2.6, 4.0, 6.5])
def test_low_pass_copy_reports_its_resolution_within_one_shell(box, resolution_px):
    v = noise_map(box, 5)
    r = resolution_px * PX
    filtered = low_pass(v, r, PX, edge_fourier_px=0.0, ndim=3)
    result = fsc(v, filtered, PX)
    shell = 1.0 / (box * PX)  # one Fourier shell in 1/Angstrom
    for found in (result.resolution_0143_angstrom, result.resolution_05_angstrom):
        assert abs(1.0 / found - 1.0 / r) <= shell


def test_resolution_interpolates_the_crossing():
    curve = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1, 0.0])
    # 0.5 is crossed halfway between shells 2 and 3 -> frequency 2.5 / (N px).
    assert resolution_at(curve, 0.5, 10, 2.0) == pytest.approx(10 * 2.0 / 2.5)
    # 0.143 between shells 3 (0.3) and 4 (0.1): 3 + 0.157 / 0.2.
    assert resolution_at(curve, 0.143, 10, 2.0) == pytest.approx(20.0 / (3 + 0.157 / 0.2))


def test_mask_is_applied_to_both_maps():
    a, b = noise_map(20, 6), noise_map(20, 7)
    mask = soft_circular_mask(20, 6.0, 3.0, ndim=3, dtype=torch.float64)
    torch.testing.assert_close(
        fourier_shell_correlation(a, b, mask), fourier_shell_correlation(a * mask, b * mask)
    )
    with pytest.raises(ValueError, match="mask"):
        fourier_shell_correlation(a, b, mask[:-1])
    with pytest.raises(ValueError, match="map2"):
        fourier_shell_correlation(a, b[:-1, :-1, :-1])


def test_csv_and_png_files(tmp_path):
    v = noise_map(16, 8)
    result = fsc(v, v + 0.5 * noise_map(16, 9), PX)
    write_fsc_csv(result, tmp_path / "fsc.csv")
    plot_fsc(result, tmp_path / "fsc.png")
    with open(tmp_path / "fsc.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    got = torch.tensor([float(r["fsc"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got, result.fsc, atol=1e-7, rtol=0)
    assert float(rows[4]["frequency_per_angstrom"]) == pytest.approx(4 / (16 * PX))
    assert (tmp_path / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.csv", "fsc.png"]


def test_cli_json_csv_png_and_errors(tmp_path):
    box = 24
    v = noise_map(box, 10)
    r = 5.0 * PX
    write_volume(tmp_path / "a.mrc", v, PX)
    write_volume(tmp_path / "b.mrc", low_pass(v, r, PX, edge_fourier_px=0.0, ndim=3), PX)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--json",
            "--csv", str(tmp_path / "c.csv"), "--png", str(tmp_path / "c.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"resolution_0143_angstrom", "resolution_05_angstrom", "curve"} <= set(out)
    assert abs(1 / out["resolution_05_angstrom"] - 1 / r) <= 1 / (box * PX)
    assert len(out["curve"]) == box // 2 + 1 and out["curve"][1]["fsc"] == pytest.approx(1.0)
    assert (tmp_path / "c.csv").exists() and (tmp_path / "c.png").exists()

    res = runner.invoke(app, ["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "nope.mrc")])
    assert res.exit_code == 1
    assert "nope.mrc" in res.output and "Traceback" not in res.output
    write_volume(tmp_path / "small.mrc", v[:20, :20, :20], PX)
    res = runner.invoke(app, ["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "small.mrc")])
    assert res.exit_code == 1 and "differs" in res.output
