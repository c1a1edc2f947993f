"""Rotations, grids, distributions, point groups and alignment on SO(3).

Every function is batched over any leading shape and works on CPU and CUDA tensors in float32
and float64. Rotation matrices follow the cryopose convention ``R = A.T`` (``A`` is RELION's
``Euler_angles2matrix``); see ``docs/conventions.md``.
"""

from cryopose.so3.alignment import AlignmentResult, align_rotations, flip_handedness
from cryopose.so3.conversions import (
    axis_angle_to_matrix,
    cryosparc_pose_to_matrix,
    euler_to_matrix,
    matrix_to_cryosparc_pose,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_relion_matrix,
    matrix_to_rotvec,
    quaternion_to_matrix,
    relion_matrix_to_matrix,
    rotvec_to_matrix,
)
from cryopose.so3.distances import (
    chordal_distance,
    chordal_from_geodesic,
    geodesic_distance,
    pairwise_geodesic_blocks,
    pairwise_geodesic_distance,
    quaternion_geodesic_distance,
)
from cryopose.so3.distributions import (
    CLOSED_FORM_MAX_ETA,
    haar_angle_cdf,
    haar_angle_density,
    iso_gaussian_angle_cdf,
    iso_gaussian_angle_density,
    iso_gaussian_angle_log_density,
    iso_gaussian_angle_std,
    iso_gaussian_log_density,
    iso_gaussian_log_kernel,
    sample_iso_gaussian,
    smoothed_histogram,
    uniform_log_density,
)
from cryopose.so3.grids import (
    LocalGridOffsets,
    SO3Grid,
    covering_radius,
    healpix_grid,
    local_grid,
    local_grid_offsets,
)
from cryopose.so3.procrustes import project_to_so3
from cryopose.so3.random import random_rotations, random_unit_vectors, resolve_generator
from cryopose.so3.symmetry import (
    PointGroupError,
    canonical_representative,
    closest_symmetry_mate,
    point_group,
    symmetric_geodesic_distance,
)

__all__ = [
    "axis_angle_to_matrix",
    "cryosparc_pose_to_matrix",
    "euler_to_matrix",
    "matrix_to_cryosparc_pose",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_relion_matrix",
    "matrix_to_rotvec",
    "quaternion_to_matrix",
    "relion_matrix_to_matrix",
    "rotvec_to_matrix",
    "chordal_distance",
    "chordal_from_geodesic",
    "geodesic_distance",
    "pairwise_geodesic_blocks",
    "pairwise_geodesic_distance",
    "quaternion_geodesic_distance",
    "project_to_so3",
    "CLOSED_FORM_MAX_ETA",
    "haar_angle_cdf",
    "haar_angle_density",
    "iso_gaussian_angle_cdf",
    "iso_gaussian_angle_density",
    "iso_gaussian_angle_log_density",
    "iso_gaussian_angle_std",
    "iso_gaussian_log_density",
    "iso_gaussian_log_kernel",
    "sample_iso_gaussian",
    "smoothed_histogram",
    "uniform_log_density",
    "LocalGridOffsets",
    "SO3Grid",
    "covering_radius",
    "healpix_grid",
    "local_grid",
    "local_grid_offsets",
    "random_rotations",
    "random_unit_vectors",
    "resolve_generator",
    "AlignmentResult",
    "align_rotations",
    "flip_handedness",
    "PointGroupError",
    "canonical_representative",
    "closest_symmetry_mate",
    "point_group",
    "symmetric_geodesic_distance",
]
