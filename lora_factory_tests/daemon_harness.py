"""A real `dagster-daemon run` on a temp instance, for the tests that need one.

The instance is the embedded instance yaml (lora_factory/embedded_instance.yaml) with
short intervals; the code location is one of the tiny ones next to this file. The
`started` fixture (conftest.py) stops the daemon and its children after the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_INSTANCE = REPO_ROOT / "lora_factory" / "embedded_instance.yaml"
DAGSTER_DAEMON = Path(sys.executable).with_name("dagster-daemon")
WAIT_S = 120  # generous: the machine's 2 cores are shared


def kill_tree(process: psutil.Process) -> list[int]:
    """SIGKILL a process and all its descendants at once; their pids."""
    tree = [process, *process.children(recursive=True)]
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    return [member.pid for member in tree]


def wait_for(what: str, condition, log: Path | None = None, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")


def write_instance(home: Path) -> None:
    """The embedded instance yaml with short intervals, as DAGSTER_HOME `home`."""
    home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(EMBEDDED_INSTANCE.read_text())
    config["run_monitoring"]["poll_interval_seconds"] = 1
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    config["run_retries"] = {"enabled": False}  # a retry is not under test
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


def start_daemon(
    location: Path | str, home: Path, log: Path, started: list, env: dict[str, str] | None = None
) -> psutil.Popen:
    """`dagster-daemon run` on instance `home` and code location `location` (a file, or
    the name of a module)."""
    target = ["-f", str(location)] if isinstance(location, Path) else ["-m", location]
    with log.open("a") as out:
        daemon = psutil.Popen(
            [str(DAGSTER_DAEMON), "run", *target],
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {}), "DAGSTER_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started.append(daemon)
    return daemon


def run_with_key(instance: dg.DagsterInstance, run_key: str) -> dg.DagsterRun | None:
    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/run_key": run_key}))
    return runs[0] if runs else None
