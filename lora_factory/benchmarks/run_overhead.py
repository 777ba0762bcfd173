"""Run overhead: daemon-launched runs whose stages are all reused, in-process vs multiprocess.

    python -m lora_factory.benchmarks.run_overhead [--home HOME] [--repeats 3] [--rounds 25]

Builds the demo characters once into a temp factory home (or reuses `--home`, built with
the same `--index`), then starts a real `dagster-daemon run` on a new embedded instance
with the code location `lora_factory.definitions`, and launches `character_job` runs as
the UI does (Dagster's GraphQL API, in this process): every stage is reused, so a run's
time is all overhead. Each figure is taken twice: with the jobs' executor as it is now
(in-process, every stage in the run worker) and as it was before (multiprocess, a new
Python process per stage, selected by run config).

1. One character's run, `--repeats` times each way: medians from submission to end and
   from RUN_START to end, and the peak memory of the run worker with its step processes.
2. A backfill of every character (one run each) launched `--rounds` times at once: the
   wall time from the first run's submission to the last run's end per character, and
   what it makes for 100 and 10,000 characters. The multiprocess way gets fewer rounds
   when they would take longer than `--budget-s` (the output says so).

Every sensor of the location is stopped before the daemon starts: the index sensor
(RUNNING by default) would otherwise start a run of every character on its first tick,
at a moment nobody chose, in the middle of the measurements. Stopping it through the
instance's sensor state works whatever its default status is, and the partitions it would
have added are added here.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_INSTANCE = REPO_ROOT / "lora_factory" / "embedded_instance.yaml"
LOCATION = "lora_factory.definitions"
REPOSITORY = "__repository__"  # the repository name Dagster gives a module's `Definitions`
JOB = "character_job"
DAGSTER_DAEMON = Path(sys.executable).with_name("dagster-daemon")
MULTIPROCESS = {"execution": {"config": {"multiprocess": {}}}}
# (label, run config): the jobs' default executor, then the way before.
WAYS = (("in-process (now)", {}), ("multiprocess (before)", MULTIPROCESS))
WAIT_S = 1800  # for one batch of runs; a stuck daemon fails the benchmark, never hangs it
MEMORY_POLL_S = 0.1  # while one run executes: its worker's memory is sampled this often

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message }
  }
}
"""


def build_home(home: Path, index: Path) -> None:
    """`make demo` for the characters of `index`, in its own process."""
    env = {**os.environ, "LF_HOME": str(home), "LF_INDEX_PATH": str(index)}
    env.pop("DAGSTER_HOME", None)  # the demo's own instance, under `home`
    subprocess.run(
        [sys.executable, "-m", "lora_factory.demo.run", "--home", str(home)],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,  # a demo's log is long; its failure raises
    )


def character_keys(index: Path) -> list[str]:
    from lora_factory.resources import CharacterIndex

    return [row.key for row in CharacterIndex(index_path=str(index)).enabled_rows()]


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (the code server started here reads them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class RunTimes:
    submitted: float  # seconds since the epoch
    started: float
    ended: float

    @property
    def submission_to_end(self) -> float:
        return self.ended - self.submitted

    @property
    def start_to_end(self) -> float:
        return self.ended - self.started


class Factory:
    """A `dagster-daemon` on a new embedded instance, and the UI's GraphQL API to launch runs."""

    def __init__(self, instance, workspace, daemon: psutil.Popen):
        from dagster_graphql.schema import create_schema

        self.instance = instance
        self.workspace = workspace
        self.daemon = daemon
        self._schema = create_schema()

    def _graphql(self, query: str, params: dict) -> dict:
        result = asyncio.run(
            self._schema.execute_async(
                query,
                context_value=self.workspace.create_request_context(),
                variable_values={"params": params},
            )
        )
        if result.errors:
            raise RuntimeError(f"GraphQL: {result.errors}")
        return next(iter(result.data.values()))

    def launch_run(self, key: str, run_config: dict) -> str:
        """One `character_job` run of partition `key`; its run id."""
        answer = self._graphql(
            LAUNCH_RUN,
            {
                "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": JOB},
                "runConfigData": run_config,
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": key}]},
            },
        )
        if answer["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"run not launched: {answer}")
        return answer["run"]["runId"]

    def launch_backfill(self, keys: list[str], run_config: dict) -> list[str]:
        """A backfill of `character_job` over `keys`, one run each; the run ids."""
        answer = self._graphql(
            LAUNCH_BACKFILL,
            {
                "selector": {
                    "partitionSetName": f"{JOB}_partition_set",
                    "repositorySelector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY},
                },
                "partitionNames": keys,
                "runConfigData": run_config,
                # Its runs are created and queued now, as `dagster job backfill` does, not
                # on the backfill daemon's next pass (up to 30 s later).
                "forceSynchronousSubmission": True,
            },
        )
        if answer["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"backfill not launched: {answer}")
        return answer["launchedRunIds"]

    def wait(self, run_ids: list[str], on_poll=None, every_s: float = 1.0) -> list[RunTimes]:
        """Wait until every run ended; their times (from the run records, not from this
        loop). Raises if one did not succeed."""
        from dagster import DagsterRunStatus, RunsFilter

        deadline = time.monotonic() + WAIT_S
        while True:
            records = self.instance.get_run_records(RunsFilter(run_ids=run_ids))
            if len(records) == len(run_ids) and all(r.dagster_run.is_finished for r in records):
                break
            if self.daemon.poll() is not None:
                raise RuntimeError(f"dagster-daemon exited with {self.daemon.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs still not finished after {WAIT_S} s")
            if on_poll:
                on_poll()
            time.sleep(every_s)
        failed = [r.dagster_run.run_id for r in records if r.dagster_run.status != DagsterRunStatus.SUCCESS]
        if failed:
            raise RuntimeError(f"runs did not succeed: {failed}")
        return [RunTimes(r.create_timestamp.timestamp(), r.start_time, r.end_time) for r in records]

    def rebuilt_stages(self, run_id: str) -> list[str]:
        """The stages a run built instead of reusing (`raw_scrape` always asks the sites
        for new posts: it counts as reused when the stages after it are)."""
        from dagster import DagsterEventType

        rebuilt = []
        for entry in self.instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            materialization = entry.asset_materialization
            if "new_posts" in materialization.metadata:  # raw_scrape: new posts rebuild the rest
                continue
            if not materialization.metadata["reused"].value:
                rebuilt.append(materialization.asset_key.to_user_string())
        return rebuilt


def stop_tree(process: psutil.Process) -> None:
    """Stop a process and its descendants (code servers, run workers); kill what lingers."""
    tree = [process, *process.children(recursive=True)]
    for member in tree:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=15)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def factory_daemon(home: Path, index: Path, folder: Path, keys: list[str]) -> Iterator[Factory]:
    import dagster as dg
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    from lora_factory.partitions import characters_partitions

    dagster_home = folder / "dagster_home"
    dagster_home.mkdir()
    # The embedded instance as `make demo` uses it: queued runs, 3 at a time.
    shutil.copy(EMBEDDED_INSTANCE, dagster_home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(dagster_home), "LF_HOME": str(home), "LF_INDEX_PATH": str(index)}
    target = ModuleTarget(module_name=LOCATION, attribute=None, working_directory=str(REPO_ROOT), location_name=None)
    with (
        environment(**env),
        dg.DagsterInstance.from_config(str(dagster_home)) as instance,
        WorkspaceProcessContext(instance, target, code_server_log_level="WARNING") as workspace,
    ):
        location = workspace.create_request_context().get_code_location(LOCATION)
        for sensor in location.get_repository(REPOSITORY).get_sensors():
            instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
        instance.add_dynamic_partitions(characters_partitions.name, keys)
        log = (folder / "daemon.log").open("w")
        daemon = psutil.Popen(
            [str(DAGSTER_DAEMON), "run", "-m", LOCATION],
            cwd=REPO_ROOT,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            factory = Factory(instance, workspace, daemon)
            # Untimed: the first run also waits for the daemon to load the code location, and
            # rebuilds what a code change since the home was built made stale.
            factory.wait([factory.launch_run(keys[0], {})])
            yield factory
        except BaseException:  # a failure, a timeout, Ctrl-C: show what the daemon said
            log.flush()
            print((folder / "daemon.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            stop_tree(daemon)
            log.close()


class WorkerMemory:
    """Peak resident memory of a run's worker process and its children (step processes),
    sampled at each poll."""

    def __init__(self, instance, run_id: str):
        self.instance, self.run_id = instance, run_id
        self.worker: psutil.Process | None = None
        self.peak_mb = 0.0

    def sample(self) -> None:
        from lora_factory.run_health import RunWorker

        if self.worker is None:
            # The run worker records its pid in a run tag before its first step.
            recorded = RunWorker.of(self.instance.get_run_by_id(self.run_id))
            if recorded is None:
                return
            try:
                self.worker = psutil.Process(recorded.pid)
            except psutil.NoSuchProcess:
                return
        try:
            processes = [self.worker, *self.worker.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak_mb = max(self.peak_mb, total / 2**20)


def one_run_figures(factory: Factory, key: str, repeats: int) -> dict[str, dict[str, float]]:
    """Per way: median seconds from submission and from RUN_START to end, peak MiB."""
    times: dict[str, list[RunTimes]] = {label: [] for label, _ in WAYS}
    peaks: dict[str, list[float]] = {label: [] for label, _ in WAYS}
    for _ in range(repeats):
        for label, run_config in WAYS:  # alternated, so both ways see the same load
            run_id = factory.launch_run(key, run_config)
            memory = WorkerMemory(factory.instance, run_id)
            times[label] += factory.wait([run_id], on_poll=memory.sample, every_s=MEMORY_POLL_S)
            rebuilt = factory.rebuilt_stages(run_id)
            if rebuilt:  # then the run's time is not overhead
                raise RuntimeError(f"run {run_id} rebuilt {rebuilt} instead of reusing them")
            peaks[label].append(memory.peak_mb)
    return {
        label: {
            "submission": statistics.median(t.submission_to_end for t in times[label]),
            "start": statistics.median(t.start_to_end for t in times[label]),
            "peak_mb": max(peaks[label]),
        }
        for label, _ in WAYS
    }


def backfill_figures(factory: Factory, keys: list[str], rounds: int, run_config: dict) -> dict[str, float]:
    """`rounds` backfills of every key, all launched at once; wall seconds and runs."""
    run_ids = []
    for _ in range(rounds):
        run_ids += factory.launch_backfill(keys, run_config)
    times = factory.wait(run_ids)
    wall = max(t.ended for t in times) - min(t.submitted for t in times)
    return {"runs": len(run_ids), "wall": wall, "per_character": wall / len(run_ids)}


def rounds_within(budget_s: float, run_s: float, characters: int, rounds: int) -> int:
    """How many backfill rounds of `run_s`-second runs fit in `budget_s` (at least one).

    Runs overlap up to the instance's 3 at a time, but no faster than the cores allow."""
    parallel = min(3, os.cpu_count() or 1)
    seconds_per_round = run_s * characters / parallel
    return max(1, min(rounds, math.floor(budget_s / seconds_per_round)))


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="a factory home already built with --index (default: build one)")
    parser.add_argument("--index", default=None, help="the character index (default: the demo's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of one character, each way")
    parser.add_argument("--rounds", type=int, default=25, help="backfills of every character (25: 100 demo runs)")
    parser.add_argument("--budget-s", type=float, default=600, help="at most this long for the multiprocess backfill")
    args = parser.parse_args(argv)

    from lora_factory.demo.deployment import DEMO_INDEX_PATH

    index = Path(args.index or DEMO_INDEX_PATH).resolve()
    keys = character_keys(index)
    with tempfile.TemporaryDirectory(prefix="run_overhead_") as scratch:
        folder = Path(scratch)
        if args.home:
            home = Path(args.home).resolve()
        else:
            home = folder / "home"
            started = time.monotonic()
            print(f"building {len(keys)} characters into a temp home ...", flush=True)
            build_home(home, index)
            print(f"built in {time.monotonic() - started:.0f} s", flush=True)

        with factory_daemon(home, index, folder, keys) as factory:
            print(f"one run of {keys[0]}, {args.repeats} times each way ...", flush=True)
            one = one_run_figures(factory, keys[0], args.repeats)
            (now, _), (before, _) = WAYS
            rounds = {
                now: args.rounds,
                before: rounds_within(args.budget_s, one[before]["start"], len(keys), args.rounds),
            }
            backfill = {}
            for label, config in WAYS:
                print(f"backfills, {label}: {rounds[label] * len(keys)} runs ...", flush=True)
                backfill[label] = backfill_figures(factory, keys, rounds[label], config)

    # Other work on the machine slows both ways: say how busy it was.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\ncharacter_job, every stage reused, daemon-launched (embedded instance, {os.cpu_count()} cores)")
    print(f"load average at the end (1, 5, 15 min): {load}")
    print(f"one run of {keys[0]}, median of {args.repeats}:")
    print(f"{'':34s} {'in-process':>11s} {'multiproc':>11s} {'ratio':>7s}")
    rows = [
        ("submission to end, s", "submission"),
        ("RUN_START to end, s", "start"),
        ("peak RSS of the run worker*, MiB", "peak_mb"),
    ]
    for label, field in rows:
        ours, theirs = one[now][field], one[before][field]
        print(f"{label:34s} {ours:11.1f} {theirs:11.1f} {ours / theirs:7.3f}")
    print("  * with its step processes, sampled every 0.1 s")

    print(
        f"\nbackfills of all {len(keys)} characters, one run each, {args.rounds} launched at once "
        "(first submission to last end):"
    )
    print(f"{'':34s} {'in-process':>11s} {'multiproc':>11s} {'ratio':>7s}")
    ours, theirs = backfill[now], backfill[before]
    print(f"{'runs':34s} {ours['runs']:11d} {theirs['runs']:11d}")
    print(f"{'wall time, s':34s} {ours['wall']:11.1f} {theirs['wall']:11.1f}")
    ratio = ours["per_character"] / theirs["per_character"]
    print(f"{'s per character':34s} {ours['per_character']:11.2f} {theirs['per_character']:11.2f} {ratio:7.3f}")
    for characters in (100, 10_000):
        a, b = ours["per_character"] * characters, theirs["per_character"] * characters
        print(f"{f'{characters:,} characters (extrapolated)':34s} {duration(a):>11s} {duration(b):>11s} {ratio:7.3f}")
    if rounds[before] < args.rounds:
        print(
            f"multiprocess: {rounds[before]} round(s), not {args.rounds}: at "
            f"{one[before]['start']:.0f} s a run, {args.rounds} would take longer than {duration(args.budget_s)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
