"""Benchmark scripts, each runnable as `python -m lora_factory.benchmarks.<name>`."""
