"""Hostile video bytes (the video sibling of test_image_fuzz.py): random and mutated real videos
give a clean one-line InputError or a video whose sampled frames decode to RGB."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import mutated
from videos import CONTAINERS, encode_video, frames_of

from llava_cli.base.errors import InputError
from llava_cli.media.video import sample_frames, video_from_bytes

pytest.importorskip("av")

SEEDS = [encode_video(frames_of(6, 24, 16, seed=index), kind) for index, kind in enumerate(CONTAINERS)]


def assert_clean(data: bytes) -> None:
    try:
        video = video_from_bytes(data, "fuzz.vid")
        frames, indices = sample_frames(video, 4)
    except InputError as err:
        assert str(err).startswith("fuzz.vid") and "\n" not in str(err)
        return
    assert frames.dtype.name == "uint8" and frames.shape == (len(indices), video.info.height, video.info.width, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS))
def test_mutated_real_videos_decode_or_fail_cleanly(data):
    assert_clean(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_cleanly(data):
    assert_clean(data)


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([b"\x1a\x45\xdf\xa3", b"\x00\x00\x00\x18ftypmp42", b"RIFF\x00\x00\x00\x00AVI LIST"]),
    st.binary(max_size=512),
)
def test_a_right_magic_with_garbage_after_fails_cleanly(magic, rest):
    assert_clean(magic + rest)
