"""The cleaning chain for one character: scraped posts -> identity-checked 3-stage crops.

Order (CyberHarem's): decode (cap the area, RGB on white; quarantine what
cannot be decoded) -> drop pictures below `min_side` -> drop monochrome -> keep
illustration/anime-screencap classes -> optional rating filter -> exact and
near-duplicate removal -> split per person -> minimum person size -> exactly one face
-> identity filter (dominant cluster) -> dedup again (person crops) -> 3-stage crops ->
minimum crop size -> crops saved as PNG blobs -> identity vectors of the crops to the
embedding store.

Memory stays flat whatever the number of posts: the first pass streams the posts in
batches and keeps only small per-person records (a box, a hash, one identity vector);
the identity filter works on those vectors; the second pass decodes the surviving
pictures again, batch by batch, to cut and store the crops. Every dropped picture or
person leaves one row in `drops` (stage, reason, detail) and every undecodable one a
row in `quarantine`, so nothing disappears without a count.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from lora_factory.cleaning.crops import CROP_KINDS, Crop, clip_box, three_stage_crops
from lora_factory.cleaning.decode import (
    DEFAULT_MAX_AREA,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    decode_image,
)
from lora_factory.cleaning.dedup import (
    DEFAULT_MAX_DISTANCE,
    NearDuplicateIndex,
    near_duplicate_representatives,
    perceptual_hash,
)
from lora_factory.cleaning.identity_filter import (
    DEFAULT_MIN_AGREEMENT,
    agreement_with_anchor,
    dominant_identity_cluster,
)
from lora_factory.storage import BlobStore, DamagedFileError

if TYPE_CHECKING:  # ONNX Runtime and LanceDB are slow to import: only the types are needed
    from lora_factory.cleaning.embeddings import EmbeddingStore
    from lora_factory.vision.models import VisionModels

# The aesthetic classifier's labels from worst to best; the score is the expected rank
# scaled to 0..1, so it orders crops even when the top label is the same.
AESTHETIC_LABELS = ("worst", "low", "normal", "good", "great", "best", "masterpiece")

CROP_COLUMNS = [
    "crop_sha256", "source_sha256", "site", "post_id", "kind", "x0", "y0", "x1", "y1",
    "width", "height", "person_index", "monochrome_score", "illustration_score",
    "anime_class", "aesthetic_label", "aesthetic_score", "identity_cluster",
    "identity_agreement", "embedding_row",
]
DROP_COLUMNS = ["source_sha256", "site", "post_id", "person_index", "stage", "reason", "detail"]
QUARANTINE_COLUMNS = ["source_sha256", "site", "post_id", "reason", "detail"]
SOURCE_LEVEL = -1  # person_index of a drop that concerns the whole picture


@dataclass(frozen=True)
class CleaningConfig:
    """Every threshold of the chain, defaulted for real booru data."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # quarantine pictures declaring more pixels
    max_area: int = DEFAULT_MAX_AREA  # scale bigger pictures down to this area
    monochrome_threshold: float = 0.5  # drop when P(monochrome) reaches this
    keep_classes: tuple[str, ...] = ("illustration", "bangumi")  # drop comic and 3d
    allowed_ratings: tuple[str, ...] | None = None  # e.g. ("safe", "r15"); None keeps all
    phash_max_distance: int = DEFAULT_MAX_DISTANCE  # near duplicates among pictures
    # ... among person crops (the same figure cut from different posts); None: off.
    person_phash_max_distance: int | None = DEFAULT_MAX_DISTANCE
    # Shorter side of the decoded picture: below 128 px no crop of it is worth training
    # on (and the models see mostly upscaling blur).
    min_side: int = 128
    require_one_face: bool = True
    identity_filter: bool = True  # off: purity is still measured, nobody is dropped
    identity_threshold: float | None = None  # None: the identity model's own threshold
    identity_min_agreement: float = DEFAULT_MIN_AGREEMENT
    # Above this many persons the dominant cluster is found on a fixed-seed sample and
    # everyone votes against its anchor: an [N, N] difference matrix would not fit.
    identity_reference_size: int = 1500
    # Shorter side of a person box and of every crop: 64 px is one 64-px step of an SD
    # bucket; smaller crops would be upscaled into blur. Production runs on real boorus
    # may raise it to ~320 (CyberHarem's person minimum).
    min_crop_side: int = 64
    batch_size: int = 16
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.log_every < 1:
            raise ValueError("batch_size and log_every must be at least 1")
        if self.min_side < 1 or self.min_crop_side < 1:
            raise ValueError("min_side and min_crop_side must be at least 1 pixel")
        if self.person_phash_max_distance is not None and self.person_phash_max_distance < 0:
            raise ValueError("person_phash_max_distance must be >= 0, or None to switch it off")
        if not self.keep_classes:
            raise ValueError("keep_classes is empty: every picture would be dropped")


@dataclass
class CleaningResult:
    crops: pd.DataFrame  # CROP_COLUMNS, one row per stored crop
    quarantine: pd.DataFrame  # QUARANTINE_COLUMNS, pictures that could not be decoded
    drops: pd.DataFrame  # DROP_COLUMNS, one row per dropped picture or person
    purity: float  # share of the face-checked persons in the dominant identity cluster
    embeddings: np.ndarray  # [len(crops), D] float32, row i = crops.embedding_row == i
    counts: dict[str, int] = field(default_factory=dict)  # posts/persons/crops + every reason
    identity_cluster_sizes: list[int] = field(default_factory=list)


@dataclass
class _Source:
    sha256: str
    site: str
    post_id: Any
    monochrome_score: float
    illustration_score: float
    anime_class: str


@dataclass
class _Person:
    source: _Source
    index: int
    box: tuple[int, int, int, int]  # in the decoded picture's pixels
    phash: int
    vector: np.ndarray  # identity of the person crop (= the full crop)
    alive: bool = True
    cluster: int = 0
    agreement: float = 1.0

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class _Ledger:
    """Collects drops and quarantines, and counts them by reason."""

    def __init__(self) -> None:
        self.drops: list[dict] = []
        self.quarantine: list[dict] = []
        self.counts: Counter[str] = Counter()

    def drop(self, source: _Source | dict, stage: str, reason: str, detail: str = "",
             person_index: int = SOURCE_LEVEL) -> None:
        sha, site, post_id = _identity_of(source)
        self.drops.append(
            {"source_sha256": sha, "site": site, "post_id": post_id, "person_index": person_index,
             "stage": stage, "reason": reason, "detail": detail}
        )
        self.counts[reason] += 1

    def quarantined(self, post: dict, reason: str, detail: str) -> None:
        sha, site, post_id = _identity_of(post)
        self.quarantine.append(
            {"source_sha256": sha, "site": site, "post_id": post_id, "reason": reason, "detail": detail}
        )
        self.counts[f"quarantined_{reason}"] += 1


def _identity_of(item: _Source | dict) -> tuple[str, str, Any]:
    if isinstance(item, _Source):
        return item.sha256, item.site, item.post_id
    return str(item["sha256"]), str(item["site"]), item["post_id"]


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def top_label(probabilities: dict[str, float]) -> tuple[str, float]:
    label = max(probabilities, key=probabilities.get)
    return label, float(probabilities[label])


def aesthetic_score(probabilities: dict[str, float]) -> float:
    """Expected quality rank scaled to 0 (worst) .. 1 (masterpiece)."""
    total = sum(probabilities.get(label, 0.0) for label in AESTHETIC_LABELS)
    if total <= 0:
        raise ValueError(f"aesthetic classifier labels {sorted(probabilities)} are not {AESTHETIC_LABELS}")
    expected = sum(rank * probabilities.get(label, 0.0) for rank, label in enumerate(AESTHETIC_LABELS))
    return expected / total / (len(AESTHETIC_LABELS) - 1)


def encode_png(image: Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes (same pixels -> same sha256)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def clean_character(
    character: str,
    posts: pd.DataFrame,
    blobs: BlobStore,
    models: VisionModels,
    config: CleaningConfig = CleaningConfig(),
    embeddings: EmbeddingStore | None = None,
    log: Callable[[str], None] = print,
) -> CleaningResult:
    """Run the cleaning chain over `posts` (columns sha256, site, post_id, ...).

    Crops go to `blobs` as PNG; their identity vectors replace the character's rows in
    `embeddings` when given.
    """
    missing = {"sha256", "site", "post_id"} - set(posts.columns)
    if missing:
        raise ValueError(f"posts needs columns sha256, site, post_id; missing {sorted(missing)}")
    ledger = _Ledger()
    records = posts.to_dict("records")
    persons = _first_pass(character, records, blobs, models, config, ledger, log)
    purity, cluster_sizes = _identity_step(persons, models, config, ledger)
    _second_dedup(persons, config, ledger)
    crops, vectors = _second_pass(character, persons, blobs, models, config, ledger, log)

    if embeddings is not None:
        embeddings.replace_character(
            character,
            pd.DataFrame(
                {"crop_sha256": crops["crop_sha256"], "kind": crops["kind"], "vector": list(vectors)}
            ),
        )
    counts = {
        "posts": len(records),
        "persons_found": len(persons),
        "persons_kept": sum(p.alive for p in persons),
        "crops": len(crops),
        **{f"crops_{kind}": int((crops["kind"] == kind).sum()) for kind in CROP_KINDS},
        **dict(ledger.counts),
    }
    log(
        f"[{character}] cleaned {len(records)} posts: {counts['persons_kept']} persons, "
        f"{len(crops)} crops, identity purity {purity:.2f}; "
        f"dropped {dict(sorted(ledger.counts.items()))}"
    )
    return CleaningResult(
        crops=crops,
        quarantine=pd.DataFrame(ledger.quarantine, columns=QUARANTINE_COLUMNS),
        drops=pd.DataFrame(ledger.drops, columns=DROP_COLUMNS),
        purity=purity,
        embeddings=vectors,
        counts=counts,
        identity_cluster_sizes=cluster_sizes,
    )


def _decode_batch(
    batch: Sequence[dict], blobs: BlobStore, config: CleaningConfig, ledger: _Ledger, seen: set[str]
) -> list[tuple[dict, DecodedImage]]:
    """Exact duplicates, missing blobs and undecodable files out; small pictures dropped."""
    decoded = []
    for post in batch:
        sha = str(post["sha256"])
        if sha in seen:
            ledger.drop(post, "dedup", "exact_duplicate", "same file as an earlier post")
            continue
        seen.add(sha)
        try:
            data = blobs.get(sha)
        except DamagedFileError as error:
            ledger.quarantined(post, "missing_blob", f"{error} (the next scrape downloads it again)")
            continue
        result = decode_image(data, max_pixels=config.max_pixels, max_area=config.max_area)
        if not isinstance(result, DecodedImage):
            ledger.quarantined(post, result.reason, result.detail)
        elif min(result.size) < config.min_side:
            width, height = result.size
            ledger.drop(post, "filter", "too_small", f"{width}x{height} < {config.min_side} px")
        else:
            decoded.append((post, result))
    return decoded


def _classify(
    decoded: list[tuple[dict, DecodedImage]], models: VisionModels, config: CleaningConfig, ledger: _Ledger
) -> list[tuple[_Source, Image.Image]]:
    """Monochrome, class and rating filters; the pictures that pass, as _Source."""
    if not decoded:
        return []
    images = [item.image for _, item in decoded]
    monochrome = models.monochrome.predict(images)
    classes = models.classification.predict(images)
    ratings = models.rating.predict(images) if config.allowed_ratings is not None else [None] * len(images)
    kept = []
    for (post, item), mono, cls, rating in zip(decoded, monochrome, classes, ratings, strict=True):
        anime_class, class_probability = top_label(cls)
        source = _Source(str(post["sha256"]), str(post["site"]), post["post_id"],
                         float(mono.get("monochrome", 0.0)), float(cls.get("illustration", 0.0)), anime_class)
        if source.monochrome_score >= config.monochrome_threshold:
            ledger.drop(source, "filter", "monochrome", f"p={source.monochrome_score:.2f}")
        elif anime_class not in config.keep_classes:
            ledger.drop(source, "filter", f"class_{anime_class}", f"p={class_probability:.2f}")
        elif rating is not None and top_label(rating)[0] not in config.allowed_ratings:
            label, probability = top_label(rating)
            ledger.drop(source, "filter", f"rating_{label}", f"p={probability:.2f}")
        else:
            kept.append((source, item.image))
    return kept


def _first_pass(
    character: str,
    records: list[dict],
    blobs: BlobStore,
    models: VisionModels,
    config: CleaningConfig,
    ledger: _Ledger,
    log: Callable[[str], None],
) -> list[_Person]:
    seen: set[str] = set()
    duplicates = NearDuplicateIndex(config.phash_max_distance)
    persons: list[_Person] = []
    persons_of: dict[str, list[_Person]] = {}
    done = 0
    for batch in _batches(records, config.batch_size):
        decoded = _decode_batch(batch, blobs, config, ledger, seen)
        pictures, superseded = [], []
        for source, image in _classify(decoded, models, config, ledger):
            verdict = duplicates.add(source.sha256, perceptual_hash(image), image.width * image.height)
            if verdict.kept:
                pictures.append((source, image))
                superseded += [(str(replaced), source.sha256) for replaced in verdict.replaced]
            else:
                ledger.drop(source, "dedup", "near_duplicate", f"of {verdict.duplicate_of}")
        for person in _split_persons(pictures, models, config, ledger):
            persons.append(person)
            persons_of.setdefault(person.source.sha256, []).append(person)
        # A larger copy arrived (in this batch or a later one): the earlier one goes,
        # unless the larger copy gave no usable person (then the person-level dedup
        # is what still catches a third copy).
        for replaced, larger in superseded:
            if larger not in persons_of:
                continue
            earlier = [p for p in persons_of.pop(replaced, []) if p.alive]
            for person in earlier:
                person.alive = False
            if earlier:  # without live persons it was already dropped for another reason
                ledger.drop(earlier[0].source, "dedup", "near_duplicate", f"of {larger} (larger)")
        for source, _ in pictures:
            if source.sha256 not in persons_of:  # no usable person: let a copy stand in
                duplicates.remove(source.sha256)
        done += len(batch)
        if done % config.log_every < len(batch) or done == len(records):
            log(f"[{character}] first pass {done}/{len(records)} posts, "
                f"{sum(p.alive for p in persons)} persons so far")
    return persons


def _split_persons(
    pictures: list[tuple[_Source, Image.Image]], models: VisionModels, config: CleaningConfig, ledger: _Ledger
) -> list[_Person]:
    """Person boxes -> minimum size -> exactly one face -> identity vector and hash."""
    if not pictures:
        return []
    candidates: list[tuple[_Source, int, tuple[int, int, int, int]]] = []
    crops: list[Image.Image] = []
    for (source, image), found in zip(pictures, models.person.detect([i for _, i in pictures]), strict=True):
        if not found:
            ledger.drop(source, "person", "no_person", "the person detector found nobody")
        for index, detection in enumerate(found):
            box = clip_box(detection.box, image.size)
            side = min(box[2] - box[0], box[3] - box[1])
            if side < config.min_crop_side:
                ledger.drop(source, "person", "person_too_small",
                            f"{side} px < {config.min_crop_side}", index)
                continue
            candidates.append((source, index, box))
            crops.append(image.crop(box))
    if config.require_one_face and candidates:
        kept = []
        for candidate, crop, faces in zip(candidates, crops, models.face.detect(crops), strict=True):
            if len(faces) == 1:
                kept.append((candidate, crop))
            else:
                source, index, _ = candidate
                reason = "no_face" if not faces else "multiple_faces"
                ledger.drop(source, "person", reason, f"{len(faces)} faces", index)
        candidates, crops = [c for c, _ in kept], [crop for _, crop in kept]
    if not candidates:
        return []
    vectors = np.asarray(models.identity.embed(crops), dtype=np.float32)
    return [
        _Person(source=source, index=index, box=box, phash=perceptual_hash(crop), vector=vector)
        for (source, index, box), crop, vector in zip(candidates, crops, vectors, strict=True)
    ]


def shifted_box(box: Sequence[float], origin: tuple[int, int, int, int]) -> tuple[float, ...]:
    """A box found in a person crop, in the whole picture's pixels."""
    return (box[0] + origin[0], box[1] + origin[1], box[2] + origin[0], box[3] + origin[1])


def _identity_step(
    persons: list[_Person], models: VisionModels, config: CleaningConfig, ledger: _Ledger
) -> tuple[float, list[int]]:
    """Cluster the persons' identity vectors; drop those outside the dominant cluster.

    Returns (purity, cluster sizes, the kept cluster first)."""
    alive = [p for p in persons if p.alive]
    if not alive:
        return 0.0, []
    threshold = config.identity_threshold
    if threshold is None:
        threshold = models.identity.threshold
    vectors = np.stack([p.vector for p in alive])
    difference = models.identity.difference
    if len(alive) <= config.identity_reference_size:
        result = dominant_identity_cluster(
            difference(vectors, vectors), threshold, config.identity_min_agreement
        )
        keep, agreement, labels, sizes = result.keep, result.agreement, result.labels, result.cluster_sizes
    else:
        # Cluster a fixed-seed sample, then let everyone vote against its anchor.
        rng = np.random.default_rng(config.seed)
        sample = vectors[np.sort(rng.choice(len(alive), config.identity_reference_size, replace=False))]
        result = dominant_identity_cluster(
            difference(sample, sample), threshold, config.identity_min_agreement
        )
        anchor = sample[result.anchor]
        chunks = np.array_split(vectors, max(1, len(vectors) // 512))
        agreement = np.concatenate(
            [agreement_with_anchor(difference(chunk, anchor), threshold) for chunk in chunks]
        )
        keep = agreement >= config.identity_min_agreement
        labels = np.where(keep, 0, 1)  # the rejected are not grouped further here
        sizes = [int(keep.sum()), int((~keep).sum())]
    for person, kept, share, label in zip(alive, keep, agreement, labels, strict=True):
        person.cluster, person.agreement = int(label), float(share)
        if not kept and config.identity_filter:
            person.alive = False
            ledger.drop(person.source, "identity", "identity_outlier",
                        f"agrees with {share:.0%} of the dominant cluster", person.index)
    return float(np.mean(keep)), sizes


def _second_dedup(persons: list[_Person], config: CleaningConfig, ledger: _Ledger) -> None:
    """Near-duplicate person crops (the same figure cut from different posts)."""
    alive = [p for p in persons if p.alive]
    if len(alive) < 2 or config.person_phash_max_distance is None:
        return
    representative = near_duplicate_representatives(
        [p.phash for p in alive], config.person_phash_max_distance, [p.area for p in alive]
    )
    for i, person in enumerate(alive):
        if representative[i] != i:
            person.alive = False
            kept = alive[representative[i]]
            ledger.drop(person.source, "dedup", "near_duplicate_person",
                        f"of {kept.source.sha256} person {kept.index}", person.index)


def _second_pass(
    character: str,
    persons: list[_Person],
    blobs: BlobStore,
    models: VisionModels,
    config: CleaningConfig,
    ledger: _Ledger,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, np.ndarray]:
    """Decode the surviving pictures again, cut 3-stage crops, store them, embed them.

    Half-body and head detection run here, on the survivors only: most persons of a
    noisy tag are dropped before, and detection is the costly model call.
    """
    by_source: dict[str, list[_Person]] = {}
    for person in persons:
        if person.alive:
            by_source.setdefault(person.source.sha256, []).append(person)
    rows: list[dict] = []
    vectors: list[np.ndarray] = []
    stored: set[str] = set()
    sources = list(by_source)
    for batch_number, batch in enumerate(_batches(sources, config.batch_size)):
        survivors, person_crops, pictures = [], [], {}
        for sha in batch:
            decoded = decode_image(blobs.get(sha), max_pixels=config.max_pixels, max_area=config.max_area)
            if not isinstance(decoded, DecodedImage):  # the first pass decoded it: the blob changed
                raise RuntimeError(f"blob {sha} no longer decodes ({decoded}); the blob store is corrupt")
            pictures[sha] = decoded.image
            for person in by_source[sha]:
                survivors.append(person)
                person_crops.append(decoded.image.crop(person.box))
        cut: list[tuple[_Person, Crop, Image.Image]] = []
        halfbodies = models.halfbody.detect(person_crops)
        heads = models.head.detect(person_crops)
        for person, halfbody, head in zip(survivors, halfbodies, heads, strict=True):
            image = pictures[person.source.sha256]
            candidates = three_stage_crops(image.size, person.box,
                                           [shifted_box(d.box, person.box) for d in halfbody],
                                           [shifted_box(d.box, person.box) for d in head])
            crops = [c for c in candidates if min(c.width, c.height) >= config.min_crop_side]
            ledger.counts["crop_too_small"] += len(candidates) - len(crops)
            if not crops:
                person.alive = False
                ledger.drop(person.source, "crop", "no_crops",
                            f"every crop is below {config.min_crop_side} px", person.index)
            cut += [(person, crop, image.crop(crop.box)) for crop in crops]
        new = []
        for person, crop, image in cut:
            crop_sha = blobs.put(encode_png(image))
            if crop_sha not in stored:  # two identical crops would count twice in training
                stored.add(crop_sha)
                new.append((person, crop, image, crop_sha))
        if not new:
            continue
        aesthetic = models.aesthetic.predict([image for _, _, image, _ in new])
        # The full crop is the person crop the identity vector was computed on.
        to_embed = [image for _, crop, image, _ in new if crop.kind != "full"]
        embedded = iter(np.asarray(models.identity.embed(to_embed), dtype=np.float32) if to_embed else [])
        for (person, crop, _, crop_sha), quality in zip(new, aesthetic, strict=True):
            label, _ = top_label(quality)
            vectors.append(person.vector if crop.kind == "full" else next(embedded))
            rows.append(
                {
                    "crop_sha256": crop_sha,
                    "source_sha256": person.source.sha256,
                    "site": person.source.site,
                    "post_id": person.source.post_id,
                    "kind": crop.kind,
                    "x0": crop.box[0], "y0": crop.box[1], "x1": crop.box[2], "y1": crop.box[3],
                    "width": crop.width,
                    "height": crop.height,
                    "person_index": person.index,
                    "monochrome_score": person.source.monochrome_score,
                    "illustration_score": person.source.illustration_score,
                    "anime_class": person.source.anime_class,
                    "aesthetic_label": label,
                    "aesthetic_score": aesthetic_score(quality),
                    "identity_cluster": person.cluster,
                    "identity_agreement": person.agreement,
                    "embedding_row": len(vectors) - 1,
                }
            )
        done = min(len(sources), (batch_number + 1) * config.batch_size)
        if done % config.log_every < config.batch_size or done == len(sources):
            log(f"[{character}] cropping {done}/{len(sources)} pictures, {len(rows)} crops")
    dimension = vectors[0].shape[0] if vectors else 0
    matrix = np.stack(vectors) if vectors else np.zeros((0, dimension), dtype=np.float32)
    return pd.DataFrame(rows, columns=CROP_COLUMNS), matrix
