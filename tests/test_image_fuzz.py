"""Hostile image bytes: random and mutated real images give a clean InputError or a valid RGB image.

Also the stdin reader's limits: a size cap and an idle timeout, so a pipe cannot hang or exhaust us.
"""

from __future__ import annotations

import io
import os
import threading

import pytest
from hostile_images import many_scan_jpeg, many_strip_tiff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import mutated

from llava_cli.base.errors import InputError
from llava_cli.media.imagelimits import (
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_TIFF_VALUES,
    jpeg_counts,
)
from llava_cli.media.images import image_from_bytes, read_stream

MAX_PIXELS = 1_000_000  # small, so a mutated header claiming a huge size is refused, not decoded slowly


def encoded(fmt: str, mode: str = "RGB", frames: int = 1, **options) -> bytes:
    from PIL import Image, ImageDraw

    pictures = []
    for index in range(frames):
        picture = Image.new(mode, (23, 17), "white" if mode != "P" else 1)
        ImageDraw.Draw(picture).rectangle(
            (2 + index, 3, 12, 11), fill=(200, 30 * index, 40) if mode in ("RGB", "RGBA") else 7
        )
        pictures.append(picture)
    buffer = io.BytesIO()
    pictures[0].save(buffer, fmt, save_all=frames > 1, append_images=pictures[1:], **options)
    return buffer.getvalue()


SEEDS = [
    encoded("PNG"),
    encoded("PNG", "RGBA"),
    encoded("PNG", "P", transparency=0),
    encoded("JPEG", quality=80),
    encoded("JPEG", "CMYK"),
    encoded("GIF", "P", frames=3, duration=50, loop=0),
    encoded("BMP"),
    encoded("TIFF", "L"),
    encoded("WEBP"),
    encoded("JPEG", progressive=True),
    encoded("TIFF", "RGB", tile=(16, 16)),
    encoded("TIFF", "L", compression="tiff_lzw"),
]


def assert_clean(data: bytes) -> None:
    try:
        ref = image_from_bytes(data, "fuzz.img", MAX_PIXELS)
    except InputError as err:
        assert str(err).startswith("fuzz.img") and "\n" not in str(err)
        return
    assert ref.image.mode == "RGB"
    assert ref.image.width >= 1 and ref.image.height >= 1
    ref.image.tobytes()  # the pixels are really there


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS))
def test_mutated_real_images_decode_or_fail_cleanly(data):
    assert_clean(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_cleanly(data):
    assert_clean(data)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(SEEDS), st.binary(max_size=16))
def test_magic_bytes_followed_by_garbage_fail_cleanly(seed, garbage):
    assert_clean(seed[:16] + garbage)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda data: data[:4].hex())
def test_every_seed_decodes_to_rgb(seed):
    assert image_from_bytes(seed, "seed", MAX_PIXELS).image.mode == "RGB"


# ---------------------------------------------------------------- decoders' work bounded (issue 28 item 4)


def test_a_jpeg_of_a_thousand_scans_is_refused_before_decoding():
    with pytest.raises(InputError, match=rf"^scans\.jpg is a JPEG of more than {MAX_JPEG_SCANS} scans") as refused:
        image_from_bytes(many_scan_jpeg(64, 1000), "scans.jpg", MAX_PIXELS)
    assert "\n" not in str(refused.value)


def test_a_jpeg_at_the_scan_limit_is_decoded():
    extra = (
        MAX_JPEG_SCANS - jpeg_counts(many_scan_jpeg(64, 0), MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS)[0]
    )  # the encoder's own scans
    assert image_from_bytes(many_scan_jpeg(64, extra), "scans.jpg", MAX_PIXELS).image.getpixel((5, 5)) == (
        128,
        128,
        128,
    )
    with pytest.raises(InputError, match="scans"):
        image_from_bytes(many_scan_jpeg(64, extra + 1), "scans.jpg", MAX_PIXELS)


@pytest.mark.parametrize("strips", [9, 100_000])
def test_a_tiff_of_more_strips_than_rows_is_refused_before_pillow_lists_them(strips):
    with pytest.raises(
        InputError, match=rf"^strips\.tif is a TIFF of 8x8 pixels that declares {strips:,} strips, more than the 8"
    ):
        image_from_bytes(many_strip_tiff(strips), "strips.tif", MAX_PIXELS)


def test_a_tiff_of_one_strip_per_row_is_decoded():
    assert image_from_bytes(many_strip_tiff(8), "strips.tif", MAX_PIXELS).image.size == (8, 8)


def test_a_jpeg_of_twenty_thousand_empty_segments_is_refused_before_pillow_reads_them():
    picture = encoded("JPEG")
    with pytest.raises(InputError, match=rf"^app\.jpg is a JPEG of more than {MAX_JPEG_SEGMENTS:,} marker segments"):
        image_from_bytes(picture[:2] + b"\xff\xe1\x00\x02" * 20_000 + picture[2:], "app.jpg", MAX_PIXELS)
    assert image_from_bytes(
        picture[:2] + b"\xff\xe1\x00\x02" * 1_000 + picture[2:], "app.jpg", MAX_PIXELS
    ).image.size == (23, 17)


def test_a_tiff_tag_of_more_numbers_than_any_picture_needs_is_refused():
    bits = MAX_TIFF_VALUES + 1
    with pytest.raises(InputError, match=rf"^bits\.tif is a TIFF whose tag 258 holds {bits:,} numbers"):
        image_from_bytes(many_strip_tiff(8, bits_per_sample_values=bits), "bits.tif", MAX_PIXELS)


def test_a_tiled_tiff_of_the_smallest_tiles_is_decoded():
    data = encoded("TIFF", "RGB", tile=(16, 16))
    assert image_from_bytes(data, "tiles.tif", MAX_PIXELS).image.getpixel((5, 5)) == (200, 0, 40)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([many_scan_jpeg(16, 300), many_strip_tiff(500)]), st.integers(0, 200), st.integers(1, 255))
def test_hostile_structures_flipped_still_fail_cleanly(data, position, flip):
    mutated = bytearray(data)
    mutated[position % len(mutated)] ^= flip
    assert_clean(bytes(mutated))


def writer(fd: int, data: bytes, keep_open: threading.Event | None = None) -> threading.Thread:
    def write() -> None:
        with os.fdopen(fd, "wb") as pipe:
            try:
                pipe.write(data)
                pipe.flush()
            except BrokenPipeError:
                return
            if keep_open is not None:
                keep_open.wait(5)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_stdin_reads_the_whole_pipe():
    read_fd, write_fd = os.pipe()
    writer(write_fd, SEEDS[0] * 3)
    with os.fdopen(read_fd, "rb") as pipe:
        assert read_stream(pipe, "<stdin>") == SEEDS[0] * 3


def test_stdin_larger_than_the_cap_is_refused():
    read_fd, write_fd = os.pipe()
    writer(write_fd, b"x" * (3 * 2**20))
    with os.fdopen(read_fd, "rb") as pipe, pytest.raises(InputError, match=r"^<stdin> is larger than 2 MiB"):
        read_stream(pipe, "<stdin>", max_bytes=2 * 2**20)


def test_a_stalled_pipe_times_out():
    read_fd, write_fd = os.pipe()
    release = threading.Event()
    writer(write_fd, SEEDS[0][:10], keep_open=release)
    try:
        with (
            os.fdopen(read_fd, "rb") as pipe,
            pytest.raises(InputError, match=r"^nothing arrived on <stdin> for 0.3 s"),
        ):
            read_stream(pipe, "<stdin>", idle_timeout=0.3)
    finally:
        release.set()


# ---------------------------------------------------------------- the decode time budget (issue 28 item 4)


@pytest.mark.slow  # decodepool's helper process
def test_a_decode_past_the_budget_is_abandoned_and_its_helper_killed(monkeypatch):
    """A picture within every byte-level limit that still decodes slowly: 250 scans of 4000x4000
    (about half a second). With a 50 ms budget it is refused in one line, the helper process that
    was decoding it is gone (killed, not left burning a core), and the next image decodes."""
    from llava_cli.media import decodepool, images

    small = encoded("PNG")
    image_from_bytes(small, "warm.png", MAX_PIXELS)  # a helper is started and idle
    helpers = [helper.process.pid for helper in decodepool.POOL.idle]
    monkeypatch.setattr(images, "DECODE_BUDGET_S", 0.05)
    with pytest.raises(InputError, match=r"^slow\.jpg took more than 0\.05 s to decode and was abandoned; re-save it"):
        image_from_bytes(many_scan_jpeg(4000, 250), "slow.jpg", 20_000_000)
    for pid in helpers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    monkeypatch.setattr(images, "DECODE_BUDGET_S", 20.0)
    assert image_from_bytes(small, "after.png", MAX_PIXELS).image.getpixel((5, 5)) == (200, 0, 40)


@pytest.mark.slow  # decodepool's helper process
def test_a_decoder_that_dies_gives_one_line_and_the_next_image_decodes(monkeypatch):
    from llava_cli.media import decodepool

    image_from_bytes(encoded("PNG"), "warm.png", MAX_PIXELS)
    for helper in decodepool.POOL.idle:  # died (as under the OOM killer) after its last check
        helper.process.kill()
        helper.process.wait()
    monkeypatch.setattr(decodepool.Helper, "alive", lambda helper: True)
    with pytest.raises(InputError, match=r"^gone\.png could not be decoded: the decoder stopped"):
        image_from_bytes(encoded("PNG"), "gone.png", MAX_PIXELS)
    assert image_from_bytes(encoded("PNG"), "next.png", MAX_PIXELS).image.size == (23, 17)
