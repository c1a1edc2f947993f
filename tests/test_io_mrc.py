"""MRC volumes, particle stacks (memory-mapped) and the streaming stack writer."""

from __future__ import annotations

import os
import resource

import mrcfile
import numpy as np
import pytest
import torch
from conftest import PARTICLES, require

from cryopose.io import (
    CryoposeInputError,
    MissingFileError,
    MrcsWriter,
    ParticleStack,
    check_box,
    read_mrc_header,
    read_volume,
    write_stack,
    write_volume,
)


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n", [5, 6])
def test_volume_round_trip_keeps_data_and_pixel_size(tmp_path, n, dtype):
    volume = _random((n, n, n), seed=n)
    volume[0, 1, 2] = 7.0  # an asymmetric marker: [z, y, x] order must survive
    path = tmp_path / "map.mrc"
    write_volume(path, torch.from_numpy(volume).to(dtype), pixel_size=1.37)
    data, pixel_size = read_volume(path, dtype=dtype)
    assert data.dtype == dtype and data.shape == (n, n, n)
    np.testing.assert_array_equal(data.numpy().astype(np.float32), volume)
    assert data[0, 1, 2] == 7.0
    assert pixel_size == pytest.approx(1.37, rel=1e-6)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 2 and not mrc.is_image_stack()
        assert float(mrc.header.dmax) == pytest.approx(volume.max())
    assert sorted(os.listdir(tmp_path)) == ["map.mrc"]  # no temporary file left


def test_volume_without_pixel_size_is_none_or_error(tmp_path):
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(_random((4, 4, 4), 0))
    assert read_volume(path).pixel_size_angstrom is None
    with pytest.raises(CryoposeInputError, match="nopix.mrc: header voxel_size is 0"):
        read_volume(path, require_pixel_size=True)


@pytest.mark.filterwarnings("ignore:Data array contains")
def test_bad_volumes_give_named_errors(tmp_path):
    with pytest.raises(MissingFileError, match="absent.mrc: MRC file not found"):
        read_volume(tmp_path / "absent.mrc")
    with pytest.raises(FileNotFoundError):
        read_volume(tmp_path / "absent.mrc")

    write_volume(tmp_path / "flat.mrc", _random((4, 6, 6), 1), pixel_size=1.0)
    with pytest.raises(
        CryoposeInputError, match=r"flat.mrc: volume shape \(4, 6, 6\) is not cubic"
    ):
        read_volume(tmp_path / "flat.mrc")

    bad = _random((5, 5, 5), 2)
    bad[1, 2, 3] = np.nan
    bad[0, 0, 0] = np.inf
    write_volume(tmp_path / "nan.mrc", bad, pixel_size=1.0)
    with pytest.raises(CryoposeInputError, match="nan.mrc: volume has 2 non-finite voxels"):
        read_volume(tmp_path / "nan.mrc")

    (tmp_path / "text.mrc").write_bytes(b"this is not an MRC file\n" * 3)
    with pytest.raises(CryoposeInputError, match="text.mrc: unreadable MRC header"):
        read_volume(tmp_path / "text.mrc")

    write_stack(tmp_path / "stack.mrcs", _random((3, 5, 5), 3), pixel_size=1.0)
    with pytest.raises(CryoposeInputError, match="stack.mrcs: .*expected a 3D volume"):
        read_volume(tmp_path / "stack.mrcs")


@pytest.mark.parametrize("box", [7, 8])
def test_stack_mmap_read_of_chosen_indices_equals_full_read(tmp_path, box, dtype):
    images = _random((11, box, box), seed=box)
    path = tmp_path / "p.mrcs"
    write_stack(path, images, pixel_size=2.5)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack() and mrc.header.mode == 2
    with ParticleStack(path) as stack:
        assert len(stack) == 11 and stack.box == box
        assert stack.pixel_size_angstrom == pytest.approx(2.5)
        full = stack.read(dtype=dtype)
        assert full.dtype == dtype and full.shape == (11, box, box)
        np.testing.assert_array_equal(full.numpy().astype(np.float32), images)
        chosen = [9, 0, 3, 3, 10]  # unsorted, repeated, first and last
        np.testing.assert_array_equal(stack.read(chosen, dtype=dtype).numpy(), full[chosen].numpy())
        np.testing.assert_array_equal(stack.read(torch.tensor([4, 5, 6])).numpy(), images[4:7])
        np.testing.assert_array_equal(stack.read(2).numpy(), images[2:3])
        np.testing.assert_array_equal(stack.read(slice(8, None)).numpy(), images[8:])


def test_stack_index_errors_and_box_check(tmp_path):
    path = tmp_path / "five.mrcs"
    write_stack(path, _random((5, 6, 6), 4), pixel_size=1.0)
    with ParticleStack(path) as stack:
        with pytest.raises(CryoposeInputError, match=r"five.mrcs: image index 5 \(0-based; 6 as a"):
            stack.read([0, 5])
        with pytest.raises(CryoposeInputError, match="five.mrcs: image index -1"):
            stack.read([-1])
        with pytest.raises(CryoposeInputError, match="expected int"):
            stack.read(np.array([0.5]))
        check_box(stack, 6)
        with pytest.raises(
            CryoposeInputError,
            match="five.mrcs: stack box 6 px differs from the "
            r"reference box 8 px \(rlnImageSize\)",
        ):
            check_box(stack, 8)


def test_million_particle_stack_is_memory_mapped(tmp_path):
    """A 1 GB (sparse) stack of 10^6 images opens and reads 3 images without loading it."""
    path = tmp_path / "big.mrcs"
    n, box = 1_000_000, 16
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2) as mrc:
        mrc.set_image_stack()
        mrc.data[n - 1] = 3.0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ParticleStack(path) as stack:
        assert len(stack) == n
        images = stack.read([0, n - 1, 12345])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # the file is 1024 MB
    assert images[1].eq(3.0).all() and images[0].eq(0.0).all()


@pytest.mark.parametrize("box", [9, 10])
def test_mrcs_writer_streams_chunks(tmp_path, box):
    images = _random((13, box, box), seed=box)
    path = tmp_path / "sim.mrcs"
    with MrcsWriter(path, box=box, pixel_size=1.2, n_total=13) as writer:
        for start, stop in [(0, 5), (5, 6), (6, 13)]:
            writer.write(torch.from_numpy(images[start:stop]))
        assert not path.exists()  # only renamed at close
    assert sorted(os.listdir(tmp_path)) == ["sim.mrcs"]
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, images)
        assert mrc.is_image_stack() and mrc.header.mode == 2
        assert float(mrc.voxel_size.x) == pytest.approx(1.2)
        assert float(mrc.header.dmin) == pytest.approx(images.min())
        assert float(mrc.header.dmax) == pytest.approx(images.max())
        assert float(mrc.header.dmean) == pytest.approx(images.mean(), abs=1e-6)
        assert float(mrc.header.rms) == pytest.approx(images.std(), rel=1e-5)
    assert read_mrc_header(path).shape == (13, box, box)


def test_mrcs_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "short.mrcs"
    writer = MrcsWriter(path, box=4, pixel_size=1.0, n_total=3)
    writer.write(np.zeros((2, 4, 4)))
    with pytest.raises(CryoposeInputError, match="short.mrcs: 2 images written; expected n_total"):
        writer.close()
    with pytest.raises(RuntimeError), MrcsWriter(path, box=4, pixel_size=1.0, n_total=2) as w:
        w.write(np.zeros((1, 4, 4)))
        raise RuntimeError("simulation failed")
    with MrcsWriter(path, box=4, pixel_size=1.0, n_total=2) as w:
        with pytest.raises(CryoposeInputError, match=r"expected \[k, 4, 4\]"):
            w.write(np.zeros((1, 5, 5)))
        with pytest.raises(CryoposeInputError, match="exceed n_total"):
            w.write(np.zeros((3, 4, 4)))
        w.abort()
    assert os.listdir(tmp_path) == []


def test_real_stacks_open():
    """relion31.mrcs (standard header) and empiar_10076_7.mrc (no MAP id, ispg 1, 7 images)."""
    with ParticleStack(require(PARTICLES / "relion31.mrcs")) as stack:
        assert (len(stack), stack.box) == (5, 256)
        assert stack.read([4]).shape == (1, 256, 256)
    with ParticleStack(require(PARTICLES / "empiar_10076_7.mrc")) as stack:
        assert (len(stack), stack.box, stack.pixel_size_angstrom) == (7, 320, None)
        assert torch.isfinite(stack.read([0, 6])).all()
    header = read_mrc_header(PARTICLES / "empiar_10076_7.mrc")
    assert header.is_image_stack and header.shape == (7, 320, 320)
