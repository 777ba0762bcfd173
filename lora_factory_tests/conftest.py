"""Fixtures shared by the test modules."""

from __future__ import annotations

import psutil
import pytest


@pytest.fixture()
def started():
    """Processes a test starts; each is stopped afterwards with all its descendants."""
    processes: list[psutil.Popen] = []
    yield processes
    tree = []
    for process in processes:
        try:
            tree += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for process in tree:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
