"""Simulated data sets: reproducibility, SNR, and agreement of the STAR metadata with the images."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from conftest import MODELS, require
from typer.testing import CliRunner

from cryopose import so3
from cryopose.cli.main import app
from cryopose.imaging import Projector, ctf_2d, irfft2_centred, phase_shift_fourier, signal_power
from cryopose.io import ParticleImages, ParticleStack, read_particles, read_volume
from cryopose.simulate import SimulationConfig, parse_pose_distribution, simulate_particles

BOX, PX = 32, 6.0


def blob_volume(box: int = BOX) -> torch.Tensor:
    """An asymmetric volume of a few Gaussian blobs (fast, no atomic model needed)."""
    centres = torch.tensor([[0.0, 0, 0], [30, 0, 0], [0, 42, 0], [0, 0, -24], [18, -18, 30]])
    i = (torch.arange(box, dtype=torch.float32) - box // 2) * PX
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    vol = torch.zeros(box, box, box)
    for cx, cy, cz in centres.tolist():
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 10.0**2))
    return vol


def digest(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in ("particles.mrcs", "particles.star", "reference.mrc")
    }


def run(tmp: Path, name: str, **overrides) -> tuple[Path, object]:
    config = SimulationConfig(
        n=120,
        box=BOX,
        pixel_size_angstrom=PX,
        snr=0.2,
        max_shift_angstrom=12.0,
        seed=5,
        chunk_size=50,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    out = tmp / name
    result, _ = simulate_particles(config, out, volume=blob_volume())
    return out, result


def test_same_seed_same_bytes(tmp_path):
    a, _ = run(tmp_path, "a")
    b, _ = run(tmp_path, "b")
    c, _ = run(tmp_path, "c", seed=6)
    assert digest(a) == digest(b)
    assert digest(a)["particles.mrcs"] != digest(c)["particles.mrcs"]
    assert not list(a.glob(".*.tmp"))  # nothing half-written left behind


def test_measured_snr_and_clean_images_from_same_seed(tmp_path):
    noisy_dir, result = run(tmp_path, "noisy", snr=0.2)
    clean_dir, _ = run(tmp_path, "clean", snr=math.inf)
    with ParticleStack(noisy_dir / "particles.mrcs") as s:
        noisy = s.read()
    with ParticleStack(clean_dir / "particles.mrcs") as s:
        clean = s.read()
    noise = noisy - clean
    snr = float(signal_power(clean) / noise.var())
    assert abs(snr / 0.2 - 1) < 0.05
    assert abs(result.measured_snr / 0.2 - 1) < 0.05
    # the noise is white and independent of the signal
    assert abs(float((noise * clean).mean()) / float(noise.std() * clean.std())) < 0.05


def test_star_metadata_reproduces_the_images(tmp_path):
    """Re-simulate from what the STAR file says (poses, origins, CTF) with the imaging layer."""
    out, _ = run(tmp_path, "inf", snr=math.inf)
    table = read_particles(out / "particles.star")
    assert len(table) == 120 and table.box == BOX and table.pixel_size == PX
    ref = read_volume(out / "reference.mrc")
    assert ref.pixel_size_angstrom == pytest.approx(PX)
    ctf = table.ctf_params(dtype=torch.float32)
    slices = Projector(ref.data).slices(table.rotations(dtype=torch.float32))
    slices = slices * ctf_2d(
        defocus_u_angstrom=ctf["defocus_u_angstrom"],
        defocus_v_angstrom=ctf["defocus_v_angstrom"],
        defocus_angle_deg=ctf["defocus_angle_deg"],
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
        pixel_size_angstrom=PX,
        box=BOX,
    )
    origin = table.origins_angstrom(dtype=torch.float32)
    assert origin.norm(dim=-1).max() <= 12.0 + 1e-4 and origin.abs().max() > 3.0
    slices = phase_shift_fourier(slices, -origin[:, 0] / PX, -origin[:, 1] / PX, BOX)
    expected = irfft2_centred(slices, BOX)
    with ParticleImages(table) as images:
        got = images.read(list(range(len(table))))
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-4
    # a wrong convention (transposed poses) does not reproduce them
    wrong = irfft2_centred(Projector(ref.data).slices(table.rotations(dtype=torch.float32).mT), BOX)
    assert (got - wrong).norm() / got.norm() > 0.1


def test_iso_gaussian_poses_about_a_mean(tmp_path):
    out, _ = run(tmp_path, "ig", snr=math.inf, n=400, poses="iso-gaussian:0.2@30,60,-45")
    rotations = read_particles(out / "particles.star").rotations()
    mean = so3.euler_to_matrix(torch.tensor([30.0, 60.0, -45.0], dtype=torch.float64))
    angles = so3.geodesic_distance(rotations, mean)
    # IG(eta) with small eta: angle std ~ 0.673 eta
    assert angles.std().item() == pytest.approx(0.673 * 0.2, rel=0.15)
    assert angles.max() < 1.0


def test_poses_from_a_star_file(tmp_path):
    src, _ = run(tmp_path, "src", snr=math.inf, n=30)
    out, _ = run(tmp_path, "resampled", snr=math.inf, n=60, poses=str(src / "particles.star"))
    source = read_particles(src / "particles.star").rotations()
    drawn = read_particles(out / "particles.star").rotations()
    nearest = so3.pairwise_geodesic_distance(drawn, source).min(dim=1).values
    assert nearest.max() < 1e-6  # every drawn pose is one of the data set's poses


@pytest.mark.parametrize(
    "spec",
    ["gaussian:0.3", "iso-gaussian:abc", "iso-gaussian:-1", "iso-gaussian:0.3@1,2", "poses.txt"],
)
def test_bad_pose_specs(spec):
    with pytest.raises(ValueError, match="pose spec"):
        parse_pose_distribution(spec)


def test_cli_simulate_model_and_errors(tmp_path):
    model = require(MODELS / "1ake.pdb.gz")
    runner = CliRunner()
    out = tmp_path / "cli"
    args = [
        "simulate",
        "-o",
        str(out),
        "--model",
        str(model),
        "--n",
        "20",
        "--box",
        "33",
        "--pixel-size",
        "2.5",
        "--snr",
        "inf",
        "--no-ctf",
        "--seed",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with ParticleStack(out / "particles.mrcs") as s:
        assert len(s) == 20 and s.box == 33
    bad = runner.invoke(app, ["simulate", "-o", str(tmp_path / "bad"), "--snr", "-1"])
    assert bad.exit_code == 1 and "--snr" in bad.output
    bad = runner.invoke(
        app,
        [
            "simulate",
            "-o",
            str(tmp_path / "bad2"),
            "--defocus-min",
            "3",
            "--defocus-max",
            "1",
            "--n",
            "2",
            "--box",
            "16",
        ],
    )
    assert bad.exit_code == 1 and "--defocus-min" in bad.output
    assert not (tmp_path / "bad2" / "particles.mrcs").exists()
