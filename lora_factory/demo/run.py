"""`make demo`: build every demo character end to end on the embedded default.

Uses the demo booru (started in this process on a free loopback port), the built-in
tiny models and a SQLite Dagster instance under the factory's home, so it needs nothing
else. Run it again and every stage whose inputs did not change is reused, not redone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

EMBEDDED_INSTANCE = Path(__file__).resolve().parents[1] / "embedded_instance.yaml"
PARTITIONED_ASSETS = (
    "raw_scrape",
    "matched_tags",
    "cleaned_crops",
    "captions",
    "buckets",
    "lora_checkpoints",
    "recscore_table",
    "chosen_model",
)


def prepare_home(home: Path) -> Path:
    """Point LF_HOME and DAGSTER_HOME at the factory's home; write the embedded instance."""
    home.mkdir(parents=True, exist_ok=True)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        shutil.copy(EMBEDDED_INSTANCE, dagster_home / "dagster.yaml")
    os.environ["LF_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


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
    import dagster as dg

    from lora_factory.definitions import defs
    from lora_factory.partitions import characters_partitions

    started = time.monotonic()
    with dg.DagsterInstance.get() as instance:
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
            instance=instance, asset_selection=[dg.AssetKey("character_index")]
        )
        if not index_result.success:
            return 1

        job = defs.resolve_job_def("character_job")
        summary: list[tuple[str, str, str]] = []
        for key in keys:
            print(f"\n=== {key} ===", flush=True)
            result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
            if not result.success:
                failure = next(
                    (e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None
                )
                message = failure.step_failure_data.error.message if failure else "run failed"
                print(f"FAILED {key}: {message.strip()}", file=sys.stderr)
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
        "tiny with random weights: its LoRAs and scores are meaningless by design."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
