"""Publish the chosen checkpoint as a release folder.

    <release_dir>/
      <key>.safetensors   the LoRA of the chosen step
      README.md           model card: trigger words, usage, previews, scores, selection rule
      previews.png        checkpoint x prompt preview grid
      metrics.png         RecScore curves with the chosen step marked
      meta.json           everything above as data, plus provenance (code/data versions, seeds)

Every file is written atomically, and only when its bytes change: publishing the same
result twice leaves the folder exactly as it was, and a crash never leaves half a file.
Nothing time-dependent goes in, so the same inputs always give the same folder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lora_factory.evaluation.prompts import PreviewPrompt, tag_to_prompt_text
from lora_factory.evaluation.selection import (
    BASELINE_STEP,
    DEFAULT_BETA,
    selection_rule_text,
)
from lora_factory.index.character_index import CharacterRow
from lora_factory.storage import atomic_copy, atomic_write_bytes, sha256_file

MODEL_CARD = "README.md"
PREVIEWS_FILE = "previews.png"
METRICS_FILE = "metrics.png"
META_FILE = "meta.json"
SCORE_COLUMNS = ("fidelity", "prompt_following", "artefact", "score")
DEFAULT_LORA_WEIGHT = 0.8


def write_release(
    release_dir: Path,
    lora_path: Path,
    step: int,
    table: pd.DataFrame,
    previews_grid_png: bytes,
    metrics_png: bytes,
    trigger_word: str,
    core_tags: Sequence[str],
    character: CharacterRow,
    base_model: str,
    provenance: Mapping[str, Any],
    *,
    beta: float = DEFAULT_BETA,
    artefact_gate: float | None = None,
    prompts: Sequence[PreviewPrompt] | None = None,
    preview_rendering: str = "",
    clip_skip: int = 2,
    synthetic_demo: bool = False,
) -> Path:
    """Write (or refresh) the release folder for `character` and return its path.

    `table` is the RecScore table (step, path, fidelity, prompt_following, artefact,
    score); `step` must be one of its steps. `provenance` is any JSON-serialisable
    mapping (code version, data versions, seeds) copied into meta.json and the card.
    `preview_rendering` says how the previews were rendered (sampler, steps, guidance...);
    `clip_skip` (A1111's count) is the one the previews were rendered with: the base model
    resource's, which training uses too.
    `synthetic_demo` marks a release trained on the demo's synthetic data and tiny models.
    """
    release_dir = Path(release_dir)
    lora_path = Path(lora_path)
    if not lora_path.is_file():
        raise FileNotFoundError(f"LoRA checkpoint {lora_path} does not exist; train the LoRA first")
    if not trigger_word.strip():
        raise ValueError("write_release needs the trigger word the LoRA was trained with")
    for name, png in (("previews_grid_png", previews_grid_png), ("metrics_png", metrics_png)):
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{name} must be PNG bytes (see lora_factory.reporting)")
    missing = [name for name in ("step", *SCORE_COLUMNS) if name not in table.columns]
    if missing:
        raise ValueError(f"write_release: the RecScore table lacks column(s) {missing}")
    if int(step) not in set(table["step"].astype(int)):
        raise ValueError(f"chosen step {step} is not in the RecScore table (steps {sorted(table['step'])})")
    try:
        provenance_json = json.loads(json.dumps(dict(provenance), sort_keys=True))
    except TypeError as error:
        raise ValueError(f"provenance must be JSON-serialisable (strings, numbers, lists, dicts): {error}") from error

    lora_file = f"{character.key}.safetensors"
    _copy_if_changed(lora_path, release_dir / lora_file)
    lora_sha256 = sha256_file(release_dir / lora_file)
    rows = _score_rows(table)
    rule = selection_rule_text(beta, artefact_gate)
    meta = {
        "key": character.key,
        "display_name": character.display_name,
        "franchise": character.franchise,
        "names": list(character.all_names),
        "lora_file": lora_file,
        "lora_sha256": lora_sha256,
        "step": int(step),
        "trigger_word": trigger_word,
        "core_tags": list(core_tags),
        "base_model": base_model,
        "selection": {"rule": rule, "beta": beta, "artefact_gate": artefact_gate},
        "scores": rows,
        "preview_prompts": [
            {"name": p.name, "prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": p.seed,
             "expected_tags": list(p.expected_tags)}
            for p in prompts or []
        ],
        "provenance": provenance_json,
        "synthetic_demo": synthetic_demo,
    }
    card = model_card(
        character=character, lora_file=lora_file, lora_sha256=lora_sha256, step=int(step),
        trigger_word=trigger_word, core_tags=core_tags, base_model=base_model, rows=rows,
        rule=rule, prompts=prompts or [], provenance=provenance_json, synthetic_demo=synthetic_demo,
        preview_rendering=preview_rendering, clip_skip=clip_skip,
    )
    _write_if_changed(release_dir / PREVIEWS_FILE, previews_grid_png)
    _write_if_changed(release_dir / METRICS_FILE, metrics_png)
    _write_if_changed(release_dir / META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    # The card last: a folder with a card is a complete release.
    _write_if_changed(release_dir / MODEL_CARD, card.encode("utf-8"))
    return release_dir


def model_card(
    *,
    character: CharacterRow,
    lora_file: str,
    lora_sha256: str,
    step: int,
    trigger_word: str,
    core_tags: Sequence[str],
    base_model: str,
    rows: list[dict[str, Any]],
    rule: str,
    prompts: Sequence[PreviewPrompt],
    provenance: Mapping[str, Any],
    synthetic_demo: bool,
    preview_rendering: str = "",
    clip_skip: int = 2,
) -> str:
    """The release's README.md (markdown)."""
    stem = Path(lora_file).stem
    core_text = ", ".join(tag_to_prompt_text(tag) for tag in core_tags)
    full_prompt = ", ".join(part for part in (trigger_word, core_text) if part)
    lines = [f"# {character.display_name} ({character.franchise}) — character LoRA", ""]
    if synthetic_demo:
        lines += [
            "> **Demo build.** This LoRA was trained on the demo booru's synthetic images with the",
            "> built-in tiny models. It shows that the pipeline runs end to end; it is not a usable",
            "> model and its scores say nothing about real characters.",
            "",
        ]
    other_names = [name for name in character.all_names if name != character.display_name]
    lines += [
        f"LoRA for **{character.display_name}** from *{character.franchise}*"
        + (f" (also known as {', '.join(other_names)})" if other_names else "")
        + f", trained on `{base_model}`. Published checkpoint: step **{step}**, chosen automatically"
        " (see below).",
        "",
        f"- file: `{lora_file}` (sha256 `{lora_sha256}`)",
        "",
        "## Trigger words",
        "",
        f"- trigger word: `{trigger_word}`",
        f"- core tags (learnt into the trigger word): `{core_text or '(none)'}`",
        f"- full character prompt: `{full_prompt}`",
        "",
        "The trigger word alone should draw the character; add the core tags when a prompt",
        "pulls the character away from their look, and describe outfits with ordinary tags.",
        "",
        "## How to use",
        "",
        f"- **AUTOMATIC1111 / Forge**: put `{lora_file}` in `models/Lora`, add "
        f"`<lora:{stem}:{DEFAULT_LORA_WEIGHT}>` and `{trigger_word}` to the prompt; clip skip {clip_skip}.",
        f"- **ComfyUI**: put `{lora_file}` in `models/loras`, insert a *Load LoRA* node after the "
        f"checkpoint loader (strength {DEFAULT_LORA_WEIGHT}) and a *CLIP Set Last Layer* node at -{clip_skip}.",
        f"- **diffusers**: `pipe.load_lora_weights(\"<folder>\", weight_name=\"{lora_file}\")`, then "
        + (
            f"`pipe(prompt, clip_skip={clip_skip - 1})` (diffusers counts skipped layers: {clip_skip - 1} = clip skip "
            f"{clip_skip})."
            if clip_skip > 1
            else "`pipe(prompt)` (clip skip 1: the last layer, diffusers' default)."
        ),
        "",
        "## Previews",
        "",
        "Every checkpoint renders the same preview prompts, each with its own fixed seed"
        + (f" ({preview_rendering})" if preview_rendering else "")
        + "; *no LoRA* is the base model.",
        "",
        f"![previews]({PREVIEWS_FILE})",
        "",
        "## How the step was chosen",
        "",
        rule,
        "",
        f"![metrics]({METRICS_FILE})",
        "",
        _markdown_score_table(rows, step),
        "",
    ]
    if prompts:
        lines += ["## Preview prompts", "", "| name | seed | prompt |", "|---|---|---|"]
        lines += [f"| {p.name} | {p.seed} | `{p.prompt}` |" for p in prompts]
        lines += ["", f"Negative prompt: `{prompts[0].negative_prompt}`", ""]
    lines += ["## Provenance", "", "```json", json.dumps(dict(provenance), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def inline_images(card: str, images: Mapping[str, str]) -> str:
    """`card` with the pictures it links by file name (`![previews](previews.png)`) pointing
    at `images[file name]` instead, e.g. data URIs, for a viewer that cannot open the
    release folder (Dagster's UI). The release's README.md keeps its relative links."""
    for name, target in images.items():
        card = re.sub(
            r"(!\[[^\]]*\]\()" + re.escape(name) + r"\)", lambda m, target=target: m.group(1) + target + ")", card
        )
    return card


def _score_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows as plain JSON values; checkpoint paths reduced to file names."""
    rows = []
    for record in table.sort_values("step").to_dict("records"):
        row: dict[str, Any] = {"step": int(record["step"])}
        if "path" in record and isinstance(record["path"], str):
            row["checkpoint"] = Path(record["path"]).name
        for name in SCORE_COLUMNS:
            value = record.get(name)
            row[name] = None if value is None or pd.isna(value) else round(float(value), 6)
        rows.append(row)
    return rows


def _markdown_score_table(rows: list[dict[str, Any]], chosen_step: int) -> str:
    header = "| step | fidelity | prompt following | artefact | F-score | |\n|---:|---:|---:|---:|---:|---|"
    body = [
        "| {step} | {f} | {p} | {a} | {s} | {mark} |".format(
            step=row["step"],
            f=_number(row["fidelity"]),
            p=_number(row["prompt_following"]),
            a=_number(row["artefact"]),
            s=_number(row["score"]),
            mark={chosen_step: "**chosen**", BASELINE_STEP: "base model, no LoRA"}.get(row["step"], ""),
        )
        for row in rows
    ]
    return "\n".join([header, *body])


def _number(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size and sha256_file(target) == sha256_file(source):
        return
    atomic_copy(source, target)
