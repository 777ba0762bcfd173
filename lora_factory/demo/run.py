"""`make demo`: build every demo character end to end on the embedded default.

Uses the demo deployment (LF_DEPLOYMENT's default: the demo booru, started in this
process on a free loopback port, and the tiny models) and a SQLite Dagster instance under
the factory's home, so it needs nothing else. Run it again and every stage whose inputs did not change is reused, not redone.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import dagster as dg

from lora_factory.run_health import fail_dead_runs, in_process_run_args

EMBEDDED_INSTANCE = Path(__file__).resolve().parents[1] / "embedded_instance.yaml"
def prepare_home(home: Path) -> Path:
    """Point LF_HOME and DAGSTER_HOME at the factory's home; create the embedded instance."""
    home.mkdir(parents=True, exist_ok=True)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    os.environ["LF_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    # Two first runs at once would both create the SQLite tables, and one would crash
    # ("table runs already exists"): the first creates them under this lock, the others
    # wait and then open what it made.
    with open(home / ".dagster_home.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dagster_home / "dagster.yaml").exists():
            shutil.copy(EMBEDDED_INSTANCE, dagster_home / "dagster.yaml")
        dg.DagsterInstance.get().dispose()
    return dagster_home


def failure_message(result) -> str:
    """What a failed run's first failed step says to do: a `dagster.Failure`'s description,
    else the innermost cause of the error (not Dagster's "Error occurred while executing")."""
    failure = next((e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None)
    if failure is None:
        return "run failed"
    data = failure.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        message = data.user_failure_data.description
    elif data.error is not None:
        error = data.error
        while error.cause is not None:
            error = error.cause
        message = error.message
    else:
        message = "step failed"
    return f"{failure.step_key}: {message.strip()}"


def _state(materialization) -> str:
    metadata = materialization.metadata
    if "new_posts" in metadata:  # raw_scrape always asks the sites for new posts
        return f"sites checked, {metadata['new_posts'].value} new posts downloaded"
    return "reused (inputs unchanged)" if metadata["reused"].value else "built"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("LF_HOME", ".lora_factory"))
    parser.add_argument("--character", action="append", help="only these keys (repeatable)")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    dagster_home = prepare_home(home)

    # Imported after the environment is set: the definitions read LF_HOME.
    from lora_factory.definitions import defs
    from lora_factory.partitions import characters_partitions, series_partitions

    started = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        # An earlier demo killed mid-run left its run STARTED, holding the `gpu` pool.
        for run_id in fail_dead_runs(instance):
            print(f"marked run {run_id} failed: its worker process died", file=sys.stderr)
        rows = defs.resources["character_index"].enabled_rows()
        keys = [row.key for row in rows if not args.character or row.key in args.character]
        missing = set(args.character or []) - set(keys)
        if missing:
            print(f"not in the index (or disabled): {sorted(missing)}", file=sys.stderr)
            return 2
        known = set(instance.get_dynamic_partitions(characters_partitions.name))
        instance.add_dynamic_partitions(characters_partitions.name, [k for k in keys if k not in known])

        index_job = defs.resolve_implicit_global_asset_job_def()
        index_result = index_job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey("character_index")],
            **in_process_run_args(),
        )
        if not index_result.success:
            return 1

        # Anime series first: the characters bound to one take their figures from its clusters.
        series = sorted({name for row in rows if row.key in keys for name in row.anime_series})
        known_series = set(instance.get_dynamic_partitions(series_partitions.name))
        instance.add_dynamic_partitions(series_partitions.name, [s for s in series if s not in known_series])
        runs = [("series_job", name) for name in series] + [("character_job", key) for key in keys]
        summary: list[tuple[str, str, str]] = []
        for job_name, key in runs:
            print(f"\n=== {key} ===", flush=True)
            result = defs.resolve_job_def(job_name).execute_in_process(
                partition_key=key, instance=instance, raise_on_error=False, **in_process_run_args()
            )
            if not result.success:
                print(f"FAILED {key}: {failure_message(result)}", file=sys.stderr)
                return 1
            for event in result.get_asset_materialization_events():
                materialization = event.event_specific_data.materialization
                summary.append((key, materialization.asset_key.to_user_string(), _state(materialization)))

    elapsed = time.monotonic() - started
    print(f"\nDone in {elapsed:.0f} s.\n")
    width = max(len(asset) for _, asset, _ in summary) if summary else 10
    for key, asset, state in summary:
        print(f"  {key:<28} {asset:<{width}}  {state}")
    releases = home / "releases"
    print(f"\nReleases: {releases}")
    for key in keys:
        print(f"  {releases / key}")
    print(
        "\nOpen the UI on this instance:\n"
        f"  DAGSTER_HOME={dagster_home} .venv/bin/dagster dev -w workspace.yaml   (or: make ui)\n"
        "then http://127.0.0.1:3000 -> Assets. The demo's images are synthetic and its models "
        "small: its base model is trained on the demo world, so its LoRAs learn their characters' "
        "looks, and the scores measure how far."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
