"""RELION CTF: independent formula, CTF(0) = +w, astigmatism direction, layouts, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopose.imaging import apply_ctf, ctf_2d, electron_wavelength_angstrom, rfft2_centred


def relion_ctf_numpy(u, v, angle_deg, kv, cs_mm, w, px, box, phase_deg=0.0, bfac=0.0,
                     half=False):
    """RELION's CTF written from /work/shared/CONVENTIONS.md on the centred grid (full, or the
    rfft half kx = 0 .. box // 2), float64."""
    volts = kv * 1000.0
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    f = (np.arange(box) - box // 2) / (box * px)  # centred frequencies, 1/A
    fx = np.arange(box // 2 + 1) / (box * px) if half else f
    ky, kx = np.meshgrid(f, fx, indexing="ij")
    k2 = kx**2 + ky**2
    phi = np.arctan2(ky, kx)
    dfoc = -((u + v) / 2 + (u - v) / 2 * np.cos(2 * (phi - np.deg2rad(angle_deg))))
    chi = (np.pi * lam * dfoc * k2 + np.pi / 2 * cs_mm * 1e7 * lam**3 * k2**2
           - np.deg2rad(phase_deg) - np.arctan(w / np.sqrt(1 - w * w)))
    return -np.sin(chi) * np.exp(-bfac * k2 / 4)


PARAMS = dict(u=14000.0, v=11500.0, angle_deg=33.0, kv=300.0, cs_mm=2.7, w=0.07, px=1.1)


def call(box, dtype=torch.float64, rfft=False, centred=True, phase_deg=0.0, bfac=0.0, **over):
    p = {**PARAMS, **over}
    return ctf_2d(
        defocus_u_angstrom=p["u"], defocus_v_angstrom=p["v"], defocus_angle_deg=p["angle_deg"],
        voltage_kv=p["kv"], cs_mm=p["cs_mm"], amplitude_contrast=p["w"],
        pixel_size_angstrom=p["px"], box=box, phase_shift_deg=phase_deg, bfactor=bfac,
        rfft=rfft, centred=centred, dtype=dtype,
    )


@pytest.mark.parametrize("box", [64, 65])
def test_matches_independent_relion_formula(box, dtype):
    ref = relion_ctf_numpy(**{**PARAMS, "phase_deg": 20.0, "bfac": 50.0}, box=box)
    ref_half = relion_ctf_numpy(**{**PARAMS, "phase_deg": 20.0, "bfac": 50.0}, box=box, half=True)
    full = call(box, dtype, phase_deg=20.0, bfac=50.0)
    assert full.dtype == dtype and full.shape == (box, box)
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(full.double().numpy(), ref, atol=tol)
    # rfft layout = the kx >= 0 half of the full centred grid
    half = call(box, dtype, rfft=True, phase_deg=20.0, bfac=50.0)
    assert half.shape == (box, box // 2 + 1)
    np.testing.assert_allclose(half.double().numpy(), ref_half, atol=tol)
    # native (uncentred) order
    native = call(box, dtype, rfft=True, centred=False, phase_deg=20.0, bfac=50.0)
    np.testing.assert_allclose(
        native.double().numpy(), np.fft.ifftshift(ref_half, axes=0), atol=tol
    )


def test_wavelength_300kv():
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.019687, abs=1e-6)
    assert float(electron_wavelength_angstrom(torch.tensor(200.0))) == pytest.approx(
        0.025079, abs=1e-6
    )


@pytest.mark.parametrize("box", [32, 33])
def test_ctf_at_zero_is_amplitude_contrast_and_first_lobe_positive(box):
    ctf = call(box, rfft=True, w=0.1)
    assert float(ctf[box // 2, 0]) == pytest.approx(0.1, abs=1e-12)
    # underfocus: the CTF rises from +w at low frequency
    assert float(ctf[box // 2, 1]) > 0.1


def test_astigmatism_direction():
    """Along the direction at angle alpha from x the CTF equals the isotropic CTF with defocus
    U; along alpha + 90 degrees, with defocus V."""
    box = 128
    iso_u = call(box, rfft=False, v=PARAMS["u"]).numpy()
    iso_v = call(box, rfft=False, u=PARAMS["v"]).numpy()
    c = box // 2
    # grid points with phi exactly 45 degrees (diagonal) and 135 degrees (anti-diagonal);
    # arrays are [ky, kx], so (c + t, c + t) has kx = ky = t.
    ctf45 = call(box, rfft=False, angle_deg=45.0).numpy()
    diag = [(c + t, c + t) for t in range(1, box // 2)]
    anti = [(c + t, c - t) for t in range(1, box // 2)]
    assert np.allclose([ctf45[p] for p in diag], [iso_u[p] for p in diag], atol=1e-12)
    assert np.allclose([ctf45[p] for p in anti], [iso_v[p] for p in anti], atol=1e-12)
    # and angle -45 swaps them (the direction is counter-clockwise from +x towards +y)
    ctfm45 = call(box, rfft=False, angle_deg=-45.0).numpy()
    assert np.allclose([ctfm45[p] for p in anti], [iso_u[p] for p in anti], atol=1e-12)
    assert not np.allclose([ctf45[p] for p in diag], [iso_v[p] for p in diag], atol=1e-3)


def test_batched_parameters_broadcast():
    u = torch.tensor([[10000.0], [20000.0]], dtype=torch.float64)  # [2, 1]
    angle = torch.tensor([0.0, 45.0, 90.0], dtype=torch.float64)  # [3]
    out = ctf_2d(defocus_u_angstrom=u, defocus_v_angstrom=u - 500, defocus_angle_deg=angle,
                 voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, pixel_size_angstrom=1.3,
                 box=24)
    assert out.shape == (2, 3, 24, 13) and out.dtype == torch.float64
    single = ctf_2d(defocus_u_angstrom=20000.0, defocus_v_angstrom=19500.0,
                    defocus_angle_deg=45.0, voltage_kv=300.0, cs_mm=2.7,
                    amplitude_contrast=0.1, pixel_size_angstrom=1.3, box=24,
                    dtype=torch.float64)
    assert torch.allclose(out[1, 1], single, atol=1e-12)


def test_apply_ctf_is_fourier_multiplication():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 33, 33, generator=g, dtype=torch.float64)
    ctf = call(33, rfft=True)
    out = apply_ctf(img, ctf)
    assert torch.allclose(rfft2_centred(out), rfft2_centred(img) * ctf, atol=1e-10)
    # a constant image only has k = 0, so it is scaled by CTF(0) = w
    const = torch.ones(1, 33, 33, dtype=torch.float64)
    assert torch.allclose(apply_ctf(const, ctf), const * PARAMS["w"])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="amplitude_contrast"):
        call(16, w=1.0)
    with pytest.raises(ValueError, match="box"):
        call(0)
    with pytest.raises(ValueError, match="pixel_size_angstrom"):
        call(16, px=0.0)
    with pytest.raises(ValueError, match="ctf_rfft_centred"):
        apply_ctf(torch.zeros(8, 8), torch.zeros(8, 8))
    assert math.isfinite(float(call(16).sum()))


def test_ctf_from_params_equals_ctf_2d_and_applies_scale():
    from cryopose.imaging import ctf_from_params

    params = {
        "defocus_u_angstrom": torch.tensor([15000.0, 9000.0]),
        "defocus_v_angstrom": torch.tensor([14000.0, 8800.0]),
        "defocus_angle_deg": torch.tensor([30.0, -60.0]),
        "voltage_kv": torch.tensor([300.0, 200.0]),
        "spherical_aberration_mm": torch.tensor([2.7, 1.4]),
        "amplitude_contrast": torch.tensor([0.1, 0.07]),
        "phase_shift_deg": torch.tensor([0.0, 90.0]),
        "bfactor_angstrom2": torch.tensor([0.0, 50.0]),
        "scale": torch.tensor([1.0, 0.5]),
        "pixel_size_angstrom": torch.tensor([1.5, 1.5]),
    }
    got = ctf_from_params(params, 33)
    for i in range(2):
        expected = ctf_2d(
            defocus_u_angstrom=float(params["defocus_u_angstrom"][i]),
            defocus_v_angstrom=float(params["defocus_v_angstrom"][i]),
            defocus_angle_deg=float(params["defocus_angle_deg"][i]),
            voltage_kv=float(params["voltage_kv"][i]),
            cs_mm=float(params["spherical_aberration_mm"][i]),
            amplitude_contrast=float(params["amplitude_contrast"][i]),
            phase_shift_deg=float(params["phase_shift_deg"][i]),
            bfactor=float(params["bfactor_angstrom2"][i]),
            pixel_size_angstrom=1.5,
            box=33,
        )
        assert torch.allclose(got[i], float(params["scale"][i]) * expected, atol=1e-6)
    params["pixel_size_angstrom"] = torch.tensor([1.5, 2.0])
    with pytest.raises(ValueError, match="one pixel size"):
        ctf_from_params(params, 33)


def _params(dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    b = 4
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)  # noqa: E731
    du = rand(8000, 20000)
    params = {
        "defocus_u_angstrom": du,
        "defocus_v_angstrom": du - rand(0, 1500),
        "defocus_angle_deg": rand(-180, 180),
        "voltage_kv": torch.tensor([300.0, 200.0, 300.0, 120.0], dtype=torch.float64),
        "spherical_aberration_mm": rand(0.01, 2.7),
        "amplitude_contrast": rand(0.0, 0.2),
        "phase_shift_deg": rand(0, 90),
        "bfactor_angstrom2": rand(0, 80),
        "scale": rand(0.5, 1.5),
        "pixel_size_angstrom": torch.full((b,), 1.3, dtype=torch.float64),
    }
    return {k: v.to(dtype) for k, v in params.items()}


@pytest.mark.parametrize("box", [32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctf_at_frequencies_on_the_grid_equals_ctf_from_params(box, dtype):
    from cryopose.imaging import ctf_at_frequencies, ctf_from_params
    from cryopose.imaging.fft import frequency_grid_2d

    params = _params(dtype)
    ky, kx = frequency_grid_2d(box, 1.0, rfft=True, centred=True, dtype=torch.float64)
    grid = ctf_from_params(params, box)
    got = ctf_at_frequencies(params, kx * box, ky * box, box)
    squared = ctf_at_frequencies(params, kx * box, ky * box, box, squared=True)
    assert got.dtype == squared.dtype == dtype and got.shape == grid.shape
    # float32: the phase reaches ~100 rad at Nyquist, so rounding of chi shows at ~1e-4
    tol = 1e-10 if dtype == torch.float64 else 5e-4
    assert float((got - grid).abs().max()) < tol
    assert float((squared - grid**2).abs().max()) < tol


def test_ctf_at_frequencies_rotates_with_the_defocus_angle():
    # CTF(R_theta k; alpha + theta) = CTF(k; alpha): the astigmatism turns with the frame
    from cryopose.imaging import ctf_at_frequencies

    params = _params()
    g = torch.Generator().manual_seed(5)
    kx, ky = (torch.rand(2, 50, generator=g, dtype=torch.float64) - 0.5) * 30
    theta = math.radians(37.0)
    rx = math.cos(theta) * kx - math.sin(theta) * ky
    ry = math.sin(theta) * kx + math.cos(theta) * ky
    turned = dict(params, defocus_angle_deg=params["defocus_angle_deg"] + 37.0)
    a = ctf_at_frequencies(params, kx, ky, 64)
    b = ctf_at_frequencies(turned, rx, ry, 64)
    assert float((a - b).abs().max()) < 1e-10
    assert float((a - ctf_at_frequencies(params, rx, ry, 64)).abs().max()) > 1e-2  # (astigmatic)


def test_ctf_at_frequencies_bad_input():
    from cryopose.imaging import ctf_at_frequencies

    params = _params()
    with pytest.raises(ValueError, match="kx, ky"):
        ctf_at_frequencies(params, torch.zeros(3), torch.zeros(4), 16)
    with pytest.raises(ValueError, match="amplitude_contrast"):
        ctf_at_frequencies(dict(params, amplitude_contrast=torch.ones(4)), torch.zeros(3),
                           torch.zeros(3), 16)
    with pytest.raises(ValueError, match="one pixel size"):
        ctf_at_frequencies(dict(params, pixel_size_angstrom=torch.tensor([1.0, 1, 1, 2])),
                           torch.zeros(3), torch.zeros(3), 16)
    partial = {k: v for k, v in params.items() if k not in ("scale", "pixel_size_angstrom")}
    with pytest.raises(ValueError, match="missing scale, pixel_size_angstrom"):
        ctf_at_frequencies(partial, torch.zeros(3), torch.zeros(3), 16)
    assert ctf_at_frequencies(dict(partial, scale=params["scale"]), torch.zeros(3),
                              torch.zeros(3), 16, pixel_size_angstrom=1.3).shape == (4, 3)
