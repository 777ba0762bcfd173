"""Trainer options: LoHa/LoKr runs, conv ranks (LoCon), Prodigy, input perturbation, noise offset and
multi-resolution noise, epochs, out-of-memory advice, GPU claims, SDPA attention and the VAE's precision,
nothing touching CUDA at import."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from lora_factory.training.base_model import load_base_model
from lora_factory.training.config import MANIFEST_NAME, TrainingConfig
from lora_factory.training.dataset import CaptionedLatentDataset, TrainingExample
from lora_factory.training.gpu import NoFreeGpuError, claim_gpu
from lora_factory.training.kohya_format import kohya_module_name, read_kohya_lora
from lora_factory.training.module import LoraTrainingModule
from lora_factory.training.optimizers import (
    OptimizerUnavailableError,
    resolve_optimizer,
)
from lora_factory.training.tiny_sd import build_tiny_sd15
from lora_factory.training.train import TrainingOutOfMemoryError, train_lora

TRIGGER = "opt_char"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2)
    examples = []
    for index in range(5):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        examples.append(TrainingExample(path, f"{TRIGGER}, tag{index}", (64, 64), repeats=1 + index % 2))
    return examples


def _train(tiny_sd, examples, output_dir, config, log=lambda message: None):
    return train_lora(
        tiny_sd,
        examples,
        output_dir,
        config,
        output_name=TRIGGER,
        trigger_word=TRIGGER,
        tag_frequency={"tag0": 1},
        dataset_dirs={f"1_{TRIGGER}": {"n_repeats": 1, "img_count": 5}},
        log=log,
        device="cpu",
    )


def test_config_epochs_learning_rates_and_validation():
    # 5 images x repeats (1, 2, 1, 2, 1) = 7 samples; batch 2 in one bucket -> 4 batches an epoch.
    resolved = TrainingConfig(max_train_epochs=3, batch_size=2).resolved(5, batches_per_epoch=4)
    assert resolved.max_train_steps == 12
    assert (resolved.unet_learning_rate, resolved.text_encoder_learning_rate) == (1e-4, 5e-5)
    prodigy = TrainingConfig(optimizer="prodigy").resolved(5)
    assert (prodigy.unet_learning_rate, prodigy.text_encoder_learning_rate) == (1.0, 1.0)
    assert TrainingConfig(unet_learning_rate=3e-4).resolved(5).unet_learning_rate == 3e-4
    with pytest.raises(ValueError) as error:
        TrainingConfig(max_train_steps=10, max_train_epochs=2, network_type="dora", input_perturbation=-1)
    message = str(error.value)
    assert "not both" in message and "network_type 'dora'" in message and "input_perturbation" in message


def test_optimizer_resolution_without_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_optimizer("adamw", cpu) == "adamw"  # 8-bit needs bitsandbytes and a GPU
    assert resolve_optimizer("prodigy", cpu) == "prodigy"
    with pytest.raises(OptimizerUnavailableError, match="needs a CUDA GPU and the bitsandbytes"):
        resolve_optimizer("adamw8bit", cpu)


def test_loha_unet_only_with_prodigy_and_input_perturbation(tiny_sd, examples, tmp_path):
    config = TrainingConfig(
        network_type="loha",
        optimizer="prodigy",
        train_text_encoder=False,
        input_perturbation=0.1,
        rank=4,
        alpha=2,
        batch_size=4,
        max_train_epochs=1,
        save_every_n_steps=1,
    )
    checkpoints = _train(tiny_sd, examples, tmp_path, config)
    assert [c.step for c in checkpoints] == [1, 2]  # one epoch = 2 batches of the 7 samples
    tensors, metadata = read_kohya_lora(checkpoints[-1].path)
    assert {key.split(".", 1)[1] for key in tensors} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert all(key.startswith("lora_unet_") for key in tensors)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    assert metadata["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy(")
    assert metadata["ss_network_train_unet_only"] == "True" and "ss_text_encoder_lr" not in metadata
    assert metadata["ss_ip_noise_gamma"] == "0.1" and metadata["ss_num_epochs"] == "1"
    first, _ = read_kohya_lora(checkpoints[0].path)
    w2_b = next(key for key in tensors if key.endswith("hada_w2_b"))  # zero-initialised factor
    assert first[w2_b].abs().sum() > 0 and not torch.equal(first[w2_b], tensors[w2_b])


def test_lokr_run_with_text_encoder(tiny_sd, examples, tmp_path):
    config = TrainingConfig(network_type="lokr", rank=4, alpha=2, batch_size=2, max_train_steps=1)
    (checkpoint,) = _train(tiny_sd, examples, tmp_path, config)
    tensors, metadata = read_kohya_lora(checkpoint.path)
    names = {kohya_module_name(key) for key in tensors}
    assert any(name.startswith("lora_te_text_model_encoder_layers_") for name in names)
    assert all(key.split(".", 1)[1].startswith(("lokr_w", "alpha")) for key in tensors)
    assert json.loads(metadata["ss_network_args"])["algo"] == "lokr"
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"


def test_a_conv_rank_trains_the_resnet_convolutions_and_previews_load_them(tiny_sd, examples, tmp_path):
    from lora_factory.evaluation.previews import PreviewRenderer
    from lora_factory.evaluation.prompts import PreviewPrompt

    with pytest.raises(ValueError, match="conv_rank must be >= 0"):
        TrainingConfig(conv_rank=-1)
    with pytest.raises(ValueError, match="give conv_rank too"):
        TrainingConfig(conv_alpha=2.0).resolved(5)
    assert TrainingConfig().resolved(5).conv_rank == 0  # kohya's default: attention blocks only
    assert TrainingConfig(conv_rank=6).resolved(5).conv_alpha == 3.0
    config = TrainingConfig(rank=4, alpha=2, conv_rank=8, conv_alpha=2, batch_size=2, max_train_steps=2)
    checkpoint = _train(tiny_sd, examples, tmp_path, config)[-1]
    tensors, metadata = read_kohya_lora(checkpoint.path)
    convs = {kohya_module_name(key) for key in tensors if tensors[key].ndim == 4 and tensors[key].shape[-1] == 3}
    assert convs and all("_resnets_" in name or "samplers_" in name for name in convs)
    assert {tensors[f"{name}.alpha"].item() for name in convs} == {2.0}
    assert tensors[f"{next(iter(convs))}.lora_down.weight"].shape[0] == 8
    assert any(name.endswith("_time_emb_proj") for name in {kohya_module_name(key) for key in tensors})
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "2"}
    # diffusers' kohya loader takes every module, convolutions included (the renderer
    # refuses a file whose modules do not all load).
    renderer = PreviewRenderer(tiny_sd, steps=2, guidance=1.0, device="cpu")
    with_lora = renderer.render(checkpoint.path, [PreviewPrompt("p", TRIGGER, "", 0)])
    assert len(with_lora) == 1 and with_lora[0].getbbox() is not None


def test_noise_options_change_the_step_and_are_recorded(tiny_sd, examples, tmp_path):
    base = load_base_model(tiny_sd, device="cpu")
    config = TrainingConfig(rank=4, batch_size=2).resolved(len(examples))
    module = LoraTrainingModule(base, CaptionedLatentDataset(examples), config, log=lambda message: None)
    module.latent_cache.fill(torch.device("cpu"), log=lambda message: None)
    batch = next(iter(module.train_dataloader()))

    def loss(**options) -> float:
        module.config = replace(config, **options)
        with torch.no_grad():
            return module.training_step(batch, 0).item()

    plain = loss()
    assert loss() == plain
    assert loss(multires_noise_iterations=6, multires_noise_discount=0.3) != plain
    assert loss(noise_offset=0.1) != plain
    # kohya's metadata names, so A1111's and kohya's tools show how the file was trained.
    run = TrainingConfig(rank=4, batch_size=2, max_train_steps=1, multires_noise_iterations=6, noise_offset=0.05,
                         caption_tag_dropout=0.2)  # fmt: skip
    _, metadata = read_kohya_lora(_train(tiny_sd, examples, tmp_path, run)[-1].path)
    assert metadata["ss_multires_noise_iterations"] == "6" and metadata["ss_multires_noise_discount"] == "0.3"
    assert metadata["ss_noise_offset"] == "0.05"
    assert metadata["ss_caption_tag_dropout_rate"] == "0.2"


def test_a_compiled_unet_trains_the_same_lora(tiny_sd, examples, tmp_path):
    config = TrainingConfig(rank=4, batch_size=2, max_train_steps=3, train_text_encoder=False)
    eager = _train(tiny_sd, examples, tmp_path / "eager", config)[-1]
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _train(tiny_sd, examples, tmp_path / "compiled", replace(config, torch_compile=True))[-1]
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the UNet
    eager_tensors, _ = read_kohya_lora(eager.path)
    compiled_tensors, _ = read_kohya_lora(compiled.path)
    # The same modules under the same names (compiling in place keeps parameter names)...
    assert sorted(compiled_tensors) == sorted(eager_tensors)
    # ...trained to the same values, up to the fused kernels' rounding (saved in fp16).
    for name, tensor in eager_tensors.items():
        torch.testing.assert_close(compiled_tensors[name].float(), tensor.float(), rtol=1e-2, atol=1e-3)
    assert any(not torch.equal(tensor, torch.zeros_like(tensor)) for tensor in compiled_tensors.values())
    # How fast a run goes is not what it makes: either can resume the other's interrupted run.
    manifests = [json.loads((tmp_path / name / MANIFEST_NAME).read_text()) for name in ("eager", "compiled")]
    assert manifests[0]["run_hash"] == manifests[1]["run_hash"]


class CastCounter(TorchDispatchMode):
    """Counts dtype casts (`aten._to_copy`): each is a kernel launch on a GPU."""

    casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


def test_adapters_take_their_inputs_as_autocast_gives_them(tiny_sd, examples):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = load_base_model(tiny_sd, device="cpu", dtype=torch.bfloat16)
    config = TrainingConfig(rank=4, batch_size=2).resolved(len(examples))  # UNet and text encoder
    module = LoraTrainingModule(base, CaptionedLatentDataset(examples), config, log=lambda message: None)
    module.latent_cache.fill(torch.device("cpu"), log=lambda message: None)
    batch = next(iter(module.train_dataloader()))

    def step() -> tuple[float, int]:
        counter = CastCounter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), counter:
            loss = module.training_step(batch, 0).item()
        return loss, counter.casts

    adapters = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    assert adapters and not any(layer.cast_input_dtype_enabled for layer in adapters)
    loss, casts = step()
    for layer in adapters:
        layer.cast_input_dtype_enabled = True  # peft's default: the input to the fp32 weights' dtype
    loss_with_casts, casts_with_casts = step()
    assert loss == loss_with_casts  # bf16 -> fp32 -> bf16 is exact: the same step
    assert casts_with_casts - casts >= 2 * len(adapters)  # to fp32 and back, per adapter


def test_input_perturbation_changes_the_step_deterministically(tiny_sd, examples):
    base = load_base_model(tiny_sd, device="cpu")
    config = TrainingConfig(rank=4, batch_size=2).resolved(len(examples))
    module = LoraTrainingModule(base, CaptionedLatentDataset(examples), config, log=lambda message: None)
    module.latent_cache.fill(torch.device("cpu"), log=lambda message: None)
    batch = next(iter(module.train_dataloader()))

    def loss(perturbation: float) -> float:
        module.config = replace(config, input_perturbation=perturbation)
        with torch.no_grad():
            return module.training_step(batch, 0).item()

    plain = loss(0.0)
    assert loss(0.0) == plain and loss(0.2) != plain


def test_out_of_memory_names_the_settings_and_the_run_resumes(tiny_sd, examples, tmp_path, monkeypatch):
    config = TrainingConfig(rank=4, alpha=2, batch_size=4, max_train_steps=2, save_every_n_steps=1, log_every_n_steps=1)
    original_step = LoraTrainingModule.training_step

    def step_that_runs_out_of_memory(self, batch, batch_index):
        if self.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_step(self, batch, batch_index)

    monkeypatch.setattr(LoraTrainingModule, "training_step", step_that_runs_out_of_memory)
    with pytest.raises(TrainingOutOfMemoryError) as error:
        _train(tiny_sd, examples, tmp_path, config)
    message = str(error.value)
    assert "out of memory" in message and "batch_size=2 (now 4)" in message
    assert "gradient_checkpointing=True" in message and "mixed_precision='bf16'" in message
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)

    monkeypatch.setattr(LoraTrainingModule, "training_step", original_step)
    messages: list[str] = []
    checkpoints = _train(tiny_sd, examples, tmp_path, replace(config, gradient_checkpointing=True), messages.append)
    assert any("resuming the interrupted run" in message for message in messages)
    assert not any("step 1/2" in message for message in messages)
    assert [c.step for c in checkpoints] == [1, 2]


def test_each_run_claims_its_own_gpu(tmp_path):
    with claim_gpu(tmp_path, device_count=2) as first:
        with claim_gpu(tmp_path, device_count=2) as second:
            assert {first, second} == {0, 1}
            with pytest.raises(NoFreeGpuError, match="stayed claimed"):
                with claim_gpu(tmp_path, device_count=2, wait_seconds=0):
                    pass
    with claim_gpu(tmp_path, device_count=2) as again:  # released when the runs end
        assert again == 0


def test_sdpa_attention_and_vae_precision(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    base = load_base_model(tiny_sd, device="cpu", dtype=torch.bfloat16)
    assert all(isinstance(p, AttnProcessor2_0) for p in base.unet.attn_processors.values())
    assert base.text_encoder.config._attn_implementation == "sdpa"
    assert base.unet.dtype == base.vae.dtype == torch.bfloat16  # bf16 has fp32's range: safe for the VAE
    half = load_base_model(tiny_sd, device="cpu", dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32  # fp16 VAEs overflow


def test_nothing_touches_cuda_at_import():
    code = """
import torch

def refuse(*args, **kwargs):
    raise AssertionError("CUDA touched at import")

for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "is_bf16_supported"):
    setattr(torch.cuda, name, refuse)
import lora_factory.training.adapters, lora_factory.training.base_model, lora_factory.training.config
import lora_factory.training.dataset, lora_factory.training.gpu, lora_factory.training.job
import lora_factory.training.kohya_format, lora_factory.training.module, lora_factory.training.optimizers
import lora_factory.training.sd15_architecture, lora_factory.training.tiny_sd, lora_factory.training.train
import lora_factory.training.__main__, lora_factory.benchmarks.training_throughput
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
