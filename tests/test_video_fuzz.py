"""Hostile video bytes (the video sibling of test_image_fuzz.py): random and mutated real videos
give a clean one-line InputError or a video whose sampled frames decode to RGB."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from videos import CONTAINERS, encode_video, frames_of
from llava_cli.errors import InputError
from llava_cli.video import sample_frames, video_from_bytes

pytest.importorskip("av")

SEEDS = [encode_video(frames_of(6, 24, 16, seed=index), kind) for index, kind in enumerate(CONTAINERS)]


@st.composite
def mutated_videos(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "truncate", "splice", "insert"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif operation == "truncate":
            del data[position:]
        elif operation == "splice":
            donor = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(donor) - 1))
            data[position : position + draw(st.integers(0, 64))] = donor[start : start + draw(st.integers(1, 256))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def assert_clean(data: bytes) -> None:
    try:
        video = video_from_bytes(data, "fuzz.vid")
        frames, indices = sample_frames(video, 4)
    except InputError as err:
        assert str(err).startswith("fuzz.vid") and "\n" not in str(err)
        return
    assert frames.dtype.name == "uint8" and frames.shape == (len(indices), video.info.height, video.info.width, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_videos())
def test_mutated_real_videos_decode_or_fail_cleanly(data):
    assert_clean(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_cleanly(data):
    assert_clean(data)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([b"\x1a\x45\xdf\xa3", b"\x00\x00\x00\x18ftypmp42", b"RIFF\x00\x00\x00\x00AVI LIST"]), st.binary(max_size=512))
def test_a_right_magic_with_garbage_after_fails_cleanly(magic, rest):
    assert_clean(magic + rest)
