"""Process-wide settings for large batched tensor work.

glibc's ``malloc`` serves a request above its *mmap threshold* with fresh pages from the kernel
and returns them on ``free``. The threshold adapts to the sizes freed, but only up to 32 MiB, so
every temporary above that size (a ``[128, 36864]`` float64 posterior pass is 37.7 MB) is
zero-filled page by page on first touch, every time it is allocated: measured here, ``x + 1``
on such an array takes 17.5 ms instead of 3.3 ms once the block can be reused. Raising the
threshold lets freed blocks return to the heap and be reused by the next batch.

:func:`configure_allocator` does that. The ``cryopose`` command calls it on start-up; Python
callers of the library may call it once (it changes the allocator of the whole process: memory
freed by large tensors stays with the process, up to the trim threshold, instead of going back
to the system at once). It does nothing where the C library is not glibc.

:func:`numba_ready` says whether the numba CPU kernels (Gauss-Newton terms, the projector's
gathers, the posterior-row and quadrature passes) can run, and gives numba torch's thread count,
so that ``torch.set_num_threads`` bounds both.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["configure_allocator", "numba_ready"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_state: dict[str, bool] = {}


def configure_allocator(
    mmap_threshold_bytes: int = 512 << 20, trim_threshold_bytes: int = 1 << 30
) -> bool:
    """Raise glibc's mmap and trim thresholds so that large tensors reuse freed memory.

    Parameters
    ----------
    mmap_threshold_bytes : int
        Requests of at least this many bytes still get their own mapping (default 512 MiB).
    trim_threshold_bytes : int
        Free memory at the top of the heap beyond this many bytes is returned to the system
        (default 1 GiB).

    Returns
    -------
    bool
        True when both settings were applied (Linux with glibc); False elsewhere or when glibc
        refused a value. Calling it again with the same values returns the first answer.
    """
    if mmap_threshold_bytes <= 0 or trim_threshold_bytes <= 0:
        raise ValueError("configure_allocator: thresholds must be positive byte counts")
    key = f"{mmap_threshold_bytes}:{trim_threshold_bytes}"
    if key in _state:
        return _state[key]
    applied = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            version = libc.gnu_get_libc_version  # AttributeError: not glibc (e.g. musl)
            version.restype = ctypes.c_char_p
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            limit = 2**31 - 1  # mallopt takes a C int
            if version():
                applied = bool(mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold_bytes), limit)))
                applied = applied and bool(
                    mallopt(_M_TRIM_THRESHOLD, min(int(trim_threshold_bytes), limit))
                )
        except (OSError, AttributeError):
            applied = False
    _state[key] = applied
    return applied


_NUMBA: dict[str, object] = {}


def numba_ready() -> bool:
    """Whether numba is importable; if so, set its thread count to torch's.

    The environment variable ``CRYOPOSE_NUMBA=0`` turns the numba kernels off (the batched torch
    code runs instead; both compute the same values to rounding).
    """
    if os.environ.get("CRYOPOSE_NUMBA", "1") == "0":
        return False
    if "module" not in _NUMBA:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba is a dependency
            numba = None
        _NUMBA["module"] = numba
    numba = _NUMBA["module"]
    if numba is None:  # pragma: no cover
        return False
    import torch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return True
