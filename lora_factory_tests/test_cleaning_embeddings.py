import numpy as np
import pandas as pd
import pytest

from lora_factory.cleaning.embeddings import EmbeddingStore

DIM = 16


def rows(prefix: str, vectors: np.ndarray, kind: str = "full") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "crop_sha256": [f"{prefix}{i:02d}" for i in range(len(vectors))],
            "kind": kind,
            "vector": list(vectors.astype(np.float32)),
        }
    )


@pytest.fixture
def vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(12, DIM))


def test_replace_character_is_idempotent_and_leaves_others_alone(tmp_path, vectors):
    store = EmbeddingStore(tmp_path / "lancedb", dimension=DIM)
    store.replace_character("ash", rows("a", vectors[:6]))
    store.replace_character("lumi", rows("l", vectors[6:]))
    store.replace_character("ash", rows("a", vectors[:6]))
    assert store.count("ash") == 6 and store.count("lumi") == 6
    store.replace_character("ash", rows("a", vectors[:2]))
    assert store.count("ash") == 2 and store.count() == 8
    # A new store on the same folder sees the same table.
    reopened = EmbeddingStore(tmp_path / "lancedb", dimension=DIM)
    assert sorted(reopened.vectors_of("ash")["crop_sha256"]) == ["a00", "a01"]


def test_batched_search_finds_each_vector_itself_first(tmp_path, vectors):
    store = EmbeddingStore(tmp_path / "db", dimension=DIM)
    store.replace_character("ash", rows("a", vectors))
    matches = store.search(vectors[[3, 7, 9]], k=2)
    assert [m[0].crop_sha256 for m in matches] == ["a03", "a07", "a09"]
    assert all(m[0].distance < 1e-5 and len(m) == 2 for m in matches)
    assert matches[0][1].distance >= matches[0][0].distance


def test_cross_character_duplicates_flags_a_crop_filed_under_two_characters(tmp_path, vectors):
    store = EmbeddingStore(tmp_path / "db", dimension=DIM)
    store.replace_character("ash", rows("a", vectors[:6]))
    lumi = vectors[6:].copy()
    lumi[2] = vectors[4] * 1.01  # the same picture, slightly different intensity
    store.replace_character("lumi", rows("l", lumi, kind="head"))
    found = store.cross_character_duplicates("lumi", threshold=0.01)
    assert found[["crop_sha256", "other_character", "other_crop_sha256"]].values.tolist() == [
        ["l02", "ash", "a04"]
    ]
    assert found["kind"].tolist() == ["head"]
    assert store.cross_character_duplicates("nobody").empty


def test_names_with_quotes_are_safe(tmp_path, vectors):
    store = EmbeddingStore(tmp_path / "db", dimension=DIM)
    store.replace_character("d'artagnan", rows("d", vectors[:3]))
    store.replace_character("x' OR '1'='1", rows("x", vectors[3:4]))
    assert store.count("d'artagnan") == 3
    store.replace_character("x' OR '1'='1", rows("x", vectors[:0]))
    assert store.count("d'artagnan") == 3 and store.count() == 3


def test_wrong_shapes_are_refused(tmp_path, vectors):
    store = EmbeddingStore(tmp_path / "db", dimension=DIM)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        store.search(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="missing"):
        store.replace_character("ash", pd.DataFrame({"crop_sha256": ["x"]}))
    with pytest.raises(ValueError, match="NaN"):
        store.replace_character("ash", rows("a", np.full((1, DIM), np.nan)))
    store.replace_character("ash", rows("a", vectors[:1]))
    with pytest.raises(ValueError, match="16-d"):
        EmbeddingStore(tmp_path / "db", dimension=32)
