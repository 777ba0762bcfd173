"""reporting: contact sheets, preview grids and sheets, metric curves, markdown data URIs,
and the tables the metadata panel shows."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_factory.assets.metadata import MAX_CELL_CHARS, table_entries, table_metadata
from lora_factory.reporting import (
    LABEL_HEIGHT,
    ROW_LABEL_WIDTH,
    SHEET_GAP,
    TITLE_HEIGHT,
    contact_sheet_png,
    image_grid_png,
    markdown_image,
    metric_curve_png,
    preview_cell_size,
    preview_sheet_png,
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


def test_preview_sheet_keeps_cells_at_the_render_size_with_labels_under_them():
    names = ["portrait", "outfit_school_uniform", "full_body"]
    blocks = [("base model, no LoRA", [solid((255, 0, 0), (128, 128))] * 3),
              ("step 48 (chosen)", [solid((0, 0, 255), (128, 128))] * 3)]
    sheet = decode(preview_sheet_png(blocks, names, cols=3))
    block_height = TITLE_HEIGHT + 128 + 2 * LABEL_HEIGHT
    assert sheet.size == (3 * 128 + 2 * SHEET_GAP, 2 * block_height)
    assert sheet.getpixel((64, TITLE_HEIGHT + 64)) == (255, 0, 0)
    assert sheet.getpixel((128 + SHEET_GAP + 64, block_height + TITLE_HEIGHT + 64)) == (0, 0, 255)
    # Default cells: the renders' own size, at most 256 px (512 px renders of a real model).
    assert preview_cell_size([solid((0, 0, 0), (128, 128))]) == 128
    assert preview_cell_size([solid((0, 0, 0), (512, 512))]) == 256
    wide = decode(preview_sheet_png([("step 1", [solid((0, 0, 0), (512, 512))] * 11)], ["p"] * 11))
    assert wide.width <= 4 * 256 + 3 * SHEET_GAP and wide.height == TITLE_HEIGHT + 3 * (256 + 2 * LABEL_HEIGHT)
    with pytest.raises(ValueError, match="one per label"):
        preview_sheet_png([("step 1", [solid((0, 0, 0))])], ["a", "b"])


def test_markdown_image_with_a_minimum_width_lowers_quality_instead_of_shrinking():
    images = [noise((128, 128), seed) for seed in range(12)]
    png = preview_sheet_png([("step 1", images)], [f"prompt {i}" for i in range(12)])
    width = decode(png).width
    markdown = markdown_image(png, "previews", max_bytes=20_000, min_width=width)
    webp = Image.open(io.BytesIO(base64.b64decode(markdown[markdown.index("base64,") + 7 : -1])))
    assert webp.width == width  # over the budget rather than cells under 128 px
    shrunk = markdown_image(png, "previews", max_bytes=20_000)
    assert Image.open(io.BytesIO(base64.b64decode(shrunk[shrunk.index("base64,") + 7 : -1]))).width < width


def test_table_metadata_is_narrow_useful_columns_first():
    sha = "ab" * 32
    frame = pd.DataFrame(
        {
            "sha256": [sha, sha],
            "path": ["artefacts/lora_checkpoints/ash/ash-000024.safetensors", ""],
            "detail": [f"near duplicate of {sha} (larger)", "x" * 500],
            "tags": [np.array(["red_hair", "horns"]), np.array([], dtype=object)],
            "score": [0.49806117368015373, float("nan")],
            "step": [24, 48],
        }
    )
    table = table_metadata(frame, max_rows=1, first=["step", "score"])
    assert [column.name for column in table.schema.columns] == ["step", "score", "detail", "tags", "sha256", "path"]
    (row,) = [record.data for record in table.records]
    assert row == {
        "step": 24,
        "score": 0.4981,
        "detail": f"near duplicate of {sha[:10]} (larger)",
        "tags": "red_hair, horns",
        "sha256": sha[:10],
        "path": "ash-000024.safetensors",
    }
    long_text = table_metadata(frame.iloc[1:]).records[0].data["detail"]
    assert len(long_text) == MAX_CELL_CHARS and long_text.endswith("…")
    entries = table_entries("checkpoints", frame, "tables/lora_checkpoints/ash.parquet", max_rows=1)
    assert entries["checkpoints_table_path"].value == "tables/lora_checkpoints/ash.parquet"
    assert "checkpoints_table_path" not in table_entries("checkpoints", frame, "t.parquet", max_rows=2)


def test_previews_shown_are_the_best_step_and_its_neighbours():
    from lora_factory.assets.evaluation import steps_around

    steps = [0, 24, 48, 72, 96]  # 0: the base model, never a neighbour
    assert steps_around(steps, 24) == [24, 48]
    assert steps_around(steps, 72) == [48, 72, 96]
    assert steps_around(steps, 96, neighbours=2) == [48, 72, 96]
