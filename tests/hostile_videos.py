"""Hostile videos, each made here with PyAV: what a user (or a web page) may hand llava-cli as a clip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from videos import audio_only, encode_video, frames_of


def many_frames(count: int = 100_001) -> bytes:
    """A valid MP4 of `count` tiny identical frames (one keyframe, then near-empty P-frames)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=1000)
        stream.width = stream.height = 16
        stream.pix_fmt, stream.gop_size = "yuv420p", count
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for index in range(count):
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def huge_frame(side: int = 10_000) -> bytes:
    """One real side x side MJPEG frame in an AVI (a 1.5 MB file that decodes to 150 MB)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width = stream.height = side
        stream.pix_fmt = "yuvj420p"
        for packet in [*stream.encode(av.VideoFrame(side, side, "yuvj420p")), *stream.encode()]:
            container.mux(packet)
    return buffer.getvalue()


def corrupt_stream() -> bytes:
    """An AVI whose MJPEG frames were overwritten: the container is fine, no frame decodes."""
    data = bytearray(encode_video(frames_of(6, 32, 24), "avi"))
    start = data.find(b"movi") + 200
    data[start : len(data) - 300] = b"\x55" * (len(data) - 300 - start)
    return bytes(data)


def truncated() -> bytes:
    """An MP4 cut short (its index, at the end, is gone)."""
    data = encode_video(frames_of(12, 40, 30))
    return data[: len(data) * 6 // 10]


HOSTILE = {
    "truncated.mp4": truncated,
    "empty.mp4": lambda: b"",
    "audio.mp4": audio_only,
    "corrupt.avi": corrupt_stream,
    "many.mp4": many_frames,
    "huge.avi": huge_frame,
}


def write_hostile(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, make in HOSTILE.items():
        paths[name] = folder / name
        paths[name].write_bytes(make())
    return paths
