"""Numba kernels for trilinear reads of the Hermitian half table
(:meth:`cryopose.imaging.Projector.half_values`): the cell of a point and the bilinear terms of
one plane (inlined helpers, shared with :mod:`cryopose.bayes._newton_numba`), and the value
gathers behind :meth:`cryopose.imaging.Projector.sample_ri` (arbitrary points) and
:meth:`cryopose.imaging.Projector.slice_values` (central slices) on the CPU. Imported on first
use; compiled once and cached on disk."""

import numba as nb


@nb.njit(inline="always")
def half_cell(qx, qy, qz, offset, vals):
    """Cell of the point ``q`` (padded Fourier pixels) in the half table ``vals``.

    Returns ``(inside, bx, by, bz, fx, fy, fz, sign)``: lower corner, fractions and the sign
    that turns the value read at ``-q`` into ``V(q) = conj(V(-q))`` when ``q_z < 0`` (it
    multiplies the imaginary value and the real derivatives). ``inside`` is False beyond the
    one-voxel margin (value and derivatives 0 there)."""
    sign = 1.0
    if qz < 0.0:
        qx = -qx
        qy = -qy
        qz = -qz
        sign = -1.0
    side = vals.shape[1]
    hz = vals.shape[0] - 2
    ix = qx + offset
    iy = qy + offset
    if ix < 0.0 or iy < 0.0 or ix > side - 1 or iy > side - 1 or qz > hz + 1:
        return False, 0, 0, 0, 0.0, 0.0, 0.0, sign
    bx = min(int(ix), side - 2)
    by = min(int(iy), side - 2)
    bz = min(int(qz), hz)
    return True, bx, by, bz, min(ix - bx, 1.0), min(iy - by, 1.0), min(qz - bz, 1.0), sign


@nb.njit(inline="always")
def plane_terms(vals, bz, by, bx, fx, fy, part):
    """Bilinear value and its x / y derivatives (per padded pixel) of component ``part``
    (0 real, 1 imaginary) on plane ``bz``."""
    a = vals[bz, by, bx, part]
    b = vals[bz, by, bx + 1, part]
    c = vals[bz, by + 1, bx, part]
    d = vals[bz, by + 1, bx + 1, part]
    low = a + fx * (b - a)
    high = c + fx * (d - c)
    return low + fy * (high - low), (b - a) + fy * ((d - c) - (b - a)), high - low


# reassociation lets LLVM vectorise the loop; no nnan / ninf assumptions
@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def sample_half(vals, offset, scale, points, out):
    """Trilinear ``V(q)`` at ``points`` ``[n, 3]`` (Fourier pixels of the N box) into ``out``
    ``[2, n]`` (re, im) from the half table ``vals`` (its first plane is ``q_z = 0``; the
    x / y index of frequency 0 is ``offset``); 0 beyond the margin."""
    for i in nb.prange(points.shape[0]):
        inside, bx, by, bz, fx, fy, fz, sign = half_cell(
            points[i, 0] * scale, points[i, 1] * scale, points[i, 2] * scale, offset, vals)
        if not inside:
            out[0, i] = 0.0
            out[1, i] = 0.0
            continue
        v0r, _, _ = plane_terms(vals, bz, by, bx, fx, fy, 0)
        v1r, _, _ = plane_terms(vals, bz + 1, by, bx, fx, fy, 0)
        v0i, _, _ = plane_terms(vals, bz, by, bx, fx, fy, 1)
        v1i, _, _ = plane_terms(vals, bz + 1, by, bx, fx, fy, 1)
        out[0, i] = v0r + fz * (v1r - v0r)
        out[1, i] = sign * (v0i + fz * (v1i - v0i))


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def sample_slices(vals, offset, scale, rot, kx, ky, out):
    """Central-slice values ``V(R_l (kx_p, ky_p, 0))`` into ``out`` ``[L, P, 2]`` (re, im) for
    rotations ``rot`` ``[L, 3, 3]`` and in-plane points ``kx, ky`` ``[P]`` (Fourier pixels of
    the N box); the point coordinates are never stored."""
    for i in nb.prange(rot.shape[0]):
        r00 = rot[i, 0, 0] * scale
        r01 = rot[i, 0, 1] * scale
        r10 = rot[i, 1, 0] * scale
        r11 = rot[i, 1, 1] * scale
        r20 = rot[i, 2, 0] * scale
        r21 = rot[i, 2, 1] * scale
        for p in range(kx.shape[0]):
            x = kx[p]
            y = ky[p]
            inside, bx, by, bz, fx, fy, fz, sign = half_cell(
                r00 * x + r01 * y, r10 * x + r11 * y, r20 * x + r21 * y, offset, vals)
            if not inside:
                out[i, p, 0] = 0.0
                out[i, p, 1] = 0.0
                continue
            v0r, _, _ = plane_terms(vals, bz, by, bx, fx, fy, 0)
            v1r, _, _ = plane_terms(vals, bz + 1, by, bx, fx, fy, 0)
            v0i, _, _ = plane_terms(vals, bz, by, bx, fx, fy, 1)
            v1i, _, _ = plane_terms(vals, bz + 1, by, bx, fx, fy, 1)
            out[i, p, 0] = v0r + fz * (v1r - v0r)
            out[i, p, 1] = sign * (v0i + fz * (v1i - v0i))
