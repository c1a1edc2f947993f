"""Evaluation of estimated poses and maps against the truth."""

from cryopose.evaluate.compare import ALIGN_MODES, PoseComparison, compare_poses, compare_star_files

__all__ = ["ALIGN_MODES", "PoseComparison", "compare_poses", "compare_star_files"]
