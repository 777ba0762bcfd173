import io
import random

import numpy as np
from PIL import Image

from lora_factory.cleaning.dedup import (
    DEFAULT_MAX_DISTANCE,
    NearDuplicateIndex,
    hamming,
    near_duplicate_groups,
    near_duplicate_representatives,
    pairwise_hamming,
    perceptual_hash,
)
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post_image


def reencoded(image: Image.Image, scale: float, fmt: str = "JPEG") -> Image.Image:
    buffer = io.BytesIO()
    image.resize((round(image.width * scale), round(image.height * scale))).save(buffer, fmt, quality=70)
    return Image.open(io.BytesIO(buffer.getvalue()))


def demo_pictures(count: int) -> list[Image.Image]:
    rng = random.Random(3)
    return [
        draw_post_image([(DEMO_CHARACTERS[i % 4], 0)], (256, 320), rng) for i in range(count)
    ]


def test_hash_is_64_bit_and_deterministic():
    picture = demo_pictures(1)[0]
    value = perceptual_hash(picture)
    assert 0 <= value < 2**64
    assert perceptual_hash(picture.copy()) == value


def test_copies_stay_close_and_other_characters_are_far():
    pictures = demo_pictures(4)
    for picture in pictures:
        for copy in (reencoded(picture, 0.75), reencoded(picture, 1.5, "WEBP")):
            assert hamming(perceptual_hash(picture), perceptual_hash(copy)) <= 4
    hashes = [perceptual_hash(p) for p in pictures]
    distances = pairwise_hamming(hashes, hashes)
    off_diagonal = distances[~np.eye(len(hashes), dtype=bool)]
    assert off_diagonal.min() > DEFAULT_MAX_DISTANCE


def test_hamming_counts_bits():
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(2**64 - 1, 0) == 64


def test_groups_keep_the_highest_priority_member_and_chain_transitively():
    # 0-1 and 1-2 are within 2 bits (a chain), 3 is far from all of them.
    hashes = [0b0000, 0b0011, 0b1111, 2**64 - 1]
    keep = near_duplicate_groups(hashes, max_distance=2)
    assert keep.tolist() == [True, False, False, True]
    keep = near_duplicate_groups(hashes, max_distance=2, priority=[10, 5, 30, 1])
    assert keep.tolist() == [False, False, True, True]
    representatives = near_duplicate_representatives(hashes, 2, priority=[10, 5, 30, 1])
    assert representatives.tolist() == [2, 2, 2, 3]


def test_ties_keep_the_first_item():
    assert near_duplicate_groups([5, 5, 5], max_distance=0, priority=[1, 1, 1]).tolist() == [True, False, False]


def test_empty_input():
    assert near_duplicate_groups([]).tolist() == []


def test_streaming_index_keeps_the_larger_copy_whatever_the_order():
    picture = demo_pictures(1)[0]
    small, large = reencoded(picture, 0.5), reencoded(picture, 1.0)
    index = NearDuplicateIndex()
    first = index.add("small", perceptual_hash(small), priority=small.width * small.height)
    assert first.kept
    second = index.add("large", perceptual_hash(large), priority=large.width * large.height)
    assert second.kept and second.replaced == ("small",)
    third = index.add("again_small", perceptual_hash(small), priority=small.width * small.height)
    assert not third.kept and third.duplicate_of == "large"
    assert len(index) == 1


def test_streaming_index_keeps_distinct_pictures():
    index = NearDuplicateIndex()
    verdicts = [index.add(i, perceptual_hash(p)) for i, p in enumerate(demo_pictures(4))]
    assert all(v.kept for v in verdicts)
    assert len(index) == 4
