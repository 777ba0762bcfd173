"""One GPU per GPU step: a step claims a free GPU with an exclusive lock file.

Dagster's `gpu` pool caps how many GPU steps (training, preview rendering) go at once
(its limit is the number of GPUs), but it does not say which GPU each gets. Each therefore locks
`<lock_dir>/gpu-<index>.lock` with `flock` before it touches the GPU. The kernel drops the
lock when the process ends, however it ends (even SIGKILL), so a crashed run never leaves
a GPU marked busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

POLL_SECONDS = 2.0


class NoFreeGpuError(RuntimeError):
    """Every GPU stayed claimed by other runs for the whole wait."""


@contextmanager
def claim_gpu(
    lock_dir: Path,
    device_count: int | None = None,
    wait_seconds: float = 600.0,
    log: Callable[[str], None] = print,
) -> Iterator[int]:
    """Hold one free GPU index for the duration of the `with` block.

    `device_count` defaults to the GPUs torch sees (CUDA_VISIBLE_DEVICES applies). Waits
    up to `wait_seconds` for a GPU to be released before giving up.
    """
    import fcntl

    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise NoFreeGpuError("no CUDA GPU is visible to this process: nothing to claim")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        for index in range(count):
            handle = open(lock_dir / f"gpu-{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")  # who holds it, for people looking at the folder
                handle.flush()
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() >= deadline:
            raise NoFreeGpuError(
                f"all {count} GPUs stayed claimed by other training runs for {wait_seconds:.0f} s "
                f"(locks in {lock_dir}): lower the `gpu` pool limit to the number of GPUs"
            )
        if not announced:
            log(f"all {count} GPUs are busy with other training runs; waiting for one")
            announced = True
        time.sleep(POLL_SECONDS)


@contextmanager
def claimed_device(lock_dir: Path, log: Callable[[str], None] = print) -> Iterator[torch.device]:
    """A free GPU claimed for the `with` block (`claim_gpu`), or the CPU when there is none."""
    if not torch.cuda.is_available():
        yield torch.device("cpu")
        return
    with claim_gpu(lock_dir, log=log) as index:
        yield torch.device("cuda", index)
