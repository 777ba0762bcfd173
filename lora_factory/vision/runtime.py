"""ONNX Runtime sessions: one per (model file, providers) per process, always with an
explicit provider list.

onnxruntime-gpu lists the CUDA and TensorRT providers even on machines without CUDA and
logs load errors when a session is created without an explicit provider list, so
"auto" probes CUDA once (quietly) and falls back to the CPU provider.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")

# ORT severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_QUIET = 3
_SILENT = 4

_sessions: dict[tuple[str, int, int, str, int], ort.InferenceSession] = {}
_sessions_lock = threading.Lock()
_cuda_usable: bool | None = None


def default_thread_count() -> int:
    """Cores this process may use (cgroup/affinity aware), at most 8: more threads than
    that only add contention for these small models."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


_shared_cpu_arena = False


def _register_shared_cpu_arena() -> None:
    """One CPU memory arena for every session of the process.

    Each session's own arena keeps the high-water mark of its largest batch for the
    life of the process, so ten models would hold ten peaks; without any arena, every
    tensor above glibc's 32 MB mmap limit is mapped and unmapped on each run and the
    page faults cost more than batching gains. A shared arena reuses one set of
    blocks: the process holds the largest single run's activations, once."""
    global _shared_cpu_arena
    if not _shared_cpu_arena:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0 (no cap), extend by the amount requested: no power-of-two overshoot.
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 1}))
        _shared_cpu_arena = True


def _session_options(intra_op_threads: int | None, severity: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or default_thread_count()
    options.inter_op_num_threads = 1
    options.log_severity_level = severity
    _register_shared_cpu_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def _cuda_driver_present() -> bool:
    # Without the driver library the CUDA provider cannot load; skipping the probe keeps
    # onnxruntime from logging a load error on every CPU-only machine.
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_usable(probe_model: Path) -> bool:
    """Whether the CUDA provider really loads here (probed once per process)."""
    global _cuda_usable
    if _cuda_usable is None:
        usable = False
        if CUDA in ort.get_available_providers() and _cuda_driver_present():
            try:
                probe = ort.InferenceSession(
                    str(probe_model),
                    sess_options=_session_options(1, _SILENT),
                    providers=[CUDA, CPU],
                )
                usable = probe.get_providers()[0] == CUDA
            except Exception:  # any load failure means: not usable
                usable = False
        _cuda_usable = usable
    return _cuda_usable


def _provider_list(path: Path, providers: str) -> list[str]:
    if providers not in PROVIDER_CHOICES:
        raise ValueError(f"providers must be one of {PROVIDER_CHOICES}, got {providers!r}")
    if providers == "cpu":
        return [CPU]
    if cuda_usable(path):
        return [CUDA, CPU]
    if providers == "cuda":
        raise RuntimeError(
            f"providers='cuda' was asked for {path}, but the CUDA execution provider does not "
            "load on this machine (no NVIDIA driver/CUDA libraries); use providers='auto' or 'cpu'"
        )
    return [CPU]


def create_session(
    path: Path | str, providers: str = "auto", intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """An `InferenceSession` for the ONNX file at `path`, shared per process.

    `providers`: "auto" (CUDA when it really loads, else CPU), "cpu" or "cuda".
    A file that changes on disk (size or mtime) gets a new session.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model file not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, providers, intra_op_threads or 0)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = ort.InferenceSession(
                str(path),
                sess_options=_session_options(intra_op_threads, _QUIET),
                providers=_provider_list(path, providers),
            )
            _sessions[key] = session
        return session


@dataclass(frozen=True)
class BatchSizes:
    """Images per model call, by where the session runs.

    On a CPU a call costs about the same per image at any batch size (measured, batch
    1-8 on two x86 CPUs: within 15% for SwinV2-B, CAFormer-S36, YOLOv8s/m and
    MobileNetV3, better or worse by model and CPU), while activation memory grows with
    the batch (SwinV2-B at 448: ~140 MB per image), so CPU batches stay small. On a GPU,
    batching is what keeps the device busy.
    """

    cpu: int
    cuda: int

    def __post_init__(self) -> None:
        if self.cpu < 1 or self.cuda < 1:
            raise ValueError(f"batch sizes must be at least 1, got {self}")

    def for_session(self, session: ort.InferenceSession) -> int:
        return self.cuda if session.get_providers()[0] == CUDA else self.cpu


def batch_size_for(session: ort.InferenceSession, batch_size: int | BatchSizes) -> int:
    """A wrapper's images per call: a fixed number, or chosen by the session's device."""
    if isinstance(batch_size, BatchSizes):
        return batch_size.for_session(session)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive runs of at most `size` items: images are preprocessed one chunk at a
    time so a long list never sits in memory as one big tensor, and a lazy iterable
    (images read from the blob store one by one) is only read one chunk ahead."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def run_batched(
    session: ort.InferenceSession, batch: np.ndarray, batch_size: int, output_index: int = 0
) -> np.ndarray:
    """Run a single-input model over `batch` in chunks and concatenate one output.

    A model exported with a fixed batch dimension is run with exactly that many
    images per call (the last chunk padded, the padding dropped afterwards).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model_input = session.get_inputs()[0]
    output_name = session.get_outputs()[output_index].name
    fixed = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    step = fixed or batch_size
    results = []
    for start in range(0, len(batch), step):
        chunk = batch[start : start + step]
        missing = step - len(chunk) if fixed else 0
        if missing:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)])
        (output,) = session.run([output_name], {model_input.name: chunk})
        results.append(output[: len(output) - missing])
    return np.concatenate(results)


def input_hw(session: ort.InferenceSession, default: tuple[int, int], layout: str) -> tuple[int, int]:
    """The (height, width) a model's image input is fixed to, or `default` where dynamic.

    `layout` is "NCHW" or "NHWC".
    """
    shape: Sequence = session.get_inputs()[0].shape
    if len(shape) != 4:
        raise ValueError(f"expected a 4-d image input, the model's input has shape {shape}")
    height, width = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    return (
        height if isinstance(height, int) else default[0],
        width if isinstance(width, int) else default[1],
    )
