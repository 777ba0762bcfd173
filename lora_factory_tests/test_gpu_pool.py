"""Only the GPU steps hold the `gpu` pool: other characters' data stages run meanwhile.

A real `dagster-daemon run` on the embedded instance yaml (op granularity, short
intervals), `gpu` limited to 1, and a tiny code location shaped like a character's chain
(gpu_pool_location.py), run by the factory's executor (`monitored_executor`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import dagster as dg
from daemon_harness import (
    run_with_key,
    start_daemon,
    wait_for,
    write_instance,
)

LOCATION = Path(__file__).with_name("gpu_pool_location.py")
GPU_STEPS = {"training", "previews"}
RUN_KEYS = ("first", "second", "first_again")


def step_intervals(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    """Each step's (STEP_START, STEP_SUCCESS) timestamps."""
    starts, ends = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
            ends[event.step_key] = entry.timestamp
    return {key: (starts[key], ends[key]) for key in starts}


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_gpu_steps_share_one_slot_while_other_runs_do_their_data_stages(tmp_path, started):
    home = tmp_path / "dagster_home"
    write_instance(home)
    flags = tmp_path / "flags"
    flags.mkdir()
    log = tmp_path / "daemon.log"

    def all_finished() -> bool:
        runs = [run_with_key(instance, key) for key in RUN_KEYS]
        return all(run is not None and run.is_finished for run in runs)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        config = instance.get_concurrency_config().pool_config
        assert config.pool_granularity.value == "op"
        # One GPU: `dagster instance concurrency set gpu 1`.
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        start_daemon(LOCATION, home, log, started, env={"GPU_POOL_TEST_FLAGS": str(flags)})
        wait_for("the three runs to finish", all_finished, log)

        runs = {key: run_with_key(instance, key) for key in RUN_KEYS}
        for key, run in runs.items():
            assert run.status == dg.DagsterRunStatus.SUCCESS, (key, log.read_text()[-4000:])
        steps = {
            (key, step): interval
            for key, run in runs.items()
            for step, interval in step_intervals(instance, run.run_id).items()
        }
        assert len(steps) == 9, steps
        gpu = {name: span for name, span in steps.items() if name[1] in GPU_STEPS}
        data = {name: span for name, span in steps.items() if name[1] not in GPU_STEPS}

        # A GPU step of one run and the data stage of another run at the same time.
        side_by_side = [
            (g, d) for g, d in itertools.product(gpu, data) if g[0] != d[0] and overlap(gpu[g], data[d])
        ]
        assert (("first", "training"), ("second", "data_stage")) in side_by_side, steps
        # Never two GPU steps at once, though they competed for the slot.
        for a, b in itertools.combinations(gpu, 2):
            assert not overlap(gpu[a], gpu[b]), (a, b, steps)

        # A step that waits for the slot waits inside its run (STARTED), saying so.
        waited = [
            entry.step_key
            for entry in instance.all_logs(
                runs["second"].run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
            )
            if "blocked by limit for pool gpu" in entry.message
        ]
        assert "training" in waited
        # Still one run per character at a time (the run queue's `dagster/partition` limit).
        first, again = (instance.get_run_record_by_id(runs[k].run_id) for k in ("first", "first_again"))
        assert not overlap((first.start_time, first.end_time), (again.start_time, again.end_time))
        # Every slot is back.
        assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0
