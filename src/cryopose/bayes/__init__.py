"""Bayesian orientation estimation: likelihood over an SO(3) grid and shifts, posterior with
priors, MLE / MAP / MMSE estimates and their uncertainty, local refinement.

Main entry point: :func:`cryopose.bayes.estimate.estimate_poses` (``cryopose estimate``).
"""

from cryopose.bayes.estimate import OUTPUT_COLUMNS, EstimateConfig, EstimateResult, estimate_poses
from cryopose.bayes.models import (
    InPlaneEstimates,
    SubtomogramScorer,
    align_images_2d,
    align_subtomograms,
    align_volumes,
    missing_wedge_mask,
)
from cryopose.bayes.noise import estimate_noise_sigma2
from cryopose.bayes.posterior import PoseEstimates, summarize_posterior
from cryopose.bayes.priors import (
    EmpiricalPrior,
    IsoGaussianPrior,
    RotationPrior,
    UniformPrior,
    parse_prior,
)
from cryopose.bayes.scoring import ReferenceScorer, shift_grid

__all__ = [
    "InPlaneEstimates",
    "SubtomogramScorer",
    "align_images_2d",
    "align_subtomograms",
    "align_volumes",
    "missing_wedge_mask",
    "OUTPUT_COLUMNS",
    "EmpiricalPrior",
    "EstimateConfig",
    "EstimateResult",
    "IsoGaussianPrior",
    "PoseEstimates",
    "ReferenceScorer",
    "RotationPrior",
    "UniformPrior",
    "estimate_noise_sigma2",
    "estimate_poses",
    "parse_prior",
    "shift_grid",
    "summarize_posterior",
]
