"""configure_allocator: large temporaries reuse freed memory instead of fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cryopose.runtime import configure_allocator

# Median minor page faults of one allocate-touch-free cycle of a 40 MB tensor (above glibc's
# largest dynamic mmap threshold, 32 MiB) over 15 cycles after 3 warm-ups (the heap grows to its
# working size first; the median ignores pages the kernel reclaims now and then).
_SCRIPT = """
import resource, statistics, sys, torch
from cryopose.runtime import configure_allocator
if sys.argv[1] == "on":
    assert configure_allocator()
x = torch.ones(5_000_000, dtype=torch.float64)
faults = []
for _ in range(18):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x + 1.0
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults[3:])))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not configure_allocator(), reason="not glibc")
def test_large_temporaries_stop_faulting_fresh_pages() -> None:
    off, on = _faults("off"), _faults("on")
    assert off > 9000  # a 40 MB block is ~9,800 fresh 4 KiB pages
    assert on < 500


def test_bad_threshold_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive"):
        configure_allocator(0, 1 << 30)
