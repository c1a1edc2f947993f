"""Simulated particle data sets with known poses: projection, CTF, origin shift, noise.

The whole forward model runs in Fourier space on central slices (one projector build per data
set), and images stream to disk chunk by chunk, so memory is bounded for any number of
particles. Every random quantity comes from its own generator seeded from the one seed (poses,
shifts, CTF, noise), so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cryopose import __version__
from cryopose.imaging.ctf import ctf_2d
from cryopose.imaging.fft import irfft2_centred
from cryopose.imaging.noise import disk_mask, noise_sigma, signal_power
from cryopose.imaging.projection import Projector
from cryopose.imaging.shifts import phase_shift_fourier
from cryopose.io.errors import CryoposeInputError
from cryopose.io.mrc import MrcsWriter, read_volume, write_volume
from cryopose.io.particles import make_particle_table
from cryopose.io.star import StarWriter
from cryopose.simulate.poses import PoseDistribution, parse_pose_distribution
from cryopose.so3.symmetry import point_group
from cryopose.volumes.atomic import density_from_model
from cryopose.volumes.default import default_volume
from cryopose.volumes.transform import resample_volume, symmetrise

__all__ = ["SimulationConfig", "SimulationResult", "simulate_particles", "load_reference"]

#: Offsets added to the seed for each random stream (independent streams, one seed).
_STREAMS = {"poses": 0, "shifts": 1, "ctf": 2, "noise": 3}


@dataclass
class SimulationConfig:
    """What to simulate. Lengths in Angstrom, defocus in micrometres, angles in degrees.

    Attributes
    ----------
    n : int
        Number of particles.
    box : int
        Image side in pixels.
    pixel_size_angstrom : float
        Pixel size in Angstrom.
    snr : float
        Signal-to-noise ratio as defined in ``docs/conventions.md`` (``math.inf``: no noise).
    ctf : bool
        Apply RELION's CTF.
    defocus_min_um, defocus_max_um : float
        Mean defocus drawn uniformly in this range (micrometres, underfocus positive).
    astigmatism_angstrom : float
        ``defocus_u - defocus_v`` drawn uniformly in ``[0, astigmatism_angstrom]``; the
        astigmatism angle uniformly in [0, 180) degrees.
    voltage_kv, cs_mm, amplitude_contrast : float
        Optics (300 kV, 2.7 mm, 0.1 by default).
    max_shift_angstrom : float
        Origins drawn uniformly in the disk of this radius.
    poses : str
        Pose distribution spec (see :mod:`cryopose.simulate.poses`).
    symmetry : str
        Point group the volume is symmetrised under before projection.
    seed : int
        The one seed.
    chunk_size : int or None
        Particles per chunk (default: about 16 MB of images per chunk).
    """

    n: int = 1000
    box: int = 128
    pixel_size_angstrom: float = 3.0
    snr: float = 0.1
    ctf: bool = True
    defocus_min_um: float = 1.0
    defocus_max_um: float = 2.5
    astigmatism_angstrom: float = 500.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    max_shift_angstrom: float = 0.0
    poses: str = "uniform"
    symmetry: str = "C1"
    seed: int = 0
    chunk_size: int | None = None

    def validate(self) -> None:
        """Raise :class:`CryoposeInputError` naming the first invalid option."""
        checks = [
            (self.n >= 1, "--n", "a positive number of particles"),
            (self.box >= 8, "--box", "at least 8 pixels"),
            (self.pixel_size_angstrom > 0, "--pixel-size", "a positive pixel size (Angstrom)"),
            (self.snr > 0, "--snr", "a positive SNR or inf"),
            (
                0 <= self.defocus_min_um <= self.defocus_max_um,
                "--defocus-min/--defocus-max",
                "0 <= min <= max (micrometres)",
            ),
            (self.astigmatism_angstrom >= 0, "--astigmatism", ">= 0 Angstrom"),
            (self.max_shift_angstrom >= 0, "--max-shift", ">= 0 Angstrom"),
            (0 <= self.amplitude_contrast < 1, "amplitude contrast", "a fraction in [0, 1)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise CryoposeInputError(f"{name}: expected {expected}")


@dataclass
class SimulationResult:
    """Paths and measured figures of a simulation."""

    particles_star: Path
    particles_mrcs: Path
    reference_mrc: Path
    parameters_json: Path
    noise_sigma: float
    signal_power: float
    measured_snr: float | None
    config: SimulationConfig = field(repr=False)


def load_reference(
    box: int,
    pixel_size_angstrom: float,
    *,
    volume_path: str | Path | None = None,
    model_path: str | Path | None = None,
    symmetry: str = "C1",
) -> torch.Tensor:
    """The reference volume at ``box`` and ``pixel_size_angstrom``, ``[z, y, x]`` float32.

    From an MRC map (resampled to the requested pixel size and box), an atomic model (PDB or
    mmCIF, gzipped or not), or by default the embedded 80S ribosome; symmetrised under
    ``symmetry`` unless it is C1.
    """
    if volume_path is not None and model_path is not None:
        raise CryoposeInputError("--volume and --model: give one of them, not both")
    if volume_path is not None:
        data = read_volume(volume_path, require_pixel_size=True)
        volume = resample_volume(data.data, data.pixel_size_angstrom, pixel_size_angstrom, box)
    elif model_path is not None:
        volume = density_from_model(model_path, box, pixel_size_angstrom)
    else:
        volume = default_volume(box, pixel_size_angstrom)
    volume = volume.to(torch.float32)
    group = point_group(symmetry, dtype=torch.float32)
    if group.shape[0] > 1:
        volume = symmetrise(volume, group)
    return volume


def _default_chunk(box: int) -> int:
    # about 16 MB of images per chunk: projection temporaries are several times that
    return int(min(1024, max(16, 2**22 // (box * box))))


def simulate_particles(
    config: SimulationConfig,
    out_dir: str | Path,
    *,
    volume: torch.Tensor | None = None,
    volume_path: str | Path | None = None,
    model_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
    keep_clean: int = 0,
) -> tuple[SimulationResult, torch.Tensor | None]:
    """Simulate a particle data set and write it to ``out_dir``.

    Writes ``particles.mrcs`` (noisy images), ``particles.star`` (RELION 3.1 with the true
    poses, origins and CTF), ``reference.mrc`` (the volume at this box and pixel size) and
    ``simulation.json`` (every parameter, the noise sigma and the measured signal power).

    The noise standard deviation is fixed from the signal power (mean squared clean image in
    the disk of radius N/2) of the first chunk of particles; when all particles fit in one
    chunk the SNR is exactly the requested one on the data set.

    Parameters
    ----------
    config : SimulationConfig
    out_dir : str or Path
        Output folder (created if needed).
    volume : torch.Tensor, optional
        ``[N, N, N]`` reference at ``config.box`` and pixel size (skips loading).
    volume_path, model_path : str or Path, optional
        See :func:`load_reference`.
    progress : callable, optional
        Called with the number of particles finished after each chunk.
    device : str or torch.device
        Where projection and the CTF run.
    keep_clean : int
        Also return the first ``keep_clean`` clean (noise-free) images, ``[k, N, N]``.

    Returns
    -------
    result : SimulationResult
    clean : torch.Tensor or None
    """
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box, px = config.box, config.pixel_size_angstrom
    if volume is None:
        volume = load_reference(
            box, px, volume_path=volume_path, model_path=model_path, symmetry=config.symmetry
        )
    if tuple(volume.shape) != (box, box, box):
        raise CryoposeInputError(
            f"volume: shape {tuple(volume.shape)} differs from the requested box {box}"
        )
    pose_distribution: PoseDistribution = parse_pose_distribution(config.poses)
    device = torch.device(device)
    projector = Projector(volume.to(device=device, dtype=torch.float32))
    generators = {
        name: torch.Generator().manual_seed(config.seed * 16 + offset)
        for name, offset in _STREAMS.items()
    }
    chunk = config.chunk_size or _default_chunk(box)
    paths = {
        "star": out / "particles.star",
        "mrcs": out / "particles.mrcs",
        "reference": out / "reference.mrc",
        "json": out / "simulation.json",
    }
    sigma = power = None
    clean_kept: list[torch.Tensor] = []
    n_kept = 0
    noise_sq_sum, signal_sq_sum, mask_count = 0.0, 0.0, 0
    disk = disk_mask(box)
    with (
        MrcsWriter(paths["mrcs"], box, px, config.n) as images_out,
        StarWriter(paths["star"]) as star_out,
    ):
        for start in range(0, config.n, chunk):
            k = min(chunk, config.n - start)
            rotations = pose_distribution.sample(k, generators["poses"])
            u = torch.rand(k, 2, generator=generators["shifts"], dtype=torch.float64)
            radius = config.max_shift_angstrom * torch.sqrt(u[:, 0])
            angle = 2 * math.pi * u[:, 1]
            origins = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
            c = torch.rand(k, 3, generator=generators["ctf"], dtype=torch.float64)
            mean_defocus = 1e4 * (
                config.defocus_min_um + (config.defocus_max_um - config.defocus_min_um) * c[:, 0]
            )
            astig = config.astigmatism_angstrom * c[:, 1]
            ctf_values = {
                "defocus_u_angstrom": mean_defocus + astig / 2,
                "defocus_v_angstrom": mean_defocus - astig / 2,
                "defocus_angle_deg": 180.0 * c[:, 2],
            }

            slices = projector.slices(rotations.to(device=device, dtype=torch.float32))
            if config.ctf:
                slices = slices * ctf_2d(
                    defocus_u_angstrom=ctf_values["defocus_u_angstrom"].to(device),
                    defocus_v_angstrom=ctf_values["defocus_v_angstrom"].to(device),
                    defocus_angle_deg=ctf_values["defocus_angle_deg"].to(device),
                    voltage_kv=config.voltage_kv,
                    cs_mm=config.cs_mm,
                    amplitude_contrast=config.amplitude_contrast,
                    pixel_size_angstrom=px,
                    box=box,
                    dtype=torch.float32,
                    device=device,
                )
            # RELION origin: the particle sits at N//2 - origin/px, i.e. shifted by -origin.
            shift = (-origins / px).to(device=device, dtype=torch.float32)
            slices = phase_shift_fourier(slices, shift[:, 0], shift[:, 1], box)
            clean = irfft2_centred(slices, box).cpu()
            if sigma is None:
                power = float(signal_power(clean))
                sigma = float(noise_sigma(power, config.snr))
            noise = sigma * torch.randn(
                clean.shape, generator=generators["noise"], dtype=torch.float32
            )
            images_out.write(clean + noise)
            signal_sq_sum += float((clean[:, disk] ** 2).sum())
            noise_sq_sum += float((noise**2).sum())
            mask_count += int(disk.sum()) * k
            if n_kept < keep_clean:
                clean_kept.append(clean[: keep_clean - n_kept])
                n_kept += clean_kept[-1].shape[0]
            table = make_particle_table(
                paths["mrcs"],
                k,
                pixel_size_angstrom=px,
                box=box,
                rotations=rotations,
                origins_angstrom=origins,
                ctf=ctf_values if config.ctf else None,
                voltage_kv=config.voltage_kv,
                spherical_aberration_mm=config.cs_mm,
                amplitude_contrast=config.amplitude_contrast,
                first_index=start + 1,
            )
            star_out.write(table)
            if progress is not None:
                progress(k)
    write_volume(paths["reference"], volume.cpu(), px)
    measured_power = signal_sq_sum / mask_count
    noise_var = noise_sq_sum / (config.n * box * box)
    measured_snr = measured_power / noise_var if noise_var > 0 else None
    record = {
        "cryopose_version": __version__,
        "config": asdict(config),
        "noise_sigma": sigma,
        "signal_power_first_chunk": power,
        "signal_power_measured": measured_power,
        "snr_measured": measured_snr,
        "snr_definition": "mean squared clean image (CTF, shift) in the disk of radius N/2 "
        "over the data set, divided by the noise variance",
        "reference_source": str(volume_path or model_path or "embedded 80S ribosome (6ZU5)"),
    }
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(paths["json"])
    clean_out = torch.cat(clean_kept) if clean_kept else None
    result = SimulationResult(
        particles_star=paths["star"],
        particles_mrcs=paths["mrcs"],
        reference_mrc=paths["reference"],
        parameters_json=paths["json"],
        noise_sigma=float(sigma),
        signal_power=float(measured_power),
        measured_snr=measured_snr,
        config=config,
    )
    return result, clean_out
