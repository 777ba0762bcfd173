import contextlib
import multiprocessing
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lancedb
import numpy as np
import pandas as pd
import pytest

from lora_factory.cleaning.embeddings import EmbeddingStore
from lora_factory.provenance import frame_hash

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
    with pytest.raises(ValueError, match="repeat"):
        store.replace_character("ash", rows("a", vectors[:2]).assign(crop_sha256="a00"))
    store.replace_character("ash", rows("a", vectors[:1]))
    with pytest.raises(ValueError, match="16-d"):
        EmbeddingStore(tmp_path / "db", dimension=32)


def test_character_digest_tells_whether_the_store_still_holds_a_run_s_vectors(tmp_path, vectors):
    path = tmp_path / "db"
    store = EmbeddingStore(path, dimension=DIM)
    assert store.created
    ash = rows("a", vectors[:6])
    ash.loc[4:, "kind"] = "head"
    store.replace_character("ash", ash)
    store.replace_character("lumi", rows("l", vectors[6:]))
    # The hash cleaned_crops stamps on its crops table, whatever the order of the rows.
    digest = frame_hash(ash.sample(frac=1, random_state=1), ["crop_sha256", "kind"])
    assert store.character_digest("ash") == digest != store.character_digest("lumi")
    assert store.character_digest("nobody") == frame_hash(ash.iloc[:0], ["crop_sha256", "kind"])
    assert not EmbeddingStore(path, dimension=DIM).created

    shutil.rmtree(path)
    reopened = EmbeddingStore(path, dimension=DIM)
    assert reopened.created and reopened.count() == 0
    assert reopened.character_digest("ash") != digest


def test_replacing_removes_copies_left_by_writers_that_raced_unlocked(tmp_path, vectors):
    store = EmbeddingStore(tmp_path / "db", dimension=DIM)
    ash = rows("a", vectors[:6])
    store.replace_character("ash", ash)
    store.replace_character("lumi", rows("l", vectors[6:]))
    table = lancedb.connect(tmp_path / "db").open_table("crop_identity")
    own = table.search().where("character = 'ash'").select(["crop_sha256", "character", "kind", "vector"])
    table.add(own.limit(None).to_arrow())  # a second run's add, between the first run's delete and add
    digest = frame_hash(ash, ["crop_sha256", "kind"])
    assert store.count("ash") == 12 and store.character_digest("ash") != digest
    store.replace_character("ash", ash)
    assert store.count("ash") == 6 and store.character_digest("ash") == digest
    assert store.count("lumi") == 6


# Concurrent writers (real processes, then threads), started together by a barrier each round.

WRITERS, ROUNDS = 3, 6


def round_rows(round_: int, writer: int) -> pd.DataFrame:
    """What `writer` stores in `round_`: crops shared with the other writers and crops of
    its own, in a number of its own, with vectors and a kind that only it writes."""
    names = [f"r{round_}-{i}" for i in range(4)] + [f"r{round_}w{writer}-{i}" for i in range(writer + 1)]
    vectors = np.random.default_rng(round_ * 100 + writer).normal(size=(len(names), DIM))
    return pd.DataFrame({"crop_sha256": names, "kind": f"w{writer}", "vector": list(vectors.astype(np.float32))})


def replace_in_rounds(path: str, writer: int, character: str | None, barrier, results) -> None:
    """One cleaning process: opens the store, then replaces a character's rows each round
    (`character`, or a character of its own when None) while the others do the same."""
    try:
        barrier.wait(timeout=60)
        store = EmbeddingStore(Path(path), dimension=DIM)
        results.put((writer, "created", store.created))
        for round_ in range(ROUNDS):
            barrier.wait(timeout=60)
            store.replace_character(character or f"c{writer}", round_rows(round_, writer))
            barrier.wait(timeout=60)
    except Exception as error:
        results.put((writer, "error", repr(error)))
        barrier.abort()  # the others stop waiting for this writer
        raise


def content(frame: pd.DataFrame) -> list[tuple[str, str, list[float]]]:
    return sorted(zip(frame["crop_sha256"], frame["kind"], [v.tolist() for v in frame["vector"]], strict=True))


def assert_rows_of_one_writer(store: EmbeddingStore, round_: int) -> None:
    found = content(store.vectors_of("ash"))
    outcomes = [content(round_rows(round_, w)) for w in range(WRITERS)]
    assert found in outcomes, f"round {round_}: {len(found)} rows, of writers {sorted({k for _, k, _ in found})}"


def run_writers(path: Path, character: str | None, check_round) -> list[bool]:
    """Runs WRITERS processes for ROUNDS rounds, calls `check_round(round_)` after each
    round; returns each writer's `created`."""
    context = multiprocessing.get_context("spawn")  # forking a process that runs LanceDB's threads can hang
    barrier, results = context.Barrier(WRITERS + 1), context.Queue()
    processes = [
        context.Process(target=replace_in_rounds, args=(str(path), w, character, barrier, results))
        for w in range(WRITERS)
    ]
    for process in processes:
        process.start()
    broken = None
    try:
        barrier.wait(timeout=120)  # spawning imports LanceDB afresh: slow on a busy machine
        for round_ in range(ROUNDS):
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            check_round(round_)
    except threading.BrokenBarrierError as error:  # a writer failed: its report says why
        broken = error
    finally:
        barrier.abort()
        for process in processes:
            process.join(timeout=60)
    reports = []
    with contextlib.suppress(queue.Empty):
        while True:
            reports.append(results.get(timeout=1))
    assert [report for report in reports if report[1] == "error"] == [] and broken is None
    assert [p.exitcode for p in processes] == [0] * WRITERS
    return [created for _, kind, created in sorted(reports) if kind == "created"]


def test_concurrent_replacements_of_one_character_leave_the_rows_of_one_of_them(tmp_path):
    store = EmbeddingStore(tmp_path / "db", dimension=DIM)
    others = rows("l", np.random.default_rng(7).normal(size=(5, DIM)))
    store.replace_character("lumi", others)

    def check_round(round_: int) -> None:
        now = EmbeddingStore(tmp_path / "db", dimension=DIM)
        assert_rows_of_one_writer(now, round_)
        assert content(now.vectors_of("lumi")) == content(others)

    assert run_writers(tmp_path / "db", "ash", check_round) == [False] * WRITERS


def test_concurrent_replacements_of_different_characters_all_land_in_a_new_store(tmp_path):
    path = tmp_path / "db"  # made by the writers, all at once
    store = None

    def check_round(round_: int) -> None:
        nonlocal store
        store = store or EmbeddingStore(path, dimension=DIM)  # kept open: sees later writes too
        for w in range(WRITERS):
            assert content(store.vectors_of(f"c{w}")) == content(round_rows(round_, w)), f"round {round_}, writer {w}"
        assert store.count() == sum(len(round_rows(round_, w)) for w in range(WRITERS))

    assert sorted(run_writers(path, None, check_round)) == [False] * (WRITERS - 1) + [True]


def test_threads_replacing_one_character_leave_the_rows_of_one_of_them(tmp_path):
    shared = EmbeddingStore(tmp_path / "db", dimension=DIM)
    # Two threads share a store, the others open their own.
    stores = [shared, shared] + [EmbeddingStore(tmp_path / "db", dimension=DIM) for _ in range(WRITERS - 2)]
    barrier = threading.Barrier(WRITERS)

    def write(round_: int, writer: int) -> None:
        barrier.wait(timeout=60)
        stores[writer].replace_character("ash", round_rows(round_, writer))

    with ThreadPoolExecutor(WRITERS) as pool:
        for round_ in range(ROUNDS):
            list(pool.map(write, [round_] * WRITERS, range(WRITERS)))
            assert_rows_of_one_writer(shared, round_)
