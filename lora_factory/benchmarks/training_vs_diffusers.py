"""Training throughput: this project's trainer vs diffusers' own LoRA example script, run as it is.

`training_throughput.py` compares our trainer with a loop written in the style of diffusers'
`examples/text_to_image/train_text_to_image_lora.py`. This benchmark runs the real script,
unmodified, in a separate Python environment, against `train_lora` on the same tiny
SD1.5-shaped model, images, captions, resolution, batch size, rank, learning rate, schedule,
min-SNR gamma, seed and number of steps, fp32 on the CPU, with the same number of threads,
and prints the images per second of each and their ratio (ours / the example). With
`--device cuda` both train on the first GPU in bf16, and `--model sd15` gives both the full
SD1.5 architecture with random weights (written once, as a diffusers folder, for all the
`--resolution`s asked for).

What is timed, on both sides: the training steps only, from the end of the last warm-up
step to the end of the last timed step, read from each trainer's own per-step progress
output as it happens. The script's tqdm bar ("Steps: ... 7/24 [...]") is redrawn after
every step (the script sets its postfix with the step's loss each time); ours logs every
step (`log_every_n_steps=1`). Start-up (imports, loading the model, the script's dataset
preparation, our latent cache) is outside the window and printed separately as the whole
run's wall time. Each run has one step after the timed ones, so that neither trainer's
writing of its final LoRA file (ours does it inside the last step's callback) is timed.
The CPU time each trainer's process used over the same steps (user + system, read when each
step is reported) is printed too, as images per CPU second: on a machine that other jobs
keep busy it moves far less than wall-clock time. `--repeats N` alternates which side runs
first and adds the medians.

The work differs where the trainers do: the script encodes every batch with the VAE and
resizes every image each step, ours encodes each image once before training; the script's
LoRA covers the attention projections (to_q/k/v/out), ours kohya's SD1.5 set (those plus
proj_in/out and the feed-forward layers); both train the UNet only here.

The script's environment needs torchvision and `datasets`, which the project does not
install; make one beside the project (any versions the script accepts; torchvision must
match its torch):

    python3 -m venv /path/to/peer-venv
    /path/to/peer-venv/bin/pip install torch torchvision   # a matching pair
    /path/to/peer-venv/bin/pip install diffusers==<ours> transformers accelerate peft datasets
    git show <tag>:examples/text_to_image/train_text_to_image_lora.py > /path/to/train_text_to_image_lora.py

    python -m lora_factory.benchmarks.training_vs_diffusers \\
        --diffusers-script /path/to/train_text_to_image_lora.py --peer-python /path/to/peer-venv/bin/python

(or set LF_DIFFUSERS_SCRIPT and LF_DIFFUSERS_PYTHON).
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import logging
import os
import re
import select
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

SCRIPT_ENV = "LF_DIFFUSERS_SCRIPT"
PYTHON_ENV = "LF_DIFFUSERS_PYTHON"
METADATA_FILE = "metadata.jsonl"  # what `datasets`' imagefolder reads captions from
PEER_LORA_FILE = "pytorch_lora_weights.safetensors"  # what the script writes at the end
OUTPUT_TAIL_LINES = 30
# The script's progress bar as tqdm draws it: "Steps:  29%|██▉       | 7/24 [00:03<00:08, ...".
PEER_PROGRESS = re.compile(r"Steps:[^\r\n]*?\|\s*(\d+)/(\d+)\s*\[")
# Our per-step log line: "<output_name>: step 7/24 epoch 4 loss ...".
OUR_PROGRESS = re.compile(r": step (\d+)/(\d+) ")
# What the peer environment must import for the script, and the versions worth reporting.
PEER_MODULES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "datasets")
MODELS = ("tiny", "sd15")
DEVICES = ("cpu", "cuda")


class PeerSetupError(RuntimeError):
    """The script or the Python that runs it is missing or unusable; the message says which."""


class PeerRunError(RuntimeError):
    """The script failed or did not train as asked; the message ends with its last lines of output."""


@dataclass(frozen=True)
class Comparison:
    model: str = "tiny"  # the tiny SD1.5-shaped model, or "sd15": the real architecture, random weights
    device: str = "cpu"  # "cuda": both trainers on the first GPU, in bf16
    resolution: int = 128  # the tiny model's native size
    batch_size: int = 8
    rank: int = 8
    steps: int = 20  # timed
    warmup_steps: int = 3
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"  # our default; the script's is "constant"
    min_snr_gamma: float = 5.0  # our default; the script's --snr_gamma
    seed: int = 0
    threads: int = 1  # torch's intra-op threads, each side
    torch_compile: bool = False  # ours only: the script does not compile

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (the bucket grid), got {self.resolution}")
        for name in ("batch_size", "rank", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    @property
    def mixed_precision(self) -> str:
        """The script's and our `mixed_precision`: bf16 on a GPU (what users train in), fp32 on the CPU."""
        return "bf16" if self.device == "cuda" else "no"

    @property
    def total_steps(self) -> int:
        """Warm-up, timed steps, and one more so that the final save is outside the window."""
        return self.warmup_steps + self.steps + 1

    @property
    def image_count(self) -> int:
        """Two full batches: every epoch has more than one batch, none of them short."""
        return 2 * self.batch_size


@dataclass(frozen=True)
class Measurement:
    images_per_second: float
    step_seconds: float
    run_seconds: float  # the whole run, start-up and final save included
    # Images per CPU second of the trainer's process over the same steps: what a core would
    # do for it alone, whatever else the machine is running.
    images_per_cpu_second: float | None = None


# --- the training set ----------------------------------------------------------------


def write_imagefolder(folder: Path, comparison: Comparison) -> list[tuple[Path, str]]:
    """The training images and their captions in the layout of `datasets`' imagefolder
    loader (what the script's `--train_data_dir` reads): the images, and `metadata.jsonl`
    with one `{"file_name": ..., "text": ...}` object per image. Returns (image, caption)."""
    from lora_factory.benchmarks.training_throughput import captions_for, write_images

    images = write_images(folder, comparison.image_count, comparison.resolution, seed=comparison.seed)
    captions = captions_for(len(images))
    with (folder / METADATA_FILE).open("w", encoding="utf-8") as metadata:
        for image, caption in zip(images, captions):
            metadata.write(json.dumps({"file_name": image.name, "text": caption}, ensure_ascii=False) + "\n")
    return list(zip(images, captions))


# --- reading progress ----------------------------------------------------------------


class StepClock:
    """When each step was first reported, from a trainer's progress output fed as it arrives.

    Output comes in arbitrary chunks; tqdm redraws its bar after a carriage return and ends
    the line only when it closes, so the unfinished last segment is searched too (a bar cut
    in the middle of its step count does not match: the pattern needs what follows the count).
    """

    def __init__(self, pattern: re.Pattern[str]):
        self.pattern = pattern
        self.first_seen: dict[int, float] = {}  # step -> wall-clock time
        self.cpu_seen: dict[int, float] = {}  # step -> CPU time the trainer's process had used
        self.total: int | None = None
        self._pending = ""

    def feed(self, text: str, now: float, cpu: float | None = None) -> None:
        self._pending += text
        *done, self._pending = re.split(r"[\r\n]", self._pending)
        for segment in [*done, self._pending]:
            match = self.pattern.search(segment)
            if match:
                step, total = int(match.group(1)), int(match.group(2))
                if step not in self.first_seen:
                    self.first_seen[step] = now
                    if cpu is not None:
                        self.cpu_seen[step] = cpu
                self.total = total

    def window(self, first: int, last: int) -> float:
        """Seconds from the end of step `first` to the end of step `last`."""
        missing = [step for step in (first, last) if step not in self.first_seen]
        if missing:
            seen = sorted(self.first_seen)
            raise PeerRunError(
                f"no progress report for step(s) {missing} (reported: "
                f"{f'{seen[0]}..{seen[-1]}' if seen else 'none'})"
            )
        return self.first_seen[last] - self.first_seen[first]

    def cpu_window(self, first: int, last: int) -> float | None:
        """CPU seconds the trainer used from the end of step `first` to the end of step `last`."""
        if first in self.cpu_seen and last in self.cpu_seen:
            return self.cpu_seen[last] - self.cpu_seen[first]
        return None


def measurement(clock: StepClock, comparison: Comparison, run_seconds: float) -> Measurement:
    first, last = comparison.warmup_steps, comparison.warmup_steps + comparison.steps
    seconds = clock.window(first, last)
    if seconds <= 0:
        raise PeerRunError(f"the timed steps took {seconds:.6f} s: the progress output was not read as it came")
    images = comparison.steps * comparison.batch_size
    cpu_seconds = clock.cpu_window(first, last)
    return Measurement(
        images_per_second=images / seconds,
        step_seconds=seconds / comparison.steps,
        run_seconds=run_seconds,
        # None when unknown, or too little to measure (CPU time is counted in clock ticks).
        images_per_cpu_second=images / cpu_seconds if cpu_seconds else None,
    )


# --- the diffusers example -------------------------------------------------------------


def check_peer(python: Path | str | None, script: Path | str | None) -> dict[str, str]:
    """Fail clearly when the script or its Python is missing or cannot import what the
    script needs; return the peer environment's versions of `PEER_MODULES`."""
    if not script:
        raise PeerSetupError(f"no diffusers example script given: pass --diffusers-script or set {SCRIPT_ENV}")
    if not python:
        raise PeerSetupError(f"no Python for the diffusers example given: pass --peer-python or set {PYTHON_ENV}")
    script, python = Path(script), Path(python)
    if not script.is_file():
        raise PeerSetupError(
            f"diffusers example script {script} not found: save examples/text_to_image/"
            "train_text_to_image_lora.py from the diffusers repository (the tag of the diffusers you run) there"
        )
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise PeerSetupError(f"Python {python} for the diffusers example not found or not executable")
    code = (
        "import importlib, json\n"
        f"print(json.dumps({{name: importlib.import_module(name).__version__ for name in {PEER_MODULES!r}}}))\n"
    )
    try:
        result = subprocess.run(
            [str(python), "-c", code], check=False, capture_output=True, text=True, timeout=600, env=peer_environment(1)
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PeerSetupError(f"{python} did not run: {error}") from error
    if result.returncode != 0:
        raise PeerSetupError(
            f"{python} cannot import what the script needs ({', '.join(PEER_MODULES)}):\n"
            + tail(result.stdout + result.stderr)
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def peer_command(
    python: Path | str, script: Path | str, model_dir: Path, data_dir: Path, output_dir: Path, comparison: Comparison
) -> list[str]:
    """The script's command line for the comparison's settings: no validation, no Hub,
    centre crop and no flip (ours does not flip by default), loader in the main process,
    the comparison's precision, no resume states (`--checkpointing_steps` past the last step)."""
    return [
        str(python),
        str(script),
        "--pretrained_model_name_or_path", str(model_dir),
        "--train_data_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir / "datasets-cache"),
        "--resolution", str(comparison.resolution),
        "--center_crop",
        "--train_batch_size", str(comparison.batch_size),
        "--max_train_steps", str(comparison.total_steps),
        "--rank", str(comparison.rank),
        "--learning_rate", repr(comparison.learning_rate),
        "--lr_scheduler", comparison.lr_scheduler,
        "--lr_warmup_steps", "0",
        "--snr_gamma", repr(comparison.min_snr_gamma),
        "--seed", str(comparison.seed),
        "--dataloader_num_workers", "0",
        "--mixed_precision", comparison.mixed_precision,
        "--checkpointing_steps", str(comparison.total_steps + 1),
    ]  # fmt: skip


def peer_environment(threads: int, hf_home: Path | None = None, gpu: bool = False) -> dict[str, str]:
    """The script's environment: no GPU unless `gpu`, `threads` threads, offline, unbuffered output."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    if not gpu:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    environment.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TQDM_MININTERVAL="0",  # redraw on every update, not at most every 0.1 s
    )
    if hf_home is not None:
        environment["HF_HOME"] = str(hf_home)
    return environment


def shown_command(command: list[str], threads: int, gpu: bool = False) -> str:
    variables = f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} TQDM_MININTERVAL=0"
    if not gpu:
        variables = f"CUDA_VISIBLE_DEVICES= {variables}"
    return f"{variables} {shlex.join(command)}"


def run_peer(
    command: list[str],
    environment: dict[str, str],
    comparison: Comparison,
    timeout_s: float,
    lora_file: Path | None = None,
) -> Measurement:
    """Run the script, reading its output as it comes, and time its training steps;
    `lora_file`: what a finished run must have written."""
    clock = StepClock(PEER_PROGRESS)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    output: list[str] = []
    started = time.perf_counter()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment)
    except OSError as error:
        raise PeerSetupError(f"cannot start {command[0]}: {error}") from error
    try:
        descriptor = process.stdout.fileno()
        while True:
            remaining = started + timeout_s - time.perf_counter()
            if remaining <= 0:
                raise PeerRunError(
                    f"the diffusers example ran past {timeout_s:.0f} s; its last output:\n" + tail("".join(output))
                )
            readable, _, _ = select.select([descriptor], [], [], min(remaining, 1.0))
            if not readable:
                continue
            chunk = os.read(descriptor, 65536)
            now = time.perf_counter()
            if not chunk:
                break
            text = decoder.decode(chunk)
            output.append(text)
            clock.feed(text, now, process_cpu_seconds(process.pid))
        returncode = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    run_seconds = time.perf_counter() - started
    text = "".join(output)
    if returncode != 0:
        raise PeerRunError(f"the diffusers example exited with status {returncode}; its last output:\n" + tail(text))
    if clock.total != comparison.total_steps or max(clock.first_seen, default=0) != comparison.total_steps:
        raise PeerRunError(
            f"the diffusers example did not report {comparison.total_steps} training steps "
            f"(its bar: {max(clock.first_seen, default=0)}/{clock.total}); its last output:\n" + tail(text)
        )
    if lora_file is not None and not lora_file.is_file():
        raise PeerRunError(
            f"the diffusers example finished without writing {lora_file}; its last output:\n" + tail(text)
        )
    try:
        return measurement(clock, comparison, run_seconds)
    except PeerRunError as error:
        raise PeerRunError(f"{error}; the script's last output:\n" + tail(text)) from error


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (all its threads); None once it has ended."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    """The last lines of a program's output, progress-bar redraws reduced to their last state."""
    redrawn = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in redrawn if line.strip()][-lines:])


# --- ours ------------------------------------------------------------------------------


def measure_ours(
    model_dir: Path, examples: list[tuple[Path, str]], comparison: Comparison, work_dir: Path
) -> Measurement:
    """`train_lora` on the comparison's device (on the CPU with `comparison.threads` threads),
    UNet only, timed from its step log."""
    import torch

    from lora_factory.training.config import TrainingConfig
    from lora_factory.training.dataset import TrainingExample
    from lora_factory.training.train import train_lora

    config = TrainingConfig(
        rank=comparison.rank,
        batch_size=comparison.batch_size,
        max_train_steps=comparison.total_steps,
        save_every_n_steps=comparison.total_steps,  # one save, after the timed steps
        log_every_n_steps=1,
        resolution=comparison.resolution,
        seed=comparison.seed,
        unet_learning_rate=comparison.learning_rate,
        lr_scheduler=comparison.lr_scheduler,
        min_snr_gamma=comparison.min_snr_gamma,
        train_text_encoder=False,  # the script trains the UNet only
        mixed_precision=comparison.mixed_precision,
        torch_compile=comparison.torch_compile,
        optimizer="adamw",
    )
    bucket = (comparison.resolution, comparison.resolution)
    training_examples = [TrainingExample(path, caption, bucket) for path, caption in examples]
    clock = StepClock(OUR_PROGRESS)

    def log(message: str) -> None:
        clock.feed(message + "\n", time.perf_counter(), time.process_time())

    threads = torch.get_num_threads()
    torch.set_num_threads(comparison.threads)
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)  # not its device and "max_steps reached" notes
    started = time.perf_counter()
    try:
        train_lora(
            model_dir,
            training_examples,
            work_dir / "ours",
            config,
            output_name="bench",
            trigger_word="bench_char",
            tag_frequency={},
            dataset_dirs={},
            log=log,
            device=comparison.device,
        )
    finally:
        torch.set_num_threads(threads)
        lightning_logger.setLevel(level)
    return measurement(clock, comparison, time.perf_counter() - started)


# --- the comparison ----------------------------------------------------------------------


def compare(
    comparison: Comparison,
    python: Path | str,
    script: Path | str,
    repeats: int = 1,
    timeout_s: float = 1800.0,
    report: Callable[[str], None] | None = None,
    model_dir: Path | None = None,
) -> list[dict[str, Measurement]]:
    """Both trainers `repeats` times (alternating which goes first); one row per repeat.
    `report` gets the printed lines (default: print, flushed); `model_dir`: the comparison's
    model already on disk (`write_base_model`), else it is made for this comparison."""
    report = report or partial(print, flush=True)
    import diffusers
    import torch

    versions = check_peer(python, script)
    script_sha256 = hashlib.sha256(Path(script).read_bytes()).hexdigest()
    gpu = comparison.device == "cuda"
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-vs-diffusers-") as tmp:
        work_dir = Path(tmp)
        model_dir = model_dir or write_base_model(comparison, work_dir / "base-model")
        examples = write_imagefolder(work_dir / "train", comparison)
        model = "tiny SD1.5-shaped model" if comparison.model == "tiny" else "SD1.5 architecture (random weights)"
        where = (
            f"bf16 on {torch.cuda.get_device_name(0)}"
            if gpu
            else f"fp32 on the CPU, {comparison.threads} thread(s) each"
        )
        report(
            f"{model}, {comparison.resolution} px, batch {comparison.batch_size}, "
            f"rank {comparison.rank}, lr {comparison.learning_rate:g} {comparison.lr_scheduler}, "
            f"min-SNR {comparison.min_snr_gamma:g}, {comparison.image_count} images; "
            f"{comparison.total_steps} steps a run: {comparison.steps} timed after {comparison.warmup_steps} "
            f"warm-up, 1 after; {where}" + ("; ours with torch_compile" if comparison.torch_compile else "")
        )
        report(f"ours: train_lora (UNet only) with torch {torch.__version__}, diffusers {diffusers.__version__}")
        report(
            f"diffusers example: {Path(script).name} (sha256 {script_sha256[:12]}) with "
            + ", ".join(f"{name} {version}" for name, version in versions.items())
        )
        if versions.get("torch") != torch.__version__:
            report(f"note: the two sides run different torch builds ({torch.__version__} vs {versions.get('torch')})")
        for repeat in range(repeats):
            output_dir = work_dir / f"peer-{repeat}"
            command = peer_command(python, script, model_dir, work_dir / "train", output_dir, comparison)
            if repeat == 0:
                report("diffusers example command: " + shown_command(command, comparison.threads, gpu))
                report(HEADER)
            environment = peer_environment(comparison.threads, work_dir / "hf-home", gpu)
            measures = {
                "peer": partial(run_peer, command, environment, comparison, timeout_s, output_dir / PEER_LORA_FILE),
                "ours": partial(measure_ours, model_dir, examples, comparison, work_dir),
            }
            row = {}
            for name in ("peer", "ours") if repeat % 2 == 0 else ("ours", "peer"):
                shutil.rmtree(work_dir / "ours", ignore_errors=True)  # no resume from an earlier run
                row[name] = measures[name]()
            rows.append(row)
            report(format_row(str(repeat + 1), row["ours"], row["peer"]))
        if repeats > 1:
            medians = [median_measurement([row[name] for row in rows]) for name in ("ours", "peer")]
            report(format_row("median", *medians))
            ratios = [row["ours"].images_per_second / row["peer"].images_per_second for row in rows]
            report(f"median of the runs' own ratios (ours / example, img/s): {statistics.median(ratios):.2f}x")
    return rows


def write_base_model(comparison: Comparison, folder: Path) -> Path:
    """The comparison's model as a diffusers pipeline folder, which both trainers load."""
    import torch

    from lora_factory.benchmarks.training_throughput import write_random_sd15
    from lora_factory.training.tiny_sd import build_tiny_sd15

    if comparison.model == "tiny":
        return build_tiny_sd15(folder)
    return write_random_sd15(folder, torch.device(comparison.device))


def median_measurement(measurements: list[Measurement]) -> Measurement:
    per_cpu_second = [m.images_per_cpu_second for m in measurements]
    return Measurement(
        images_per_second=statistics.median(m.images_per_second for m in measurements),
        step_seconds=statistics.median(m.step_seconds for m in measurements),
        run_seconds=statistics.median(m.run_seconds for m in measurements),
        images_per_cpu_second=None if None in per_cpu_second else statistics.median(per_cpu_second),
    )


HEADER = (
    f"{'run':>6} | {'ours img/s':>10} | {'example img/s':>13} | {'ours / example':>14} | "
    f"{'ours img/CPU-s':>14} | {'example img/CPU-s':>17} | {'ours / example':>14} | "
    f"{'ours run s':>10} | {'example run s':>13}"
)


def format_row(label: str, ours: Measurement, peer: Measurement) -> str:
    ratio = ours.images_per_second / peer.images_per_second
    if ours.images_per_cpu_second and peer.images_per_cpu_second:
        cpu = (
            f"{ours.images_per_cpu_second:>14.2f} | {peer.images_per_cpu_second:>17.2f} | "
            f"{ours.images_per_cpu_second / peer.images_per_cpu_second:>13.2f}x"
        )
    else:
        cpu = f"{'n/a':>14} | {'n/a':>17} | {'n/a':>14}"
    return (
        f"{label:>6} | {ours.images_per_second:>10.2f} | {peer.images_per_second:>13.2f} | {ratio:>13.2f}x | "
        f"{cpu} | {ours.run_seconds:>10.1f} | {peer.run_seconds:>13.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", default=os.environ.get(SCRIPT_ENV), help=f"default: ${SCRIPT_ENV}")
    parser.add_argument("--peer-python", default=os.environ.get(PYTHON_ENV), help=f"default: ${PYTHON_ENV}")
    defaults = Comparison()
    parser.add_argument("--model", choices=MODELS, default=defaults.model)
    parser.add_argument("--device", choices=DEVICES, default=defaults.device, help="cuda: the first GPU, bf16")
    parser.add_argument(
        "--resolution", type=int, nargs="+", default=[defaults.resolution], help="one comparison per resolution"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads, each side")
    parser.add_argument("--torch-compile", action="store_true", help="ours with torch_compile=True")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the median is printed too")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="for one run of the script")
    args = parser.parse_args(argv)
    try:
        comparisons = [
            Comparison(
                model=args.model,
                device=args.device,
                resolution=resolution,
                batch_size=args.batch_size,
                rank=args.rank,
                steps=args.steps,
                warmup_steps=args.warmup_steps,
                threads=args.threads,
                torch_compile=args.torch_compile,
            )
            for resolution in args.resolution
        ]
    except ValueError as error:
        parser.error(str(error))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no GPU here")
    try:
        check_peer(args.peer_python, args.diffusers_script)  # before the model is written
        with tempfile.TemporaryDirectory(prefix="lf-vs-diffusers-model-") as tmp:
            model_dir = write_base_model(comparisons[0], Path(tmp) / "base-model")  # one for all resolutions
            for comparison in comparisons:
                compare(comparison, args.peer_python, args.diffusers_script, args.repeats, args.timeout_s,
                        model_dir=model_dir)  # fmt: skip
    except (PeerSetupError, PeerRunError) as error:
        print(f"error: {error}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
