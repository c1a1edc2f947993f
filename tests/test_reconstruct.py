"""Direct Fourier reconstruction: resolution against the truth, weights, symmetry, halves, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import haar
from typer.testing import CliRunner

from cryopose.cli.main import app
from cryopose.evaluate.fsc import fsc
from cryopose.imaging import Projector, ctf_2d, irfft2_centred, phase_shift_fourier
from cryopose.io import read_particles, read_volume, write_star
from cryopose.reconstruct import (
    FourierAccumulator,
    half_subsets,
    reconstruct_images,
    reconstruct_particles,
)
from cryopose.simulate import SimulationConfig, simulate_particles
from cryopose.so3 import point_group

PX = 6.0
CENTRES = [[0.0, 0, 0], [30, 0, 0], [0, 42, 0], [0, 0, -24], [18, -18, 30]]


def blobs(box: int, centres=CENTRES, sigma: float = 6.0, dtype=torch.float64) -> torch.Tensor:
    """Gaussian blobs (sigma in Angstrom) at ``centres`` (x, y, z Angstrom): power up to Nyquist."""
    i = (torch.arange(box, dtype=torch.float64) - box // 2) * PX
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for cx, cy, cz in centres:
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return vol.to(dtype)


def res05_px(volume: torch.Tensor, truth: torch.Tensor) -> float:
    return fsc(volume, truth, PX).resolution_05_angstrom / PX


def rel_error(volume: torch.Tensor, truth: torch.Tensor) -> float:
    return float((volume - truth).norm() / truth.norm())


@pytest.mark.parametrize("box", [32, 33])
def test_noiseless_true_poses_reach_2_2_pixels(box, dtype):
    truth = blobs(box, dtype=dtype)
    rot = haar(300, seed=box, dtype=dtype)
    images = Projector(truth).images(rot)
    rec = reconstruct_images(images, rot, pixel_size_angstrom=PX)
    assert rec.volume.dtype == dtype and rec.volume.shape == (box,) * 3
    assert res05_px(rec.volume, truth) <= 2.2
    assert rel_error(rec.volume, truth) < 0.12
    # Half-maps agree with each other to the same figure.
    assert rec.half_fsc.resolution_05_angstrom / PX <= 2.2


def test_ctf_and_origins_are_undone():
    box = 32
    truth = blobs(box)
    n = 400
    rot = haar(n, seed=3)
    g = torch.Generator().manual_seed(4)
    defocus = 8000.0 + 12000.0 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = ctf_2d(
        defocus_u_angstrom=defocus, defocus_v_angstrom=defocus - 300.0, defocus_angle_deg=30.0,
        voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=PX, box=box,
    )
    origin_px = 3.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    # Forward model: CTF, then move the particle by -origin (RELION's sign).
    slices = Projector(truth).slices(rot) * ctf
    moved = phase_shift_fourier(slices, -origin_px[:, 0], -origin_px[:, 1], box)
    images = irfft2_centred(moved, box)
    rec = reconstruct_images(images, rot, ctf=ctf, shifts_px=origin_px, pixel_size_angstrom=PX)
    assert res05_px(rec.volume, truth) <= 2.2
    assert rel_error(rec.volume, truth) < 0.12
    # Ignoring the shifts ruins it (the test can fail).
    wrong = reconstruct_images(images, rot, ctf=ctf, pixel_size_angstrom=PX)
    assert rel_error(wrong.volume, truth) > 0.3


@pytest.mark.parametrize("symbol", ["C4", "D3"])
def test_symmetry_from_a_fraction_of_the_particles(symbol):
    box = 32
    group = point_group(symbol)
    base = torch.tensor([[18.0, 6.0, 12.0], [0.0, 0, 0], [9.0, -24, -6]], dtype=torch.float64)
    centres = torch.einsum("gij,cj->gci", group, base).reshape(-1, 3).tolist()
    truth = blobs(box, centres)
    n_full = 600
    rot = haar(n_full // len(group), seed=7)
    images = Projector(truth).images(rot)
    rec = reconstruct_images(images, rot, symmetry=symbol, pixel_size_angstrom=PX)
    assert res05_px(rec.volume, truth) <= 2.2
    assert rel_error(rec.volume, truth) < 0.12
    # Symmetry applied on the wrong side (R g instead of g.T R) must not pass.
    wrong_rot = (rot[:, None] @ group[None]).reshape(-1, 3, 3)
    wrong = reconstruct_images(images.repeat_interleave(len(group), 0), wrong_rot,
                               pixel_size_angstrom=PX)
    assert rel_error(wrong.volume, truth) > 0.2


def test_symmetry_makes_the_map_symmetric():
    """From a few images of an asymmetric map, ``--symmetry C4`` still gives a C4 map (odd box:
    ``rot90`` about the centre voxel is exact); without symmetry it does not."""
    box = 33
    truth = blobs(box)
    rot = haar(20, seed=12)
    images = Projector(truth).images(rot)
    sym = reconstruct_images(images, rot, symmetry="C4", ssnr=100.0).volume
    plain = reconstruct_images(images, rot, ssnr=100.0).volume
    turned = torch.rot90(sym, 1, dims=(1, 2))
    assert rel_error(turned, sym) < 1e-6
    assert rel_error(torch.rot90(plain, 1, dims=(1, 2)), plain) > 0.1


def test_wiener_filter_from_half_maps_beats_no_regularisation():
    box = 32
    truth = blobs(box)
    rot = haar(400, seed=13)
    clean = Projector(truth).images(rot)
    g = torch.Generator().manual_seed(14)
    sigma = float(clean.pow(2).mean().sqrt()) * 1.5
    images = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    wiener = reconstruct_images(images, rot, ssnr="fsc", pixel_size_angstrom=PX)
    plain = reconstruct_images(images, rot, ssnr=1e8, pixel_size_angstrom=PX)
    assert rel_error(wiener.volume, truth) < 0.8 * rel_error(plain.volume, truth)
    # The estimated SSNR falls with frequency (signal decays, noise is white).
    assert float(wiener.ssnr[2]) > 10 * float(wiener.ssnr[-1])


def test_weights_select_and_scale():
    box = 24
    truth = blobs(box)
    rot = haar(120, seed=9)
    images = Projector(truth).images(rot)
    subsets = half_subsets(120, seed=1)
    keep = torch.zeros(120, dtype=torch.float64)
    keep[::2] = 1.0
    kw = dict(subsets=subsets, ssnr=100.0, pixel_size_angstrom=PX)
    weighted = reconstruct_images(images, rot, weights=keep, **kw)
    sub = reconstruct_images(images[::2], rot[::2], subsets=subsets[::2], ssnr=100.0)
    torch.testing.assert_close(weighted.volume, sub.volume)
    # A common factor changes nothing (the Wiener term scales with the denominator).
    a = reconstruct_images(images, rot, **kw)
    b = reconstruct_images(images, rot, weights=torch.full((120,), 3.0, dtype=torch.float64), **kw)
    torch.testing.assert_close(a.volume, b.volume)
    with pytest.raises(ValueError, match="weights"):
        reconstruct_images(images, rot, weights=-keep, **kw)


def test_half_subsets_seeded_balanced_and_from_star():
    a, b = half_subsets(101, seed=3), half_subsets(101, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, half_subsets(101, seed=4))
    assert abs(int((a == 1).sum()) - int((a == 2).sum())) <= 1
    given = np.array([1, 2, 2, 1])
    assert np.array_equal(half_subsets(4, given), given)
    with pytest.raises(ValueError, match="rlnRandomSubset"):
        half_subsets(4, np.array([1, 2, 3, 1]))


def test_accumulator_rejects_bad_shapes():
    acc = FourierAccumulator(16)
    with pytest.raises(ValueError, match="slices"):
        acc.insert(torch.zeros(2, 16, 16, dtype=torch.complex64), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="rotations"):
        acc.insert(torch.zeros(2, 16, 9, dtype=torch.complex64), torch.eye(3).expand(3, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    truth = blobs(24)
    rot = haar(100, seed=11)
    images = Projector(truth).images(rot)
    cpu = reconstruct_images(images, rot, ssnr=100.0).volume
    gpu = reconstruct_images(images.cuda(), rot.cuda(), ssnr=100.0).volume
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-8, rtol=1e-6)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Noiseless CTF-modulated particles with origins; half of them get random (wrong) poses
    and a high ``rlnCryoposeExpectedLoss``."""
    folder = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(
        n=400, box=32, pixel_size_angstrom=PX, snr=float("inf"), max_shift_angstrom=12.0,
        seed=2, defocus_min_um=0.8, defocus_max_um=2.0,
    )
    simulate_particles(config, folder / "data", volume=blobs(32, dtype=torch.float32))
    table = read_particles(folder / "data" / "particles.star")
    bad = np.arange(len(table)) % 2 == 1
    rng = np.random.default_rng(0)
    angles = table.data[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().copy()
    angles[bad] = rng.uniform(0, 180, size=(int(bad.sum()), 3))
    table.data[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = angles
    table.data["rlnCryoposeExpectedLoss"] = np.where(bad, 5.0, 0.1) + rng.uniform(0, 0.01, len(bad))
    table.data["rlnGood"] = np.where(bad, 0.0, 1.0)
    write_star(table, folder / "data" / "mixed.star")
    return folder / "data"


def test_cli_reconstruct_keep_fraction_weights_halves(simulated, tmp_path):
    runner = CliRunner()
    truth = read_volume(simulated / "reference.mrc", dtype=torch.float64).data
    star = str(simulated / "mixed.star")

    out = tmp_path / "kept.mrc"
    res = runner.invoke(app, ["reconstruct", star, "-o", str(out), "--halves",
                              "--keep-fraction", "0.5", "--by", "rlnCryoposeExpectedLoss"])
    assert res.exit_code == 0, res.output
    printed = " ".join(res.stdout.split())  # rich wraps long paths at the console width
    assert "200 particles" in printed and "half-map FSC resolution" in printed
    kept = read_volume(out, dtype=torch.float64)
    assert kept.pixel_size_angstrom == pytest.approx(PX)
    assert res05_px(kept.data, truth) <= 2.5
    assert (tmp_path / "kept_half1.mrc").exists() and (tmp_path / "kept_half2.mrc").exists()

    res = runner.invoke(app, ["reconstruct", star, "-o", str(tmp_path / "w.mrc"),
                              "--weights", "rlnGood"])
    assert res.exit_code == 0, res.output
    weighted = read_volume(tmp_path / "w.mrc", dtype=torch.float64).data
    assert res05_px(weighted, truth) <= 2.5

    res = runner.invoke(app, ["reconstruct", star, "-o", str(tmp_path / "all.mrc")])
    assert res.exit_code == 0, res.output
    everything = read_volume(tmp_path / "all.mrc", dtype=torch.float64).data
    assert rel_error(everything, truth) > 0.3  # the wrong poses spoil it
    assert rel_error(kept.data, truth) < 0.15 and rel_error(weighted, truth) < 0.15


def test_cli_reconstruct_bad_input(simulated, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.mrc"
    res = runner.invoke(app, ["reconstruct", str(tmp_path / "missing.star"), "-o", str(out)])
    assert res.exit_code == 1 and "missing.star" in res.output
    star = str(simulated / "mixed.star")
    res = runner.invoke(app, ["reconstruct", star, "-o", str(out), "--keep-fraction", "0.5",
                              "--by", "rlnNoSuchColumn"])
    assert res.exit_code == 1 and "rlnNoSuchColumn" in res.output
    res = runner.invoke(app, ["reconstruct", star, "-o", str(out), "--keep-fraction", "1.5",
                              "--by", "rlnCryoposeExpectedLoss"])
    assert res.exit_code == 1 and "--keep-fraction" in res.output
    res = runner.invoke(app, ["reconstruct", star, "-o", str(out), "--pad-factor", "0.5"])
    assert res.exit_code == 1 and "--pad-factor" in res.output
    assert not out.exists() and "Traceback" not in res.output


@pytest.mark.slow
@pytest.mark.parametrize("box", [32, 33])
def test_4000_particles_with_ctf_at_snr_half_reach_2_5_pixels(box, tmp_path):
    """The issue's figure: 4,000 particles with CTF and origins at SNR 0.5, true poses."""
    config = SimulationConfig(
        n=4000, box=box, pixel_size_angstrom=PX, snr=0.5, max_shift_angstrom=6.0, seed=3,
        defocus_min_um=0.8, defocus_max_um=2.0,
    )
    simulate_particles(config, tmp_path / "d", volume=blobs(box, dtype=torch.float32))
    rec = reconstruct_particles(read_particles(tmp_path / "d" / "particles.star"))
    truth = read_volume(tmp_path / "d" / "reference.mrc", dtype=torch.float64).data
    assert res05_px(rec.volume.double(), truth) <= 2.5
