"""End to end: a 4-step LoRA run on the tiny base, its files, re-runs and resumption after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lora_factory.training.config import LOSS_LOG_NAME, TrainingConfig
from lora_factory.training.dataset import TrainingExample
from lora_factory.training.job import TrainingJob
from lora_factory.training.kohya_format import kohya_module_name, read_kohya_lora
from lora_factory.training.tiny_sd import build_tiny_sd15
from lora_factory.training.train import (
    MANIFEST_NAME,
    STATE_DIR_NAME,
    STATE_FILE_NAME,
    train_lora,
)

CONFIG = TrainingConfig(rank=4, alpha=2, max_train_steps=4, save_every_n_steps=2, log_every_n_steps=1, batch_size=4)
TRIGGER = "tiny_char"
TAG_FREQUENCY = {"red_hair": 8, "solo": 8}
DATASET_DIRS = {f"1_{TRIGGER}": {"n_repeats": 1, "img_count": 8}}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """8 images in two buckets (64x64 and 128x64), captions with the trigger first."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    examples = []
    for index in range(8):
        bucket = (64, 64) if index < 5 else (128, 64)
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (bucket[1], bucket[0], 3), dtype=np.uint8)).save(path)
        examples.append(TrainingExample(path, f"{TRIGGER}, tag{index}, red_hair, solo", bucket, repeats=1 + index % 2))
    return examples


def _train(tiny_sd, examples, output_dir, log):
    return train_lora(
        tiny_sd,
        examples,
        output_dir,
        CONFIG,
        output_name=TRIGGER,
        trigger_word=TRIGGER,
        tag_frequency=TAG_FREQUENCY,
        dataset_dirs=DATASET_DIRS,
        log=log,
        device="cpu",
    )


@pytest.fixture(scope="module")
def trained(tiny_sd, examples, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lora")
    messages: list[str] = []
    checkpoints = _train(tiny_sd, examples, output_dir, messages.append)
    return output_dir, checkpoints, messages


def test_run_writes_kohya_checkpoints(trained, tiny_sd):
    from diffusers import UNet2DConditionModel

    output_dir, checkpoints, messages = trained
    assert [(c.step, c.path.name) for c in checkpoints] == [
        (2, f"{TRIGGER}-000002.safetensors"),
        (4, f"{TRIGGER}-000004.safetensors"),
    ]
    assert [c.epoch for c in checkpoints] == [1, 1]  # 12 samples, 2 buckets -> 4 batches per epoch
    assert any(re.search(r"step 4/4 .*loss \d+\.\d+.* s/step", message) for message in messages)

    unet_modules = {
        "lora_unet_" + path.replace(".", "_")
        for path, _ in UNet2DConditionModel.from_pretrained(tiny_sd / "unet").named_modules()
    }
    first, last = (read_kohya_lora(c.path) for c in checkpoints)
    for tensors, metadata in (first, last):
        names = {kohya_module_name(key) for key in tensors}
        assert {name for name in names if name.startswith("lora_unet_")} <= unet_modules
        assert any(name.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for name in names)
        assert all(tensors[f"{name}.alpha"].item() == 2.0 for name in names)
        assert metadata["ss_network_alpha"] == "2" and metadata["ss_network_dim"] == "4"
        assert metadata["ss_output_name"] == TRIGGER and TRIGGER in metadata["ss_training_comment"]
        assert json.loads(metadata["ss_tag_frequency"]) == {TRIGGER: {"red_hair": 8, "solo": 8}}
        assert metadata["ss_mixed_precision"] == "no"
    assert (first[1]["ss_steps"], last[1]["ss_steps"]) == ("2", "4")
    # The adapters trained: up weights left zero-init and moved between the two saves.
    up = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    assert first[0][up].abs().sum() > 0 and not torch.equal(first[0][up], last[0][up])
    manifest = json.loads((output_dir / MANIFEST_NAME).read_text())
    assert manifest["status"] == "finished" and len(manifest["checkpoints"]) == 2
    assert not (output_dir / STATE_DIR_NAME / STATE_FILE_NAME).exists()
    # Every step's loss, as kohya's TensorBoard users see it.
    losses = pd.read_csv(output_dir / LOSS_LOG_NAME)
    assert list(losses["step"]) == [1, 2, 3, 4] and list(losses["epoch"]) == [1, 1, 1, 1]
    assert losses["loss"].between(0, 10).all()
    assert losses["learning_rate"].iloc[0] > 0 and losses["learning_rate"].is_monotonic_decreasing  # cosine


def test_checkpoint_loads_in_diffusers_without_key_warnings(trained, tiny_sd, capfd):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    _, checkpoints, _ = trained
    tensors, _ = read_kohya_lora(checkpoints[-1].path)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    capfd.readouterr()
    pipeline.load_lora_weights(str(checkpoints[-1].path))
    out, err = capfd.readouterr()
    assert not re.search(r"unexpected|missing|not loaded", out + err, re.IGNORECASE), out + err
    layers = [
        module
        for model in (pipeline.unet, pipeline.text_encoder)
        for module in model.modules()
        if isinstance(module, LoraLayer)
    ]
    assert len(layers) == len({kohya_module_name(key) for key in tensors})
    image = pipeline(TRIGGER, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)


def test_same_run_again_reproduces_the_same_files(trained, tiny_sd, examples, tmp_path):
    """Whether to train is the caller's decision (the asset reuses verified results):
    asked again, train_lora trains again and, seeded by position, writes the same bytes."""
    _, checkpoints, _ = trained
    again = _train(tiny_sd, examples, tmp_path / "again", lambda message: None)
    assert [c.sha256 for c in again] == [c.sha256 for c in checkpoints]


def test_sigkilled_training_process_resumes_to_the_same_weights(trained, tiny_sd, examples, tmp_path):
    """A real `python -m lora_factory.training` process, SIGKILLed after its first saved
    state, is started again: it resumes, and ends bit-identical to the uninterrupted run."""
    _, uninterrupted, _ = trained
    job = TrainingJob(
        base_source=str(tiny_sd),
        examples=examples,
        output_dir=str(tmp_path / "run"),
        config=CONFIG,
        output_name=TRIGGER,
        trigger_word=TRIGGER,
        tag_frequency=TAG_FREQUENCY,
        dataset_dirs=DATASET_DIRS,
        device="cpu",
    )
    job_file = tmp_path / "job.json"
    job_file.write_text(job.to_json())
    state = tmp_path / "run" / STATE_DIR_NAME / STATE_FILE_NAME
    with open(tmp_path / "killed.log", "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "lora_factory.training", str(job_file)], stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while not state.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    killed_log = (tmp_path / "killed.log").read_text()
    assert process.returncode == -signal.SIGKILL and state.exists(), killed_log
    assert "saved tiny_char-000002.safetensors" in killed_log
    assert not (tmp_path / "run" / f"{TRIGGER}-000004.safetensors").exists(), "finished before the kill"
    assert json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())["status"] == "running"

    messages: list[str] = []
    resumed = TrainingJob.from_json(job_file.read_text()).run(log=messages.append)
    assert any("resuming the interrupted run" in message for message in messages)
    assert not any("step 1/4" in message or "step 2/4" in message for message in messages)
    # Seeded by position, restored optimizer and batch order: bit-identical to the uninterrupted run.
    assert [(c.step, c.sha256) for c in resumed] == [(c.step, c.sha256) for c in uninterrupted]
    assert not state.exists()
    # The steps repeated after the resume point are logged once, with the same losses.
    trained_dir, _, _ = trained
    assert (tmp_path / "run" / LOSS_LOG_NAME).read_bytes() == (trained_dir / LOSS_LOG_NAME).read_bytes()


def test_changed_inputs_replace_the_previous_run(tiny_sd, examples, tmp_path):
    _train(tiny_sd, examples, tmp_path, lambda message: None)
    first = {path.name: path.read_bytes() for path in tmp_path.glob("*.safetensors")}
    messages: list[str] = []
    changed = [TrainingExample(e.image_path, e.caption + ", smile", e.bucket, e.repeats) for e in examples]
    checkpoints = _train(tiny_sd, changed, tmp_path, messages.append)
    assert any("removed 2 files of a previous run" in message for message in messages)
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == sorted(first)
    assert all(c.path.read_bytes() != first[c.path.name] for c in checkpoints)


def test_buckets_the_base_model_cannot_take_are_refused_before_the_previous_run_is_touched(
    tiny_sd, examples, tmp_path
):
    _train(tiny_sd, examples, tmp_path, lambda message: None)
    before = {path.name: path.read_bytes() for path in tmp_path.glob("*") if path.is_file()}
    # The tiny UNet halves its latents once: picture sides must be multiples of 8 x 2 = 16 px.
    odd = [*examples[:-1], TrainingExample(examples[-1].image_path, examples[-1].caption, (72, 64))]
    with pytest.raises(ValueError, match=r"1 training picture\(s\) have buckets the base model cannot take"
                       r" \(its sides must be multiples of 16 px\)"):  # fmt: skip
        _train(tiny_sd, odd, tmp_path, lambda message: None)
    assert {path.name: path.read_bytes() for path in tmp_path.glob("*") if path.is_file()} == before


def test_latent_disk_cache_skips_the_vae_on_the_next_run(tiny_sd, examples, tmp_path):
    from lora_factory.training.base_model import load_base_model
    from lora_factory.training.dataset import CaptionedLatentDataset
    from lora_factory.training.module import LatentCache

    base = load_base_model(tiny_sd, device="cpu")
    dataset = CaptionedLatentDataset(examples, flip=True)
    first_log: list[str] = []
    first = LatentCache(base, dataset, tmp_path / "latents")
    first.fill(torch.device("cpu"), first_log.append)
    assert first_log == ["encoding 16 training images with the VAE"]  # 8 images x (plain, flipped)
    latent = first.latents[(5, False)]
    assert latent.shape == (4, 8, 16)  # 128x64 bucket / 8, 4 latent channels

    second_log: list[str] = []
    second = LatentCache(base, dataset, tmp_path / "latents")
    second.fill(torch.device("cpu"), second_log.append)
    assert second_log == []
    assert all(torch.equal(second.latents[key], value) for key, value in first.latents.items())
