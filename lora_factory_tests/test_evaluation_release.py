"""evaluation.release: the release folder, its model card and metadata, idempotence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_factory.evaluation.prompts import preview_prompts
from lora_factory.evaluation.release import inline_images, write_release
from lora_factory.index.character_index import CharacterRow
from lora_factory.reporting import contact_sheet_png, metric_curve_png
from lora_factory.storage import sha256_file

CHARACTER = CharacterRow(key="ash_ember_knights", display_name="Ash", franchise="ember_knights", names=("アッシュ",))
TABLE = pd.DataFrame(
    {
        "step": [100, 200],
        "path": ["/somewhere/lora-100.safetensors", "/somewhere/lora-200.safetensors"],
        "fidelity": [0.4, 0.9],
        "prompt_following": [0.6, 0.5],
        "artefact": [np.nan, np.nan],
        "score": [0.41, 0.85],
    }
)
PROVENANCE = {"code_version": "abc123", "data_versions": {"captions": "d1e2"}, "seeds": {"training": 0, "previews": 42}}


@pytest.fixture()
def release_inputs(tmp_path):
    lora = tmp_path / "checkpoints" / "lora-200.safetensors"
    lora.parent.mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4)}, str(lora))
    return {
        "lora_path": lora,
        "step": 200,
        "table": TABLE,
        "previews_grid_png": contact_sheet_png([Image.new("RGB", (8, 8), (200, 0, 0))], thumb=16),
        "metrics_png": metric_curve_png(TABLE, chosen_step=200),
        "trigger_word": "ash_ember_knights",
        "core_tags": ["red_hair", "yellow_eyes", "horns"],
        "character": CHARACTER,
        "base_model": "tiny_sd15",
        "provenance": PROVENANCE,
    }


def test_release_folder_holds_lora_card_pictures_and_metadata(tmp_path, release_inputs):
    release = write_release(
        tmp_path / "release", **release_inputs,
        prompts=preview_prompts("ash_ember_knights", ["red_hair"], [["navy_jacket"]]), synthetic_demo=True,
        preview_rendering="DPM++ 2M, 20 steps, guidance 4, clip skip 2, LoRA strength 1, 3 seeds a prompt",
    )
    assert sorted(path.name for path in release.iterdir()) == [
        "README.md", "ash_ember_knights.safetensors", "meta.json", "metrics.png", "previews.png"
    ]
    assert sha256_file(release / "ash_ember_knights.safetensors") == sha256_file(release_inputs["lora_path"])
    assert (release / "previews.png").read_bytes() == release_inputs["previews_grid_png"]

    card = (release / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# Ash (ember_knights)")
    assert "`ash_ember_knights`" in card and "red hair, yellow eyes, horns" in card
    assert "<lora:ash_ember_knights:0.8>" in card and "ComfyUI" in card
    assert "beta = 3" in card  # the selection rule
    assert "| 200 | 0.900 | 0.500 | – | " in card and "**chosen**" in card
    assert "Demo build" in card
    # How the previews were rendered, so a user can render the same.
    assert "fixed seed (DPM++ 2M, 20 steps, guidance 4, clip skip 2, LoRA strength 1, 3 seeds a prompt)" in card
    assert "アッシュ" in card and "outfit_cluster_0" in card
    assert "/somewhere" not in card  # checkpoint paths of the factory never leak into the card
    # The file links its pictures relatively; the UI's copy has them inline.
    assert "![previews](previews.png)" in card and "![metrics](metrics.png)" in card
    shown = inline_images(card, {"previews.png": "data:image/webp;base64,AAAA", "metrics.png": "data:image/webp;base64,BBBB"})
    assert "![previews](data:image/webp;base64,AAAA)" in shown and "![metrics](data:image/webp;base64,BBBB)" in shown
    assert "previews.png)" not in shown and "metrics.png)" not in shown
    assert shown.replace("data:image/webp;base64,AAAA", "previews.png").replace(
        "data:image/webp;base64,BBBB", "metrics.png") == card

    meta = json.loads((release / "meta.json").read_text())
    assert meta["step"] == 200 and meta["lora_file"] == "ash_ember_knights.safetensors"
    assert meta["lora_sha256"] == sha256_file(release_inputs["lora_path"])
    assert meta["provenance"] == PROVENANCE
    assert meta["scores"][1] == {
        "step": 200, "checkpoint": "lora-200.safetensors", "fidelity": 0.9,
        "prompt_following": 0.5, "artefact": None, "score": 0.85,
    }
    assert meta["synthetic_demo"] is True


def test_real_releases_carry_no_demo_note(tmp_path, release_inputs):
    release = write_release(tmp_path / "release", **release_inputs)
    assert "Demo build" not in (release / "README.md").read_text(encoding="utf-8")


def test_the_card_gives_the_clip_skip_the_lora_was_trained_with(tmp_path, release_inputs):
    # The NAI family's clip skip 2, each tool in its own words (diffusers counts skipped layers).
    card = (write_release(tmp_path / "nai", **release_inputs) / "README.md").read_text(encoding="utf-8")
    assert "to the prompt; clip skip 2." in card and "*CLIP Set Last Layer* node at -2." in card
    assert "`pipe(prompt, clip_skip=1)`" in card
    # A base model used with its last layer.
    card = (write_release(tmp_path / "last", **release_inputs, clip_skip=1) / "README.md").read_text(encoding="utf-8")
    assert "to the prompt; clip skip 1." in card and "*CLIP Set Last Layer* node at -1." in card
    assert "`pipe(prompt)`" in card and "clip_skip=" not in card


def test_publishing_twice_changes_nothing_and_a_new_step_updates(tmp_path, release_inputs):
    release = write_release(tmp_path / "release", **release_inputs)
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in release.iterdir()}
    write_release(tmp_path / "release", **release_inputs)
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in release.iterdir()} == before

    other = release_inputs["lora_path"].with_name("lora-100.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(other))
    write_release(tmp_path / "release", **{**release_inputs, "lora_path": other, "step": 100})
    assert sha256_file(release / "ash_ember_knights.safetensors") == sha256_file(other)
    assert json.loads((release / "meta.json").read_text())["step"] == 100
    assert not [path for path in release.iterdir() if path.name.endswith(".tmp")]


def test_bad_release_inputs_are_refused(tmp_path, release_inputs):
    with pytest.raises(ValueError, match="not in the RecScore table"):
        write_release(tmp_path / "r", **{**release_inputs, "step": 300})
    with pytest.raises(FileNotFoundError):
        write_release(tmp_path / "r", **{**release_inputs, "lora_path": tmp_path / "absent.safetensors"})
    with pytest.raises(ValueError, match="PNG"):
        write_release(tmp_path / "r", **{**release_inputs, "metrics_png": b"not a png"})
    with pytest.raises(ValueError, match="JSON"):
        write_release(tmp_path / "r", **{**release_inputs, "provenance": {"when": object()}})
