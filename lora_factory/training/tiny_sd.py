"""A tiny Stable Diffusion 1.5-shaped pipeline, built offline with random weights.

Tests and the demo need a base model without downloading 2 GB: this one has the same
components, block types, latent channels, VAE downsampling (x8), text-encoder layout and
scheduler as SD1.5, only much smaller. Its images are noise; its LoRA key names and shapes
follow exactly the same rules as a real SD1.5 model's, which is what the factory checks.

The tokenizer is a byte-level BPE written here from scratch (the 256 byte symbols, their
end-of-word variants, a handful of merges and CLIP's two special tokens), so building needs
no network at all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from lora_factory.training.sd15_architecture import SD15_NOISE_SCHEDULE

# Bump when the architecture or the build recipe changes, so that an old folder is rebuilt.
TINY_SD15_RECIPE_VERSION = 2
BUILD_MARKER = "tiny_sd15.json"
# Weights are drawn from torch's global random state: two threads building at once would mix
# their draws, so builds in one process take turns (other processes are handled by the rename).
_BUILD_LOCK = threading.Lock()

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_TOKENS = 77  # SD1.5's context length: 75 caption tokens + BOS + EOS

# A few frequent letter pairs of booru captions, so that the BPE really merges something.
TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("h", "a"),
    ("i", "r</w>"),
    ("ha", "ir</w>"),
    ("e", "r</w>"),
    ("o", "n"),
    ("i", "n"),
    ("s", "o"),
    ("l", "o</w>"),
    ("so", "lo</w>"),
    ("g", "i"),
    ("r", "l</w>"),
    ("gi", "rl</w>"),
    ("e", "y"),
    ("e", "s</w>"),
    ("ey", "es</w>"),
)


def build_tiny_sd15(target_dir: Path, seed: int = 0) -> Path:
    """Build (once) the tiny SD1.5-shaped diffusers pipeline folder at `target_dir`.

    Deterministic: the same seed gives byte-identical weights. Idempotent: a folder that
    already holds this recipe and seed is returned as it is. The folder appears atomically
    (built next to it, then renamed), so a crash never leaves a half-built model.
    """
    with _BUILD_LOCK:
        return _build(Path(target_dir), seed)


def _build(target_dir: Path, seed: int) -> Path:
    marker = {"recipe_version": TINY_SD15_RECIPE_VERSION, "seed": seed}
    marker_path = target_dir / BUILD_MARKER
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return target_dir
    if target_dir.exists() and any(target_dir.iterdir()):
        raise FileExistsError(
            f"{target_dir} exists and is not a tiny SD1.5 build with seed {seed}: "
            "remove it or choose another folder"
        )

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target_dir.parent, prefix=f".{target_dir.name}."))
    try:
        # A private random state: building must not reseed the caller's generators.
        with torch.random.fork_rng(devices=[]):
            pipeline = _tiny_pipeline(staging / "tokenizer_source", seed)
        build_dir = staging / "pipeline"
        save_pipeline(pipeline, build_dir, staging / "tokenizer_source")
        (build_dir / BUILD_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
        try:
            if target_dir.exists():
                target_dir.rmdir()  # empty (checked above); a rename cannot replace a full folder
            build_dir.replace(target_dir)
        except OSError:
            # Another process built the same model first: its result is as good as ours.
            if not (marker_path.is_file() and json.loads(marker_path.read_text()) == marker):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def _tiny_pipeline(tokenizer_dir: Path, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    vocab = write_byte_level_bpe(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_TOKENS)

    text_width = 32
    # Each component gets its own seed so that changing one never reshuffles the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,  # latent side: 16 x (VAE factor 8) = 128 px images by default
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=text_width,
        attention_head_dim=2,  # SD1.5's config calls the head count "attention_head_dim"
        norm_num_groups=32,
        use_linear_projection=False,  # SD1.5: proj_in / proj_out are 1x1 convolutions
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: x8 like SD1.5
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    # >= 2 layers so that clip skip 2 (penultimate layer) is meaningful
    text_encoder = clip_text_encoder(vocab, width=text_width, layers=3, intermediate_size=64)
    return sd15_pipeline(vae, text_encoder, tokenizer, unet)


def clip_text_encoder(vocab: dict[str, int], width: int, layers: int, intermediate_size: int):
    """A CLIPTextModel of SD1.5's kind (quick GELU, 77 positions) for a `write_byte_level_bpe` vocab."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=width,
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
        )
    )


def sd15_pipeline(vae, text_encoder, tokenizer, unet):
    """A StableDiffusionPipeline of these components with SD1.5's own scheduler config."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**SD15_NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline, folder: Path, tokenizer_source: Path) -> None:
    """Save a pipeline folder, keeping the classic tokenizer files next to tokenizer.json
    for older readers."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_source / name, folder / "tokenizer" / name)


def write_byte_level_bpe(folder: Path, merges: Sequence[tuple[str, str]] = TINY_MERGES) -> dict[str, int]:
    """Write CLIP-style `vocab.json` + `merges.txt` for a small byte-level BPE; return the vocab.

    Vocabulary order follows CLIP's: the 256 byte symbols, the same with the end-of-word
    marker, one token per merge (in merge order), then the start and end tokens (so they
    get the last ids). `merges` are (left, right) symbol pairs, earliest applied first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(byte_symbols().values())
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the BPE merges produce a duplicate token")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text(lines, encoding="utf-8")
    return vocab


def byte_symbols() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; every other byte is shifted to an unused
    code point above 255, so that any UTF-8 text becomes a string of visible symbols.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return dict(sorted(table.items()))
