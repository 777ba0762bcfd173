"""Training set, bucket batch order, caption handling and the dataset-size rules of the config."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from PIL import Image

from lora_factory.training.config import (
    TrainingConfig,
    epochs_for_dataset,
    rank_for_dataset,
    steps_for_dataset,
)
from lora_factory.training.dataset import (
    BucketBatchSampler,
    BucketDataLoader,
    CaptionedLatentDataset,
    TrainingExample,
    drop_tags,
    load_bucket_image,
    shuffle_caption,
)

BUCKETS = [(64, 64)] * 7 + [(128, 64)] * 5 + [(64, 192)] * 3


def test_bucket_sampler_never_mixes_buckets_and_covers_every_sample():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        requests = list(sampler)
        assert len(requests) == len(sampler) == 2 + 2 + 1
        for request in requests:
            assert len({BUCKETS[slot] for slot in request.slots}) == 1
            assert 1 <= len(request.slots) <= 4
        assert sorted(slot for request in requests for slot in request.slots) == list(range(len(BUCKETS)))


def test_bucket_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=seed)
        sampler.set_epoch(epoch)
        return [request.slots for request in sampler]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_sampler_state_resumes_mid_epoch():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=0)
    sampler.set_epoch(2)
    full = [request.slots for request in sampler]
    iterator = iter(sampler)
    first_two = [next(iterator).slots, next(iterator).slots]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "handed_out": 2}

    resumed = BucketBatchSampler(BUCKETS, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what Lightning does before the resumed epoch
    assert first_two + [request.slots for request in resumed] == full
    resumed.set_epoch(3)  # the next epoch starts from its first batch again
    assert len(list(resumed)) == len(full)


def test_caption_shuffle_keeps_the_trigger_first():
    caption = "surtr_(arknights), red_hair, sword, long_hair, smile, dress"
    seen = set()
    for seed in range(20):
        shuffled = shuffle_caption(caption, keep_tokens=1, rng=random.Random(seed))
        tags = shuffled.split(", ")
        assert tags[0] == "surtr_(arknights)"
        assert sorted(tags) == sorted(caption.split(", "))
        seen.add(shuffled)
    assert len(seen) > 1


def test_tag_dropout_keeps_the_trigger_and_drops_about_its_rate():
    caption = ", ".join(["kaede_sa"] + [f"tag{i}" for i in range(10)])
    kept = 0
    for seed in range(200):
        tags = drop_tags(caption, keep_tokens=1, rate=0.3, rng=random.Random(seed)).split(", ")
        assert tags[0] == "kaede_sa"
        assert tags[1:] == [tag for tag in caption.split(", ")[1:] if tag in tags]  # order kept
        kept += len(tags) - 1
    assert 0.6 < kept / 2000 < 0.8


def test_dataset_drops_tags_reproducibly(tmp_path):
    paths = _write_images(tmp_path, [(64, 64)])
    example = TrainingExample(paths[0], "trigger, a, b, c, d, e, f", (64, 64), repeats=8)

    def captions(dataset):
        return [caption for batch in BucketDataLoader(dataset, batch_size=4) for caption in batch["captions"]]

    dropped = captions(CaptionedLatentDataset([example], seed=3, caption_tag_dropout=0.5))
    assert dropped == captions(CaptionedLatentDataset([example], seed=3, caption_tag_dropout=0.5))
    assert all(caption.split(", ")[0] == "trigger" for caption in dropped)
    assert min(len(caption.split(", ")) for caption in dropped) < 7  # some tags left out
    assert all(len(caption.split(", ")) == 7 for caption in captions(CaptionedLatentDataset([example], seed=3)))


def _write_images(folder, sizes):
    paths = []
    for index, size in enumerate(sizes):
        path = folder / f"image{index}.png"
        Image.new("RGB", size, (index * 20, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_dataset_batches_repeats_and_deterministic_captions(tmp_path):
    paths = _write_images(tmp_path, [(64, 64), (64, 64), (128, 64)])
    examples = [
        TrainingExample(paths[0], "trigger, a, b, c", (64, 64), repeats=3),
        TrainingExample(paths[1], "trigger, d, e", (64, 64), repeats=1),
        TrainingExample(paths[2], "trigger, f", (128, 64), repeats=2),
    ]
    dataset = CaptionedLatentDataset(examples, seed=5, flip=True)
    assert len(dataset) == 6
    loader = BucketDataLoader(dataset, batch_size=2)
    batches = list(loader)
    assert Counter(i for batch in batches for i in batch["example_ids"]) == {0: 3, 1: 1, 2: 2}
    for batch in batches:
        assert len({examples[i].bucket for i in batch["example_ids"]}) == 1
        assert all(caption.startswith("trigger, ") for caption in batch["captions"])
    assert batches == list(BucketDataLoader(CaptionedLatentDataset(examples, seed=5, flip=True), batch_size=2))

    pixels = dataset.load_pixels(2, flip=True)
    assert pixels.shape == (3, 64, 128) and -1.0 <= pixels.min() and pixels.max() <= 1.0
    torch.testing.assert_close(pixels.flip(-1), dataset.load_pixels(2, flip=False))


def test_images_are_resized_to_their_bucket_defensively(tmp_path):
    (path,) = _write_images(tmp_path, [(300, 200)])
    assert load_bucket_image(path, (128, 64)).size == (128, 64)


def test_bad_examples_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="multiples of 8"):
        TrainingExample(tmp_path / "a.png", "x", (100, 64))
    with pytest.raises(FileNotFoundError, match="missing"):
        CaptionedLatentDataset([TrainingExample(tmp_path / "gone.png", "x", (64, 64))])
    with pytest.raises(ValueError, match="empty"):
        CaptionedLatentDataset([])


def test_dataset_size_rules():
    assert epochs_for_dataset(30) == 80 and epochs_for_dataset(100) == 80
    assert epochs_for_dataset(20_000) == 6
    sizes = [10, 100, 150, 400, 900, 1_500, 4_000, 9_000, 50_000]
    epochs = [epochs_for_dataset(n) for n in sizes]
    assert epochs == sorted(epochs, reverse=True)
    assert steps_for_dataset(100, 4) == 80 * 25
    assert [rank_for_dataset(n) for n in (10, 100, 500, 5_000)] == [4, 8, 16, 32]

    resolved = TrainingConfig().resolved(100)
    assert (resolved.rank, resolved.alpha) == (8, 4.0)
    assert resolved.max_train_steps == steps_for_dataset(100, 4)
    assert resolved.save_every_n_steps == 200 and resolved.is_resolved
    assert resolved.lr_scheduler == "cosine"  # undecided: cosine
    assert TrainingConfig(lr_scheduler="constant").resolved(100).lr_scheduler == "constant"
    explicit = TrainingConfig(rank=16, alpha=4, max_train_steps=50, save_every_n_steps=7).resolved(100)
    assert (explicit.rank, explicit.alpha, explicit.max_train_steps, explicit.save_every_n_steps) == (16, 4, 50, 7)
    assert TrainingConfig().sha256() == TrainingConfig().sha256() != TrainingConfig(seed=1).sha256()


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError) as error:
        TrainingConfig(
            optimizer="sgd", batch_size=0, caption_dropout=1.5, caption_tag_dropout=-0.1, lr_scheduler="linear"
        )
    message = str(error.value)
    assert "lr_scheduler 'linear'" in message and "optimizer 'sgd'" in message
    assert "batch_size" in message and "caption_dropout must" in message and "caption_tag_dropout must" in message
