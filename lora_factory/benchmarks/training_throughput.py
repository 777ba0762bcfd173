"""Training throughput: this project's trainer vs a loop in the style of diffusers' LoRA example.

Both train the same LoRA (kohya's SD1.5 targets, UNet only, same rank, optimizer and
precision) on the same images in one process on the same device, and the script prints
images per second side by side, with the model FLOPs utilisation (MFU) of each: FLOPs of
one training step counted with `torch.utils.flop_counter` over the device's dense bf16 peak.

- ours: `LoraTrainingModule` driven by Lightning as `train_lora` drives it (cached
  latents, bucket batches, min-SNR, seeded noise);
- example-style: what diffusers' `train_text_to_image_lora.py` does every step: image ->
  tensor transforms, VAE encode, text encoder, UNet forward/backward, optimizer step, at
  one fixed resolution. Its images are already at the training size, so its resize is as
  cheap as it can be: the comparison favours it, if anything.

`training_vs_diffusers.py` runs diffusers' script itself, unmodified, against `train_lora`.

On a GPU: the real SD1.5 architecture built from its config (random weights) at 512 and
768 px, batch 8, rank 32, bf16. Without one: the same comparison with the tiny SD1.5-shaped
model on the CPU (fp32), where MFU is printed only with `--peak-tflops`.

    python -m lora_factory.benchmarks.training_throughput [--steps 20] [--resolutions 512 768]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a piece of the device name.
# Checked in order: the more specific names first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
TARGET_SPEEDUP = 1.5
TARGET_MFU = 0.45


@dataclass(frozen=True)
class Setup:
    model: str  # "sd15" (full-size architecture, random weights) or "tiny"
    device: torch.device
    resolutions: tuple[int, ...]
    batch_size: int
    rank: int
    steps: int
    warmup_steps: int
    precision: str  # Lightning's name: "bf16-mixed" or "32-true"
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # ours only: the example does not compile


def default_setup(device: torch.device) -> Setup:
    if device.type == "cuda":
        return Setup("sd15", device, (512, 768), 8, 32, steps=20, warmup_steps=5, precision="bf16-mixed")
    # The tiny model's native 128 px plays 512's part; 192 is 768's 1.5x.
    return Setup("tiny", device, (128, 192), 8, 8, steps=10, warmup_steps=2, precision="32-true")


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part in name), None)


# --- base models ---------------------------------------------------------------------


def fresh_base(setup: Setup, work_dir: Path):
    """A new, adapter-free base model for one measurement (adapters are added in place)."""
    from lora_factory.training.base_model import load_base_model
    from lora_factory.training.tiny_sd import build_tiny_sd15
    from lora_factory.training.train import weights_dtype

    dtype = weights_dtype(setup.precision)
    if setup.model == "tiny":
        return load_base_model(build_tiny_sd15(work_dir / "tiny-sd15"), device=setup.device, dtype=dtype)
    return random_sd15_base(setup.device, dtype, work_dir)


def random_sd15_base(device: torch.device, dtype: torch.dtype, work_dir: Path):
    """SD1.5's UNet, VAE and CLIP-L text encoder at full size with random weights.

    The tokenizer is the tiny model's byte-level BPE (CLIP's vocabulary cannot be
    downloaded here); sequences are padded to 77 tokens either way, so the compute is SD1.5's.
    """
    from transformers import CLIPTokenizer

    from lora_factory.training.base_model import BaseModel, use_sdpa_attention
    from lora_factory.training.sd15_architecture import (
        build_clip_l_text_encoder,
        build_sd15_noise_scheduler,
        build_sd15_unet,
        build_sd15_vae,
    )
    from lora_factory.training.tiny_sd import (
        BOS_TOKEN,
        EOS_TOKEN,
        MAX_TOKENS,
        write_byte_level_bpe,
    )

    vocab = write_byte_level_bpe(work_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work_dir / "tokenizer", model_max_length=MAX_TOKENS)
    vae_dtype = dtype if dtype == torch.bfloat16 else torch.float32  # as load_base_model does
    with torch.device(device), default_dtype(dtype):
        unet = build_sd15_unet()
        text_encoder = build_clip_l_text_encoder(vocab[BOS_TOKEN], vocab[EOS_TOKEN])
    with torch.device(device), default_dtype(vae_dtype):
        vae = build_sd15_vae()
    base = BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=build_sd15_noise_scheduler(),
        name="sd15-architecture-random",
        sha256="0" * 64,
        source="random weights",
    )
    use_sdpa_attention(base)
    for module in (base.unet, base.vae, base.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return base


def write_random_sd15(folder: Path, device: torch.device) -> Path:
    """`random_sd15_base` saved as a diffusers pipeline folder, for trainers that load one
    from disk (diffusers' example script, `train_lora`). bf16 on a GPU (half the bytes to
    write and read; both trainers train in bf16 there), fp32 on the CPU."""
    from diffusers import StableDiffusionPipeline

    from lora_factory.training.tiny_sd import save_pipeline

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scratch = folder.parent / f"{folder.name}-tokenizer-source"
    base = random_sd15_base(device, dtype, scratch)
    pipeline = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipeline, folder, scratch / "tokenizer")
    return folder


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype`: no full-precision copy, no cast afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --- the training set ----------------------------------------------------------------


def write_images(folder: Path, count: int, resolution: int, seed: int = 0) -> list[Path]:
    """Smooth random colour fields: PNG-compressible, unlike white noise, as real art is."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((resolution // 8, resolution // 8, 1), dtype=np.uint8))
        path = folder / f"{index:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def captions_for(count: int) -> list[str]:
    return [f"bench_char, tag{index}, red_hair, smile, solo" for index in range(count)]


# --- ours ------------------------------------------------------------------------------


def measure_ours(setup: Setup, resolution: int, images: list[Path], work_dir: Path) -> dict:
    import lightning as L

    from lora_factory.training.config import TrainingConfig
    from lora_factory.training.dataset import CaptionedLatentDataset, TrainingExample
    from lora_factory.training.module import LatentCache, LoraTrainingModule
    from lora_factory.training.optimizers import resolve_optimizer
    from lora_factory.training.train import make_trainer, quiet_lightning_warnings

    base = fresh_base(setup, work_dir)
    examples = [
        TrainingExample(path, caption, (resolution, resolution)) for path, caption in zip(images, captions_for(len(images)))
    ]
    dataset = CaptionedLatentDataset(examples, seed=0)
    total_steps = setup.warmup_steps + setup.steps
    config = TrainingConfig(
        rank=setup.rank,
        alpha=setup.rank / 2,
        batch_size=setup.batch_size,
        max_train_steps=total_steps,
        save_every_n_steps=total_steps,
        log_every_n_steps=total_steps,
        train_text_encoder=False,
        gradient_checkpointing=setup.gradient_checkpointing,
        torch_compile=setup.torch_compile,
        optimizer=resolve_optimizer("adamw", setup.device),
        resolution=resolution,
    ).resolved(len(examples))
    cache = LatentCache(base, dataset)
    started = time.perf_counter()
    cache.fill(setup.device, log=lambda message: None)
    _synchronize(setup.device)
    cache_seconds = time.perf_counter() - started
    module = LoraTrainingModule(base, dataset, config, cache, log=lambda message: None)

    module.to(setup.device)
    batch = next(iter(module.train_dataloader()))
    flops, operations = count_flops(setup, lambda: module.training_step(batch, 0))
    module.zero_grad(set_to_none=True)

    class StepTimer(L.Callback):
        started_at = finished_at = 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index):
            if trainer.global_step in (setup.warmup_steps, total_steps):
                _synchronize(setup.device)
                now = time.perf_counter()
                if trainer.global_step == setup.warmup_steps:
                    self.started_at = now
                else:
                    self.finished_at = now

    timer = StepTimer()
    trainer = make_trainer(config, setup.device, setup.precision, [timer], work_dir / "lightning")
    with quiet_lightning_warnings():
        trainer.fit(module)
    seconds = timer.finished_at - timer.started_at
    return {
        "images_per_second": setup.steps * setup.batch_size / seconds,
        "flops_per_step": flops,
        "operations_per_step": operations,
        "step_seconds": seconds / setup.steps,
        "latent_cache_seconds": cache_seconds,
    }


# --- the example-style loop ------------------------------------------------------------


class ExampleStyleImages(torch.utils.data.Dataset):
    """The example's per-step preprocessing: resize, centre crop, random flip, to [-1, 1]."""

    def __init__(self, images: list[Path], input_ids: torch.Tensor, resolution: int):
        from PIL import Image

        # The example keeps decoded images in memory (a datasets.Dataset); so does this.
        self.images = [Image.open(path).convert("RGB") for path in images]
        self.input_ids = input_ids
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image, ImageOps

        image = self.images[index]
        scale = self.resolution / min(image.size)
        image = image.resize(
            (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))),
            Image.Resampling.BILINEAR,
        )
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if random.random() < 0.5:
            image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixel_values": pixels, "input_ids": self.input_ids[index]}


def measure_example_style(setup: Setup, resolution: int, images: list[Path], work_dir: Path) -> dict:
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler

    from lora_factory.training.adapters import add_adapters
    from lora_factory.training.base_model import tokenize_captions
    from lora_factory.training.optimizers import build_optimizer, resolve_optimizer

    base = fresh_base(setup, work_dir)
    # The example's defaults: no TF32, no cuDNN autotuning (ours turns both on for GPUs).
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    parameters = add_adapters(base.unet, None, "lora", setup.rank, setup.rank / 2, seed=0)
    base.unet.to(setup.device)
    if setup.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()
    optimizer = build_optimizer(
        resolve_optimizer("adamw", setup.device), [{"params": parameters, "lr": 1e-4}], weight_decay=1e-2
    )
    lr_scheduler = get_scheduler("constant", optimizer)
    input_ids = tokenize_captions(base.tokenizer, captions_for(len(images)))
    loader = torch.utils.data.DataLoader(
        ExampleStyleImages(images, input_ids, resolution), batch_size=setup.batch_size, shuffle=True, drop_last=True
    )
    scheduler = base.noise_scheduler
    autocast_dtype = torch.bfloat16 if setup.precision == "bf16-mixed" else None
    weight_dtype = next(base.unet.parameters()).dtype
    vae_dtype = next(base.vae.parameters()).dtype

    def step(batch: dict) -> torch.Tensor:
        pixels = batch["pixel_values"].to(setup.device, dtype=vae_dtype)
        with torch.no_grad():
            latents = base.vae.encode(pixels).latent_dist.sample() * base.vae.config.scaling_factor
            latents = latents.to(weight_dtype)
            hidden_states = base.text_encoder(batch["input_ids"].to(setup.device), return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=setup.device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(setup.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = base.unet(noisy_latents, timesteps, hidden_states, return_dict=False)[0]
        return F.mse_loss(prediction.float(), noise.float())

    def batches():
        while True:
            yield from loader

    stream = batches()
    flops, operations = count_flops(setup, lambda: step(next(stream)), autocast=False)
    optimizer.zero_grad(set_to_none=True)
    total_steps = setup.warmup_steps + setup.steps
    started = 0.0
    for number in range(total_steps):
        if number == setup.warmup_steps:
            _synchronize(setup.device)
            started = time.perf_counter()
        loss = step(next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(setup.device)
    seconds = time.perf_counter() - started
    return {
        "images_per_second": setup.steps * setup.batch_size / seconds,
        "flops_per_step": flops,
        "operations_per_step": operations,
        "step_seconds": seconds / setup.steps,
    }


# --- measuring ---------------------------------------------------------------------------


class OperationCounter(TorchDispatchMode):
    """Counts the operations dispatched: each is host work, and most launch a GPU kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_flops(setup: Setup, loss_of_one_step, autocast: bool = True) -> tuple[int, int]:
    """(FLOPs, operations) of one training step, forward and backward: FLOPs counted by
    torch's FLOP counter, operations as dispatched; eagerly (a compiled model's fused
    kernels are the same arithmetic, in fewer operations)."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.bfloat16 if setup.precision == "bf16-mixed" else None
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        with OperationCounter() as operations:
            with torch.autocast(setup.device.type, dtype=dtype, enabled=autocast and dtype is not None):
                loss = loss_of_one_step()
            loss.backward()
    return counter.get_total_flops(), operations.count


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(setup: Setup, peak: float | None) -> list[dict]:
    """Measure both loops at every resolution; one row per resolution."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-train-bench-") as tmp:
        work_dir = Path(tmp)
        for resolution in setup.resolutions:
            # Two batches' worth: every epoch has more than one batch, in both loops.
            images = write_images(work_dir / f"images-{resolution}", 2 * setup.batch_size, resolution)
            row = {"resolution": resolution}
            for name, measure in (("example", measure_example_style), ("ours", measure_ours)):
                try:
                    row[name] = measure(setup, resolution, images, work_dir)
                except torch.OutOfMemoryError:
                    row[name] = None
                    print(f"{resolution} px, {name}: out of GPU memory (try --gradient-checkpointing)", flush=True)
                finally:
                    if setup.device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            print_row(row, peak, setup)
    return rows


def print_header(setup: Setup, peak: float | None) -> None:
    device = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "CPU"
    model = "SD1.5 architecture (random weights)" if setup.model == "sd15" else "tiny SD1.5-shaped model"
    peak_text = f"{peak:.0f} TFLOP/s bf16 peak" if peak else "no known peak: MFU needs --peak-tflops"
    print(
        f"device: {device} ({peak_text}); model: {model}; batch {setup.batch_size}, rank {setup.rank}, "
        f"precision {setup.precision}, {setup.steps} timed steps after {setup.warmup_steps} warm-up"
        + (", ours with torch_compile (compiled in the warm-up)" if setup.torch_compile else "")
    )
    print(
        f"{'px':>5} | {'ours img/s':>10} | {'example img/s':>13} | {'speed-up':>8} | "
        f"{'GFLOP/img ours / example':>24} | {'ours MFU':>8} | {'example MFU':>11} | {'latent cache s':>14} | "
        f"{'ops/step ours / example (step us per op)':>40}"
    )


def gflops_per_image(result: dict | None, setup: Setup) -> float:
    return result["flops_per_step"] / setup.batch_size / 1e9 if result else float("nan")


def print_row(row: dict, peak: float | None, setup: Setup) -> None:
    ours, example = row.get("ours"), row.get("example")

    def mfu(result):
        if not result or not peak:
            return "n/a"
        return f"{result['flops_per_step'] / result['step_seconds'] / (peak * 1e12):.1%}"

    speedup = f"{ours['images_per_second'] / example['images_per_second']:.2f}x" if ours and example else "n/a"
    print(
        f"{row['resolution']:>5} | {ours['images_per_second'] if ours else float('nan'):>10.2f} | "
        f"{example['images_per_second'] if example else float('nan'):>13.2f} | {speedup:>8} | "
        f"{gflops_per_image(ours, setup):>11.1f} / {gflops_per_image(example, setup):<10.1f} | "
        f"{mfu(ours):>8} | {mfu(example):>11} | "
        f"{ours['latent_cache_seconds'] if ours else float('nan'):>14.2f} | "
        f"{operations(ours):>19} / {operations(example):<19}",
        flush=True,
    )


def operations(result: dict | None) -> str:
    """Operations a step dispatches, and the step's time per operation: about the host's
    cost of one where the GPU waits for the host."""
    if not result:
        return "n/a"
    return f"{result['operations_per_step']} ({result['step_seconds'] / result['operations_per_step'] * 1e6:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--model", choices=("auto", "sd15", "tiny"), default="auto")
    parser.add_argument("--resolutions", type=int, nargs="+")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true", help="ours with torch_compile=True")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 (or fp32 on CPU) peak, for MFU")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    setup = default_setup(device)
    overrides = {
        "model": None if args.model == "auto" else args.model,
        "resolutions": tuple(args.resolutions) if args.resolutions else None,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "gradient_checkpointing": args.gradient_checkpointing or None,
        "torch_compile": args.torch_compile or None,
    }
    setup = replace(setup, **{key: value for key, value in overrides.items() if value is not None})
    if any(resolution % 64 for resolution in setup.resolutions):
        parser.error("resolutions must be multiples of 64 (the bucket grid)")
    peak = args.peak_tflops or peak_tflops(device)
    print_header(setup, peak)
    rows = run(setup, peak)
    if setup.model == "sd15" and device.type == "cuda":
        complete = [row for row in rows if row.get("ours") and row.get("example")]
        speedups = [row["ours"]["images_per_second"] / row["example"]["images_per_second"] for row in complete]
        mfus = [
            row["ours"]["flops_per_step"] / row["ours"]["step_seconds"] / (peak * 1e12)
            for row in complete
            if peak
        ]
        if speedups:
            print(
                f"targets: speed-up >= {TARGET_SPEEDUP}x: min {min(speedups):.2f}x; "
                f"MFU >= {TARGET_MFU:.0%}: " + (f"min {min(mfus):.1%}" if mfus else "n/a (unknown peak)")
            )
    return 0 if all(row.get("ours") and row.get("example") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
