"""Image paths in STAR files resolve like RELION's: STAR folder first, then the project folder."""

from __future__ import annotations

import os

import torch

from cryopose.io import ParticleImages, make_particle_table, read_star, write_stack, write_star


def test_relion_project_relative_paths(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "Extract" / "job012").mkdir(parents=True)
    (project / "Refine3D" / "job020").mkdir(parents=True)
    images = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    write_stack(project / "Extract" / "job012" / "p.mrcs", images, 2.0)
    table = make_particle_table(
        project / "Extract/job012/p.mrcs", 3, pixel_size_angstrom=2.0, box=8
    )
    star = project / "Refine3D" / "job020" / "run_data.star"
    write_star(table, star)
    text = star.read_text()
    assert "../../Extract/job012/p.mrcs" in text  # we write paths relative to the STAR file
    # RELION writes them relative to the project folder instead
    star.write_text(text.replace("../../Extract", "Extract"))
    monkeypatch.chdir(project)
    loaded = read_star(os.path.relpath(star))
    with ParticleImages(loaded) as reader:
        assert torch.equal(reader.read([2, 0]), images[[2, 0]])
    # the name resolved to the project folder, as an absolute path
    paths, _ = loaded.image_paths_and_indices()
    assert paths[0] == str(project / "Extract" / "job012" / "p.mrcs")
