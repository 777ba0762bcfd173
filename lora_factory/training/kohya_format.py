"""Writing peft LoRA / LoHa / LoKr adapters as kohya-format `.safetensors` files.

The kohya layout is what AUTOMATIC1111, ComfyUI, kohya's scripts and diffusers all read:

- `lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` /
  `.alpha` for the UNet (module paths are diffusers' UNet2DConditionModel paths);
- `lora_te_text_model_encoder_layers_<n>_<self_attn_q_proj|mlp_fc1|...>` for the SD1.5
  text encoder (A1111's convention, with the `text_model` level that transformers 5's
  flattened CLIPTextModel no longer has);
- `.alpha` is the adapter's real alpha (forward scale = alpha / rank). diffusers'
  `convert_state_dict_to_kohya` writes alpha = rank and `lora_te1_encoder_...` keys, which
  is why the keys are written here one by one from the adapter layers themselves;
- 1x1-convolution targets (SD1.5's proj_in / proj_out) keep their 4-d conv weight shapes;
- LoHa (`hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b`) and LoKr (`lokr_w1[_a/_b]`,
  `lokr_w2[_a/_b]`) modules use the same module names in LyCORIS' key layout.

Metadata follows kohya (`ss_*`), the Stability AI model spec (`modelspec.*`) and the
additional-networks hashes (`sshs_*`).
"""

from __future__ import annotations

import hashlib
import json

import safetensors.torch
import torch

from lora_factory.storage import atomic_write_bytes, sha256_bytes

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
# A1111's SD1.5 text-encoder keys include the `text_model` level of the original CLIP.
TEXT_MODEL_LEVEL = "text_model."
PEFT_WRAPPER_PREFIX = "base_model.model."
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# kohya's `ss_network_module` per adapter kind: LyCORIS networks load through lycoris.kohya.
NETWORK_MODULES = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}

# The additional-networks "legacy" hash reads this window of the file.
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000


def peft_to_kohya_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    alpha: float | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    conv_alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """kohya / LyCORIS tensors for the peft adapters injected in `unet` and `text_encoder`.

    LoRA layers give `lora_down.weight` / `lora_up.weight`, LoHa layers `hada_w1_a`,
    `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, LoKr layers `lokr_w1` (or `lokr_w1_a` /
    `lokr_w1_b`) and `lokr_w2` (or `lokr_w2_a` / `lokr_w2_b`); each module also gets its
    `alpha`. Loaders scale an update by alpha / rank, so each layer's alpha comes from its
    own peft scaling (alpha = scaling x rank), which is what its forward pass used. When
    `alpha` is given, every layer must agree with it (3x3 convolutions with `conv_alpha`):
    a mismatch means the adapters were built with another alpha than the one recorded in
    the metadata.
    """
    tensors: dict[str, torch.Tensor] = {}
    parts = [(UNET_PREFIX, unet)]
    if text_encoder is not None:
        parts.append((TEXT_ENCODER_PREFIX, text_encoder))
    for prefix, model in parts:
        for module_path, layer in _adapter_layers(model, adapter_name):
            if prefix == TEXT_ENCODER_PREFIX:
                module_path = TEXT_MODEL_LEVEL + module_path.removeprefix(TEXT_MODEL_LEVEL)
            name = prefix + module_path.replace(".", "_")
            rank = layer.r[adapter_name]
            layer_alpha = layer.scaling[adapter_name] * rank
            expected = conv_alpha if _is_3x3_conv(layer) else alpha
            if expected is not None and not _close(layer_alpha, expected):
                raise ValueError(f"{module_path}: adapter alpha {layer_alpha} differs from the expected {expected}")
            weights, file_alpha = _layer_tensors(module_path, layer, adapter_name, layer_alpha)
            for suffix, weight in weights.items():
                tensors[f"{name}.{suffix}"] = _export(weight, dtype)
            tensors[f"{name}.alpha"] = torch.tensor(file_alpha, dtype=dtype)
    if not tensors:
        raise ValueError(f"no adapter layers named {adapter_name!r} found: add adapters before exporting")
    return tensors


def _layer_tensors(module_path: str, layer, adapter_name: str, alpha: float) -> tuple[dict[str, torch.Tensor], float]:
    """One layer's file tensors (suffix -> tensor) and the alpha to write next to them."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):
        if layer.use_dora.get(adapter_name, False):
            raise ValueError(f"{module_path}: DoRA adapters have no plain kohya LoRA form")
        return {
            "lora_down.weight": layer.lora_A[adapter_name].weight,
            "lora_up.weight": layer.lora_B[adapter_name].weight,
        }, alpha
    if isinstance(layer, LoHaLayer):
        if adapter_name in layer.hada_t1:
            raise ValueError(f"{module_path}: LoHa with Tucker (effective conv2d) factors is not exported")
        # peft and LyCORIS store the same factors with the same shapes; for a 1x1 conv the
        # "b" factors are (rank, in_channels) and loaders reshape the product to the conv.
        return {suffix: getattr(layer, suffix)[adapter_name] for suffix in LOHA_SUFFIXES}, alpha
    if isinstance(layer, LoKrLayer):
        if adapter_name in layer.lokr_t2:
            raise ValueError(f"{module_path}: LoKr with Tucker (effective conv2d) factors is not exported")
        weights = {
            suffix: getattr(layer, suffix)[adapter_name]
            for suffix in LOKR_SUFFIXES
            if adapter_name in getattr(layer, suffix)
        }
        if "lokr_w1_b" in weights or "lokr_w2_b" in weights:
            return weights, alpha  # loaders scale by alpha / rank, the rank read from a "b" factor
        # Both Kronecker factors are full matrices: the file holds no rank, and LyCORIS,
        # AUTOMATIC1111, ComfyUI and diffusers then apply no alpha scaling at all. peft did
        # scale by alpha / r, so the scale goes into the weights and alpha = rank says "1".
        weights["lokr_w2"] = weights["lokr_w2"] * layer.scaling[adapter_name]
        return weights, float(layer.r[adapter_name])
    raise TypeError(f"{module_path}: {type(layer).__name__} adapters have no kohya/LyCORIS form")


def _is_3x3_conv(layer) -> bool:
    base = layer.get_base_layer()
    return isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1)


def _adapter_layers(model: torch.nn.Module, adapter_name: str):
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    for module_path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            present = adapter_name in module.lora_A
        elif isinstance(module, LycorisLayer):
            present = adapter_name in module._available_adapters
        else:
            continue
        if present:
            yield module_path.removeprefix(PEFT_WRAPPER_PREFIX), module


def _export(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    weight = weight.detach().to(dtype=dtype)
    # Meta tensors (full-size models built without memory, to check key layouts) stay meta.
    return weight if weight.is_meta else weight.cpu().contiguous()


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def kohya_module_name(key: str) -> str:
    """`lora_unet_x_y.lora_down.weight` -> `lora_unet_x_y` (the LoRA module's name)."""
    return key.split(".", 1)[0]


def kohya_metadata(
    *,
    output_name: str,
    trigger_word: str,
    network_dim: int,
    network_alpha: float,
    tag_frequency: dict,
    dataset_dirs: dict,
    base_model_name: str,
    base_model_hash: str,
    steps: int,
    epoch: int,
    seed: int,
    resolution: int,
    optimizer: str,
    learning_rate: float,
    clip_skip: int,
    text_encoder_learning_rate: float | None = None,
    train_text_encoder: bool = True,
    max_train_steps: int | None = None,
    num_train_images: int | None = None,
    num_batches_per_epoch: int | None = None,
    batch_size: int | None = None,
    lr_scheduler: str | None = None,
    lr_warmup_steps: int | None = None,
    min_snr_gamma: float | None = None,
    noise_offset: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float | None = None,
    caption_shuffle: bool | None = None,
    keep_tokens: int | None = None,
    caption_dropout: float | None = None,
    caption_tag_dropout: float | None = None,
    flip: bool | None = None,
    mixed_precision: str | None = None,
    bucket_info: dict | None = None,
    training_comment: str | None = None,
    network_module: str = "networks.lora",
    network_args: dict | None = None,
    input_perturbation: float | None = None,
    num_epochs: int | None = None,
    gradient_checkpointing: bool | None = None,
) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` metadata for one checkpoint (all values strings).

    `tag_frequency` is kohya's `{dataset_dir: {tag: count}}`; a flat `{tag: count}` is
    filed under `output_name`. `dataset_dirs` is `{dataset_dir: {"n_repeats": r,
    "img_count": n}}`. `network_args` are kohya's `--network_args` (for LyCORIS networks
    `{"algo": "loha"}` etc.). No timestamps are written, so the same training gives the
    same bytes.
    """
    if tag_frequency and all(isinstance(count, int) for count in tag_frequency.values()):
        tag_frequency = {output_name: tag_frequency}
    comment = training_comment or f"trigger word: {trigger_word}"
    metadata: dict[str, object] = {
        "ss_output_name": output_name,
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": _number(network_alpha),
        "ss_training_comment": comment,
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False, sort_keys=True),
        "ss_dataset_dirs": json.dumps(dataset_dirs, ensure_ascii=False, sort_keys=True),
        "ss_sd_model_name": base_model_name,
        "ss_new_sd_model_hash": base_model_hash,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_seed": seed,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_optimizer": optimizer,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": learning_rate,
        "ss_clip_skip": clip_skip,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_network_train_unet_only": not train_text_encoder,
        "ss_cache_latents": True,
        "ss_enable_bucket": True,
        "ss_gradient_accumulation_steps": 1,
        "ss_num_reg_images": 0,
        "ss_max_token_length": 75,
    }
    optional = {
        "ss_network_args": json.dumps(network_args, sort_keys=True) if network_args is not None else None,
        "ss_text_encoder_lr": text_encoder_learning_rate if train_text_encoder else None,
        "ss_max_train_steps": max_train_steps,
        "ss_num_train_images": num_train_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size,
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_min_snr_gamma": min_snr_gamma,
        "ss_noise_offset": noise_offset,
        "ss_multires_noise_iterations": multires_noise_iterations,
        "ss_multires_noise_discount": multires_noise_discount,
        "ss_ip_noise_gamma": input_perturbation,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": gradient_checkpointing,
        "ss_shuffle_caption": caption_shuffle,
        "ss_keep_tokens": keep_tokens,
        "ss_caption_dropout_rate": caption_dropout,
        "ss_caption_tag_dropout_rate": caption_tag_dropout,
        "ss_flip_aug": flip,
        "ss_mixed_precision": mixed_precision,
        "ss_bucket_info": json.dumps(bucket_info, sort_keys=True) if bucket_info is not None else None,
    }
    metadata.update({key: value for key, value in optional.items() if value is not None})
    metadata.update(
        {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": output_name,
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.prediction_type": "epsilon",
            "modelspec.encoder_layer": clip_skip,
            "modelspec.trigger_phrase": trigger_word,
            "modelspec.description": comment,
        }
    )
    return {key: str(value) for key, value in metadata.items()}


def network_metadata(
    network_type: str, lokr_factor: int = -1, conv_rank: int = 0, conv_alpha: float | None = None
) -> tuple[str, dict]:
    """(`ss_network_module`, `ss_network_args`) for an adapter kind, as kohya/LyCORIS write
    them (a conv rank as kohya's `conv_dim` / `conv_alpha` network args, in strings)."""
    conv = {"conv_dim": str(conv_rank), "conv_alpha": str(_number(conv_alpha))} if conv_rank else {}
    if network_type == "lora":
        return NETWORK_MODULES["lora"], conv
    if network_type == "loha":
        return NETWORK_MODULES["loha"], {"algo": "loha", **conv}
    if network_type == "lokr":
        return NETWORK_MODULES["lokr"], {"algo": "lokr", "factor": lokr_factor, **conv}
    raise ValueError(f"unknown network type {network_type!r}")


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def kohya_model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks and kohya compute them.

    Both are taken from the file as it would be written with only the `ss_*` metadata, so
    that adding descriptive metadata later does not change them. The model hash is the
    sha256 of the tensor data (everything after the safetensors header); the legacy hash is
    the first 8 hex digits of the sha256 of a 64 KiB window at 1 MiB into the file (of
    nothing, for files smaller than that).
    """
    training_metadata = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors.torch.save(tensors, training_metadata)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    window = data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    legacy_hash = hashlib.sha256(window).hexdigest()[:8]
    return model_hash, legacy_hash


def save_kohya_lora(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write the LoRA file atomically with its metadata and `sshs_*` hashes; return its sha256."""
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    model_hash, legacy_hash = kohya_model_hashes(tensors, metadata)
    full_metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    data = canonical_safetensors_bytes(tensors, full_metadata)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def canonical_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted JSON header, so that the same LoRA is the same file.

    The library writes header entries in hash-map order, which changes from one save to the
    next; offsets in the header are relative to the data section, which stays as written.
    """
    data = safetensors.torch.save(tensors, metadata)
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    canonical += b" " * (-len(canonical) % 8)  # the format pads the header to 8-byte alignment
    return len(canonical).to_bytes(8, "little") + canonical + data[8 + header_length :]


def read_kohya_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file."""
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def tensor_data_sha256(path) -> str:
    """sha256 of a safetensors file's tensor data (what `sshs_model_hash` must equal)."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        return hashlib.sha256(handle.read()).hexdigest()

