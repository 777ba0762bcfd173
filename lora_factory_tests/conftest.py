"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import uuid

import psutil
import psycopg2
import pytest

# The PostgreSQL server every machine of the project runs (trust auth).
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

# The demo deployment's plumbing is tested on the tiny random base model, which trains and
# renders in seconds (the processes tests start inherit it); the tests of learning itself
# ask for the demo base model by name.
os.environ.setdefault("LF_DEMO_BASE_MODEL", "tiny-sd15")


@pytest.fixture()
def started():
    """Processes a test starts; each is stopped afterwards with all its descendants."""
    processes: list[psutil.Popen] = []
    yield processes
    stop_process_trees(processes)


def stop_process_trees(processes: list[psutil.Popen], timeout_s: float = 10) -> None:
    """Terminate each process and its descendants; kill what is still alive after `timeout_s`."""
    tree = []
    for process in processes:
        try:
            tree += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for process in tree:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def service_missing(reason: str) -> None:
    """Skip a test whose server (PostgreSQL, RabbitMQ) is not running here; under CI, where
    every one runs, fail instead: a skip there would hide a broken set-up."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture()
def scratch_database():
    """A new, empty PostgreSQL database, dropped after the test."""
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as error:
        service_missing(f"no PostgreSQL server answers on 127.0.0.1:5432 ({error})")
    admin.autocommit = True
    name = f"lf_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield name
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def tiny_models_on_one_core(tmp_path_factory):
    """The tiny vision models, loaded (and their ONNX Runtime sessions sized) while the
    process is pinned to one core: one intra-op thread each, as on a busy machine."""
    from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
    from lora_factory.vision.models import VisionModels

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        registry = tiny_registry(tmp_path_factory.mktemp("models"), hf_cache_dir=tmp_path_factory.mktemp("hf"))
        yield VisionModels.load(registry, names=TINY_MODELS)
    finally:
        os.sched_setaffinity(0, cores)
