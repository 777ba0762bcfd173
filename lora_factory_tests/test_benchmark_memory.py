"""The benchmarks' peak-memory reading is the measured process's own, not its parent's."""

import subprocess
import sys

from lora_factory.benchmarks.memory import peak_rss_mb


def test_a_fresh_process_does_not_report_its_big_parents_memory():
    ballast = bytearray(400 * 2**20)  # zero pages are not resident until written
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    assert peak_rss_mb() >= 400
    child = subprocess.run(
        [sys.executable, "-c", "from lora_factory.benchmarks.memory import peak_rss_mb; print(peak_rss_mb())"],
        check=True, capture_output=True, text=True,
    )
    assert 5 < float(child.stdout) < 200
    del ballast
