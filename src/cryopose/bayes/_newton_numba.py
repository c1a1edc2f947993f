"""The numba kernel of :mod:`cryopose.bayes._newton_kernel` (imported on first use: numba's
import and the cached machine code load only when a Gauss-Newton step runs on the CPU)."""

import numba as nb

from cryopose.imaging._gather_numba import half_cell, plane_terms


# reassociation lets LLVM vectorise the point loop (~3x); no nnan / ninf assumptions
@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def terms(vals, offset, scale, rot, data_r, data_i, data_row, w, c, owner, kx, ky, n_points,
          ll_out, g_out, h_out):
    """``ll_out [A]``, ``g_out [A, 3]``, ``h_out [A, 3, 3]`` of every pair (arguments as in
    :func:`cryopose.bayes._newton_kernel.gauss_newton_terms`; ``c`` of shape ``(0, 0)``: no
    CTF)."""
    n_pairs = rot.shape[0]
    has_ctf = c.shape[0] > 0
    for a in nb.prange(n_pairs):
        r00 = rot[a, 0, 0]
        r01 = rot[a, 0, 1]
        r02 = rot[a, 0, 2]
        r10 = rot[a, 1, 0]
        r11 = rot[a, 1, 1]
        r12 = rot[a, 1, 2]
        r20 = rot[a, 2, 0]
        r21 = rot[a, 2, 1]
        r22 = rot[a, 2, 2]
        d = data_row[a]
        o = owner[a]
        ll = 0.0
        g0 = 0.0
        g1 = 0.0
        g2 = 0.0
        h00 = 0.0
        h01 = 0.0
        h02 = 0.0
        h11 = 0.0
        h12 = 0.0
        h22 = 0.0
        for p in range(n_points):
            x = kx[p]
            y = ky[p]
            dr = data_r[d, p]
            di = data_i[d, p]
            wp = w[o, p]
            cp = c[o, p] if has_ctf else 1.0
            inside, bx, by, bz, fx, fy, fz, sgn = half_cell(
                (r00 * x + r01 * y) * scale, (r10 * x + r11 * y) * scale,
                (r20 * x + r21 * y) * scale, offset, vals)
            if not inside:
                ll -= 0.5 * wp * (dr * dr + di * di)  # template and gradient 0
                continue
            v0r, dx0r, dy0r = plane_terms(vals, bz, by, bx, fx, fy, 0)
            v1r, dx1r, dy1r = plane_terms(vals, bz + 1, by, bx, fx, fy, 0)
            v0i, dx0i, dy0i = plane_terms(vals, bz, by, bx, fx, fy, 1)
            v1i, dx1i, dy1i = plane_terms(vals, bz + 1, by, bx, fx, fy, 1)
            vr = v0r + fz * (v1r - v0r)
            vi = sgn * (v0i + fz * (v1i - v0i))
            # d/dq of conj(V(-q)) = -conj(V'(-q)): the real parts change sign
            gxr = sgn * scale * (dx0r + fz * (dx1r - dx0r))
            gxi = scale * (dx0i + fz * (dx1i - dx0i))
            gyr = sgn * scale * (dy0r + fz * (dy1r - dy0r))
            gyi = scale * (dy0i + fz * (dy1i - dy0i))
            gzr = sgn * scale * (v1r - v0r)
            gzi = scale * (v1i - v0i)
            rr = dr - cp * vr
            ri = di - cp * vi
            ll -= 0.5 * wp * (rr * rr + ri * ri)
            # u = grad^T R; J = -u^T [k]x = (u_z ky, -u_z kx, u_y kx - u_x ky)
            uxr = gxr * r00 + gyr * r10 + gzr * r20
            uyr = gxr * r01 + gyr * r11 + gzr * r21
            uzr = gxr * r02 + gyr * r12 + gzr * r22
            uxi = gxi * r00 + gyi * r10 + gzi * r20
            uyi = gxi * r01 + gyi * r11 + gzi * r21
            uzi = gxi * r02 + gyi * r12 + gzi * r22
            j0r = uzr * y
            j1r = -uzr * x
            j2r = uyr * x - uxr * y
            j0i = uzi * y
            j1i = -uzi * x
            j2i = uyi * x - uxi * y
            wc = wp * cp
            wcc = wc * cp
            g0 += wc * (rr * j0r + ri * j0i)
            g1 += wc * (rr * j1r + ri * j1i)
            g2 += wc * (rr * j2r + ri * j2i)
            h00 += wcc * (j0r * j0r + j0i * j0i)
            h01 += wcc * (j0r * j1r + j0i * j1i)
            h02 += wcc * (j0r * j2r + j0i * j2i)
            h11 += wcc * (j1r * j1r + j1i * j1i)
            h12 += wcc * (j1r * j2r + j1i * j2i)
            h22 += wcc * (j2r * j2r + j2i * j2i)
        ll_out[a] = ll
        g_out[a, 0] = g0
        g_out[a, 1] = g1
        g_out[a, 2] = g2
        h_out[a, 0, 0] = h00
        h_out[a, 0, 1] = h01
        h_out[a, 0, 2] = h02
        h_out[a, 1, 0] = h01
        h_out[a, 1, 1] = h11
        h_out[a, 1, 2] = h12
        h_out[a, 2, 0] = h02
        h_out[a, 2, 1] = h12
        h_out[a, 2, 2] = h22
