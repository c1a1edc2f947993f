"""`ReferenceScorer.score_local` (image-side in-plane rotation) against the exact path."""

from __future__ import annotations

import math

import pytest
import torch
from test_simulate import blob_volume

from cryopose import so3
from cryopose.bayes.scoring import ReferenceScorer
from cryopose.imaging import Projector, ctf_2d


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("box", [32, 33])
def test_score_local_matches_score_rotations(box):
    px = 6.0
    volume = blob_volume(box)
    scorer = ReferenceScorer(volume, px)
    truth = so3.random_rotations(3, generator=1)
    images = Projector(volume).images(truth)
    images = images + 0.3 * images.std() * torch.randn(
        images.shape, generator=torch.Generator().manual_seed(2)
    )
    ctf = ctf_2d(
        defocus_u_angstrom=12000.0,
        defocus_v_angstrom=11000.0,
        defocus_angle_deg=30.0,
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
        pixel_size_angstrom=px,
        box=box,
    )
    # directions near each truth, in-plane offsets around it
    offsets = so3.local_grid(torch.eye(3), 10.0, 0.0, 5.0).reshape(-1, 3, 3)  # viewing dirs only
    directions = truth[:, None] @ offsets[None]  # [B, V, 3, 3]
    inplane = torch.deg2rad(torch.arange(-10.0, 10.1, 5.0))
    fast = scorer.score_local(images, ctf[None], 1.0, directions, inplane)  # [B, V, P, 1]
    rz = so3.axis_angle_to_matrix(torch.tensor([0.0, 0, 1]).expand(len(inplane), 3), inplane)
    rotations = (directions[:, :, None] @ rz).reshape(3, -1, 3, 3)
    exact = scorer.score_rotations(images, ctf[None], 1.0, rotations).reshape(fast.shape)
    for b in range(3):
        f, e = fast[b].flatten(), exact[b].flatten()
        assert _spearman(f, e) > 0.95
        spread = e.max() - e.min()
        # the 2D interpolation costs ~11% of the spread here (measured), which is why the fast
        # path is opt-in (EstimateConfig.fast_coarse_levels); a wrong rotation sense fails both
        assert ((f - f.mean()) - (e - e.mean())).abs().max() < 0.15 * spread
        # the best local rotation is (nearly) the same one
        best_f = rotations[b].reshape(-1, 3, 3)[f.argmax()]
        best_e = rotations[b].reshape(-1, 3, 3)[e.argmax()]
        assert math.degrees(float(so3.geodesic_distance(best_f, best_e))) <= 5.0 + 1e-3
