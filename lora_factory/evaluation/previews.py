"""Render the preview prompts with a base model, with or without a LoRA checkpoint.

One `PreviewRenderer` holds one loaded pipeline and swaps LoRA checkpoints in and out,
so scoring thirty checkpoints loads the base model once. Every prompt's noise comes from
a CPU `torch.Generator` seeded with the prompt's seed: CPU random streams are the same on
every machine, so a preview is reproducible whether it was rendered on a GPU or not, and
two checkpoints differ only by their weights. The device is chosen when a renderer is
made (CUDA when available), never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from lora_factory.evaluation.prompts import PreviewPrompt
from lora_factory.training.base_model import (
    encode_token_ids,
    load_base_model,
    pick_device,
    tokenize_captions,
)

ADAPTER_NAME = "preview"


class PreviewRenderer:
    """A Stable Diffusion 1.5 pipeline that renders preview prompts.

    `pipeline_dir` is the base model as training takes it (`load_base_model`): a diffusers
    folder, or a single `.safetensors` checkpoint with `base_model_config` (an SD1.5
    diffusers folder giving its configuration offline). `clip_skip` follows the
    AUTOMATIC1111 convention that anime models are published with: 1 = last CLIP layer,
    2 = penultimate layer (the NAI family's setting). `size` is (width, height); None uses
    the model's native resolution. Images are reproducible for a given `batch_size`
    (batching changes float rounding by at most a grey level).
    """

    def __init__(
        self,
        pipeline_dir: Path,
        size: tuple[int, int] | None = None,
        steps: int = 10,
        guidance: float = 7.0,
        lora_scale: float = 1.0,
        clip_skip: int = 2,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        base_model_config: Path | None = None,
    ):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got steps={steps}, batch_size={batch_size})")
        if size is not None and (size[0] % 8 or size[1] % 8 or min(size) <= 0):
            raise ValueError(f"preview size must be positive multiples of 8 (width, height), got {size}")
        self.device = torch.device(device) if device is not None else pick_device()
        # Half precision for the UNet and text encoder on GPUs; the VAE stays fp32 as training
        # loads it (some anime VAEs overflow to NaN in fp16: A1111's --no-half-vae).
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.size = size
        self.steps = steps
        self.guidance = guidance
        self.lora_scale = lora_scale
        self.clip_skip = clip_skip
        self.batch_size = batch_size

        # The same loader as training, so previews see exactly the model the LoRA was trained on.
        base = load_base_model(
            pipeline_dir, clip_skip=clip_skip, dtype=self.dtype, device=self.device, config=base_model_config
        )
        self.base_model_name = base.name
        self.base_model_sha256 = base.sha256
        pipeline = StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config),  # PREVIEW_SAMPLER
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline

    def render(self, lora_path: Path | None, prompts: Sequence[PreviewPrompt]) -> list[Image.Image]:
        """One image per prompt, in prompt order; with the LoRA file loaded when given."""
        if not prompts:
            raise ValueError("render needs at least one preview prompt")
        if lora_path is None:
            return self._render_all(prompts)
        self._load_lora(Path(lora_path))
        saved = self._adapted_weights()
        try:
            # Fused, a checkpoint renders as fast as the base model: unfused, every adapted
            # module runs its LoRA matrices at every sampling step (on 2 CPU cores, 33 demo
            # previews took 11.2 s with a LoRA, 7.2 s fused, 6.5 s without). The images are
            # the same up to float rounding.
            self.pipeline.fuse_lora(adapter_names=[ADAPTER_NAME])
            return self._render_all(prompts)
        finally:
            # Back to the bare base model, bit for bit, so the next checkpoint starts from
            # the same weights (unfusing would subtract the LoRA again and leave rounding).
            self.pipeline.unload_lora_weights()
            for module, weight in saved:
                module.weight.data.copy_(weight)

    def _load_lora(self, lora_path: Path) -> None:
        if not lora_path.is_file():
            raise FileNotFoundError(f"LoRA checkpoint {lora_path} does not exist")
        # Loading the tensors ourselves keeps diffusers from treating the path as a hub repo id.
        state_dict = load_file(str(lora_path))
        modules_in_file = {key.split(".", 1)[0] for key in state_dict if key.endswith(".lora_down.weight")}
        try:
            self.pipeline.load_lora_weights(state_dict, adapter_name=ADAPTER_NAME)
        except (ValueError, KeyError, RuntimeError) as error:
            self.pipeline.unload_lora_weights()
            raise ValueError(f"{lora_path} cannot be loaded as an SD1.5 LoRA: {error}") from error
        # A module that silently fails to load ("key not loaded") would make previews lie
        # about the checkpoint: every module in the file must have become a LoRA layer.
        loaded = self._loaded_lora_layers()
        if loaded != len(modules_in_file) or not loaded:
            self.pipeline.unload_lora_weights()
            raise ValueError(
                f"{lora_path}: {loaded} of its {len(modules_in_file)} LoRA modules loaded into the "
                "pipeline; the file's keys do not match this SD1.5 base model (expected kohya "
                "lora_unet_* / lora_te_text_model_* names)"
            )
        self.pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[self.lora_scale])

    def _lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [
            module
            for model in (self.pipeline.unet, self.pipeline.text_encoder)
            for module in model.modules()
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
        ]

    def _loaded_lora_layers(self) -> int:
        return len(self._lora_layers())

    def _adapted_weights(self) -> list[tuple[torch.nn.Module, torch.Tensor]]:
        """Copies (on the CPU, out of the GPU's way) of the weights the loaded LoRA adapts,
        so that `render` can put the base model back exactly after fusing."""
        return [
            (layer.get_base_layer(), layer.get_base_layer().weight.detach().to("cpu", copy=True))
            for layer in self._lora_layers()
        ]

    @torch.inference_mode()
    def _render_all(self, prompts: Sequence[PreviewPrompt]) -> list[Image.Image]:
        width, height = self.size if self.size is not None else (None, None)
        images: list[Image.Image] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(prompt.seed) for prompt in batch]
            result = self.pipeline(
                prompt_embeds=self._encode_text([prompt.prompt for prompt in batch]),
                negative_prompt_embeds=self._encode_text([prompt.negative_prompt for prompt in batch]),
                width=width,
                height=height,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                generator=generators,
                output_type="latent",
            )
            images.extend(self._decode(result.images))
        return images

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        # Encoded here, the way training encodes captions, rather than by the pipeline's
        # `clip_skip` argument, which reaches for `text_encoder.text_model`: a level that
        # transformers 5's CLIPTextModel no longer has.
        token_ids = tokenize_captions(self.pipeline.tokenizer, texts).to(self.device)
        return encode_token_ids(self.pipeline.text_encoder, token_ids, self.clip_skip).to(dtype=self.dtype)


def render_previews(
    pipeline_dir: Path,
    lora_path: Path | None,
    prompts: Sequence[PreviewPrompt],
    size: tuple[int, int] | None = None,
    steps: int = 10,
    guidance: float = 7.0,
    lora_scale: float = 1.0,
    clip_skip: int = 2,
    device: str | torch.device | None = None,
) -> list[Image.Image]:
    """Render `prompts` once; use `PreviewRenderer` to render several checkpoints."""
    renderer = PreviewRenderer(
        pipeline_dir, size=size, steps=steps, guidance=guidance, lora_scale=lora_scale,
        clip_skip=clip_skip, device=device,
    )
    return renderer.render(lora_path, prompts)
