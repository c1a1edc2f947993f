"""Point groups (RELION settings), symmetric distances and coset representatives."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import haar

from cryopose.so3 import symmetry
from cryopose.so3.conversions import axis_angle_to_matrix
from cryopose.so3.distances import geodesic_distance
from cryopose.so3.symmetry import (
    canonical_representative,
    closest_symmetry_mate,
    point_group,
    symmetric_geodesic_distance,
)

TAU = (1.0 + math.sqrt(5.0)) / 2.0
GROUPS = ["C4", "D2", "D7", "T", "O", "I"]


def rotation(axis, fold, dtype=torch.float64):
    """Rotation by 360/fold degrees about axis, built with the library-independent roma path."""
    return axis_angle_to_matrix(
        torch.tensor(axis, dtype=dtype), torch.tensor(2.0 * math.pi / fold, dtype=dtype)
    )


def contains(group, matrix, tol=1e-6):
    return bool(((group - matrix).abs().amax(dim=(-1, -2)) < tol).any())


@pytest.mark.parametrize(
    ("symbol", "order"),
    [
        ("C1", 1),
        ("C4", 4),
        ("c12", 12),
        ("D2", 4),
        ("D7", 14),
        ("d10", 20),
        ("T", 12),
        ("O", 24),
        ("I", 60),
        (" i2 ", 60),
        ("I1", 60),
        ("I3", 60),
        ("I4", 60),
    ],
)
def test_group_order_closure_and_orthogonality(symbol, order, dtype):
    g = point_group(symbol, dtype=dtype)
    assert g.shape == (order, 3, 3) and g.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    eye = torch.eye(3, dtype=dtype)
    assert torch.allclose(g[0], eye)
    assert (g @ g.transpose(-1, -2) - eye).abs().max() < tol
    assert (torch.linalg.det(g) - 1.0).abs().max() < tol
    # elements are distinct ...
    pair_gap = (g[:, None] - g[None]).abs().amax(dim=(-1, -2))
    assert (pair_gap + 10 * torch.eye(order, dtype=dtype)).min() > 0.1
    # ... and every product (and inverse) is again an element: closure
    products = (g[:, None] @ g[None]).reshape(-1, 1, 3, 3)
    assert ((products - g[None]).abs().amax(dim=(-1, -2)).min(dim=1).values < tol).all()
    inverses = g.transpose(-1, -2)[:, None]
    assert ((inverses - g[None]).abs().amax(dim=(-1, -2)).min(dim=1).values < tol).all()


@pytest.mark.parametrize("bad", ["C0", "D1", "D0", "X", "", "I5", "C-2", "Cn", "TD", "O2"])
def test_bad_symbol_raises_clear_value_error(bad):
    with pytest.raises(ValueError, match="point group symbol"):
        point_group(bad)


def test_non_string_symbol_raises():
    with pytest.raises(ValueError, match="point group symbol"):
        point_group(5)  # type: ignore[arg-type]


def test_relion_axis_settings():
    # Cn / Dn: n-fold along z, 2-fold along x (and for odd n not along y).
    assert contains(point_group("C4"), rotation((0, 0, 1), 4))
    d7 = point_group("D7")
    assert contains(d7, rotation((0, 0, 1), 7)) and contains(d7, rotation((1, 0, 0), 2))
    assert not contains(d7, rotation((0, 1, 0), 2))
    # T: RELION puts a 3-fold on z and a 2-fold in the yz plane, 54.74 deg from z;
    # z is NOT a 2-fold (unlike the "2-folds on x, y, z" orientation).
    t = point_group("T")
    assert contains(t, rotation((0, 0, 1), 3))
    assert contains(t, rotation((0, math.sqrt(2 / 3), math.sqrt(1 / 3)), 2))
    assert not contains(t, rotation((0, 0, 1), 2))
    # O: 4-folds on x, y, z; 3-fold on (1, 1, 1).
    o = point_group("O")
    for axis in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert contains(o, rotation(axis, 4))
    assert contains(o, rotation((1, 1, 1), 3))
    # I (= I2, Crowther 222): 2-folds on x, y, z; 5-fold (1, 0, tau) in the xz plane,
    # 3-fold (0, 1, tau^2) in the yz plane; the yz-plane 5-fold (0, 1, tau) belongs to I1.
    i2 = point_group("I")
    assert torch.equal(i2, point_group("I2"))
    for axis in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert contains(i2, rotation(axis, 2))
    assert contains(i2, rotation((1, 0, TAU), 5))
    assert contains(i2, rotation((0, 1, TAU**2), 3))
    assert contains(i2, rotation((-TAU, -1, 0), 5))  # the older Xmipp/RELION "I" generator
    assert not contains(i2, rotation((0, 1, TAU), 5))
    i1 = point_group("I1")
    for axis in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert contains(i1, rotation(axis, 2))
    assert contains(i1, rotation((0, 1, TAU), 5)) and contains(i1, rotation((TAU, 0, -1), 5))
    assert contains(i1, rotation((TAU**2, 1, 0), 3))
    assert not contains(i1, rotation((1, 0, TAU), 5))
    # I1 is I2 turned by 90 degrees about z.
    rz90 = rotation((0, 0, 1), 4)
    turned = rz90 @ i2 @ rz90.T
    assert all(contains(i1, m) for m in turned)
    # I3: 5-fold on z, 2-fold along (-1, 0, tau); I4: 5-fold along (2, 0, 1), 2-fold (1, 0, tau).
    i3, i4 = point_group("I3"), point_group("I4")
    assert contains(i3, rotation((0, 0, 1), 5)) and contains(i3, rotation((-1, 0, TAU), 2))
    assert contains(i3, rotation((-0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 3))
    assert contains(i4, rotation((2, 0, 1), 5)) and contains(i4, rotation((1, 0, TAU), 2))
    assert contains(i4, rotation((0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 3))


def _cyclic_sign_orbit(base):
    """All cyclic permutations and sign choices of a 3-vector (an independent point list)."""
    points = set()
    for shift in range(3):
        perm = base[shift:] + base[:shift]
        for signs in itertools.product([1.0, -1.0], repeat=3):
            points.add(tuple(round(s * c, 12) for s, c in zip(signs, perm, strict=True)))
    return torch.tensor(sorted(points), dtype=torch.float64)


def _independent_point_set(symbol):
    """Point sets whose rotation group is the named group, written down without the library."""
    phase, height = 0.37, 0.45
    if symbol == "C4":
        a = [2 * math.pi * k / 4 + phase for k in range(4)]
        return torch.tensor([[math.cos(t), math.sin(t), height] for t in a], dtype=torch.float64)
    if symbol == "D7":
        a = [2 * math.pi * k / 7 + phase for k in range(7)]
        upper = [[math.cos(t), math.sin(t), height] for t in a]
        lower = [[math.cos(t), -math.sin(t), -height] for t in a]  # image under the x 2-fold
        return torch.tensor(upper + lower, dtype=torch.float64)
    if symbol == "D2":
        x, y, z = 0.3, 0.5, 0.8
        corners = [[x, y, z], [x, -y, -z], [-x, y, -z], [-x, -y, z]]
        return torch.tensor(corners, dtype=torch.float64)
    if symbol == "T":  # tetrahedron: a vertex on z, an edge midpoint on (0, sqrt(2/3), sqrt(1/3))
        s = math.sqrt(2.0) / 3.0
        return torch.tensor(
            [
                [0, 0, 1],
                [0, 2 * s, -1 / 3],
                [math.sqrt(2 / 3), -s, -1 / 3],
                [-math.sqrt(2 / 3), -s, -1 / 3],
            ],
            dtype=torch.float64,
        )
    if symbol == "O":  # octahedron vertices
        return torch.cat([torch.eye(3), -torch.eye(3)]).double()
    if symbol == "I":  # icosahedron vertices, cyclic permutations of (+-1, 0, +-tau)
        return _cyclic_sign_orbit((1.0, 0.0, TAU))
    if symbol == "I1":  # cyclic permutations of (0, +-1, +-tau)
        return _cyclic_sign_orbit((0.0, 1.0, TAU))
    raise AssertionError(symbol)


def _gaussian_map(points, centres, sigma=0.35):
    d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return torch.exp(-0.5 * d2 / sigma**2).sum(-1)


@pytest.mark.parametrize("symbol", GROUPS + ["I1"])
def test_volume_with_independent_point_set_is_invariant(symbol, dtype):
    """V(g x) = V(x) for a sum of Gaussians on a point set listed by hand (pins the axes)."""
    centres = _independent_point_set(symbol).to(dtype)
    g = point_group(symbol, dtype=dtype)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    v = _gaussian_map(x, centres)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for element in g:
        assert (_gaussian_map(x @ element.T, centres) - v).abs().max() < tol
    # The wrong icosahedral setting does not leave the vertices invariant.
    if symbol in ("I", "I1"):
        other = point_group("I1" if symbol == "I" else "I", dtype=dtype)
        worst = max(float((_gaussian_map(x @ m.T, centres) - v).abs().max()) for m in other)
        assert worst > 1e-2


def _projection_quadrature(pose, centres, grid, z, sigma=0.35):
    """image(x, y) = integral of V(R (x, y, z)) dz by quadrature (the documented convention)."""
    xs, ys = grid
    u = torch.stack(torch.broadcast_tensors(xs[..., None], ys[..., None], z), dim=-1)
    volume_points = u.reshape(-1, 3) @ pose.T
    values = _gaussian_map(volume_points, centres, sigma).reshape(u.shape[:-1])
    return values.sum(-1) * (z[1] - z[0])


def _projection(pose, centres, grid, sigma=0.35):
    """Closed form of the same integral: 2D Gaussians at the (x, y) of R^T c."""
    xs, ys = grid
    moved = centres @ pose  # rows are (R^T c)^T
    d2 = (xs[..., None] - moved[:, 0]) ** 2 + (ys[..., None] - moved[:, 1]) ** 2
    return math.sqrt(2 * math.pi) * sigma * torch.exp(-0.5 * d2 / sigma**2).sum(-1)


def _grid(box, dtype=torch.float64):
    axis = (torch.arange(box, dtype=dtype) - box // 2) * (3.0 / box)
    return torch.meshgrid(axis, axis, indexing="xy")


@pytest.mark.parametrize("box", [20, 21])
def test_gaussian_projection_closed_form_matches_quadrature(box):
    dtype = torch.float64
    centres = torch.tensor([[0.9, 0.2, 0.5], [-0.4, 0.3, -0.6]], dtype=dtype)
    pose = haar(1, 7, dtype)[0]
    z = torch.linspace(-4.0, 4.0, 161, dtype=dtype)
    quadrature = _projection_quadrature(pose, centres, _grid(box), z)
    assert (quadrature - _projection(pose, centres, _grid(box))).abs().max() < 1e-9


@pytest.mark.parametrize("symbol", ["C4", "D7", "T", "O", "I"])
@pytest.mark.parametrize("box", [20, 21])
def test_symmetric_poses_give_identical_projections(symbol, box):
    """Poses R and g^T R (left action) project a G-symmetric map identically; R g does not."""
    dtype = torch.float64
    g = point_group(symbol, dtype=dtype)
    generic = torch.tensor([[0.9, 0.2, 0.5]], dtype=dtype)
    centres = (generic @ g.transpose(-1, -2)).reshape(-1, 3)  # the G-orbit of a generic point
    grid = _grid(box)
    pose = haar(1, 7, dtype)[0]
    image = _projection(pose, centres, grid)
    assert image.abs().max() > 0.1
    right_action_differs = False
    for element in g[1:]:
        same = _projection(element.T @ pose, centres, grid)
        assert (same - image).abs().max() < 1e-9
        other = _projection(pose @ element, centres, grid)
        right_action_differs |= bool((other - image).abs().max() > 1e-2)
    assert right_action_differs


@pytest.mark.parametrize("symbol", GROUPS)
def test_symmetric_distance_zero_for_equivalent_poses(symbol, dtype):
    g = point_group(symbol, dtype=dtype)
    n = 200
    r = haar(n, 1, dtype)
    which = torch.randint(1, g.shape[0], (n,), generator=torch.Generator().manual_seed(2))
    equivalent = g[which].transpose(-1, -2) @ r  # RELION A g  <->  cryopose g^T R
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert symmetric_geodesic_distance(r, equivalent, g).max() < tol
    assert symmetric_geodesic_distance(equivalent, r, symbol).max() < tol
    assert geodesic_distance(r, equivalent).min() > 0.1


@pytest.mark.parametrize("symbol", GROUPS)
def test_symmetric_distance_matches_brute_force(symbol, dtype, monkeypatch):
    g = point_group(symbol, dtype=dtype)
    r1, r2 = haar(300, 3, dtype), haar(300, 4, dtype)
    brute = torch.stack([geodesic_distance(r1, m.T @ r2) for m in g]).min(dim=0).values
    got = symmetric_geodesic_distance(r1, r2, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (got - brute).abs().max() < tol
    assert (got <= geodesic_distance(r1, r2) + tol).all()
    assert (symmetric_geodesic_distance(r2, r1, g) - got).abs().max() < tol
    # chunked evaluation (tiny memory budget) gives the same answer
    monkeypatch.setattr(symmetry, "_SCORE_ELEMENTS", 7)
    assert torch.equal(symmetric_geodesic_distance(r1, r2, g), got)


def test_symmetric_distance_broadcasts():
    g = point_group("D7")
    r1 = haar(5, 5).reshape(5, 1, 3, 3)
    r2 = haar(4, 6).reshape(1, 4, 3, 3)
    got = symmetric_geodesic_distance(r1, r2, g)
    assert got.shape == (5, 4)
    assert torch.allclose(got[2, 3], symmetric_geodesic_distance(r1[2, 0], r2[0, 3], g))


def test_closest_symmetry_mate_is_a_coset_element():
    g = point_group("O")
    r, ref = haar(100, 8), haar(100, 9)
    mate, index = closest_symmetry_mate(r, ref, g)
    assert torch.allclose(mate, g[index].transpose(-1, -2) @ r)
    assert torch.allclose(geodesic_distance(ref, mate), symmetric_geodesic_distance(ref, r, g))


@pytest.mark.parametrize("symbol", GROUPS)
def test_canonical_representative_invariant_and_idempotent(symbol, dtype):
    g = point_group(symbol, dtype=dtype)
    n = 300
    r = haar(n, 10, dtype)
    rep = canonical_representative(r, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # in the coset: rep R^T is a group element
    coset_gap = ((rep @ r.transpose(-1, -2))[:, None] - g[None]).abs().amax(dim=(-1, -2))
    assert (coset_gap.min(dim=1).values < tol).all()
    # closest to the identity among the coset
    traces = torch.einsum("gij,nij->ng", g, r)  # tr(g^T R)
    rep_trace = rep.diagonal(dim1=-1, dim2=-2).sum(-1)
    assert (rep_trace >= traces.max(dim=1).values - tol).all()
    # invariant to replacing R by g^T R, and idempotent
    which = torch.randint(0, g.shape[0], (n,), generator=torch.Generator().manual_seed(11))
    moved = g[which].transpose(-1, -2) @ r
    assert (canonical_representative(moved, g) - rep).abs().max() < tol
    assert (canonical_representative(rep, g) - rep).abs().max() < tol


def test_group_argument_checked_and_cast():
    r = haar(3, 12, torch.float32)
    with pytest.raises(ValueError, match="group"):
        symmetric_geodesic_distance(r, r, torch.eye(3))
    with pytest.raises(ValueError, match="rotations"):
        canonical_representative(torch.ones(3, 3, 2), "C2")
    # a float64 group tensor is cast to the rotations' dtype
    out = symmetric_geodesic_distance(r, r, point_group("C3"))
    assert out.dtype == torch.float32 and out.max() < 1e-5
