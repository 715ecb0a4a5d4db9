"""Odd but valid images become the ordinary upright 8-bit RGB picture a person would see."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from llava_cli.media.images import load_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def saved(tmp_path: Path, name: str, picture: Image.Image, **options) -> Path:
    path = tmp_path / name
    picture.save(path, **options)
    return path


def rgb(path: Path) -> Image.Image:
    picture = load_image(str(path)).image
    assert picture.mode == "RGB"
    return picture


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 12), colour) for colour in (RED, GREEN, BLUE)]
    path = saved(tmp_path, "anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    picture = rgb(path)
    assert picture.size == (16, 12)
    assert picture.getpixel((8, 6)) == RED


def test_transparent_pixels_are_composited_on_white(tmp_path):
    picture = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # transparent black: must show as white
    picture.paste((255, 0, 0, 255), (0, 0, 10, 10))  # opaque red stays red
    picture.paste((0, 0, 0, 128), (10, 0, 15, 10))  # half-transparent black over white: mid grey
    result = rgb(saved(tmp_path, "alpha.png", picture))
    assert result.getpixel((2, 5)) == RED
    assert close(result.getpixel((12, 5)), (127, 127, 127), tolerance=1)
    assert result.getpixel((18, 5)) == WHITE


def test_palette_images_keep_their_colours_and_transparency(tmp_path):
    picture = Image.new("P", (12, 6), 0)
    picture.putpalette([0, 0, 0, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    picture.paste(1, (0, 0, 6, 6))
    picture.paste(2, (6, 0, 12, 6))
    opaque = rgb(saved(tmp_path, "palette.png", picture))
    assert (opaque.getpixel((1, 1)), opaque.getpixel((10, 1))) == (GREEN, BLUE)
    see_through = rgb(saved(tmp_path, "palette-transparent.png", picture, transparency=2))
    assert (see_through.getpixel((1, 1)), see_through.getpixel((10, 1))) == (GREEN, WHITE)


def test_greyscale_becomes_equal_rgb_channels(tmp_path):
    picture = Image.new("L", (8, 8), 77)
    assert rgb(saved(tmp_path, "grey.png", picture)).getpixel((3, 3)) == (77, 77, 77)


def test_cmyk_becomes_rgb(tmp_path):
    picture = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert rgb(saved(tmp_path, "cmyk.tif", picture)).getpixel((3, 3)) == RED


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    picture = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        picture.putpixel((x, 0), value)
    path = saved(tmp_path, "grey16.png", picture)
    assert Image.open(path).mode.startswith("I")  # Pillow really reads it as 16-bit
    result = rgb(path)
    # Clipping would make every non-zero pixel white; scaling keeps mid grey mid grey.
    assert result.getpixel((0, 0)) == (0, 0, 0)
    assert result.getpixel((1, 0)) == (128, 128, 128)
    assert result.getpixel((2, 0)) == WHITE


def test_a_dark_16_bit_picture_stays_dark(tmp_path):
    picture = Image.new("I;16", (2, 1), 0)
    picture.putpixel((1, 0), 200)  # 200 of 65535: black to the eye, though it is under 255
    assert rgb(saved(tmp_path, "dark16.png", picture)).getpixel((1, 0)) == (1, 1, 1)


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotation_is_applied(tmp_path, orientation, top, bottom):
    stored = Image.new("RGB", (64, 32), RED)  # stored sideways: red left half, blue right half
    stored.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: turn 90 degrees clockwise to view; 8: counter-clockwise
    upright = rgb(saved(tmp_path, f"rotated-{orientation}.jpg", stored, exif=exif.tobytes(), quality=95))
    assert upright.size == (32, 64)
    assert close(upright.getpixel((16, 8)), top, tolerance=12)
    assert close(upright.getpixel((16, 56)), bottom, tolerance=12)


def test_the_same_bytes_from_a_file_and_from_memory_give_the_same_digest(tmp_path):
    from llava_cli.media.images import image_from_bytes

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), GREEN).save(buffer, "PNG")
    path = tmp_path / "green.png"
    path.write_bytes(buffer.getvalue())
    assert load_image(str(path)).digest == image_from_bytes(buffer.getvalue(), "<stdin>").digest


def test_a_prompt_too_long_to_be_a_file_name_is_a_prompt_not_an_error(tmp_path):
    from llava_cli.frontend.arguments import split_images_and_prompt

    prompt = "describe this picture in detail " * 200  # longer than any file name may be
    assert split_images_and_prompt([str(tmp_path / "a.png"), prompt]) == ([str(tmp_path / "a.png")], prompt)
