"""The index-scale benchmark runs end to end on a small index and prints every figure."""

from lora_factory.benchmarks.index_scale import main


def test_index_scale_benchmark_prints_each_tick(capsys):
    assert main(["--rows", "30"]) == 0
    out = capsys.readouterr().out
    for label in ("first tick, every row new", "tick, file unchanged", "tick, one row changed"):
        assert label in out
    assert "2 runs requested" in out  # the index refresh and the one changed row
