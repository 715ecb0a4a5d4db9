"""What a user attaches, image or video: one choke point that tells them apart and opens them.

`open_media(name, settings)` reads a file or fetches an http(s) URL: a name with a video extension
(VIDEO_SUFFIXES, on the URL's path for a URL) is a video (media/video.py), anything else an image
(media/images.py, media/urls.py); `open_local` is the chat's (/image, /video). `media_from_bytes(data, name, settings)` decides by content instead (stdin,
data: URLs, a server request's part): the magic bytes of an allowed video container make a video.
Videos are sampled as `settings` says (`--frames`, `--fps`; neither: the checkpoint's default).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from llava_cli.base.errors import InputError
from llava_cli.media.images import ImageRef, image_from_bytes, load_image
from llava_cli.media.urls import URL_TIMEOUT_S, download, is_url, open_image, redacted
from llava_cli.media.video import (
    MAX_VIDEO_BYTES,
    Sampling,
    VideoRef,
    container_format,
    is_video_name,
    load_video,
    video_from_bytes,
)

Media = ImageRef | VideoRef


def sampling_of(settings: Any) -> Sampling:
    return Sampling(frames=settings.frames, fps=settings.fps)


def open_media(name: str, settings: Any) -> Media:
    """The image or video a user named: a file, or an http(s) URL (fetched within the caps)."""
    if is_url(name):
        if is_video_name(urllib.parse.urlsplit(name).path):
            return video_from_bytes(
                download(name, URL_TIMEOUT_S, MAX_VIDEO_BYTES), redacted(name), sampling_of(settings)
            )
        return open_image(name, settings.max_image_pixels)
    if is_video_name(name):
        return load_video(name, sampling_of(settings))
    return open_image(name, settings.max_image_pixels)


def open_local(path: str, settings: Any, kind: str = "any") -> Media:
    """A local file the chat attaches: `kind` "image" (/image: a video is refused, naming /video),
    "video" (/video: only a video's extension), or "any" (`llava chat FILE...`: by extension)."""
    if kind == "video" and not is_video_name(path):
        raise InputError(f"{path} is not a video (MP4/MOV, WebM/MKV or AVI); attach images with /image")
    if kind != "image" and is_video_name(path):
        return load_video(path, sampling_of(settings))
    return load_image(path, settings.max_image_pixels)


def media_from_bytes(data: bytes, name: str, settings: Any) -> Media:
    """An image or a video, told apart by its bytes (a video container's magic, else an image)."""
    if container_format(data) is not None:
        return video_from_bytes(data, name, sampling_of(settings))
    return image_from_bytes(data, name, settings.max_image_pixels)
