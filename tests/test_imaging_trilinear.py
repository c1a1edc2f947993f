"""trilinear_corners: the shared kernel of the Fourier gather and scatter."""

from __future__ import annotations

import pytest
import torch

from cryopose.imaging import trilinear_corners


@pytest.mark.parametrize("side", [6, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trilinear_corners_reproduce_affine_functions(side, dtype):
    # trilinear interpolation is exact for f(x, y, z) = a + b x + c y + d z on a [z, y, x] grid
    g = torch.Generator().manual_seed(side)
    ax = torch.arange(side, dtype=torch.float64)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    field = (0.3 + 1.5 * x - 2.0 * y + 0.7 * z).reshape(-1)
    points = torch.rand(500, 3, generator=g, dtype=torch.float64) * (side - 1)
    points[:3] = torch.tensor([[0.0, 0, 0], [side - 1.0, side - 1, side - 1], [2.0, 3, 1]])
    index, weight = trilinear_corners(points.to(dtype), side)
    assert index.shape == weight.shape == (500, 8) and index.dtype == torch.int64
    assert int(index.min()) >= 0 and int(index.max()) < side**3
    torch.testing.assert_close(weight.sum(-1), torch.ones(500, dtype=dtype))
    value = (weight.double() * field[index]).sum(-1)
    px, py, pz = points.unbind(-1)
    expected = 0.3 + 1.5 * px - 2.0 * py + 0.7 * pz
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(value, expected, rtol=0, atol=tol)
    # a swapped axis order is caught
    swapped = (weight.double() * field.reshape(side, side, side).transpose(0, 2).reshape(-1)[
        index]).sum(-1)
    assert (swapped - expected).abs().max() > 0.1
