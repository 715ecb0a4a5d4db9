"""Videos: hostile bytes in, a few sampled RGB frames out, or a one-line error.

`load_video(path, sampling)`, `video_from_bytes(data, name, sampling)` return a `VideoRef`: the
name, a digest of the bytes, the sampling, the bytes themselves (capped at MAX_VIDEO_BYTES) and
what the container says (`VideoInfo`); only the first frame is decoded then, as a check. The frames are decoded later, by `sample_frames(video,
num_frames)`, once the checkpoint's default frame count is known. Every way a video can be bad
raises `InputError`.

A container is a program for a demuxer, so:
- the bytes reach FFmpeg (PyAV) only through a file object, never as a path or URL;
- the container is recognised by its magic bytes and opened with that one demuxer named
  (ALLOWED_CONTAINERS: mp4/mov, webm/mkv, avi), so FFmpeg never probes for playlists, concat
  lists, image sequences or network protocols; the format PyAV reports is checked again;
- duration, frame count, frame size and the bytes of the sampled frames are capped (MAX_*)
  before any frame is converted; FFmpeg's own decoders get `max_pixels` (DECODER_LIMITS), so that
  neither probing nor decoding allocates a frame over the cap, whatever the header says;
- frames are decoded in order up to the last sampled one, and only sampled frames are converted
  to RGB; decoding stops there.

Frame choice is transformers' own (`default_sample_indices_fn`): `num_frames` frames at
`arange(n) * total // n`, where `total` is the stream's frame count (counted from the packets when
the container does not say), or `--fps F`: n = max(1, int(total / video_fps * F)), capped.
PyAV is an optional extra (`pip install 'llava-cli[video]'`); without it a video gets that hint.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llava_cli.base.errors import InputError, one_line
from llava_cli.base.options import MAX_VIDEO_FRAMES
from llava_cli.media.images import VIDEO_SUFFIXES, read_media_file

MAX_VIDEO_BYTES = 512 * 1024 * 1024
MAX_DURATION_S = 3 * 3600  # a feature film; longer is no clip to ask about
MAX_TOTAL_FRAMES = 50_000  # about half an hour at 30 fps, never decoded whole: only up to the last sampled frame
MAX_FRAME_PIXELS = 4096 * 2304  # beyond 4K UHD; 10000x10000 is a bomb, not a camera
MAX_DECODED_BYTES = 1024 * 1024 * 1024  # RGB bytes of all sampled frames
DECODER_LIMITS = {"max_pixels": str(MAX_FRAME_PIXELS)}
INSTALL_HINT = "videos need PyAV: pip install 'llava-cli[video]'"
# the demuxers allowed (chosen by magic bytes), and the name PyAV reports when it probes them itself
ALLOWED_CONTAINERS = {"mov": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm", "avi": "avi"}
VIDEO_MIME_TYPES = {"mov": "video/mp4", "matroska": "video/x-matroska", "avi": "video/x-msvideo"}  # what a client sends
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"}


@dataclass(frozen=True)
class Sampling:
    """Which frames to take: `frames` of them, or `fps` per second; neither: the checkpoint's default."""

    frames: int | None = None
    fps: float | None = None


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its video stream (checked against the caps)."""

    container: str
    total_frames: int
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class VideoRef:
    """A video ready for sampling, with where it came from; `digest` is the bytes' (as an image's)."""

    name: str
    digest: str
    info: VideoInfo
    sampling: Sampling
    data: bytes = field(compare=False, repr=False)
    path: str | None = field(default=None, compare=False)


def is_video_name(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


def load_video(path: str, sampling: Sampling = Sampling()) -> VideoRef:
    """Read and check the video file at `path`; raise `InputError` saying what is wrong with it."""
    file = Path(path).expanduser()
    data = read_media_file(file, path, "video", MAX_VIDEO_BYTES, "cut the part you want to ask about")
    return replace(video_from_bytes(data, path, sampling), path=os.path.abspath(file))


def video_from_bytes(data: bytes, name: str, sampling: Sampling = Sampling()) -> VideoRef:
    """Check `data` as a video (container, stream, caps), decoding only its first frame."""
    if not data:
        raise InputError(f"{name} is empty, not a video")
    if len(data) > MAX_VIDEO_BYTES:
        raise InputError(f"{name} is larger than {MAX_VIDEO_BYTES // 2**20} MiB; cut the part you want to ask about")
    av = import_av()
    info = with_av_errors(name, lambda: probe(av, data, name))
    with_av_errors(
        name, lambda: decode_at(av, data, name, info, [0])
    )  # a stream of which no frame decodes is refused now
    digest = hashlib.sha256(data).hexdigest()
    return VideoRef(name=name, digest=digest, info=info, sampling=sampling, data=data)


def import_av() -> Any:
    try:
        import av
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return av


def with_av_errors(name: str, work: Any) -> Any:
    """Run `work()`, turning whatever FFmpeg raises into a one-line `InputError`."""
    try:
        return work()
    except InputError:
        raise
    except Exception as err:  # FFmpeg and PyAV report broken data with many exception types, as Pillow does
        raise InputError(f"{name} is truncated or corrupt ({one_line(err)}); re-export or re-download it") from None


def container_format(data: bytes) -> str | None:
    """The allowed demuxer for these magic bytes, or None."""
    if data[4:8] in MP4_BOXES:
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def open_container(av: Any, data: bytes, name: str) -> Any:
    demuxer = container_format(data)
    if demuxer is None:
        raise InputError(f"{name} is not a video llava-cli reads (MP4/MOV, WebM/MKV or AVI)")
    # max_pixels: the decoders FFmpeg runs while probing refuse a frame over the cap before allocating it
    container = av.open(io.BytesIO(data), mode="r", format=demuxer, options=DECODER_LIMITS)
    if container.format.name not in (demuxer, ALLOWED_CONTAINERS[demuxer]):
        container.close()
        raise InputError(f"{name} is a {container.format.name} container, which llava-cli does not read")
    return container


def probe(av: Any, data: bytes, name: str) -> VideoInfo:
    with open_container(av, data, name) as container:
        if not container.streams.video:
            raise InputError(f"{name} has no video stream (audio only?)")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise InputError(f"{name} uses a video codec llava-cli cannot decode; re-encode it (H.264, VP9...)")
        width, height = stream.codec_context.width, stream.codec_context.height
        check_frame_size(name, width, height)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and container.duration:
            duration = container.duration / 1_000_000
        if duration is not None and duration > MAX_DURATION_S:
            raise InputError(
                f"{name} lasts {duration / 60:.0f} min, over the limit of {MAX_DURATION_S // 60} min; cut the part you want"
            )
        declared = stream.frames or 0
        if declared > MAX_TOTAL_FRAMES:
            raise InputError(
                f"{name} has {declared:,} frames, over the limit of {MAX_TOTAL_FRAMES:,}; cut the part you want"
            )
        total = declared or count_packets(container, stream, name)
        if total < 1:
            raise InputError(f"{name} has no video frames")
        return VideoInfo(container=container.format.name, total_frames=total, fps=fps, width=width, height=height)


def count_packets(container: Any, stream: Any, name: str) -> int:
    """Frames of a container that does not say (WebM): its video packets, without decoding them."""
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
            if count > MAX_TOTAL_FRAMES:
                raise InputError(f"{name} has over {MAX_TOTAL_FRAMES:,} frames; cut the part you want")
    return count


def check_frame_size(name: str, width: int, height: int) -> None:
    if width < 1 or height < 1:  # FFmpeg could not decode a frame within DECODER_LIMITS while probing
        raise InputError(
            f"{name} has no frame of at most {MAX_FRAME_PIXELS:,} pixels (frames too large, or a broken stream); scale it down or re-export it"
        )
    if width * height > MAX_FRAME_PIXELS:
        raise InputError(
            f"{name} has {width}x{height} frames, over the limit of {MAX_FRAME_PIXELS:,} pixels; scale it down"
        )


def frame_count(info: VideoInfo, sampling: Sampling, default_frames: int) -> int:
    """How many frames to sample (transformers' rule for --fps), at most the video's and MAX_VIDEO_FRAMES."""
    if sampling.frames is not None:
        wanted = sampling.frames
    elif sampling.fps is not None and info.fps > 0:
        wanted = max(1, int(info.total_frames / info.fps * sampling.fps))
    else:
        wanted = default_frames
    return max(1, min(wanted, info.total_frames, MAX_VIDEO_FRAMES))


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """transformers' `default_sample_indices_fn`: `num_frames` evenly spaced, the first one first."""
    return [i * total_frames // num_frames for i in range(num_frames)]


def sample_frames(video: VideoRef, default_frames: int) -> tuple[Any, list[int]]:
    """The sampled frames as one uint8 (frames, height, width, 3) array, and their indices."""
    info = video.info
    indices = frame_indices(info.total_frames, frame_count(info, video.sampling, default_frames))
    if len(indices) * info.width * info.height * 3 > MAX_DECODED_BYTES:
        raise InputError(
            f"{video.name}: {len(indices)} frames of {info.width}x{info.height} are too many to decode; ask for fewer (--frames)"
        )
    av = import_av()
    frames = with_av_errors(video.name, lambda: decode_at(av, video.data, video.name, info, indices))
    import numpy as np

    return np.stack(frames), indices


def decode_at(av: Any, data: bytes, name: str, info: VideoInfo, indices: list[int]) -> list[Any]:
    """Decode in order up to the last wanted frame, converting only the wanted ones to RGB."""
    wanted = set(indices)
    frames: list[Any] = []
    with open_container(av, data, name) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = DECODER_LIMITS  # a stream that grows its frames mid-way is refused too
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                check_frame_size(name, frame.width, frame.height)
                if (frame.width, frame.height) != (info.width, info.height):
                    raise InputError(f"{name} changes its frame size mid-stream; re-encode it")
                frames.extend([frame.to_ndarray(format="rgb24")] * indices.count(index))
            if index >= indices[-1]:
                break
    if len(frames) < len(indices):
        raise InputError(
            f"{name} is truncated or corrupt (decoded {len(frames)} of {len(indices)} sampled frames); re-export it"
        )
    return frames
