"""Small videos the tests encode themselves with PyAV, and hostile ones made from them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CONTAINERS = {
    "mp4": ("mp4", "mpeg4"),
    "webm": ("webm", "libvpx"),
    "mkv": ("matroska", "mpeg4"),
    "avi": ("avi", "mjpeg"),
    "mov": ("mov", "mpeg4"),
}


def frames_of(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """`count` distinct frames: a moving colour gradient, so each sampled frame differs."""
    ys, xs = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        out[i, ..., 0] = (xs * 255 // max(width - 1, 1) + 9 * i + base[0]) % 256
        out[i, ..., 1] = (ys * 255 // max(height - 1, 1) + 5 * i + base[1]) % 256
        out[i, ..., 2] = (xs + ys + 17 * i + base[2]) % 256
    return out


def encode_video(frames: np.ndarray, kind: str = "mp4", fps: int = 10, audio: bool = False) -> bytes:
    """`frames` (n, h, w, 3) uint8 encoded as a `kind` file (mp4, webm, mkv, avi, mov)."""
    import av

    container_format, codec = CONTAINERS[kind]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec != "mjpeg":
            stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        if audio:
            add_silence(container)
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def add_silence(container) -> None:
    import av

    stream = container.add_stream("aac", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
    frame.sample_rate = 8000
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def audio_only() -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        add_silence(container)
    return buffer.getvalue()


def write_video(path: Path, frames: np.ndarray, kind: str | None = None, fps: int = 10) -> Path:
    path.write_bytes(encode_video(frames, kind or path.suffix.lstrip("."), fps))
    return path
