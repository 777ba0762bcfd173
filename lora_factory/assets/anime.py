"""Anime episodes as one more source of a character's pictures.

- `series_figures` (one partition per series): every episode's kept frames, the figures
  found in them (detectors, face check, 3-stage crops, an identity vector each) and
  every drop by reason. Incremental: each episode file's result is kept by the file's
  content, so adding an episode processes only that episode; a bad file is quarantined
  with its reason and the others are processed.
- `series_clusters` (per series): the identity clusters of all the series' figures
  (HDBSCAN; noise stays unclustered), with sizes, purity and a contact sheet each.
- `anime_posts` (per character): for each series of the index row's `anime_series`, the
  one cluster that is the character (bound by identity distance to the row's reference
  images, or to the dominant look of its web posts), its figures as posts of a site
  named `anime:<series>`; `cleaned_crops` cleans them with the web posts.
"""

import io
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from lora_factory.assets.index import character_index
from lora_factory.assets.metadata import counts_metadata, table_metadata
from lora_factory.assets.scraping import MatchedTagsFiles, matched_tags
from lora_factory.assets.stage import AssetFiles, Stage, UpstreamError, character_asset, partitioned_asset
from lora_factory.engines import VISION_ON_GPU
from lora_factory.partitions import series_partitions
from lora_factory.provenance import fingerprint, frame_hash
from lora_factory.reporting import contact_sheet_png, markdown_image
from lora_factory.resources import AnimeSeries, CharacterIndex, FactoryStorage, VisionModelsResource
from lora_factory.storage import atomic_write_json, cached_sha256, read_json, read_table, write_table

FIGURE_TABLE_COLUMNS = [
    "episode", "frame_index", "time", "person_index", "person_box", "person_score", "upper_box",
    "head_box", "anime_class", "monochrome_score", "person_phash", "context_sha256",
]  # fmt: skip
CONTEXT_JPEG_QUALITY = 95  # episode frames are lossy already; PNG would be ~8x bigger
SHEETS_SHOWN = 8  # contact sheets of the largest clusters in the metadata
SHEET_MEMBERS = 16


class SeriesFiguresFiles(AssetFiles):
    """series_figures' tables: figures (FIGURE_TABLE_COLUMNS, row i = vector i), one row per
    episode file, drops by reason; the identity vectors; per-episode results by content."""

    asset = "series_figures"

    def figures(self) -> pd.DataFrame:
        return self.read_table()

    def episodes(self) -> pd.DataFrame:
        return self.read_table("episodes")

    def vectors(self) -> np.ndarray:
        return np.load(self.verified(self.folder / "vectors.npy"))


class SeriesClustersFiles(AssetFiles):
    """series_clusters' tables: one row per cluster, and the cluster of every figure
    (row i = series_figures' figure i; -1 = noise)."""

    asset = "series_clusters"

    def clusters(self) -> pd.DataFrame:
        return self.read_table()

    def labels(self) -> np.ndarray:
        return self.read_table("labels")["cluster"].to_numpy()


class AnimePostsFiles(AssetFiles):
    """anime_posts' tables: the binding of each series (its evidence), and the posts."""

    asset = "anime_posts"

    def posts(self) -> pd.DataFrame:
        return self.read_table("posts")


class EpisodeSettings(dg.Config):
    """Keyframe selection and the figure checks (lora_factory.episodes)."""

    keyframe_mode: str = ""  # "": the anime_series resource's; "auto", "all" or "keyframes"
    min_interval_s: float = 0.5  # at most ~2 kept frames a second inside a shot
    min_crop_side: int = 64  # as cleaning's: smaller crops would be upscaled into blur
    require_one_face: bool = True


@partitioned_asset(
    series_partitions,
    gpu=VISION_ON_GPU,
    group_name="anime",
    code_version="1",
    description=(
        "Every figure in a series' episodes: keyframes that show something new (scene cuts, "
        "motion; near duplicates skipped), then the detectors, a one-face check and 3-stage "
        "crops as for web pictures, with an identity vector per figure and every drop counted "
        "by reason. Each episode file's result is kept by its content: adding an episode "
        "processes only it; truncated, corrupt, audio-only or unsupported files are "
        "quarantined with their reason."
    ),
)
def series_figures(
    context: dg.AssetExecutionContext,
    config: EpisodeSettings,
    storage: FactoryStorage,
    anime_series: AnimeSeries,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    stage_store = storage.store()
    videos = anime_series.videos(context.partition_key, stage_store)
    hash_cache = stage_store.root / "cache" / "file_sha256.json"
    contents = {video.stem: cached_sha256(video, hash_cache) for video in videos}
    mode = config.keyframe_mode or anime_series.keyframe_mode
    stage = Stage(
        context, storage, SeriesFiguresFiles, config,
        extra={"episodes": contents, "mode": mode, "models": vision_models.versions(storage.store())},
    )  # fmt: skip
    if stage.needs_build():
        built = _build_series_figures(stage, videos, contents, config, mode, vision_models, context.log.info)
        stage.finish(built["output_hash"], built["summary"], blobs=built["blobs"])
    files = stage.files
    figures, episodes, drops = files.figures(), files.episodes(), files.read_table("drops")
    sample = figures.drop_duplicates("person_phash").head(32)

    def sheet() -> str:
        images = list(stage.images(sample["context_sha256"]))
        labels = [f"{r.episode} {r.time:.1f}s" for r in sample.itertuples()]
        return markdown_image(contact_sheet_png(images, labels=labels, thumb=128, cols=8), "figures")

    return stage.result(
        {
            "dagster/row_count": len(figures),
            "episodes": table_metadata(episodes),
            "quarantined_episodes": int((episodes["status"] == "rejected").sum()),
            "damaged_episodes": int((episodes["status"] == "damaged").sum()),
            "frames_decoded": int(episodes["frames_decoded"].sum()),
            "frames_kept": int(episodes["frames_kept"].sum()),
            "drops_by_reason": counts_metadata(drops["reason"].value_counts().to_dict()),
            "figures_table": dg.MetadataValue.path(files.relative(files.table_path())),
        },
        pictures={"figures_sample": sheet} if len(sample) else {},
    )


def _build_series_figures(stage, videos, contents, config, mode, vision_models, log) -> dict:
    """Process the episodes whose content has no stored result yet; gather every episode."""
    from lora_factory.episodes.figures import FigureConfig, episode_result
    from lora_factory.episodes.keyframes import KeyframeConfig

    keyframes = KeyframeConfig(mode=mode, min_interval_s=config.min_interval_s)
    checks = FigureConfig(
        min_crop_side=config.min_crop_side, require_one_face=config.require_one_face, keep_context=True
    )
    settings = fingerprint(asdict(keyframes), asdict(checks))
    cache = stage.files.folder / "episodes"
    models = None
    tables, rows, vectors, drops, used = [], [], [], [], set()
    for number, video in enumerate(videos, start=1):
        entry = cache / f"{video.stem}-{contents[video.stem][:16]}-{settings[:8]}"
        used.add(entry.name)
        if not _episode_intact(entry, stage.store.blobs):
            models = models or vision_models.load(stage.store)
            log(f"episode {number}/{len(videos)} {video.name}: selecting keyframes and finding figures")
            row, table = episode_result(video, models, keyframes, checks)
            if table is None:
                _save_episode(entry, row, None, None, None)
            else:
                figures = table.figures.drop(columns="identity")
                figures["context_sha256"] = [stage.store.blobs.put(_jpeg(image)) for image in table.contexts]
                _save_episode(entry, row, figures[FIGURE_TABLE_COLUMNS], table.vectors, table.drops)
        else:
            log(f"episode {number}/{len(videos)} {video.name}: unchanged, reusing its figures")
        row = read_json(entry / "episode.json")
        rows.append({**row, "file": video.name, "sha256": contents[video.stem][:10]})
        if (entry / "figures.parquet").is_file():
            drops.append(read_table(entry / "drops.parquet"))
            figures = read_table(entry / "figures.parquet")
            if len(figures):  # row i of the figures is vector i
                tables.append(figures)
                vectors.append(np.load(entry / "vectors.npy"))
        if row["status"] != "ok":
            log(f"episode {video.name}: {row['status']} ({row['reason']}: {row['detail']})")
    for stale in (p for p in cache.glob("*") if p.name not in used):
        shutil.rmtree(stale, ignore_errors=True)  # a replaced or removed episode's result
    figures = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=FIGURE_TABLE_COLUMNS)
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    episodes = pd.DataFrame(rows)
    write_table(figures, stage.files.table_path())
    write_table(episodes, stage.files.table_path("episodes"))
    write_table(pd.concat(drops, ignore_index=True) if drops else pd.DataFrame(columns=["reason"]),
                stage.files.table_path("drops"))  # fmt: skip
    np.save(stage.files.folder / "vectors.npy", matrix)
    return {
        "output_hash": frame_hash(figures, ["episode", "frame_index", "person_index", "context_sha256"]),
        "summary": {"figures": len(figures), "episodes": len(episodes)},
        "blobs": figures["context_sha256"],
    }


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=CONTEXT_JPEG_QUALITY)
    return buffer.getvalue()


def _episode_intact(entry: Path, blobs) -> bool:
    """A stored episode result is reused only when complete and its pictures are all there."""
    if not (entry / "episode.json").is_file():
        return False
    if not (entry / "figures.parquet").is_file():
        return read_json(entry / "episode.json")["status"] == "rejected"
    try:
        figures = read_table(entry / "figures.parquet")
        count = len(np.load(entry / "vectors.npy"))
    except (OSError, ValueError):
        return False
    return count == len(figures) and all(blobs.has(sha) for sha in figures["context_sha256"])


def _save_episode(entry: Path, row: dict, figures, vectors, drops) -> None:
    """Write one episode's result next to `entry` and rename it in: never half there."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        if figures is not None:
            write_table(figures, staging / "figures.parquet")
            np.save(staging / "vectors.npy", vectors)
            write_table(drops, staging / "drops.parquet")
        atomic_write_json(staging / "episode.json", row)
        shutil.rmtree(entry, ignore_errors=True)
        staging.replace(entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ClusterSettings(dg.Config):
    """HDBSCAN over the identity model's differences (lora_factory.episodes.clusters)."""

    min_cluster_size: int = 5
    min_samples: int = 3


@partitioned_asset(
    series_partitions,
    group_name="anime",
    code_version="1",
    deps=[series_figures],
    description=(
        "The series' figures grouped by identity across all its episodes: HDBSCAN on the "
        "identity model's differences (figures seen once or half out of frame stay noise), "
        "clusters closer than half the same-character threshold merged (one character in "
        "several outfits); per cluster its size, episodes, purity (share of members within "
        "the threshold of the medoid) and a contact sheet."
    ),
)
def series_clusters(
    context: dg.AssetExecutionContext,
    config: ClusterSettings,
    storage: FactoryStorage,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    stage = Stage(
        context, storage, SeriesClustersFiles, config, reads=(SeriesFiguresFiles,),
        extra={"identity_model": vision_models.versions(storage.store(), ("identity",))},
    )  # fmt: skip
    figures_files = stage.read(SeriesFiguresFiles)
    figures = figures_files.figures()
    if stage.needs_build():
        from lora_factory.episodes.clusters import ClusterConfig, cluster_identities

        vectors = figures_files.vectors()
        if len(figures) < config.min_cluster_size:
            raise ValueError(
                f"series {stage.key!r} has {len(figures)} figures, fewer than min_cluster_size "
                f"{config.min_cluster_size}: add episodes (see series_figures' drops by reason)"
            )
        identity = vision_models.load_identity(stage.store)
        clusters = cluster_identities(
            vectors, identity, ClusterConfig(min_cluster_size=config.min_cluster_size, min_samples=config.min_samples)
        )
        table = clusters.table.copy()
        table["episodes"] = [
            int(figures.loc[clusters.members(c), "episode"].nunique()) for c in table["cluster"]
        ]
        write_table(table, stage.files.table_path())
        write_table(pd.DataFrame({"cluster": clusters.labels}), stage.files.table_path("labels"))
        stage.finish(frame_hash(table), {"clusters": len(table), "noise": int((clusters.labels < 0).sum())})
    table, labels = stage.files.clusters(), stage.files.labels()

    def sheets() -> str:
        parts = []
        for row in table.sort_values("size", ascending=False).head(SHEETS_SHOWN).itertuples():
            members = figures[labels == row.cluster].head(SHEET_MEMBERS)
            images = list(stage.images(members["context_sha256"]))
            png = contact_sheet_png(images, labels=[f"{r.episode} {r.time:.1f}s" for r in members.itertuples()])
            parts.append(f"**cluster {row.cluster}**: {row.size} figures, purity {row.purity:.2f}\n\n"
                         + markdown_image(png, f"cluster {row.cluster}"))  # fmt: skip
        return "\n\n".join(parts)

    return stage.result(
        {
            "dagster/row_count": len(table),
            "clusters": table_metadata(table.drop(columns="medoid")),
            "noise_figures": int((labels < 0).sum()),
            "clustered_figures": int((labels >= 0).sum()),
        },
        pictures={"cluster_sheets": sheets} if len(table) else {},
    )


@character_asset(
    gpu=VISION_ON_GPU,
    group_name="dataset",
    code_version="1",
    deps=[
        matched_tags,
        character_index,
        dg.AssetDep(series_figures, partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep(series_clusters, partition_mapping=dg.AllPartitionMapping()),
    ],
    description=(
        "The character's figures from the anime series of its index row (`anime_series`): in "
        "each series, the one identity cluster that matches the row's reference images (or "
        "the dominant look of its web posts) by identity distance, with the evidence; a clear "
        "error when no cluster matches or two do. Its figures become posts of the site "
        "`anime:<series>`, cleaned with the web posts. Empty for a row without series."
    ),
)
def anime_posts(
    context: dg.AssetExecutionContext,
    storage: FactoryStorage,
    character_index: CharacterIndex,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    row = character_index.row(context.partition_key)
    store = storage.store()
    series = {name: (SeriesFiguresFiles(store, name), SeriesClustersFiles(store, name)) for name in row.anime_series}
    try:
        versions = {name: [f.data_version for f in files] for name, files in series.items()}
    except UpstreamError as error:
        raise UpstreamError(f"{error} (run series_job for that series first)") from error
    references = character_index.reference_paths(row)
    stage = Stage(
        context, storage, AnimePostsFiles, reads=(MatchedTagsFiles,),
        extra={"series": versions, "identity_model": vision_models.versions(storage.store(), ("identity",)),
               "reference_images": [str(p) for p in references]},
    )  # fmt: skip
    if stage.needs_build():
        bindings, posts = [], []
        if series:
            identity = vision_models.load_identity(stage.store)
            wanted = _reference_vectors(stage, references, identity)
            for name, (figures_files, clusters_files) in series.items():
                binding, rows = _bind(name, figures_files, clusters_files, wanted, identity)
                bindings.append(binding)
                posts.append(rows)
        binding_table = pd.DataFrame(bindings, columns=["series", "cluster", "agreement", "figures", "evidence"])
        post_table = pd.concat(posts, ignore_index=True) if posts else pd.DataFrame(columns=POST_COLUMNS)
        write_table(binding_table, stage.files.table_path())
        write_table(post_table, stage.files.table_path("posts"))
        stage.finish(frame_hash(post_table, ["site", "post_id", "sha256"]), {"posts": len(post_table)},
                     blobs=post_table["sha256"])  # fmt: skip
    bindings, posts = stage.files.read_table(), stage.files.posts()
    return stage.result(
        {
            "dagster/row_count": len(posts),
            "anime_series": ", ".join(row.anime_series) or "none in the index row",
            "bindings": table_metadata(bindings.drop(columns="evidence")),
            "binding_evidence": dg.MetadataValue.md(
                "\n\n".join(f"**{b.series}**\n\n{_evidence_markdown(b.evidence)}" for b in bindings.itertuples())
                or "no series"
            ),
        }
    )


POST_COLUMNS = ["site", "post_id", "sha256", "candidate_tag", "episode", "time"]


def _reference_vectors(stage: Stage, references: list[Path], identity) -> np.ndarray:
    """The character's look: its reference images, else the dominant look of its web posts."""
    from lora_factory.matching.visual import dominant_reference, embed_reference_images, manifest_sampler

    if references:
        return embed_reference_images(references, identity.embed, stage.key)
    web = stage.read(MatchedTagsFiles).posts()
    sample = manifest_sampler(web, stage.store.blobs.get, identity.embed)
    pairs = web[["site", "candidate_tag"]].drop_duplicates().itertuples(index=False)
    vectors = [v for v in (sample(site, tag) for site, tag in pairs) if len(v)]
    look = dominant_reference(np.concatenate(vectors), identity) if vectors else np.zeros((0, 0))
    if not len(look):
        raise ValueError(
            f"{stage.key}: nothing to tell which anime figures are this character: give the index row "
            "reference_images, or let it find solo web posts first"
        )
    return look


def _bind(name: str, figures_files: SeriesFiguresFiles, clusters_files: SeriesClustersFiles, references, identity):
    from lora_factory.episodes.clusters import BindingError, IdentityClusters, bind_cluster

    figures = figures_files.figures()
    clusters = IdentityClusters.from_labels(
        clusters_files.labels(), figures_files.vectors(), identity.difference, identity.threshold
    )
    try:
        binding = bind_cluster(references, clusters)
    except BindingError as error:
        raise ValueError(
            f"anime series {name!r}: {error}\n{error.evidence.to_string(index=False)}\n"
            "Give the index row reference_images of the character, or remove the series from its anime_series."
        ) from error
    members = figures.iloc[clusters.members(binding.cluster)]
    rows = pd.DataFrame({
        "site": f"anime:{name}",
        "post_id": [f"{r.episode}@{r.time:.3f}#{r.person_index}" for r in members.itertuples()],
        "sha256": members["context_sha256"].to_numpy(),
        "candidate_tag": name,
        "episode": members["episode"].to_numpy(),
        "time": members["time"].to_numpy(),
    })  # fmt: skip
    summary = {"series": name, "cluster": binding.cluster, "agreement": round(binding.agreement, 3),
               "figures": len(rows), "evidence": binding.evidence.to_json(orient="records")}  # fmt: skip
    return summary, rows.drop_duplicates("sha256", ignore_index=True)


def _evidence_markdown(evidence_json: str) -> str:
    evidence = pd.DataFrame(json.loads(evidence_json))
    header = "| cluster | size | agreement | median difference | matches |\n|---:|---:|---:|---:|---|"
    lines = [
        f"| {r.cluster} | {r.size} | {r.agreement:.0%} | {r.median_difference:.3f} | {'yes' if r.matches else ''} |"
        for r in evidence.itertuples()
    ]
    return "\n".join([header, *lines])
