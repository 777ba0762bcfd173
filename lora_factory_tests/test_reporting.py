"""reporting: contact sheets, preview grids, metric curves, markdown data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_factory.reporting import (
    LABEL_HEIGHT,
    ROW_LABEL_WIDTH,
    contact_sheet_png,
    image_grid_png,
    markdown_image,
    metric_curve_png,
)


def decode(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 60), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour if mode == "RGB" else (*colour, 0))


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_contact_sheet_lays_out_thumbnails_and_labels():
    images = [solid((255, 0, 0)), solid((0, 0, 255), (90, 30)), *[solid((0, 128, 0))] * 8]
    sheet = decode(contact_sheet_png(images, [f"image {i}" for i in range(10)], thumb=32, cols=4))
    assert sheet.size == (4 * 32, 3 * (32 + LABEL_HEIGHT))
    # The first cell is red in its middle; the second (a wide image) is blue in its middle.
    assert sheet.getpixel((16, 16)) == (255, 0, 0)
    assert sheet.getpixel((48, 16)) == (0, 0, 255)
    # A cell past the last image stays background white.
    assert sheet.getpixel((3 * 32 + 16, 2 * (32 + LABEL_HEIGHT) + 16)) == (255, 255, 255)


def test_contact_sheet_without_labels_and_fewer_images_than_columns():
    sheet = decode(contact_sheet_png([solid((10, 10, 10))] * 3, thumb=20, cols=8))
    assert sheet.size == (3 * 20, 20)


def test_contact_sheet_puts_transparent_images_on_white():
    sheet = decode(contact_sheet_png([solid((0, 0, 0), mode="RGBA")], thumb=16))
    assert sheet.getpixel((8, 8)) == (255, 255, 255)


def test_contact_sheet_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet_png([])
    with pytest.raises(ValueError, match="labels"):
        contact_sheet_png([solid((0, 0, 0))] * 2, ["only one"])


def test_pngs_stay_within_the_byte_budget():
    images = [noise((128, 128), seed) for seed in range(16)]
    png = contact_sheet_png(images, thumb=128, cols=4, max_bytes=40_000)
    assert len(png) <= 40_000
    assert decode(png).width < 4 * 128  # it had to be downscaled to fit


def test_image_grid_has_a_header_row_and_a_label_column():
    rows = [[solid((255, 0, 0)), solid((0, 0, 255))] for _ in range(3)]
    grid = decode(image_grid_png(rows, ["step 10", "step 20", "step 30"], ["portrait", "full_body"], thumb=48))
    assert grid.size == (ROW_LABEL_WIDTH + 2 * 48, LABEL_HEIGHT + 3 * 48)
    assert grid.getpixel((ROW_LABEL_WIDTH + 24, LABEL_HEIGHT + 24)) == (255, 0, 0)
    assert grid.getpixel((ROW_LABEL_WIDTH + 48 + 24, LABEL_HEIGHT + 2 * 48 + 24)) == (0, 0, 255)


def test_image_grid_rejects_ragged_rows():
    with pytest.raises(ValueError, match="one image per column"):
        image_grid_png([[solid((0, 0, 0))], []], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="row labels"):
        image_grid_png([[solid((0, 0, 0))]], [], ["c"])


def test_metric_curve_is_a_png_of_the_figure_size():
    table = pd.DataFrame(
        {
            "step": [30, 10, 20],
            "fidelity": [0.9, 0.2, 0.6],
            "prompt_following": [0.5, 0.7, 0.6],
            "artefact": [np.nan] * 3,  # not measured: left off the plot
            "score": [0.8, 0.3, 0.6],
        }
    )
    png = metric_curve_png(table, ys=["fidelity", "prompt_following", "artefact", "score"], chosen_step=30)
    assert decode(png).size == (600, 350)


def test_metric_curve_names_missing_columns():
    with pytest.raises(ValueError, match="fidelity"):
        metric_curve_png(pd.DataFrame({"step": [1]}), ys=["fidelity"])


def test_markdown_image_embeds_the_picture_as_compact_webp():
    png = contact_sheet_png([solid((200, 40, 40))], thumb=64)
    markdown = markdown_image(png, "previews [step 10]")
    assert markdown.startswith("![previews (step 10)](data:image/webp;base64,")
    encoded = markdown[markdown.index("base64,") + len("base64,") : -1]
    webp = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert webp.format == "WEBP" and webp.size == decode(png).size
    # Lossy, but the picture is still the picture: its colour survives.
    assert max(abs(a - b) for a, b in zip(webp.convert("RGB").getpixel((32, 32)), (200, 40, 40))) < 12


def test_markdown_image_shrinks_oversized_pngs_and_refuses_other_formats():
    big = io.BytesIO()
    noise((400, 400), 0).save(big, format="PNG")
    markdown = markdown_image(big.getvalue(), "noise", max_bytes=50_000)
    encoded = markdown[markdown.index("base64,") + len("base64,") : -1]
    assert len(base64.b64decode(encoded)) <= 50_000
    with pytest.raises(ValueError, match="PNG"):
        markdown_image(b"GIF89a", "not a png")
