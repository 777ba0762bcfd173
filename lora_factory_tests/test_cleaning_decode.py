import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_factory.cleaning.decode import DecodedImage, Quarantined, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decoded(data: bytes, **kwargs) -> DecodedImage:
    result = decode_image(data, **kwargs)
    assert isinstance(result, DecodedImage), result
    assert result.image.mode == "RGB"
    return result


def quarantined(data: bytes, **kwargs) -> Quarantined:
    result = decode_image(data, **kwargs)
    assert isinstance(result, Quarantined), result
    return result


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_plain_rgb_png_passes_unchanged():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    result = decoded(encode(image))
    assert result.size == (40, 30)
    assert result.source_format == "PNG"
    assert result.notes == ()
    assert result.image.getpixel((5, 5)) == (10, 200, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"  <!DOCTYPE html><html><body>429 Too Many Requests</body></html>", "html"),
        (b"<html><head></head></html>", "html"),
        (bytes(range(256)) * 4, "not_an_image"),
    ],
)
def test_non_images_are_quarantined_with_a_stable_reason(data, reason):
    assert quarantined(data).reason == reason


def test_truncated_jpeg_is_quarantined():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=95)
    result = quarantined(data[: len(data) // 2])
    assert result.reason == "truncated"
    assert str(result).startswith("truncated: ")


def test_decompression_bomb_is_refused_from_the_header():
    # A valid PNG header declaring 50000 x 50000 pixels with almost no data behind it.
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + png_chunk(b"IEND", b"")
    )
    assert quarantined(data).reason == "too_many_pixels"


def test_pixel_ceiling_is_configurable():
    data = encode(Image.new("RGB", (100, 100)))
    assert quarantined(data, max_pixels=5_000, max_area=4_000).reason == "too_many_pixels"
    with pytest.raises(ValueError, match="max_area"):
        decode_image(data, max_pixels=100, max_area=1_000)


def test_huge_images_are_capped_by_area_keeping_the_aspect_ratio():
    result = decoded(encode(Image.new("RGB", (600, 400), (1, 2, 3))), max_area=60_000)
    width, height = result.size
    assert width * height <= 60_000
    assert abs(width / height - 1.5) < 0.02
    assert "downscaled" in result.notes
    assert result.source_size == (600, 400)


def test_large_jpeg_is_drafted_then_capped():
    data = encode(Image.new("RGB", (1600, 1200), (200, 100, 50)), "JPEG")
    result = decoded(data, max_area=40_000)
    assert result.size[0] * result.size[1] <= 40_000
    assert abs(result.size[0] / result.size[1] - 4 / 3) < 0.03
    assert np.abs(np.asarray(result.image, dtype=int) - (200, 100, 50)).max() < 8


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    result = decoded(encode(cmyk, "JPEG", quality=95))
    assert "cmyk" in result.notes
    red, green, blue = result.image.getpixel((16, 16))
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_greyscale_keeps_its_full_range():
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I")
    result = decoded(encode(image))
    assert "high_bit_depth" in result.notes
    assert [result.image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_transparency_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black
    rgba.putpixel((10, 10), (255, 0, 0, 255))
    result = decoded(encode(rgba))
    assert "alpha_on_white" in result.notes
    assert result.image.getpixel((0, 0)) == (255, 255, 255)
    assert result.image.getpixel((10, 10)) == (255, 0, 0)


def test_half_transparent_pixels_blend_with_white():
    result = decoded(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    grey = result.image.getpixel((1, 1))
    assert all(120 <= channel <= 135 for channel in grey)


def test_palette_image_with_transparent_index():
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putpixel((3, 3), 1)
    palette_image.info["transparency"] = 0
    result = decoded(encode(palette_image, transparency=0))
    assert result.image.getpixel((0, 0)) == (255, 255, 255)
    assert result.image.getpixel((3, 3)) == (0, 0, 255)


def test_greyscale_with_alpha():
    result = decoded(encode(Image.new("LA", (8, 8), (0, 0))))
    assert result.image.getpixel((2, 2)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    result = decoded(encode(image, "JPEG", exif=exif, quality=95))
    assert result.size == (20, 60)
    assert "exif_rotated" in result.notes
    red, green, blue = result.image.getpixel((10, 3))  # the left band is now on top
    assert red > 200 and green < 60


def test_animated_gif_keeps_the_first_frame():
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    result = decoded(buffer.getvalue())
    assert "animated_first_frame" in result.notes
    red, green, blue = result.image.getpixel((5, 5))
    assert red > 200 and blue < 60
