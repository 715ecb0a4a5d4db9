"""Images: turn whatever the user points at into a clean RGB picture, or a one-line error.

`load_image(path)` and `image_from_bytes(data, name)` return an `ImageRef`: the RGB image, the
name the user gave it and a content digest (the generation cache keys images by it). Every way an
image can be bad - missing, a directory, a FIFO or device, unreadable, not an image, truncated, a
decompression bomb, a video (`refuse_video`: by extension, before anything is read) - raises `InputError`; nothing else escapes. Files are read through
`safeio.read_regular` (regular files only, never blocking, capped at MAX_IMAGE_BYTES). Odd but valid images are made ordinary: the
first frame of an animation, EXIF rotation applied, alpha composited on white, CMYK, palette,
greyscale and 16-bit converted to 8-bit RGB.

Image bytes are hostile, so decoding is limited:
- only the formats in DECODED_FORMATS are tried (`Image.open(formats=...)`): never EPS, PS or PDF,
  which Pillow hands to Ghostscript, nor any other plugin nobody needs for a photo;
- bytes that ask the decoder for more work than any real picture needs (a JPEG of thousands of
  scans, a TIFF of millions of strips) are refused before it runs (`media/imagelimits.py`);
- `image_from_bytes` decodes in a helper process (media/decodepool.py) within DECODE_BUDGET_S: a decode
  past it is killed and refused in one line, and a crashing decoder takes only the helper down;
- an image whose sides differ by more than MAX_ASPECT_RATIO:1 is refused before it is decoded: the
  processor scales the short side up to its input size (336 or 384 px), so a 177-byte 1x100000 PNG
  would become a 336x33,600,000 image of several GB. 50:1 is far beyond photos (at most 3:1),
  panoramas (a full 360-degree sweep is about 10:1) and long phone screenshots (about 25:1), and
  keeps the upscaled long side under 50 x 384 = 19,200 px;
- an image whose long side is over MAX_IMAGE_SIDE is shrunk to it (aspect kept) before the processor
  sees it. No LLaVA family uses more than 2304 px (OneVision's largest anyres grid; llava-1.5 uses
  336, LLaVA-NeXT at most 1344), so the model loses nothing, while the processor's float copies
  of a 7000x7000 picture (about 600 MB each) do not happen. Smaller images are left pixel for pixel
  as they are, so their answers are exactly those of plain transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import select
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, BinaryIO

from llava_cli.base.errors import InputError, one_line
from llava_cli.base.options import DEFAULT_MAX_IMAGE_PIXELS
from llava_cli.base.safeio import BadPath, FileTooLarge, NotRegularFile, read_regular
from llava_cli.media.decodepool import decode_elsewhere
from llava_cli.media.imagelimits import check_decoding_work

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_BYTES = 200 * 1024 * 1024  # no real photo is this big; refuse before reading it all
STDIN_IDLE_TIMEOUT_S = 60.0  # a pipe that sends nothing for this long is stuck, not slow
READ_CHUNK = 1 << 16
HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
BACKGROUND = (255, 255, 255)
DECODED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA")  # JPEG covers MPO (phone photos)
MAX_ASPECT_RATIO = 50  # see the module docstring
DECODE_BUDGET_S = 20.0  # a 50 MP picture decodes in about 1 s; far past that, the file is pathological
MAX_IMAGE_SIDE = 4096  # pixels; beyond any family's input size (2304 at most), see the module docstring
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ico", ".ppm", ".pgm", ".tga"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".wmv", ".flv", ".mpg", ".mpeg", ".ogv", ".3gp"}


@dataclass(frozen=True)
class ImageRef:
    """An image ready for the model, with where it came from and what it contains."""

    name: str
    digest: str
    image: Image.Image = field(compare=False, repr=False)
    path: str | None = field(default=None, compare=False)  # absolute path of the file; None if not from a file


def load_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageRef:
    """Read the image file at `path`; raise `InputError` saying what is wrong with it."""
    refuse_video(path, path)
    file = Path(path).expanduser()
    return replace(image_from_bytes(read_image_file(file), path, max_pixels), path=os.path.abspath(file))


def refuse_video(name: str, path: str) -> None:
    """A video (named by `path`'s extension) is no image: say so before reading it, however large."""
    if PurePath(path).suffix.lower() in VIDEO_SUFFIXES:
        raise InputError(f"{name} is a video, not an image: attach it with /video {name}")


def read_image_file(path: Path) -> bytes:
    """The bytes of an image file: a regular file only (a FIFO or /dev/zero is refused at once), at most MAX_IMAGE_BYTES."""
    return read_media_file(path, str(path), "image", MAX_IMAGE_BYTES, "is it really an image?")


def read_media_file(path: Path, name: str, kind: str, max_bytes: int, too_large_hint: str) -> bytes:
    """A user's `kind` file (image, video, PDF) as bytes, at most `max_bytes`, regular files only;
    `InputError` in one line, naming the file as `name`, for every way it can fail."""
    try:
        return read_regular(path, max_bytes)
    except FileNotFoundError:
        raise InputError(f"{kind} not found: {name}") from None
    except NotRegularFile as err:
        raise InputError(f"{name} is {err.kind}, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}") from None
    except BadPath:
        raise InputError(f"{name!r} is not a valid path (it holds a NUL byte or an unencodable character)") from None
    except FileTooLarge:
        raise InputError(f"{name} is larger than {max_bytes // 2**20} MiB; {too_large_hint}") from None
    except PermissionError:
        raise InputError(f"cannot read {name}: permission denied") from None
    except OSError as err:
        raise InputError(f"cannot read {name}: {err.strerror or err}") from None


def read_stream(
    stream: BinaryIO, name: str, max_bytes: int = MAX_IMAGE_BYTES, idle_timeout: float = STDIN_IDLE_TIMEOUT_S
) -> bytes:
    """Read a pipe (stdin) to its end: at most `max_bytes`, giving up when it sends nothing for `idle_timeout` s."""
    fd = stream.fileno()
    chunks, size = [], 0
    while True:
        ready, _, _ = select.select([fd], [], [], idle_timeout)
        if not ready:
            raise InputError(
                f"nothing arrived on {name} for {idle_timeout:g} s; pipe the image in (cat photo.png | llava ask - ...)"
            )
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise InputError(f"{name} is larger than {max_bytes // 2**20} MiB; is it really an image?")
        chunks.append(chunk)


def image_from_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageRef:
    """Decode `data` into an RGB `ImageRef`; `name` is only used in messages."""
    if not data:
        raise InputError(f"{name} is empty, not an image")
    image = decode_elsewhere(data, name, max_pixels, DECODE_BUDGET_S)
    return ImageRef(name=name, digest=hashlib.sha256(data).hexdigest(), image=image)


def decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The RGB picture of `data`, decoded here (media/decodepool.py's helper process runs this)."""
    from PIL import Image, UnidentifiedImageError

    check_decoding_work(data, name)
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses bombs itself past twice this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=DECODED_FORMATS) as img:
                check_size(img, name, max_pixels)
                img.seek(0)  # animations: the first frame
                img.load()
                return shrink_to_usable(to_rgb(img))
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name} is too large to be a safe image (raise --max-image-pixels if you trust it)") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image Pillow can read (try PNG, JPEG, GIF, WebP, BMP or TIFF)") from None
    except Exception as err:  # Pillow reports corrupt data with many exception types
        raise InputError(f"{name} is truncated or corrupt ({one_line(err)}); re-export or re-download it") from None


def check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            "raise --max-image-pixels if you trust it"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(
            f"{name} is {width}x{height}: its sides differ by more than {MAX_ASPECT_RATIO}:1, "
            "which the model cannot use; crop it or cut it into pieces"
        )


def shrink_to_usable(img: Image.Image) -> Image.Image:
    """`img` with its long side cut to MAX_IMAGE_SIDE (aspect kept); smaller images are returned untouched."""
    from PIL import Image

    if max(img.size) <= MAX_IMAGE_SIDE:
        return img
    img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Make any Pillow image an upright 8-bit RGB image."""
    from PIL import Image, ImageOps

    with contextlib.suppress(Exception):  # a broken EXIF block only costs us the rotation
        ImageOps.exif_transpose(img, in_place=True)  # in place: a copy of a 7000x7000 picture costs 150 MB
    if img.mode in HIGH_BIT_DEPTH_MODES:
        img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit or float greyscale to 0..255 instead of letting Pillow clip it."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):  # declared 16-bit: a dark picture must stay dark
        full_scale = 65535.0
    else:  # 32-bit integer or float say nothing of their range: judge by the brightest pixel
        brightest = float(pixels.max()) if pixels.size else 0.0
        full_scale = 65535.0 if brightest > 255 else 255.0 if brightest > 1 else 1.0
    scaled = np.rint(pixels * (255.0 / full_scale))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def looks_like_image(arg: str) -> bool:
    """True for an existing file or a name with an image (or video) extension (so a typo'd path is not a prompt)."""
    if "\n" in arg:
        return False
    path = Path(arg).expanduser()
    try:
        return path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
    except (OSError, ValueError):  # a long prompt is no valid file name at all
        return False
