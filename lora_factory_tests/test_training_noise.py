"""Training noise: plain Gaussian unless asked, kohya's noise offset and multi-resolution
noise put random coarse structure into it, and a run records what it used."""

from __future__ import annotations

import pytest
import torch

from lora_factory.demo.deployment import DemoBaseModel
from lora_factory.training.config import TrainingConfig
from lora_factory.training.noise import training_noise

SHAPE = (512, 4, 16, 16)  # the demo base model's latents


def _coarse_spread(noise: torch.Tensor) -> float:
    """Spread of the per-channel means: the coarsest structure a picture's noise has."""
    return noise.mean(dim=(2, 3)).std().item()


def test_without_options_it_is_the_plain_gaussian_a_run_always_drew():
    plain = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(training_noise(SHAPE, torch.Generator().manual_seed(3)), plain)


@pytest.mark.parametrize(
    "options", [{"offset": 0.1}, {"multires_iterations": 4, "multires_discount": 0.5}], ids=["offset", "multires"]
)
def test_offset_and_multires_noise_add_coarse_structure(options):
    plain = training_noise(SHAPE, torch.Generator().manual_seed(0))
    coarse = training_noise(SHAPE, torch.Generator().manual_seed(0), **options)
    assert coarse.shape == plain.shape
    # Plain noise averages away over 256 latent pixels (spread 1/16); the coarse kinds keep
    # a random colour cast the model cannot read a picture's colours through.
    assert _coarse_spread(plain) == pytest.approx(1 / 16, rel=0.1)
    assert _coarse_spread(coarse) > 1.5 * _coarse_spread(plain)
    if "multires_iterations" in options:  # scaled back to unit variance, picture by picture
        assert torch.allclose(coarse.std(dim=(1, 2, 3)), torch.ones(SHAPE[0]), atol=1e-4)


def test_multires_noise_stops_at_one_latent_pixel_in_tall_buckets():
    generator = torch.Generator().manual_seed(0)
    # 8x24 latents (a 64x192 bucket): three halvings reach one column; more ask for nothing coarser.
    assert torch.equal(
        training_noise((2, 4, 24, 8), generator, multires_iterations=3, multires_discount=0.4),
        training_noise((2, 4, 24, 8), torch.Generator().manual_seed(0), multires_iterations=10, multires_discount=0.4),
    )


def test_bad_multires_settings_are_refused():
    with pytest.raises(ValueError, match="multires_noise_iterations must be >= 0"):
        TrainingConfig(multires_noise_iterations=-1)
    with pytest.raises(ValueError, match=r"multires_noise_discount must be in \(0, 1\]"):
        TrainingConfig(multires_noise_iterations=6, multires_noise_discount=0.0)
    with pytest.raises(ValueError, match="noise_offset must be >= 0"):
        TrainingConfig(noise_offset=-0.1)


def test_undecided_noise_is_plain_unless_the_base_model_says_otherwise():
    plain = TrainingConfig().resolved(5)
    assert (plain.noise_offset, plain.multires_noise_iterations, plain.multires_noise_discount) == (0.0, 0, 0.3)
    demo = DemoBaseModel.defaults.training(TrainingConfig()).resolved(5)
    assert (demo.noise_offset, demo.multires_noise_iterations, demo.multires_noise_discount) == (0.1, 4, 0.5)
    # A run that turns it off keeps it off.
    off = DemoBaseModel.defaults.training(TrainingConfig(noise_offset=0.0, multires_noise_iterations=0))
    assert (off.resolved(5).noise_offset, off.resolved(5).multires_noise_iterations) == (0.0, 0)
