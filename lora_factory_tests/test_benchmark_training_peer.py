"""The comparison with diffusers' own LoRA example script (`benchmarks/training_vs_diffusers.py`).

What needs no second environment is tested here always: the training set in the layout the
script's `--train_data_dir` reads, its command line, the reading of a progress bar as it
is drawn, the errors, and our side's measurement. The comparison itself runs only where the
script and a Python that can run it are named by LF_DIFFUSERS_SCRIPT and LF_DIFFUSERS_PYTHON.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from lora_factory.benchmarks.training_throughput import captions_for
from lora_factory.benchmarks.training_vs_diffusers import (
    METADATA_FILE,
    PEER_LORA_FILE,
    PEER_PROGRESS,
    PYTHON_ENV,
    SCRIPT_ENV,
    Comparison,
    PeerRunError,
    PeerSetupError,
    StepClock,
    check_peer,
    main,
    measure_ours,
    peer_command,
    peer_environment,
    run_peer,
    write_imagefolder,
)


def test_the_training_set_is_an_imagefolder_with_captions_in_metadata_jsonl(tmp_path):
    comparison = Comparison(resolution=64, batch_size=3)
    examples = write_imagefolder(tmp_path / "train", comparison)

    lines = (tmp_path / "train" / METADATA_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == comparison.image_count == 6
    assert all(set(record) == {"file_name", "text"} for record in records)
    # imagefolder resolves file_name relative to the metadata file: plain names of files beside it
    images_on_disk = sorted(path.name for path in (tmp_path / "train").iterdir() if path.suffix == ".png")
    assert sorted(record["file_name"] for record in records) == images_on_disk
    assert [record["text"] for record in records] == captions_for(6)
    assert [(path.name, caption) for path, caption in examples] == [(r["file_name"], r["text"]) for r in records]
    for record in records:
        with Image.open(tmp_path / "train" / record["file_name"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_script_gets_the_comparisons_settings_and_nothing_that_leaves_the_machine(tmp_path):
    comparison = Comparison(resolution=192, batch_size=4, rank=16, steps=10, warmup_steps=2, seed=7)
    command = peer_command("py", "script.py", tmp_path / "model", tmp_path / "train", tmp_path / "out", comparison)
    assert command[:2] == ["py", "script.py"]
    assert flag(command, "--pretrained_model_name_or_path") == str(tmp_path / "model")
    assert flag(command, "--train_data_dir") == str(tmp_path / "train")
    assert flag(command, "--resolution") == "192"
    assert flag(command, "--train_batch_size") == "4"
    assert flag(command, "--rank") == "16"
    assert flag(command, "--seed") == "7"
    assert flag(command, "--max_train_steps") == "13"  # 2 warm-up + 10 timed + 1 after
    assert int(flag(command, "--checkpointing_steps")) > 13  # no resume state inside the run
    assert flag(command, "--mixed_precision") == "no"
    assert flag(command, "--dataloader_num_workers") == "0"
    assert float(flag(command, "--learning_rate")) == comparison.learning_rate
    assert flag(command, "--lr_scheduler") == "cosine" and flag(command, "--lr_warmup_steps") == "0"
    assert float(flag(command, "--snr_gamma")) == comparison.min_snr_gamma
    assert "--center_crop" in command and "--random_flip" not in command
    assert not {"--validation_prompt", "--push_to_hub", "--dataset_name"} & set(command)

    environment = peer_environment(3, tmp_path / "hf")
    assert environment["OMP_NUM_THREADS"] == "3" and environment["CUDA_VISIBLE_DEVICES"] == ""
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["HF_HOME"] == str(tmp_path / "hf")
    assert "PYTHONPATH" not in environment


def test_on_a_gpu_both_trainers_get_the_gpu_and_train_in_bf16(tmp_path):
    comparison = Comparison(model="sd15", device="cuda", resolution=512, rank=32)
    command = peer_command("py", "script.py", tmp_path / "model", tmp_path / "train", tmp_path / "out", comparison)
    assert flag(command, "--mixed_precision") == "bf16" == comparison.mixed_precision
    assert "CUDA_VISIBLE_DEVICES" not in peer_environment(1, tmp_path / "hf", gpu=True)
    for bad, message in (({"model": "sdxl"}, "model must be one of"), ({"device": "mps"}, "device must be one of")):
        with pytest.raises(ValueError, match=message):
            Comparison(**bad)


def test_a_gpu_comparison_without_a_gpu_is_refused_before_anything_runs(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--model", "sd15", "--diffusers-script", "x.py", "--peer-python", "py"])
    assert "torch sees no GPU here" in capsys.readouterr().err


def test_steps_are_timed_when_the_bar_is_first_drawn_with_them_even_across_cut_chunks():
    clock = StepClock(PEER_PROGRESS)
    clock.feed("INFO - ***** Running training *****\n", 0.0)
    clock.feed("\rSteps:   0%|          | 0/24 [00:00<?, ?it/s]", 1.0)
    clock.feed("\rSteps:   4%|▍         | 1/24 [00:00<00:05,  4.1it/s]", 2.0, cpu=10.0)
    clock.feed("\rSteps:   4%|▍         | 1/24 [00:00<00:05,  4.1it/s, lr=1e-4, step_loss=0.9]", 2.5, cpu=10.5)
    clock.feed("\rSteps:  50%|█████     | 1", 3.0, cpu=11.0)  # cut inside "12/24": not step 1, not yet 12
    clock.feed("2/24 [00:03<00:03,  4.0it/s]", 3.25, cpu=11.25)
    clock.feed("\rSteps: 100%|██████████| 24/24 [00:06<00:00,  4.0it/s]\n", 6.0, cpu=12.0)
    assert clock.first_seen == {0: 1.0, 1: 2.0, 12: 3.25, 24: 6.0}
    assert clock.cpu_seen == {1: 10.0, 12: 11.25, 24: 12.0}
    assert clock.total == 24
    assert clock.window(1, 24) == 4.0
    assert clock.cpu_window(1, 24) == 2.0 and clock.cpu_window(0, 24) is None
    with pytest.raises(PeerRunError, match=r"step\(s\) \[5\]"):
        clock.window(1, 5)


def write_executable(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# A stand-in for the script that draws its progress bar as it does (tqdm, the postfix set
# after each step), with steps of a known length and CPU time; it takes the same arguments.
BAR_DRAWER = """\
    import argparse, pathlib, sys, time
    from tqdm.auto import tqdm
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_train_steps", type=int)
    parser.add_argument("--output_dir")
    parser.add_argument("--step_s", type=float, default=0.1)
    parser.add_argument("--cpu_s", type=float, default=0.0)
    parser.add_argument("--stop_after", type=int)
    args, _ = parser.parse_known_args()
    print("INFO - ***** Running training *****", file=sys.stderr, flush=True)
    bar = tqdm(range(args.max_train_steps), desc="Steps")
    for step in range(args.max_train_steps if args.stop_after is None else args.stop_after):
        time.sleep(args.step_s)
        busy_until = time.process_time() + args.cpu_s
        while time.process_time() < busy_until:
            pass
        bar.update(1)
        bar.set_postfix(step_loss=0.5, lr=1e-4)
    bar.close()
    pathlib.Path(args.output_dir, "pytorch_lora_weights.safetensors").write_bytes(b"")
"""


def test_the_scripts_steps_are_timed_from_its_progress_bar_as_it_is_drawn(tmp_path):
    script = write_executable(tmp_path / "bar.py", BAR_DRAWER)
    comparison = Comparison(resolution=64, batch_size=2, steps=5, warmup_steps=1)
    out = tmp_path / "out"
    out.mkdir()
    command = peer_command(sys.executable, script, tmp_path, tmp_path, out, comparison)
    command += ["--step_s", "0.1", "--cpu_s", "0.1"]
    result = run_peer(command, peer_environment(1), comparison, timeout_s=120, lora_file=out / PEER_LORA_FILE)
    # 5 timed steps of 0.1 s asleep + 0.1 s of CPU: 10 images/s at most; a busy machine only slows it.
    assert 0.3 * 10 < result.images_per_second <= 10 * 1.05
    assert 0.19 < result.step_seconds < 0.7
    # Its CPU time is read from its process as each step is reported: 0.1 s a step, 20 images per CPU second.
    assert 20 * 0.7 < result.images_per_cpu_second <= 20 * 1.1
    assert result.run_seconds > 7 * 0.2


def test_a_script_that_fails_or_stops_early_is_reported_with_its_last_lines(tmp_path):
    comparison = Comparison(resolution=64, batch_size=2, steps=3, warmup_steps=1)
    failing = write_executable(
        tmp_path / "failing.py",
        """\
        import sys
        for number in range(100):
            print(f"loading {number}", file=sys.stderr)
        raise SystemExit("ValueError: --train_data_dir has no metadata.jsonl")
        """,
    )
    with pytest.raises(PeerRunError) as error:
        run_peer([sys.executable, str(failing)], peer_environment(1), comparison, timeout_s=60)
    assert "exited with status 1" in str(error.value)
    assert "has no metadata.jsonl" in str(error.value) and "loading 99" in str(error.value)
    assert "loading 10\n" not in str(error.value)  # only the last lines

    bar = write_executable(tmp_path / "bar.py", BAR_DRAWER)
    short = [sys.executable, str(bar), "--max_train_steps", str(comparison.total_steps), "--output_dir", str(tmp_path)]
    with pytest.raises(PeerRunError, match=r"did not report 5 training steps \(its bar: 2/5\)"):
        run_peer(short + ["--step_s", "0", "--stop_after", "2"], peer_environment(1), comparison, timeout_s=60)

    with pytest.raises(PeerRunError, match="ran past 2 s"):
        run_peer(short + ["--step_s", "30"], peer_environment(1), comparison, timeout_s=2)

    with pytest.raises(PeerRunError, match="without writing"):
        run_peer(short + ["--step_s", "0"], peer_environment(1), comparison, 60, lora_file=tmp_path / "elsewhere")


def test_a_missing_script_or_python_or_module_is_a_clear_setup_error(tmp_path):
    script = tmp_path / "train_text_to_image_lora.py"
    with pytest.raises(PeerSetupError, match="--diffusers-script"):
        check_peer(sys.executable, None)
    with pytest.raises(PeerSetupError, match="--peer-python"):
        check_peer(None, script)
    with pytest.raises(PeerSetupError, match=r"train_text_to_image_lora.py not found"):
        check_peer(sys.executable, script)
    script.write_text("")
    with pytest.raises(PeerSetupError, match=r"bin/python3 for the diffusers example not found"):
        check_peer(tmp_path / "venv" / "bin" / "python3", script)
    no_torchvision = write_executable(
        tmp_path / "python",
        """\
        #!/bin/sh
        echo "ModuleNotFoundError: No module named 'torchvision'" >&2
        exit 1
        """,
    )
    with pytest.raises(PeerSetupError, match=r"cannot import(.|\n)*No module named 'torchvision'"):
        check_peer(no_torchvision, script)

    assert main(["--diffusers-script", str(tmp_path / "missing.py"), "--peer-python", sys.executable]) == 2


def test_our_side_is_timed_from_train_loras_step_log(tmp_path):
    import torch

    from lora_factory.training.tiny_sd import build_tiny_sd15

    comparison = Comparison(resolution=64, batch_size=2, rank=4, steps=3, warmup_steps=1)
    model = build_tiny_sd15(tmp_path / "tiny-sd15")
    examples = write_imagefolder(tmp_path / "train", comparison)
    threads = torch.get_num_threads()
    result = measure_ours(model, examples, comparison, tmp_path)
    assert torch.get_num_threads() == threads
    assert result.images_per_second > 0
    assert result.step_seconds * comparison.steps < result.run_seconds
    assert result.images_per_second == pytest.approx(comparison.batch_size / result.step_seconds)
    # One thread: the process cannot use more CPU time than wall time over the steps.
    assert result.images_per_cpu_second >= 0.95 * result.images_per_second
    assert (tmp_path / "ours" / "bench-000005.safetensors").is_file()  # it trained all 5 steps


def test_against_the_diffusers_example_when_one_is_set_up(capsys):
    script, python = os.environ.get(SCRIPT_ENV), os.environ.get(PYTHON_ENV)
    if not (script and python):
        pytest.skip(
            f"set {SCRIPT_ENV} (diffusers' train_text_to_image_lora.py) and {PYTHON_ENV} (a Python with "
            "torchvision and datasets) to run the comparison"
        )
    assert main(["--diffusers-script", script, "--peer-python", python, "--steps", "4", "--warmup-steps", "1",
                 "--batch-size", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "diffusers example command: " in printed and "--max_train_steps 6" in printed
    row = re.search(r"^\s+1 \| +([\d.]+) \| +([\d.]+) \| +([\d.]+)x", printed, re.MULTILINE)
    assert row, printed
    ours, example, ratio = map(float, row.groups())
    assert ours > 0 and example > 0 and ratio == pytest.approx(ours / example, rel=0.02)
