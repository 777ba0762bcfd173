"""Pictures for run metadata: contact sheets, checkpoint x prompt grids, metric curves.

Dagster has no image metadata type, but its UI renders markdown, and markdown accepts
pictures embedded as data URIs. Those URIs live in the event log database, so every PNG
made here is kept under a byte budget (downscaled until it fits), and `markdown_image`
embeds it as lossy WebP, a few tens of KB.
Pure PIL/matplotlib: no Dagster, no GUI backend.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

# A few of these per materialization are fine in the event log; megabytes are not.
DEFAULT_MAX_PNG_BYTES = 300_000
DEFAULT_MAX_INLINE_BYTES = 60_000  # per picture embedded in metadata
LABEL_FONT_SIZE = 12  # px: legible at the picture's own size
LABEL_HEIGHT = 16
TITLE_FONT_SIZE = 15
TITLE_HEIGHT = 24
ROW_LABEL_WIDTH = 110
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
TITLE_BACKGROUND = (232, 236, 242)
# Preview sheets: cells at the renders' own size up to this (128 px for the demo's models,
# 256 px for SD1.5's 512 px renders), rows about this wide, so a dialog shows them unscaled.
MAX_PREVIEW_CELL = 256
PREVIEW_SHEET_WIDTH = 1024
SHEET_GAP = 4  # px of white between the cells of a preview sheet
# WebP qualities tried, best first, before a picture with a minimum width is downscaled.
WEBP_QUALITIES = (80, 70, 60, 50, 40)


def contact_sheet_png(
    images: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    thumb: int = 128,
    cols: int = 8,
    max_bytes: int = DEFAULT_MAX_PNG_BYTES,
) -> bytes:
    """Thumbnails of `images` in a grid of `cols` columns, each with its label below."""
    if not images:
        raise ValueError("contact_sheet_png needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images: pass one per image")
    if thumb < 8 or cols < 1:
        raise ValueError(f"thumb must be >= 8 and cols >= 1 (got thumb={thumb}, cols={cols})")
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    label_height = LABEL_HEIGHT if labels is not None else 0
    cell_height = thumb + label_height
    sheet = Image.new("RGB", (cols * thumb, rows * cell_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        left, top = (index % cols) * thumb, (index // cols) * cell_height
        _paste_thumbnail(sheet, image, left, top, thumb)
        if labels is not None:
            _draw_label(draw, labels[index], left + 2, top + thumb + 1, thumb - 4)
    return encode_png(sheet, max_bytes)


def image_grid_png(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    thumb: int = 128,
    max_bytes: int = DEFAULT_MAX_PNG_BYTES,
) -> bytes:
    """A labelled table of images, e.g. one row per checkpoint and one column per prompt."""
    if not rows:
        raise ValueError("image_grid_png needs at least one row")
    if len(row_labels) != len(rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(rows)} rows")
    for row_index, row in enumerate(rows):
        if len(row) != len(col_labels):
            raise ValueError(
                f"row {row_index} has {len(row)} images but there are {len(col_labels)} "
                "column labels: every row needs one image per column"
            )
    if not col_labels:
        raise ValueError("image_grid_png needs at least one column")
    width = ROW_LABEL_WIDTH + len(col_labels) * thumb
    height = LABEL_HEIGHT + len(rows) * thumb
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for col_index, label in enumerate(col_labels):
        _draw_label(draw, label, ROW_LABEL_WIDTH + col_index * thumb + 2, 1, thumb - 4)
    for row_index, row in enumerate(rows):
        top = LABEL_HEIGHT + row_index * thumb
        _draw_label(draw, row_labels[row_index], 2, top + thumb // 2 - 6, ROW_LABEL_WIDTH - 4)
        for col_index, image in enumerate(row):
            _paste_thumbnail(grid, image, ROW_LABEL_WIDTH + col_index * thumb, top, thumb)
    return encode_png(grid, max_bytes)


def preview_cell_size(images: Sequence[Image.Image]) -> int:
    """The cell side of a preview sheet: the renders' own size, at most MAX_PREVIEW_CELL."""
    return min(MAX_PREVIEW_CELL, max(max(image.size) for image in images))


def preview_sheet_png(
    blocks: Sequence[tuple[str, Sequence[Image.Image]]],
    labels: Sequence[str],
    thumb: int | None = None,
    cols: int | None = None,
) -> bytes:
    """Preview images of a few checkpoints, one block each: the block's title on a band,
    then its images (one per prompt, labelled) in rows of `cols`.

    `thumb` defaults to `preview_cell_size` and `cols` to a balanced count that keeps a
    row near PREVIEW_SHEET_WIDTH. Lossless and not shrunk: `markdown_image(...,
    min_width=...)` makes it compact without making the cells smaller.
    """
    if not blocks:
        raise ValueError("preview_sheet_png needs at least one block")
    for title, images in blocks:
        if len(images) != len(labels):
            raise ValueError(f"block {title!r} has {len(images)} images for {len(labels)} labels: one per label")
    if not labels:
        raise ValueError("preview_sheet_png needs at least one image per block")
    thumb = thumb or preview_cell_size([image for _, images in blocks for image in images])
    if cols is None:
        rows_needed = -(-len(labels) * (thumb + SHEET_GAP) // PREVIEW_SHEET_WIDTH)
        cols = -(-len(labels) // rows_needed)
    cols = max(1, min(cols, len(labels)))
    grid_rows = -(-len(labels) // cols)
    label_height = 2 * LABEL_HEIGHT
    block_height = TITLE_HEIGHT + grid_rows * (thumb + label_height)
    pitch = thumb + SHEET_GAP
    sheet = Image.new("RGB", (cols * pitch - SHEET_GAP, len(blocks) * block_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for block_index, (title, images) in enumerate(blocks):
        top = block_index * block_height
        draw.rectangle((0, top, sheet.width, top + TITLE_HEIGHT - 1), fill=TITLE_BACKGROUND)
        _draw_label(draw, title, 6, top + (TITLE_HEIGHT - TITLE_FONT_SIZE) // 2 - 1, sheet.width - 12,
                    size=TITLE_FONT_SIZE)
        for index, image in enumerate(images):
            left = (index % cols) * pitch
            cell_top = top + TITLE_HEIGHT + (index // cols) * (thumb + label_height)
            _paste_thumbnail(sheet, image, left, cell_top, thumb)
            _draw_wrapped_label(draw, labels[index], left + 3, cell_top + thumb + 1, thumb - 6)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def metric_curve_png(
    table: pd.DataFrame,
    x: str = "step",
    ys: Sequence[str] = ("fidelity", "prompt_following", "score"),
    chosen_step: float | None = None,
    title: str | None = None,
    max_bytes: int = DEFAULT_MAX_PNG_BYTES,
) -> bytes:
    """Line plot of the `ys` columns against `x`, with the chosen step marked."""
    missing = [name for name in (x, *ys) if name not in table.columns]
    if missing:
        raise ValueError(f"metric_curve_png: table has no column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("metric_curve_png: the table is empty, there is nothing to plot")
    ordered = table.sort_values(x)
    # An object-oriented Figure with the Agg canvas: no pyplot global state, no GUI.
    figure = Figure(figsize=(6.0, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    plotted = False
    for name in ys:
        values = pd.to_numeric(ordered[name], errors="coerce")
        if values.notna().any():  # an optional metric that was not measured stays off the legend
            axes.plot(ordered[x], values, marker="o", markersize=3, label=name)
            plotted = True
    if chosen_step is not None:
        axes.axvline(chosen_step, color="black", linestyle="--", linewidth=1, label=f"chosen {x} {chosen_step}")
    axes.set_xlabel(x)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if title:
        axes.set_title(title)
    if plotted or chosen_step is not None:
        axes.legend(loc="best", fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return shrink_png(buffer.getvalue(), max_bytes)


def markdown_image(
    png: bytes, alt: str, max_bytes: int = DEFAULT_MAX_INLINE_BYTES, min_width: int | None = None
) -> str:
    """Markdown that shows `png` inline, compactly: `![alt](data:image/webp;base64,...)`.

    The picture is re-encoded as lossy WebP (quality 80) and downscaled until it fits in
    `max_bytes`: a few tens of KB per picture in the event log instead of a PNG's hundreds.
    With `min_width` (a preview sheet whose cells must stay their size) the quality is
    lowered first, and the picture is never made narrower than `min_width`, even if it
    then stays over `max_bytes`.
    """
    return f"![{_safe_alt(alt)}]({data_uri(png, max_bytes, min_width)})"


def data_uri(png: bytes, max_bytes: int = DEFAULT_MAX_INLINE_BYTES, min_width: int | None = None) -> str:
    """`png` as a compact WebP data URI (see `markdown_image`)."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("markdown_image expects PNG bytes (e.g. from contact_sheet_png)")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    qualities = WEBP_QUALITIES if min_width else WEBP_QUALITIES[:1]
    while True:
        for quality in qualities:
            buffer = io.BytesIO()
            image.save(buffer, format="WEBP", quality=quality, method=4)
            if buffer.tell() <= max_bytes:
                break
        smaller = (max(1, image.width * 3 // 4), max(1, image.height * 3 // 4))
        if buffer.tell() <= max_bytes or min(image.size) <= 16 or (min_width and smaller[0] < min_width):
            break
        image = image.resize(smaller, Image.LANCZOS)
    return f"data:image/webp;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _safe_alt(alt: str) -> str:
    # Brackets would end the alt text early; newlines would break the markdown line.
    return " ".join(alt.replace("[", "(").replace("]", ")").split())


def encode_png(image: Image.Image, max_bytes: int = DEFAULT_MAX_PNG_BYTES) -> bytes:
    """PNG bytes of `image`, downscaled as much as needed to stay within `max_bytes`."""
    while True:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
        if len(data) <= max_bytes or min(image.size) <= 16:
            return data
        # PNG size grows roughly with the pixel count; aim a little below the budget.
        factor = max(0.25, min(0.9, (max_bytes / len(data)) ** 0.5 * 0.95))
        new_size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)


def shrink_png(png: bytes, max_bytes: int = DEFAULT_MAX_PNG_BYTES) -> bytes:
    """`png` itself when it fits the budget, else a downscaled re-encoding."""
    if len(png) <= max_bytes:
        return png
    with Image.open(io.BytesIO(png)) as image:
        return encode_png(image.convert("RGB"), max_bytes)


def _paste_thumbnail(canvas: Image.Image, image: Image.Image, left: int, top: int, size: int) -> None:
    """Paste `image` shrunk to fit a `size` square, centred in the cell, alpha on white."""
    thumbnail = _on_white(image)
    thumbnail.thumbnail((size, size), Image.Resampling.LANCZOS)
    offset = (left + (size - thumbnail.width) // 2, top + (size - thumbnail.height) // 2)
    canvas.paste(thumbnail, offset)


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


@functools.cache
def _label_font(size: int = LABEL_FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` px (its small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, max_width: int, font) -> str:
    """`text`, cut with an ellipsis so that it is at most `max_width` px wide."""
    if draw.textlength(text, font=font) > max_width:
        while text and draw.textlength(text + "…", font=font) > max_width:
            text = text[:-1]
        text += "…"
    return text


def _draw_label(
    draw: ImageDraw.ImageDraw, text: str, left: int, top: int, max_width: int, size: int = LABEL_FONT_SIZE
) -> None:
    """Draw `text`, cut with an ellipsis so that it never spills into the next cell."""
    font = _label_font(size)
    draw.text((left, top), _fit(draw, " ".join(str(text).split()), max_width, font), fill=TEXT_COLOUR, font=font)


def _draw_wrapped_label(draw: ImageDraw.ImageDraw, text: str, left: int, top: int, max_width: int) -> None:
    """Draw `text` on up to two lines, broken after a space or an underscore; the rest is
    cut with an ellipsis."""
    font = _label_font()
    text = " ".join(str(text).split())
    first = text
    if draw.textlength(text, font=font) > max_width:
        breaks = [i + 1 for i, char in enumerate(text) if char in " _" and
                  draw.textlength(text[: i + 1].rstrip(), font=font) <= max_width]
        first = text[: breaks[-1]] if breaks else _fit(draw, text, max_width, font)
    rest = text[len(first):].strip() if not first.endswith("…") else ""
    draw.text((left, top), first.rstrip(), fill=TEXT_COLOUR, font=font)
    if rest:
        draw.text((left, top + LABEL_HEIGHT), _fit(draw, rest, max_width, font), fill=TEXT_COLOUR, font=font)
