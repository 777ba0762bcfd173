"""The training throughput benchmark runs end to end on the CPU (the tiny model) and
reports, per side, FLOPs and the operations a step dispatches."""

from __future__ import annotations

import re

import torch

from lora_factory.benchmarks.training_throughput import Setup, count_flops, main


def test_a_step_is_counted_in_flops_and_operations():
    setup = Setup("tiny", torch.device("cpu"), (64,), 2, 4, steps=1, warmup_steps=0, precision="32-true")
    layer = torch.nn.Linear(8, 16)
    flops, operations = count_flops(setup, lambda: layer(torch.randn(4, 8)).square().mean())
    assert flops == 2 * (2 * 4 * 8 * 16)  # the forward matmul and the weight's gradient (the input needs none)
    assert operations >= 6  # matmul, bias, square, mean forward; their gradients backward


def test_the_benchmark_prints_both_sides_with_their_operations(capsys):
    status = main(["--device", "cpu", "--model", "tiny", "--resolutions", "64", "--steps", "2",
                   "--warmup-steps", "1", "--batch-size", "2", "--rank", "4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0, printed
    row = re.search(r"^\s+64 \| +([\d.]+) \| +([\d.]+) \|.*\| +(\d+) \(([\d.]+)\) / (\d+) \(([\d.]+)\)", printed, re.M)
    assert row, printed
    ours_images, example_images, ours_ops, _, example_ops, _ = map(float, row.groups())
    assert ours_images > 0 and example_images > 0
    # The example also runs the VAE and the text encoder every step; ours reads cached latents.
    assert example_ops > ours_ops > 100
