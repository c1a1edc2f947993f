"""EM refinement with projections (soft / hard assignment): weights, soft insertion, the loop,
shift recovery, symmetry, the CLI and seeded reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryopose.cli.main import app
from cryopose.imaging import Projector, ctf_2d, irfft2_centred, phase_shift_fourier, rfft2_centred
from cryopose.io import make_particle_table, read_particles, read_volume, write_stack, write_star
from cryopose.io.mrc import write_volume
from cryopose.reconstruct import FourierAccumulator
from cryopose.reconstruct.refine import (
    GridBackProjector,
    RefineConfig,
    assignment_weights,
    iteration_paths,
    refine,
)
from cryopose.so3 import healpix_grid

PX = 8.0
CENTRES = [[0.0, 0, 0], [40, 0, 0], [0, 56, 0], [0, 0, -32], [24, -24, 40]]


def blobs(box: int, centres=CENTRES, sigma: float = 10.0) -> torch.Tensor:
    """Gaussian blobs (sigma, centres in Angstrom), float64 ``[z, y, x]``."""
    i = (torch.arange(box, dtype=torch.float64) - box // 2) * PX
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for cx, cy, cz in centres:
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return vol


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def make_dataset(
    folder,
    volume: torch.Tensor,
    rotations: torch.Tensor,
    *,
    origins_px: torch.Tensor | None = None,
    noise_sigma: float = 0.0,
    seed: int = 0,
    name: str = "particles",
):
    """Projections with RELION's CTF, moved by ``-origin`` (RELION sign), optional white noise;
    written as a stack and a table whose origins are ``origins_px`` (zeros if None)."""
    box = volume.shape[-1]
    n = rotations.shape[0]
    g = torch.Generator().manual_seed(seed)
    defocus = 10000.0 + 10000.0 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = ctf_2d(
        defocus_u_angstrom=defocus, defocus_v_angstrom=defocus - 200.0, defocus_angle_deg=20.0,
        voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=PX, box=box,
    )
    slices = Projector(volume).slices(rotations) * ctf
    if origins_px is not None:
        slices = phase_shift_fourier(slices, -origins_px[:, 0], -origins_px[:, 1], box)
    images = irfft2_centred(slices, box)
    if noise_sigma > 0:
        images = images + noise_sigma * torch.randn(images.shape, generator=g, dtype=images.dtype)
    stack = folder / f"{name}.mrcs"
    write_stack(stack, images, PX)
    table = make_particle_table(
        stack, n, pixel_size_angstrom=PX, box=box, rotations=rotations,
        origins_angstrom=None if origins_px is None else origins_px * PX,
        ctf={"defocus_u_angstrom": defocus, "defocus_v_angstrom": defocus - 200.0,
             "defocus_angle_deg": 20.0},
    )
    return table


def grid_poses(order: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = healpix_grid(order, dtype=torch.float64)
    index = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed))[:n]
    return grid.matrices[index], index


# ---- E-step weights ------------------------------------------------------------------------


def test_assignment_weights_soft_is_the_posterior_and_hard_the_mle(dtype):
    g = torch.Generator().manual_seed(0)
    ll = 3.0 * torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    log_q = torch.log(torch.rand(7, generator=g, dtype=torch.float64) + 0.1)
    soft = assignment_weights(ll.to(dtype), "soft", log_q)
    joint = (ll + log_q[None, :, None]).reshape(5, -1)
    expected = torch.softmax(joint, dim=1).reshape(5, 7, 3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert soft.dtype == dtype
    torch.testing.assert_close(soft.double(), expected, rtol=tol, atol=tol)
    # per-image offsets (1e6) change nothing: only differences enter
    shifted = assignment_weights(ll + torch.tensor([1e6, -1e6, 0, 3e5, 7.0])[:, None, None],
                                 "soft", log_q)
    torch.testing.assert_close(shifted, expected, rtol=1e-9, atol=1e-9)
    hard = assignment_weights(ll, "hard")
    assert torch.equal(hard.sum(dim=(1, 2)), torch.ones(5, dtype=torch.float64))
    best = ll.reshape(5, -1).argmax(1)
    assert torch.equal(hard.reshape(5, -1).argmax(1), best)
    assert int((hard > 0).sum()) == 5
    with pytest.raises(ValueError, match="assignment"):
        assignment_weights(ll, "medium")
    with pytest.raises(ValueError, match="log_likelihood"):
        assignment_weights(ll[0], "soft")


# ---- M-step: soft insertion ----------------------------------------------------------------


@pytest.mark.parametrize("box", [24, 25])
def test_soft_insertion_of_a_split_posterior_is_the_mean_of_two_insertions(box, dtype):
    """A particle whose posterior is 50/50 between (R1, t1) and (R2, t2) inserts the mean of the
    two single insertions (each of the image centred by its shift)."""
    grid = healpix_grid(1, dtype=dtype)
    shifts = torch.tensor([[0.0, 0.0], [1.0, -2.0], [-1.5, 0.5]], dtype=dtype)
    g = torch.Generator().manual_seed(box)
    image = torch.randn(1, box, box, generator=g, dtype=dtype)
    ctf = 0.2 + torch.rand(1, box, box // 2 + 1, generator=g, dtype=dtype)
    ft = rfft2_centred(image)
    (g1, t1), (g2, t2) = (17, 1), (301, 2)
    weights = torch.zeros(1, len(grid), 3, dtype=dtype)
    weights[0, g1, t1] = weights[0, g2, t2] = 0.5
    sums = GridBackProjector(box, len(grid), shifts, dtype)
    sums.add(weights, ft, ctf)
    soft = FourierAccumulator(box, dtype=dtype)
    sums.insert_into(soft, grid.matrices)

    direct = FourierAccumulator(box, dtype=dtype)
    for gi, ti in ((g1, t1), (g2, t2)):
        centred = phase_shift_fourier(ft, -shifts[ti, 0], -shifts[ti, 1], box)
        direct.insert(centred, grid.matrices[gi][None], ctf, torch.tensor([0.5], dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    scale = float(direct.denominator.abs().max())
    torch.testing.assert_close(soft.denominator, direct.denominator, rtol=0, atol=tol * scale)
    scale = float(direct.numerator.abs().max())
    torch.testing.assert_close(soft.numerator, direct.numerator, rtol=0, atol=tol * scale)
    # and it is not the insertion at one of the two poses alone
    single = FourierAccumulator(box, dtype=dtype)
    single.insert(ft, grid.matrices[g1][None], ctf)
    diff = single.denominator - soft.denominator
    assert float(diff.norm() / single.denominator.norm()) > 0.3


def test_insert_sums_equals_insert():
    box = 24
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, box, box, generator=g, dtype=torch.float64)
    ctf = torch.randn(4, box, box // 2 + 1, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    rot = healpix_grid(0, dtype=torch.float64).matrices[:4]
    ft = rfft2_centred(images)
    a = FourierAccumulator(box, dtype=torch.float64)
    a.insert(ft, rot, ctf, w)
    b = FourierAccumulator(box, dtype=torch.float64)
    b.insert_sums(w[:, None, None] * ctf * ft, w[:, None, None] * ctf**2, rot, n_images=4)
    torch.testing.assert_close(a.numerator, b.numerator, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.denominator, b.denominator, rtol=1e-12, atol=1e-12)
    assert a.n_images == b.n_images == 4
    with pytest.raises(ValueError, match="denominator"):
        b.insert_sums(ft, ctf[:, :-1], rot)


# ---- the loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("box", [24, 25])
def test_noiseless_one_iteration_hard_finds_grid_poses_and_soft_limit_equals_hard(box, tmp_path):
    """Noiseless particles at grid rotations, the true map as reference: hard assignment
    recovers every pose and a map that correlates > 0.9 with the truth; at a tiny noise level
    the posterior is one-hot and soft assignment gives the same poses and map."""
    truth = blobs(box)
    rotations, index = grid_poses(1, 160, seed=box)
    table = make_dataset(tmp_path, truth, rotations)
    results = {}
    for assignment in ("hard", "soft", "mmse"):
        config = RefineConfig(iterations=1, assignment=assignment, grid_order=1,
                              noise_sigma=1e-4, dtype=torch.float64, seed=3)
        results[assignment] = refine(table, truth, PX, config).final
    hard, soft = results["hard"], results["soft"]
    # a one-hot posterior's MMSE pose is its grid point: the mmse map is the hard one
    torch.testing.assert_close(results["mmse"].table.rotations(), rotations, atol=1e-6, rtol=0)
    torch.testing.assert_close(results["mmse"].reconstruction.volume, hard.reconstruction.volume,
                               rtol=0, atol=1e-6 * float(truth.abs().max()))
    assert torch.equal(hard.estimates.index_mle, index)
    torch.testing.assert_close(hard.table.rotations(), rotations, atol=1e-9, rtol=0)
    assert correlation(hard.reconstruction.volume, truth) > 0.9
    assert float(soft.estimates.max_probability.min()) > 0.999
    torch.testing.assert_close(soft.table.rotations(), rotations, atol=1e-6, rtol=0)
    torch.testing.assert_close(soft.reconstruction.volume, hard.reconstruction.volume,
                               rtol=0, atol=1e-6 * float(truth.abs().max()))
    # gold standard: two half sets of (almost) equal size, labelled in the output table
    labels = soft.table.data["rlnRandomSubset"].to_numpy()
    assert set(labels) == {1, 2} and abs(int((labels == 1).sum()) - 80) <= 1


def test_soft_assignment_keeps_posterior_spread_at_low_snr(tmp_path):
    """At low SNR the soft map differs from the hard one and soft poses carry uncertainty."""
    box = 24
    truth = blobs(box)
    rotations, _ = grid_poses(1, 120, seed=5)
    sigma = 2.0 * float(Projector(truth).images(rotations[:8]).std())
    table = make_dataset(tmp_path, truth, rotations, noise_sigma=sigma, seed=2)
    out = {}
    for assignment in ("soft", "hard"):
        config = RefineConfig(iterations=1, assignment=assignment, grid_order=1)
        out[assignment] = refine(table, truth, PX, config).final
    assert float(out["soft"].estimates.max_probability.median()) < 0.99
    diff = out["soft"].reconstruction.volume - out["hard"].reconstruction.volume
    assert float(diff.norm() / out["hard"].reconstruction.volume.norm()) > 0.01


def test_shift_search_recovers_origins_with_relion_sign(tmp_path):
    box = 24
    truth = blobs(box)
    rotations, index = grid_poses(1, 40, seed=8)
    g = torch.Generator().manual_seed(9)
    origins = torch.randint(-1, 2, (40, 2), generator=g).double()  # on the 1-px shift grid
    table = make_dataset(tmp_path, truth, rotations, origins_px=origins)
    # input origins: the truth moved by one pixel in x for half of the particles
    start = origins.clone()
    start[::2, 0] += 1.0
    table = table.with_poses(rotations, start * PX)
    config = RefineConfig(iterations=1, assignment="hard", grid_order=1, noise_sigma=1e-4,
                          shift_range_angstrom=2.0 * PX, shift_step_angstrom=PX,
                          dtype=torch.float64)
    result = refine(table, truth, PX, config).final
    found = result.table.origins_angstrom() / PX
    torch.testing.assert_close(found, origins, atol=1e-9, rtol=0)
    assert torch.equal(result.estimates.index_mle, index)


def test_mmse_insertion_undoes_shifts_and_expands_symmetry_like_the_grid_path(tmp_path):
    """Off-grid origins, a shift search and C2: with a point-mass posterior the mmse M-step
    (each image inserted at its own pose and shift) equals the hard one (grid sums), which
    pins the shift sign and the symmetry-mate composition of the direct insertion; with a
    spread posterior the two differ."""
    box = 24
    truth = blobs(box)
    truth = 0.5 * (truth + truth.flip(1, 2))
    rotations, _ = grid_poses(1, 40, seed=4)
    g = torch.Generator().manual_seed(6)
    origins = torch.randint(-1, 2, (40, 2), generator=g).double()
    table = make_dataset(tmp_path, truth, rotations, origins_px=origins)
    table = table.with_poses(rotations, torch.zeros(40, 2, dtype=torch.float64))
    maps = {}
    for noise in (1e-4, 1.0):
        for assignment in ("hard", "mmse"):
            config = RefineConfig(iterations=1, assignment=assignment, grid_order=1,
                                  symmetry="C2", noise_sigma=noise,
                                  shift_range_angstrom=1.5 * PX, shift_step_angstrom=PX,
                                  dtype=torch.float64)
            maps[(noise, assignment)] = refine(table, truth, PX, config).final
    hard, mmse = maps[(1e-4, "hard")], maps[(1e-4, "mmse")]
    torch.testing.assert_close(mmse.table.origins_angstrom() / PX, origins, atol=1e-6, rtol=0)
    torch.testing.assert_close(mmse.reconstruction.volume, hard.reconstruction.volume,
                               rtol=0, atol=1e-6 * float(truth.abs().max()))
    spread_h = maps[(1.0, "hard")].reconstruction.volume
    spread_m = maps[(1.0, "mmse")].reconstruction.volume
    assert float((spread_m - spread_h).norm() / spread_h.norm()) > 1e-3


def test_symmetry_gives_a_symmetric_map(tmp_path):
    """C2 about z: the map of a C2 refinement is invariant under the 2-fold ``(x, y) -> (-x,
    -y)`` (odd box: a flip of the y and x axes), while a C1 refinement of the same data from
    the same asymmetric reference is not exactly.

    (From a C2-symmetric reference a C1 soft refinement is itself exactly symmetric: the two
    poses ``R`` and ``R C2`` of every particle have equal likelihoods, so the posterior splits
    evenly between them. Hence the asymmetric bump on the reference.)"""
    box = 25
    truth = blobs(box)
    truth = 0.5 * (truth + truth.flip(1, 2))
    c = box // 2
    reference = truth.clone()
    reference[c - 1 : c + 2, c + 2 : c + 5, c + 4 : c + 7] += 0.3 * float(truth.max())
    rotations, _ = grid_poses(1, 80, seed=11)
    table = make_dataset(tmp_path, truth, rotations)
    maps = {}
    for symmetry in ("C2", "C1"):
        config = RefineConfig(iterations=1, assignment="soft", grid_order=1, symmetry=symmetry,
                              noise_sigma=0.3, dtype=torch.float64)
        maps[symmetry] = refine(table, reference, PX, config).final.reconstruction.volume
    vol = maps["C2"]
    assert float((vol.flip(1, 2) - vol).norm() / vol.norm()) < 1e-9
    assert correlation(vol, truth) > 0.9
    c1 = maps["C1"]
    asym = float((c1.flip(1, 2) - c1).norm() / c1.norm())
    assert asym > 1e-3, asym  # ~2e-3 here; the C2 map is symmetric to 1e-9


def test_refine_rejects_bad_input(tmp_path):
    truth = blobs(24)
    rotations, _ = grid_poses(1, 10, seed=1)
    table = make_dataset(tmp_path, truth, rotations)
    with pytest.raises(ValueError, match="--assignment"):
        refine(table, truth, PX, RefineConfig(assignment="fuzzy"))
    with pytest.raises(ValueError, match="--iterations"):
        refine(table, truth, PX, RefineConfig(iterations=0))
    with pytest.raises(ValueError, match="reference"):
        refine(table, truth[0], PX, RefineConfig(iterations=1, grid_order=0))
    with pytest.raises(ValueError, match="--symmetry"):
        refine(table, truth, PX, RefineConfig(symmetry="Q7"))
    one_half = table.copy()
    one_half.data["rlnRandomSubset"] = 1
    with pytest.raises(ValueError, match="half set 2"):
        refine(one_half, truth, PX, RefineConfig(iterations=1, grid_order=0))


# ---- CLI -----------------------------------------------------------------------------------


@pytest.fixture()
def star_and_map(tmp_path):
    truth = blobs(24)
    rotations, _ = grid_poses(1, 60, seed=4)
    sigma = 0.5 * float(Projector(truth).images(rotations[:8]).std())
    table = make_dataset(tmp_path, truth, rotations, noise_sigma=sigma, seed=6)
    star = tmp_path / "particles.star"
    write_star(table, star)
    ref = tmp_path / "ref.mrc"
    write_volume(ref, truth, PX)
    return star, ref


def test_cli_refine_writes_every_iteration_and_is_reproducible(star_and_map, tmp_path):
    star, ref = star_and_map
    runner = CliRunner()
    outs = []
    for k, (seed, iterations) in enumerate(((7, 2), (7, 2), (8, 1))):
        out = tmp_path / f"run{k}"
        res = runner.invoke(app, ["refine", str(star), "--reference", str(ref), "-o", str(out),
                                  "--iterations", str(iterations), "--assignment", "soft",
                                  "--grid-order", "0", "--seed", str(seed), "--batch-size", "16"])
        assert res.exit_code == 0, res.output
        assert "cryopose refine" in res.stdout, res.stdout
        assert f"iter_00{iterations}.mrc" in res.stdout, res.stdout
        outs.append(out)
    for it in (1, 2):
        paths = iteration_paths(outs[0], it)
        for path in paths.values():
            assert path.exists(), path
            assert path.read_bytes() == (outs[1] / path.name).read_bytes(), path.name
        vol = read_volume(paths["map"])
        assert vol.data.shape == (24, 24, 24) and vol.pixel_size_angstrom == pytest.approx(PX)
        table = read_particles(paths["star"])
        assert len(table) == 60 and table.has_poses
        assert "rlnCryoposeExpectedLoss" in table.data.columns
        header = paths["fsc"].read_text().splitlines()[0]
        assert header.startswith("shell,")
    assert not list(outs[0].glob(".*.tmp"))
    # another seed: another half split
    a = read_particles(iteration_paths(outs[0], 1)["star"]).data["rlnRandomSubset"].to_numpy()
    c = read_particles(iteration_paths(outs[2], 1)["star"]).data["rlnRandomSubset"].to_numpy()
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--assignment", "fuzzy"], "--assignment"),
        (["--iterations", "0"], "--iterations"),
        (["--grid-order", "9"], "--grid-order"),
        (["--noise-sigma", "-1"], "--noise-sigma"),
        (["--symmetry", "Q3"], "--symmetry"),
    ],
)
def test_cli_refine_bad_options_fail_with_one_line(star_and_map, tmp_path, extra, needle):
    star, ref = star_and_map
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["refine", str(star), "--reference", str(ref), "-o", str(out),
                                   *extra])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    assert not out.exists() or not any(out.iterdir())


def test_cli_refine_missing_files_fail_with_one_line(star_and_map, tmp_path):
    star, ref = star_and_map
    runner = CliRunner()
    res = runner.invoke(app, ["refine", str(tmp_path / "nope.star"), "--reference", str(ref),
                              "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope.star" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["refine", str(star), "--reference", str(tmp_path / "nope.mrc"),
                              "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope.mrc" in res.output
    assert len([x for x in res.output.splitlines() if x.strip()]) == 1
    assert math.isfinite(PX)
