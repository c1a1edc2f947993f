"""The numba kernel of :mod:`cryopose.bayes._newton_kernel` (imported on first use: numba's
import and the cached machine code load only when a Gauss-Newton step runs on the CPU)."""

import numba as nb


# reassociation lets LLVM vectorise the point loop (~3x); no nnan / ninf assumptions
@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def terms(vals, z0, offset, scale, rot, data_r, data_i, data_row, w, c, owner, kx, ky,
          n_points, ll_out, g_out, h_out):
    n_pairs = rot.shape[0]
    side = vals.shape[1]
    hi = side - 2
    hz = vals.shape[0] - 2
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
            qx = (r00 * x + r01 * y) * scale
            qy = (r10 * x + r11 * y) * scale
            qz = (r20 * x + r21 * y) * scale
            sgn = 1.0
            if qz < 0.0:  # V(q) = conj(V(-q))
                qx = -qx
                qy = -qy
                qz = -qz
                sgn = -1.0
            ix = qx + offset
            iy = qy + offset
            iz = qz + offset - z0
            dr = data_r[d, p]
            di = data_i[d, p]
            wp = w[o, p]
            cp = c[o, p] if has_ctf else 1.0
            if ix < 0.0 or iy < 0.0 or ix > side - 1 or iy > side - 1 or iz > hz + 1:
                ll -= 0.5 * wp * (dr * dr + di * di)  # template and gradient 0
                continue
            bx = min(int(ix), hi)
            by = min(int(iy), hi)
            bz = min(int(iz), hz)
            fx = min(ix - bx, 1.0)
            fy = min(iy - by, 1.0)
            fz = min(iz - bz, 1.0)
            # corners (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1) of planes z, z + 1
            a0r = vals[bz, by, bx, 0]
            a0i = vals[bz, by, bx, 1]
            b0r = vals[bz, by, bx + 1, 0]
            b0i = vals[bz, by, bx + 1, 1]
            c0r = vals[bz, by + 1, bx, 0]
            c0i = vals[bz, by + 1, bx, 1]
            d0r = vals[bz, by + 1, bx + 1, 0]
            d0i = vals[bz, by + 1, bx + 1, 1]
            a1r = vals[bz + 1, by, bx, 0]
            a1i = vals[bz + 1, by, bx, 1]
            b1r = vals[bz + 1, by, bx + 1, 0]
            b1i = vals[bz + 1, by, bx + 1, 1]
            c1r = vals[bz + 1, by + 1, bx, 0]
            c1i = vals[bz + 1, by + 1, bx, 1]
            d1r = vals[bz + 1, by + 1, bx + 1, 0]
            d1i = vals[bz + 1, by + 1, bx + 1, 1]
            lo0r = a0r + fx * (b0r - a0r)
            lo0i = a0i + fx * (b0i - a0i)
            hi0r = c0r + fx * (d0r - c0r)
            hi0i = c0i + fx * (d0i - c0i)
            v0r = lo0r + fy * (hi0r - lo0r)
            v0i = lo0i + fy * (hi0i - lo0i)
            dx0r = (b0r - a0r) + fy * ((d0r - c0r) - (b0r - a0r))
            dx0i = (b0i - a0i) + fy * ((d0i - c0i) - (b0i - a0i))
            lo1r = a1r + fx * (b1r - a1r)
            lo1i = a1i + fx * (b1i - a1i)
            hi1r = c1r + fx * (d1r - c1r)
            hi1i = c1i + fx * (d1i - c1i)
            v1r = lo1r + fy * (hi1r - lo1r)
            v1i = lo1i + fy * (hi1i - lo1i)
            dx1r = (b1r - a1r) + fy * ((d1r - c1r) - (b1r - a1r))
            dx1i = (b1i - a1i) + fy * ((d1i - c1i) - (b1i - a1i))
            vr = v0r + fz * (v1r - v0r)
            vi = sgn * (v0i + fz * (v1i - v0i))
            # d/dq of conj(V(-q)) = -conj(V'(-q)): the real parts change sign
            gxr = sgn * scale * (dx0r + fz * (dx1r - dx0r))
            gxi = scale * (dx0i + fz * (dx1i - dx0i))
            gyr = sgn * scale * ((hi0r - lo0r) + fz * ((hi1r - lo1r) - (hi0r - lo0r)))
            gyi = scale * ((hi0i - lo0i) + fz * ((hi1i - lo1i) - (hi0i - lo0i)))
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
