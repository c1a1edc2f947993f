"""Numba kernel behind :meth:`cryopose.imaging.Projector.sample_ri` on the CPU (imported on
first use; compiled once and cached on disk)."""

import numba as nb


# reassociation lets LLVM vectorise the loop; no nnan / ninf assumptions
@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def sample_half(vals, offset, scale, points, out):
    """Trilinear ``V(q)`` at ``points`` ``[n, 3]`` (Fourier pixels of the N box) into ``out``
    ``[2, n]`` (re, im) from the ``q_z >= 0`` half table (``Projector.half_values``; its first
    plane is ``q_z = 0``), ``V(q) = conj(V(-q))`` below; 0 beyond the margin."""
    n = points.shape[0]
    side = vals.shape[1]
    hi = side - 2
    hz = vals.shape[0] - 2
    for i in nb.prange(n):
        qx = points[i, 0] * scale
        qy = points[i, 1] * scale
        qz = points[i, 2] * scale
        sgn = 1.0
        if qz < 0.0:
            qx = -qx
            qy = -qy
            qz = -qz
            sgn = -1.0
        ix = qx + offset
        iy = qy + offset
        iz = qz
        if ix < 0.0 or iy < 0.0 or ix > side - 1 or iy > side - 1 or iz > hz + 1:
            out[0, i] = 0.0
            out[1, i] = 0.0
            continue
        bx = min(int(ix), hi)
        by = min(int(iy), hi)
        bz = min(int(iz), hz)
        fx = min(ix - bx, 1.0)
        fy = min(iy - by, 1.0)
        fz = min(iz - bz, 1.0)
        gx = 1.0 - fx
        gy = 1.0 - fy
        gz = 1.0 - fz
        w00 = gz * gy
        w01 = gz * fy
        w10 = fz * gy
        w11 = fz * fy
        re = (w00 * (gx * vals[bz, by, bx, 0] + fx * vals[bz, by, bx + 1, 0])
              + w01 * (gx * vals[bz, by + 1, bx, 0] + fx * vals[bz, by + 1, bx + 1, 0])
              + w10 * (gx * vals[bz + 1, by, bx, 0] + fx * vals[bz + 1, by, bx + 1, 0])
              + w11 * (gx * vals[bz + 1, by + 1, bx, 0] + fx * vals[bz + 1, by + 1, bx + 1, 0]))
        im = (w00 * (gx * vals[bz, by, bx, 1] + fx * vals[bz, by, bx + 1, 1])
              + w01 * (gx * vals[bz, by + 1, bx, 1] + fx * vals[bz, by + 1, bx + 1, 1])
              + w10 * (gx * vals[bz + 1, by, bx, 1] + fx * vals[bz + 1, by, bx + 1, 1])
              + w11 * (gx * vals[bz + 1, by + 1, bx, 1] + fx * vals[bz + 1, by + 1, bx + 1, 1]))
        out[0, i] = re
        out[1, i] = sgn * im
