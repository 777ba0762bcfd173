"""The run-overhead benchmark runs end to end at its smallest size and prints both ways.

One demo character (a one-row copy of the demo index) built into a temp home, one run
each way, one backfill round each way, on a real `dagster-daemon`.
"""

import re

import pytest
import yaml

from lora_factory.benchmarks.run_overhead import main
from lora_factory.demo.deployment import DEMO_INDEX_PATH

NUMBER = r"(\d+(?:\.\d+)?)"


def figures(out: str, label: str) -> list[float]:
    """The numbers of the table row starting with `label`."""
    line = next(line for line in out.splitlines() if line.startswith(label))
    return [float(value) for value in re.findall(NUMBER, line[len(label) :])]


# Building the character takes 1.5-7 min on 2 shared cores, two multiprocess runs 1-3 min.
@pytest.mark.timeout(1500)
def test_run_overhead_benchmark_prints_both_ways(tmp_path, capsys):
    demo_index = yaml.safe_load(DEMO_INDEX_PATH.read_text())
    demo_index["characters"] = demo_index["characters"][:1]
    index = tmp_path / "index.yaml"
    index.write_text(yaml.safe_dump(demo_index, allow_unicode=True))

    assert main(["--index", str(index), "--repeats", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out

    assert "in-process" in out and "multiproc" in out
    for label in ("submission to end, s", "RUN_START to end, s", "wall time, s", "s per character"):
        in_process, multiprocess, *_ = figures(out, label)
        assert in_process > 0 and multiprocess > 0, label
    assert figures(out, "runs") == [1, 1]  # one character, one round, each way
    peak_in_process, peak_multiprocess, _ = figures(out, "peak RSS")
    assert peak_in_process > 0 and peak_multiprocess > 0
