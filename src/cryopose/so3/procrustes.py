"""Projection of 3x3 matrices onto SO(3) (orthogonal Procrustes with the determinant fix)."""

from __future__ import annotations

import torch

__all__ = ["project_to_so3"]


def project_to_so3(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest rotation (in Frobenius norm) to each 3x3 matrix.

    With the SVD ``M = U S V^T`` the answer is ``U diag(1, 1, det(U V^T)) V^T``; the
    determinant fix keeps the result a proper rotation (never a reflection). This is the MMSE
    rotation when ``M`` is the posterior mean of rotation matrices, and the closed-form global
    alignment when ``M = sum_i ref_i est_i^T``.

    Parameters
    ----------
    matrix : torch.Tensor
        ``[..., 3, 3]`` real matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` rotation matrices (same dtype and device).
    """
    u, _, vh = torch.linalg.svd(matrix)
    det = torch.linalg.det(u @ vh)
    fix = torch.ones_like(matrix[..., 0, :])
    fix[..., 2] = torch.sign(det) + (det == 0).to(det.dtype)
    return (u * fix[..., None, :]) @ vh
