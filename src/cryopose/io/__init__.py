"""Files in and out: MRC volumes and particle stacks, RELION STAR and cryoSPARC ``.cs``.

Main entry points::

    table = read_particles("particles.star")     # or .cs; RELION 3.0/3.1/4/5
    R = table.rotations()                         # [n, 3, 3] cryopose matrices R = A.T
    with ParticleImages(table) as images:
        batch = images.read([0, 5, 7])            # [3, box, box], 0-based table rows
    write_star(table, "out.star")                 # RELION 3.1
    volume, pixel_size = read_volume("map.mrc")   # [z, y, x]

Conventions are documented in ``docs/conventions.md`` ("Files: MRC, RELION STAR, cryoSPARC .cs").
"""

from cryopose.io.cryosparc import read_cryosparc
from cryopose.io.errors import CryoposeInputError, MissingFileError
from cryopose.io.mrc import (
    MrcHeaderInfo,
    MrcsWriter,
    ParticleStack,
    VolumeData,
    check_box,
    read_mrc_header,
    read_volume,
    write_stack,
    write_volume,
)
from cryopose.io.particles import (
    ParticleImages,
    ParticleTable,
    make_particle_table,
    read_particles,
)
from cryopose.io.star import StarWriter, read_star, write_star

__all__ = [
    "CryoposeInputError",
    "MissingFileError",
    "MrcHeaderInfo",
    "MrcsWriter",
    "ParticleImages",
    "ParticleStack",
    "ParticleTable",
    "StarWriter",
    "VolumeData",
    "check_box",
    "make_particle_table",
    "read_cryosparc",
    "read_mrc_header",
    "read_particles",
    "read_star",
    "read_volume",
    "write_stack",
    "write_star",
    "write_volume",
]
