"""recscore_table and chosen_model: score every checkpoint, publish the best one.

torch and diffusers are imported inside the asset (see assets/dataset.py for why).
"""

import io
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dagster as dg
import pandas as pd
from PIL import Image

from lora_factory.assets.cleaning import CleanedCropsFiles, cleaned_crops
from lora_factory.assets.dataset import CaptionsFiles, captions
from lora_factory.assets.index import character_index
from lora_factory.assets.metadata import rounded, table_metadata
from lora_factory.assets.stage import AssetFiles, Stage, UpstreamError, character_asset
from lora_factory.assets.training import LoraCheckpointsFiles, lora_checkpoints
from lora_factory.evaluation.prompts import PREVIEW_SAMPLER, PreviewPrompt, preview_prompts
from lora_factory.evaluation.recscore import score_checkpoints
from lora_factory.evaluation.release import (
    METRICS_FILE,
    MODEL_CARD,
    PREVIEWS_FILE,
    inline_images,
    write_release,
)
from lora_factory.evaluation.selection import (
    BASELINE_STEP,
    DEFAULT_BETA,
    choose_step,
    selection_rule_text,
)
from lora_factory.provenance import fingerprint, frame_hash
from lora_factory.reporting import (
    data_uri,
    image_grid_png,
    markdown_image,
    metric_curve_png,
    preview_sheet_png,
)
from lora_factory.resources import (
    BaseModelResource,
    CharacterIndex,
    FactoryStorage,
    VisionModelsResource,
)
from lora_factory.storage import atomic_write_bytes, read_table, write_table

GENDER_TAGS = {"female": "1girl", "male": "1boy", "other": "solo"}
DEFAULT_SAMPLING_STEPS = 20
DEFAULT_GUIDANCE = 7.0
DEFAULT_PREVIEW_BATCH_SIZE = 4


class EvaluationSettings(dg.Config):
    """recscore_table's preview rendering and step rule (CyberHarem's F-beta, beta 3).
    chosen_model has no settings of its own: it publishes the step this rule picks, with
    the previews and settings recscore_table recorded."""

    sampling_steps: int = 0  # 0: the base model deployment's default (20 for a real model)
    guidance: float = 0.0  # 0: the base model deployment's default (7 for a real model)
    # Seeds per preview prompt; 0: the base model deployment's default (1 for a real model).
    # More make fidelity steadier (one preview in 11 moves it by ~0.1) and rendering longer.
    previews_per_prompt: int = 0
    # Previews rendered at once; 0: the base model deployment's default (4 for a real model).
    # The images differ by float rounding between batch sizes, so changing it re-renders.
    preview_batch_size: int = 0
    lora_scale: float = 1.0
    base_seed: int = 42
    beta: float = DEFAULT_BETA


@dataclass(frozen=True)
class PreviewSettings:
    """How recscore_table renders previews: each setting from the run's config, else the base
    model deployment's default, else the usual value. Part of its fingerprint (a changed
    default re-renders) and of its stamp, from which chosen_model takes the prompts and
    writes the settings into the release (so a user can render the same)."""

    sampling_steps: int
    guidance: float
    previews_per_prompt: int
    batch_size: int
    lora_scale: float
    clip_skip: int
    base_seed: int  # the prompts' seeds derive from it

    def describe(self) -> str:
        """`DPM++ 2M, 20 steps, guidance 7, clip skip 2, LoRA strength 1, 1 seed a prompt`."""
        seeds = f"{self.previews_per_prompt} seed{'s' if self.previews_per_prompt > 1 else ''} a prompt"
        return (
            f"{PREVIEW_SAMPLER}, {self.sampling_steps} steps, guidance {self.guidance:g}, clip skip {self.clip_skip}, "
            f"LoRA strength {self.lora_scale:g}, {seeds}"
        )


def preview_settings(config: EvaluationSettings, base_model: BaseModelResource) -> PreviewSettings:
    defaults = base_model.defaults
    return PreviewSettings(
        sampling_steps=config.sampling_steps or defaults.sampling_steps or DEFAULT_SAMPLING_STEPS,
        guidance=config.guidance or defaults.guidance or DEFAULT_GUIDANCE,
        previews_per_prompt=config.previews_per_prompt or defaults.previews_per_prompt or 1,
        batch_size=config.preview_batch_size or defaults.preview_batch_size or DEFAULT_PREVIEW_BATCH_SIZE,
        lora_scale=config.lora_scale,
        clip_skip=base_model.clip_skip,
        base_seed=config.base_seed,
    )


def _prompts(captioned: CaptionsFiles, gender: str, settings: PreviewSettings):
    """(trigger word, core tags, preview prompts) from what captions decided."""
    summary = captioned.summary()
    clusters = captioned.clusters()
    return summary.trigger_word, summary.core_tags, preview_prompts(
        summary.trigger_word,
        summary.core_tags,
        [list(tags) for tags in clusters.sort_values("cluster")["tags"]],
        gender_tag=GENDER_TAGS[gender],
        base_seed=settings.base_seed,
        seeds_per_prompt=settings.previews_per_prompt,
    )


def first_seeds(prompts: Sequence[PreviewPrompt]) -> list[PreviewPrompt]:
    """Each prompt at its first seed: what grids and sheets show, one column per prompt."""
    return [prompt for prompt in prompts if prompt.repeat == 1]


class RecscoreFiles(AssetFiles):
    """recscore_table's scores per checkpoint, the preview images per step, the preview
    grid and the RecScore curve."""

    asset = "recscore_table"

    def table(self) -> pd.DataFrame:
        return self.read_table()

    def preview_grid_png(self) -> bytes:
        return self.verified(self.folder / "previews_grid.png").read_bytes()

    def preview_path(self, step: int, prompt_name: str):
        return self.folder / f"step_{int(step):06d}" / f"{prompt_name}.png"

    def preview_settings(self) -> PreviewSettings:
        """The settings the previews were rendered with."""
        return self._recorded("preview_settings", lambda value: PreviewSettings(**value))

    def beta(self) -> float:
        """The F-beta rule's beta the scores were computed with."""
        return self._recorded("beta", float)

    def _recorded(self, name: str, parse):
        try:
            return parse(self.stamp.summary[name])
        except (KeyError, TypeError) as error:  # stamped by a version that recorded other things
            raise UpstreamError(
                f"recscore_table[{self.key}] does not record the {name.replace('_', ' ')} this version reads: "
                "materialize it again"
            ) from error

    def preview_images(self, step: int, prompt_names: Sequence[str]) -> list[Image.Image]:
        """The previews of one step (step 0: the base model), one per prompt, checked."""
        images = []
        for name in prompt_names:
            with Image.open(self.verified(self.preview_path(step, name))) as image:
                images.append(image.convert("RGB"))
        return images


# Previews shown in the UI (the base model and the steps around the best one): about this
# many bytes of WebP per sheet in the event log. Cells are never shrunk to fit: the quality
# is lowered first, and a sheet may go over.
PREVIEW_SHEET_BYTES = 240_000


def steps_around(steps: Sequence[int], best: int, neighbours: int = 1) -> list[int]:
    """`best` and up to `neighbours` checkpoints on each side of it, in order."""
    ordered = sorted(int(s) for s in steps if int(s) != BASELINE_STEP)
    at = ordered.index(int(best))
    return ordered[max(0, at - neighbours) : at + neighbours + 1]


def step_title(record, chosen: int, beta: float) -> str:
    """`step 48 (chosen): F3 0.512, fidelity 0.600, prompt following 0.400`."""
    if int(record["step"]) == BASELINE_STEP:
        name = "base model, no LoRA"
    else:
        name = f"step {int(record['step'])}" + (" (chosen)" if int(record["step"]) == int(chosen) else "")
    return (
        f"{name}: F{beta:g} {record['score']:.3f}, fidelity {record['fidelity']:.3f}, "
        f"prompt following {record['prompt_following']:.3f}"
    )


def preview_sheet(
    files: RecscoreFiles, table: pd.DataFrame, steps: Sequence[int], prompt_names: Sequence[str], chosen: int, beta: float
) -> bytes:
    """One block per step in `steps` (the baseline first): its previews, labelled."""
    records = {int(r["step"]): r for r in table.to_dict("records")}
    blocks = [
        (step_title(records[step], chosen, beta), files.preview_images(step, prompt_names))
        for step in steps
    ]
    return preview_sheet_png(blocks, list(prompt_names))


def sheet_markdown(png: bytes, alt: str) -> str:
    """A preview sheet as an inline picture whose cells keep their size."""
    with Image.open(io.BytesIO(png)) as image:
        width = image.width
    return markdown_image(png, alt, max_bytes=PREVIEW_SHEET_BYTES, min_width=width)


class ChosenModelFiles(AssetFiles):
    """chosen_model's release folder `releases/<key>/`: LoRA, model card, previews, metrics."""

    asset = "chosen_model"
    extra_roots = ("releases/{key}",)

    @property
    def release_dir(self):
        return self.store.root / self.extra_roots[0].format(key=self.key)


@character_asset(
    group_name="evaluation",
    code_version="4",
    deps=[lora_checkpoints, captions, cleaned_crops, character_index],
    gpu=True,
    description=(
        "RecScore per checkpoint: previews from a fixed prompt set (one prompt per outfit "
        "cluster plus framing, pose and expression prompts; fixed seeds), fidelity = share "
        "of (preview, dataset) pairs the identity model calls the same character normalised "
        "by the dataset's own agreement, prompt following = tagger confidence on the "
        "prompts' tags, and their F-beta score. Row step 0 is the base model without the "
        "LoRA (same prompts and seeds): the baseline the checkpoints must beat."
    ),
)
def recscore_table(
    context: dg.AssetExecutionContext,
    config: EvaluationSettings,
    storage: FactoryStorage,
    character_index: CharacterIndex,
    vision_models: VisionModelsResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    row = character_index.row(context.partition_key)
    settings = preview_settings(config, base_model)
    stage = Stage(
        context,
        storage,
        RecscoreFiles,
        config,
        reads=(LoraCheckpointsFiles, CaptionsFiles, CleanedCropsFiles),
        extra={
            "models": vision_models.versions(storage.store()),
            "base": base_model.identity(storage.store()),
            "row": row.content_hash(),
            "previews": asdict(settings),
        },
    )
    table_path = stage.files.table_path()
    out_dir = stage.files.folder
    grid_path, curve_path = out_dir / "previews_grid.png", out_dir / "recscore_curve.png"
    if stage.needs_build():
        from lora_factory.evaluation.previews import PreviewRenderer
        from lora_factory.training.gpu import claimed_device

        cleaned = stage.read(CleanedCropsFiles)
        crops = cleaned.crops()
        _, _, prompts = _prompts(stage.read(CaptionsFiles), row.gender, settings)
        models = vision_models.load(stage.store)
        # Several GPUs: each rendering step (the `gpu` pool) claims a different one.
        with claimed_device(stage.store.root / "locks" / "gpu", log=context.log.info) as device:
            renderer = PreviewRenderer(
                base_model.resolve(stage.store),
                steps=settings.sampling_steps,
                guidance=settings.guidance,
                lora_scale=settings.lora_scale,
                clip_skip=settings.clip_skip,
                batch_size=settings.batch_size,
                device=device,
            )
            table, previews = score_checkpoints(
                stage.read(LoraCheckpointsFiles).checkpoints(),
                renderer,
                prompts,
                cleaned.image_sequence(crops["crop_sha256"]),
                models.identity,
                models.tagger,
                context.log,
                beta=config.beta,
                baseline=True,
            )
            del renderer  # its weights leave the GPU before the lock does
        for earlier in out_dir.glob("step_*"):
            shutil.rmtree(earlier)  # an earlier build's previews: other checkpoints or seeds
        for step, images in previews.items():
            for prompt, image in zip(prompts, images, strict=True):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                atomic_write_bytes(out_dir / f"step_{step:06d}" / f"{prompt.name}.png", buffer.getvalue())
        steps = sorted(previews)
        shown = first_seeds(prompts)  # the first len(shown) previews of every step
        atomic_write_bytes(
            grid_path,
            image_grid_png(
                [previews[s][: len(shown)] for s in steps],
                ["no LoRA" if s == BASELINE_STEP else f"step {s}" for s in steps],
                [prompt.name for prompt in shown],
            ),
        )
        atomic_write_bytes(curve_path, metric_curve_png(table))
        # Home-relative checkpoint paths; the baseline row has no checkpoint ("").
        table["path"] = table["path"].map(lambda path: stage.files.relative(path) if path else "")
        write_table(table, table_path)
        # The settings and the rule are part of what chosen_model reads (its step, prompts, card).
        scores_hash = frame_hash(table, ["step", "fidelity", "prompt_following", "score"])
        recorded = {"preview_settings": asdict(settings), "beta": config.beta}
        stage.finish(fingerprint(scores_hash, recorded), recorded)
    table = read_table(table_path)
    best = choose_step(table, beta=config.beta)  # what chosen_model will publish

    def previews() -> str:
        steps = [BASELINE_STEP, *steps_around(table["step"], best)]
        prompts = _prompts(stage.read(CaptionsFiles), row.gender, settings)[2]
        names = [prompt.name for prompt in first_seeds(prompts)]
        sheet = preview_sheet(stage.files, table, steps, names, best, config.beta)
        return (
            f"The base model and the checkpoints around the best step ({best}), every picture at "
            f"its rendered size (each prompt's first seed). Every step's previews: "
            f"`{stage.files.relative(out_dir)}/step_<step>/`; the first seeds of all steps in one grid: "
            f"`{stage.files.relative(grid_path)}`.\n\n"
            + sheet_markdown(sheet, f"previews around step {best}")
        )

    return stage.result(
        {
            "dagster/row_count": len(table),
            "recscore": table_metadata(
                table, max_rows=100, first=["step", "score", "fidelity", "prompt_following", "artefact"]
            ),
            "best_step": int(best),
            "best_score": rounded(table.loc[table["step"] == best, "score"].iloc[0]),
            "preview_rendering": settings.describe(),
            "previews_dir": dg.MetadataValue.path(stage.files.relative(out_dir)),
        },
        pictures={
            "previews": previews,
            "recscore_curve": lambda: markdown_image(curve_path.read_bytes(), "curve"),
        },
    )


@character_asset(
    group_name="evaluation",
    code_version="3",
    deps=[recscore_table, lora_checkpoints, captions, character_index],
    description=(
        "The checkpoint with the best F-beta of fidelity and prompt following (recscore_table's "
        "beta, 3 by default), published as a release folder: the LoRA, a model card (trigger "
        "word, core tags, steps table, selection rule), previews, the metrics plot and meta.json. "
        "No settings of its own: it publishes what recscore_table scored and rendered."
    ),
)
def chosen_model(
    context: dg.AssetExecutionContext,
    storage: FactoryStorage,
    character_index: CharacterIndex,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    row = character_index.row(context.partition_key)
    stage = Stage(
        context,
        storage,
        ChosenModelFiles,
        reads=(RecscoreFiles, LoraCheckpointsFiles, CaptionsFiles),
        extra={"row": row.content_hash(), "base": base_model.source},
    )
    release_dir = stage.files.release_dir
    scores = stage.read(RecscoreFiles)
    settings, beta = scores.preview_settings(), scores.beta()
    if stage.needs_build():
        table = scores.table()
        step = choose_step(table, beta=beta)
        trigger, core_tags, prompts = _prompts(stage.read(CaptionsFiles), row.gender, settings)
        write_release(
            release_dir,
            stage.read(LoraCheckpointsFiles).checkpoint(step),
            step,
            table,
            scores.preview_grid_png(),
            metric_curve_png(table, chosen_step=step),
            trigger,
            core_tags,
            row,
            base_model.source,
            {
                "upstream_data_versions": stage.upstream_hashes,
                "code_versions": {
                    key.to_user_string(): version
                    for key, version in context.assets_def.code_versions_by_key.items()
                },
                "preview_settings": asdict(settings),
            },
            beta=beta,
            prompts=prompts,
            preview_rendering=settings.describe(),
            clip_skip=settings.clip_skip,
            synthetic_demo=base_model.synthetic_demo,
        )
        stage.finish(f"{step}:{stage.upstream_hashes['recscore_table']}", {"step": step})
    step = stage.stamp.summary["step"]
    table = scores.table()
    chosen = table[table["step"] == step].iloc[0]
    context.log.info(f"{stage.key}: chose step {step}; release at {release_dir}")

    def model_card() -> str:
        """The release's README.md with its pictures inline (the file keeps its relative
        links): the metrics plot, and the previews of the base model and the chosen step at
        their rendered size (recscore_table's `previews` adds the neighbouring steps, the
        release's previews.png has every step)."""
        _, _, prompts = _prompts(stage.read(CaptionsFiles), row.gender, settings)
        steps = [BASELINE_STEP, int(step)]
        sheet = preview_sheet(scores, table, steps, [p.name for p in first_seeds(prompts)], step, beta)
        with Image.open(io.BytesIO(sheet)) as image:
            width = image.width
        return inline_images(
            (release_dir / MODEL_CARD).read_text(encoding="utf-8"),
            {
                PREVIEWS_FILE: data_uri(sheet, PREVIEW_SHEET_BYTES, min_width=width),
                METRICS_FILE: data_uri((release_dir / METRICS_FILE).read_bytes()),
            },
        )

    return stage.result(
        {
            "chosen_step": int(step),
            # Exactly what a prompt must contain (as the captions and the model card write it).
            "trigger_word": stage.read(CaptionsFiles).summary().trigger_word,
            "fidelity": rounded(chosen["fidelity"]),
            "prompt_following": rounded(chosen["prompt_following"]),
            "score": rounded(chosen["score"]),
            "selection_rule": selection_rule_text(beta),
            "release_dir": dg.MetadataValue.path(stage.files.relative(release_dir)),
            "lora_file": dg.MetadataValue.path(stage.files.relative(release_dir / f"{stage.key}.safetensors")),
        },
        pictures={"model_card": model_card},
    )
