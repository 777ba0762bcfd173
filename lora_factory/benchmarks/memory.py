"""Peak memory of the current process, for the benchmarks' fresh-process runs."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space, in MiB.

    On Linux this is VmHWM: getrusage's ru_maxrss survives exec, so a process started
    from a big parent would report the parent's size at fork time as its own peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    # Elsewhere ru_maxrss is the best there is (bytes on macOS).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
