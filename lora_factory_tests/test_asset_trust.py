"""Assets a user can trust: damaged or missing files are found and rebuilt, never reused or
published; a moved home works as it is; a second run of a character fails at once; a full
disk names itself. Each test damages a copy of one fully built home, then runs the chain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from test_factory_chain import (
    CHAIN,
    CHARACTER,
    failure_message,
    metadata_by_asset,
    run_chain,
)

from lora_factory.assets.cleaning import CleanedCropsFiles
from lora_factory.assets.evaluation import ChosenModelFiles
from lora_factory.assets.stage import PartitionBusyError, claim_partition
from lora_factory.assets.training import LoraCheckpointsFiles
from lora_factory.demo.deployment import DemoVisionModels
from lora_factory.provenance import StampBook, damaged_outputs
from lora_factory.resources import FactoryStorage
from lora_factory.storage import FactoryStore, read_table, sha256_file


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A home with the whole chain built for one character, and the instance that built it."""
    home = tmp_path_factory.mktemp("built") / "home"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("characters", [CHARACTER])
        result = run_chain(instance, home)
        assert result.success, failure_message(result)
        yield instance, home


@pytest.fixture
def home(built, tmp_path):
    """A private copy of the built home (a copy is also what a moved home is)."""
    _, source = built
    copy = tmp_path / "home"
    shutil.copytree(source, copy, symlinks=True)
    return copy


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def rerun(built, home: Path):
    instance, _ = built
    result = run_chain(instance, home)
    assert result.success, failure_message(result)
    return metadata_by_asset(result)


def assert_intact(home: Path) -> None:
    """Every stamp's recorded files and blobs still have their bytes."""
    store = FactoryStore(home)
    for asset in CHAIN:
        stamp = StampBook(store).read(asset, CHARACTER)
        assert stamp is not None and damaged_outputs(store.root, store.blobs, stamp) == [], asset


def test_a_flipped_crop_blob_is_set_aside_and_rebuilt(built, home):
    crops = CleanedCropsFiles(FactoryStore(home), CHARACTER).crops()
    blob = FactoryStore(home).blobs.path(crops["crop_sha256"].iloc[0])
    flip_byte(blob)
    metadata = rerun(built, home)
    assert metadata["cleaned_crops"]["reused"] is False
    assert "damaged" in metadata["cleaned_crops"]["repaired"]
    assert sha256_file(blob) == blob.name  # made again from the scraped picture
    assert (home / "blobs" / "damaged" / blob.name).is_file()  # the bad copy kept for a look
    # Same crops again: everything after cleaning is still reused.
    assert all(metadata[name]["reused"] for name in CHAIN[CHAIN.index("captions"):])
    assert_intact(home)


def test_a_deleted_crop_blob_is_rebuilt(built, home):
    crops = CleanedCropsFiles(FactoryStore(home), CHARACTER).crops()
    FactoryStore(home).blobs.path(crops["crop_sha256"].iloc[-1]).unlink()
    metadata = rerun(built, home)
    assert metadata["cleaned_crops"]["reused"] is False
    assert_intact(home)


def test_a_deleted_embedding_store_is_refilled_not_read_as_empty(built, home):
    from lora_factory.cleaning.embeddings import EmbeddingStore

    crops = CleanedCropsFiles(FactoryStore(home), CHARACTER).crops()
    shutil.rmtree(home / "lancedb")
    metadata = rerun(built, home)
    assert metadata["cleaned_crops"]["reused"] is False
    assert "identity vectors" in metadata["cleaned_crops"]["repaired"]
    assert EmbeddingStore(home / "lancedb").count(CHARACTER) == len(crops)


def test_a_flipped_scraped_image_is_downloaded_again(built, home):
    manifest = read_table(home / "tables" / "raw_scrape" / f"{CHARACTER}.parquet")
    sha = manifest["sha256"].dropna().iloc[0]
    flip_byte(FactoryStore(home).blobs.path(sha))
    rerun(built, home)
    assert FactoryStore(home).blobs.verify(sha)
    assert_intact(home)


def test_a_damaged_checkpoint_is_retrained_not_reused(built, home):
    files = LoraCheckpointsFiles(FactoryStore(home), CHARACTER)
    first_step = int(files.table()["step"].iloc[0])
    path = home / files.table()["path"].iloc[0]
    recorded = sha256_file(path)
    flip_byte(path, offset=-10)
    metadata = rerun(built, home)
    assert metadata["lora_checkpoints"]["reused"] is False
    assert "lora_checkpoints" in metadata["lora_checkpoints"]["repaired"]
    assert sha256_file(files.checkpoint(first_step)) == recorded  # seeded: the same bytes again
    assert_intact(home)


def test_a_changed_release_lora_is_published_again(built, home):
    release = ChosenModelFiles(FactoryStore(home), CHARACTER).release_dir
    lora = release / f"{CHARACTER}.safetensors"
    flip_byte(lora, offset=-10)
    metadata = rerun(built, home)
    assert metadata["chosen_model"]["reused"] is False
    meta = json.loads((release / "meta.json").read_text())
    assert sha256_file(lora) == meta["lora_sha256"]


def test_a_deleted_release_lora_is_not_reported_as_reused(built, home):
    release = ChosenModelFiles(FactoryStore(home), CHARACTER).release_dir
    (release / f"{CHARACTER}.safetensors").unlink()
    metadata = rerun(built, home)
    assert metadata["chosen_model"]["reused"] is False
    assert "missing" in metadata["chosen_model"]["repaired"]
    assert (release / f"{CHARACTER}.safetensors").is_file()


def test_a_flipped_table_is_rebuilt_not_read(built, home):
    table = home / "tables" / "captions" / f"{CHARACTER}.parquet"
    flip_byte(table)
    metadata = rerun(built, home)
    assert metadata["captions"]["reused"] is False
    assert_intact(home)


def test_a_truncated_stamp_names_itself_and_is_rebuilt(built, home):
    stamp = home / "stamps" / "buckets" / f"{CHARACTER}.json"
    stamp.write_text(stamp.read_text()[:40])
    metadata = rerun(built, home)
    assert metadata["buckets"]["reused"] is False
    assert str(stamp) in metadata["buckets"]["repaired"]
    assert_intact(home)


def test_reading_a_damaged_upstream_fails_with_the_file_and_the_fix(built, home):
    instance, _ = built
    flip_byte(home / "tables" / "recscore_table" / f"{CHARACTER}.parquet")
    result = run_chain(instance, home, selection=["chosen_model"])  # not the damaged asset
    assert not result.success
    message = failure_message(result)
    assert f"tables/recscore_table/{CHARACTER}.parquet" in message
    assert "re-materialize recscore_table" in message


def test_a_moved_home_works_as_it_is(built, tmp_path):
    _, source = built
    moved = tmp_path / "elsewhere" / "home"
    shutil.copytree(source, moved, symlinks=True)
    tables = list((moved / "tables").rglob("*.parquet"))
    for path in tables:  # no table remembers where the home used to be
        frame = read_table(path)
        text = frame.astype(str).to_csv()
        assert str(source) not in text, path
    metadata = rerun(built, moved)
    assert all(metadata[name]["reused"] for name in CHAIN[1:])
    release = moved / "releases" / CHARACTER
    meta = json.loads((release / "meta.json").read_text())
    assert sha256_file(release / f"{CHARACTER}.safetensors") == meta["lora_sha256"]
    assert str(source) not in repr(metadata)


def test_a_second_run_of_a_character_fails_at_once_naming_the_first(built, home):
    instance, _ = built
    # A run of this instance, still in progress, is building the character.
    other = dg.DagsterRun(job_name="character_job", status=dg.DagsterRunStatus.STARTED)
    instance.add_run(other)
    claim_partition(FactoryStore(home), CHARACTER, other.run_id, lambda run_id: False)
    result = run_chain(instance, home)
    assert not result.success
    assert f"already being built by run {other.run_id}" in failure_message(result)
    # Once that run is over, the character is free again.
    instance.report_run_failed(instance.get_run_by_id(other.run_id))
    rerun(built, home)


def test_only_one_of_two_processes_claims_a_character(tmp_path):
    """Two real processes claim the same character at once: exactly one wins."""
    script = (
        "import sys\n"
        "from lora_factory.assets.stage import claim_partition, PartitionBusyError\n"
        "from lora_factory.storage import FactoryStore\n"
        "try:\n"
        f"    claim_partition(FactoryStore({str(tmp_path)!r}), 'ash', sys.argv[1], lambda run_id: True)\n"
        "    print('won')\n"
        "except PartitionBusyError as error:\n"
        "    print(error)\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, f"run-{n}"], stdout=subprocess.PIPE, text=True)
        for n in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in processes]
    assert sorted(o == "won" for o in outputs) == [False, True], outputs
    assert any("already being built by run run-" in o for o in outputs)


def test_a_finished_owner_does_not_block(tmp_path):
    store = FactoryStore(tmp_path)
    claim_partition(store, "ash", "old-run", lambda run_id: False)
    claim_partition(store, "ash", "new-run", lambda run_id: False)  # old-run is finished
    with pytest.raises(PartitionBusyError, match="already being built by run new-run"):
        claim_partition(store, "ash", "third-run", lambda run_id: True)


def test_a_failing_site_is_skipped_with_its_error_when_another_site_works(built, home):
    import socket

    from lora_factory.demo.deployment import DEMO_SITE, DemoImageSites
    from lora_factory.resources import SiteConfig

    instance, _ = built
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sites = DemoImageSites(
        sites=[SiteConfig(**DEMO_SITE), SiteConfig(name="danbooru", base_url=f"http://127.0.0.1:{port}")],
        max_retries=1,
    )
    result = run_chain(instance, home, selection=["raw_scrape"], image_sites=sites)
    assert result.success, failure_message(result)
    errors = metadata_by_asset(result)["raw_scrape"]["site_errors"]
    assert "danbooru (tag search)" in errors and f"127.0.0.1:{port}" in errors


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MiB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_names_the_path_damages_nothing_and_a_rerun_completes(built, small_disk):
    instance, source = built
    home = small_disk / "home"
    shutil.copytree(source, home, symlinks=True)
    (home / "releases" / CHARACTER / f"{CHARACTER}.safetensors").unlink()  # the rerun must write it
    ballast = small_disk / "ballast"
    free = shutil.disk_usage(small_disk).free
    ballast.write_bytes(b"\0" * (free - 64 * 1024))  # leave 64 KiB: less than the LoRA
    storage = FactoryStorage(home=str(home), min_free_mb=0)

    result = run_chain(instance, home, storage=storage)
    assert not result.success
    message = failure_message(result)
    assert "no space left on the device writing" in message and "MiB free" in message
    assert f"writing {home}/" in message
    store = FactoryStore(home)
    for asset in CHAIN[:-1]:  # everything stored before the full disk is still intact
        stamp = StampBook(store).read(asset, CHARACTER)
        assert damaged_outputs(store.root, store.blobs, stamp) == [], asset

    ballast.unlink()
    result = run_chain(instance, home, storage=storage)
    assert result.success, failure_message(result)
    assert_intact(home)


def test_a_stage_refuses_to_start_on_a_nearly_full_disk(built, small_disk):
    instance, _ = built
    result = run_chain(instance, small_disk / "home", storage=FactoryStorage(home=str(small_disk / "home")))
    assert not result.success
    message = failure_message(result)
    assert "MiB free on the disk of the factory's home" in message and "min_free_mb" in message


def test_lineage_declares_every_file_an_asset_reads():
    """The UI's lineage is the real data flow: each reader an asset uses is a declared dep
    (Stage refuses undeclared reads at run time; this pins the graph itself)."""
    from lora_factory.definitions import defs

    graph = defs.resolve_asset_graph()
    upstream = {
        key.to_user_string(): {dep.to_user_string() for dep in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert upstream["lora_checkpoints"] >= {"buckets", "captions"}
    assert upstream["buckets"] >= {"captions", "cleaned_crops"}
    assert upstream["recscore_table"] >= {"lora_checkpoints", "captions", "cleaned_crops", "character_index"}
    assert upstream["chosen_model"] >= {"recscore_table", "lora_checkpoints", "captions", "character_index"}


def test_a_changed_upstream_marks_its_consumers_stale(built, home):
    """Dagster's own staleness (what the UI shows): new captions make every asset that
    reads them stale, and nothing upstream of them."""
    from dagster._core.definitions.data_version import (
        CachingStaleStatusResolver,
        StaleStatus,
    )
    from dagster._core.loader import LoadingContextForTest

    from lora_factory.definitions import defs

    instance, _ = built
    rerun(built, home)  # this home's data versions are the instance's latest
    result = run_chain(
        instance,
        home,
        selection=["captions"],
        run_config={"ops": {"captions": {"config": {"style": "fluid"}}}},
    )
    assert result.success, failure_message(result)
    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    status = {name: resolver.get_status(dg.AssetKey(name), CHARACTER) for name in CHAIN}
    for name in ("buckets", "lora_checkpoints", "recscore_table", "chosen_model"):
        assert status[name] == StaleStatus.STALE, (name, status)
    assert status["cleaned_crops"] == StaleStatus.FRESH


def test_a_model_replaced_under_the_same_name_rebuilds_what_it_decided(built, home, tmp_path):
    """A tagger at a local path whose files change (another version copied over it) is a
    new model: the captions it wrote are rebuilt, not trusted; stages that never ran it
    are reused."""
    from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry

    tagger = tmp_path / "my_tagger"
    shutil.copytree(tiny_registry(tmp_path / "models").resolve(TINY_MODELS["tagger"]), tagger)
    instance, _ = built
    models = DemoVisionModels(tagger=str(tagger))
    assert run_chain(instance, home, vision_models=models).success  # the new name: rebuilt once
    reused = metadata_by_asset(run_chain(instance, home, vision_models=models))
    assert reused["captions"]["reused"] is True

    tags = tagger / "selected_tags.csv"
    tags.write_text(tags.read_text().replace(",0\n", ",1\n"))  # other counts: another version's files
    metadata = metadata_by_asset(run_chain(instance, home, vision_models=models))
    assert metadata["captions"]["reused"] is False
    assert metadata["matched_tags"]["reused"] is True  # tag matching never runs the tagger


def test_previews_of_a_changed_base_model_are_rendered_again(built, home):
    """The previews (the no-LoRA baseline first) are renderings of the base model's weights:
    rendering alone after its files changed under the same name renders them again."""
    instance, _ = built
    base_dir = FactoryStore(home).models_dir / "tiny-sd15"
    assert base_dir.is_dir()
    (base_dir / "NOTES.txt").write_text("another version's files\n")
    metadata = metadata_by_asset(run_chain(instance, home, selection=["recscore_table"]))
    assert metadata["recscore_table"]["reused"] is False


def test_releases_are_readable_by_others(built):
    """Files 0644 and folders 0755 under the usual umask (temp files start as 0600)."""
    _, home = built
    release = ChosenModelFiles(FactoryStore(home), CHARACTER).release_dir
    for path in [release, *release.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


RACE_SCRIPT = """
import os, sys, time
from pathlib import Path
import dagster as dg
from test_factory_chain import failure_message, run_chain
gate = Path(sys.argv[2])
(gate / f"ready-{os.getpid()}").touch()
while not (gate / "go").exists():  # both processes start their runs together
    time.sleep(0.01)
with dg.DagsterInstance.get() as instance:
    result = run_chain(instance, sys.argv[1], selection=["raw_scrape", "matched_tags"])
print("ok" if result.success else failure_message(result))
"""


def test_two_real_runs_of_one_character_one_builds_the_other_fails_at_once(built, home, tmp_path):
    """Two processes start a run of the same character on one instance at the same moment:
    one builds, the other fails at once naming it, and nothing stored is damaged."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:  # create the SQLite schema once
        instance.add_dynamic_partitions("characters", [CHARACTER])
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    tests_dir = Path(__file__).parent
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, str(home), str(tmp_path)],
            cwd=tests_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = sorted(p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in processes)
    assert outputs[1] == "ok", outputs
    assert "is already being built by run" in outputs[0], outputs
    store = FactoryStore(home)
    for asset in ("raw_scrape", "matched_tags"):
        stamp = StampBook(store).read(asset, CHARACTER)
        assert damaged_outputs(store.root, store.blobs, stamp) == [], asset
