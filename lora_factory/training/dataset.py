"""The training set: images in aspect-ratio buckets, captions, repeats, and a batch order
that is a pure function of (seed, epoch) so that runs are reproducible and resumable.

Batches never mix buckets (every image of a batch has the same size, like kohya's aspect
ratio bucketing). Caption shuffling keeps the first `keep_tokens` tags in place (the
trigger word stays first) and, like every other random choice here, is seeded by the
position in the run, not by a global random state.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class TrainingExample:
    image_path: Path
    caption: str  # comma-separated tags, trigger word first
    # (width, height): multiples of 8 (the VAE); training checks that the UNet takes them too
    bucket: tuple[int, int]
    repeats: int = 1

    def __post_init__(self) -> None:
        width, height = self.bucket
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise ValueError(f"{self.image_path}: bucket {self.bucket} must be positive multiples of 8")
        if self.repeats < 1:
            raise ValueError(f"{self.image_path}: repeats must be >= 1, got {self.repeats}")


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler asks the dataset for: a batch's slots, and where it is in the run."""

    epoch: int
    number: int  # position of the batch in its epoch
    slots: tuple[int, ...]  # indices into the repeated sample list


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle the tags after the first `keep_tokens` ones (kohya's shuffle_caption + keep_tokens)."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def drop_tags(caption: str, keep_tokens: int, rate: float, rng: random.Random) -> str:
    """Leave out each tag after the first `keep_tokens` ones with probability `rate`
    (kohya's caption_tag_dropout_rate)."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(kept + [tag for tag in rest if rng.random() >= rate])


def load_bucket_image(path: Path, bucket: tuple[int, int]) -> Image.Image:
    """The image as RGB at exactly `bucket` size.

    The bucketing stage already stored images at their bucket size; if one is not (a
    changed bucket, a hand-edited file), resize to cover and centre-crop as bucketing does,
    rather than stretch it.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.size != tuple(bucket):
        image = ImageOps.fit(image, bucket, method=Image.Resampling.LANCZOS)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BucketBatchSampler(Sampler[BatchRequest]):
    """Batches of one bucket each, reshuffled every epoch from (seed, epoch) alone.

    Within a bucket the samples are shuffled and cut into batches (the last one may be
    smaller); then the batches of all buckets are shuffled together. Stateful: it remembers
    how many batches of the current epoch it handed out, so that a run resumed from a
    mid-epoch checkpoint continues with the next batch instead of replaying the epoch.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int):
        if not buckets:
            raise ValueError("the training set is empty: no samples to batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._skip = 0  # batches already consumed in `epoch` before a resume
        self._handed_out = 0
        self._slots_by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for slot, bucket in enumerate(buckets):
            self._slots_by_bucket[tuple(bucket)].append(slot)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def batches(self, epoch: int) -> list[tuple[int, ...]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for bucket in sorted(self._slots_by_bucket):
            slots = list(self._slots_by_bucket[bucket])
            rng.shuffle(slots)
            batches += [tuple(slots[i : i + self.batch_size]) for i in range(0, len(slots), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return sum(math.ceil(len(slots) / self.batch_size) for slots in self._slots_by_bucket.values())

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        self._handed_out = skip
        for number, slots in enumerate(self.batches(epoch)):
            if number < skip:
                continue
            self._handed_out = number + 1
            yield BatchRequest(epoch=epoch, number=number, slots=slots)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "handed_out": self._handed_out}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self._skip = state["handed_out"]


class CaptionedLatentDataset(Dataset):
    """Samples (examples x repeats); each batch request returns example ids, flips and captions.

    Pixels are not returned: the training module encodes each (example, flip) once with the
    VAE and reuses the cached latents, so a batch only needs to say which ones it wants.
    """

    def __init__(
        self,
        examples: list[TrainingExample],
        seed: int = 0,
        caption_shuffle: bool = True,
        keep_tokens: int = 1,
        caption_dropout: float = 0.0,
        caption_tag_dropout: float = 0.0,
        flip: bool = False,
    ):
        if not examples:
            raise ValueError("no training examples: the bucketing stage produced an empty dataset")
        missing = [str(example.image_path) for example in examples if not Path(example.image_path).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} training images are missing, e.g. {missing[:3]}")
        self.examples = list(examples)
        self.seed = seed
        self.caption_shuffle = caption_shuffle
        self.keep_tokens = keep_tokens
        self.caption_dropout = caption_dropout
        self.caption_tag_dropout = caption_tag_dropout
        self.flip = flip
        self.sample_examples = [index for index, example in enumerate(examples) for _ in range(example.repeats)]

    def __len__(self) -> int:
        return len(self.sample_examples)

    @property
    def sample_buckets(self) -> list[tuple[int, int]]:
        return [self.examples[index].bucket for index in self.sample_examples]

    def batch_sampler(self, batch_size: int) -> BucketBatchSampler:
        return BucketBatchSampler(self.sample_buckets, batch_size, self.seed)

    def flip_variants(self) -> tuple[bool, ...]:
        return (False, True) if self.flip else (False,)

    def load_pixels(self, example_index: int, flip: bool = False) -> torch.Tensor:
        example = self.examples[example_index]
        image = load_bucket_image(Path(example.image_path), example.bucket)
        if flip:
            image = ImageOps.mirror(image)
        return image_to_tensor(image)

    def __getitem__(self, request: BatchRequest) -> dict:
        example_ids, flips, captions = [], [], []
        for position, slot in enumerate(request.slots):
            # One generator per sample, keyed by its place in the run: reproducible and
            # independent of how many random numbers anything else drew.
            rng = random.Random(f"{self.seed}:{request.epoch}:{request.number}:{position}")
            example_index = self.sample_examples[slot]
            caption = self.examples[example_index].caption
            if self.caption_shuffle:
                caption = shuffle_caption(caption, self.keep_tokens, rng)
            if self.caption_tag_dropout:
                caption = drop_tags(caption, self.keep_tokens, self.caption_tag_dropout, rng)
            if self.caption_dropout and rng.random() < self.caption_dropout:
                caption = ""
            example_ids.append(example_index)
            flips.append(self.flip and rng.random() < 0.5)
            captions.append(caption)
        return {"example_ids": example_ids, "flips": flips, "captions": captions}


class BucketDataLoader(DataLoader):
    """A DataLoader whose batch order can be saved and restored with a training checkpoint.

    Lightning stores `state_dict()` of loaders that have one and gives it back before the
    first batch of a resumed run; the state is the bucket sampler's.
    """

    def __init__(self, dataset: CaptionedLatentDataset, batch_size: int):
        # The sampler yields whole batch requests and the dataset answers each with a batch,
        # so automatic batching is off (batch_size=None) and no collation is needed.
        super().__init__(
            dataset, sampler=dataset.batch_sampler(batch_size), batch_size=None, collate_fn=_as_is, num_workers=0
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _as_is(batch: dict) -> dict:
    return batch

