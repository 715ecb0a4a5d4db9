"""Paste the image on the system clipboard (`/paste`, `llava ask --clipboard`), or say in one line why not.

`paste_image(max_pixels)` asks the first clipboard tool the session has (`PASTE_TOOLS`, in order:
`wl-paste` on Wayland, `xclip` on X11, `pngpaste` then `osascript` on macOS, PowerShell's
`Get-Clipboard -Format Image` on Windows and WSL) for a PNG. The clipboard is hostile input like
any file: the tool's output is read with a byte cap and an idle timeout (images.read_stream), the
tool is killed past `TOOL_TIMEOUT_S`, and the bytes go through the same decoding checks as an image
file (images.image_from_bytes: allow-listed formats, pixel and aspect caps). The result is named
`PASTED_NAME` and has no path, so a saved conversation records it as a pasted image that, like
one read from stdin, cannot be read again on resume. With no tool, or no image on the clipboard,
`InputError` says so. chat/clipboard.py (`/copy`) is the other direction.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from llava_cli.base.errors import InputError
from llava_cli.base.options import DEFAULT_MAX_IMAGE_PIXELS
from llava_cli.media.images import MAX_IMAGE_BYTES, ImageRef, image_from_bytes, read_stream

PASTED_NAME = "<clipboard>"
TOOL_TIMEOUT_S = 5.0
TEXT_CAP = 2 * MAX_IMAGE_BYTES + 64  # hex (osascript) doubles the bytes; base64 adds a third
OSASCRIPT_DATA = re.compile(rb"\xc2\xabdata PNGf([0-9A-Fa-f]*)\xc2\xbb")  # «data PNGf89504E47...»
POWERSHELL_SCRIPT = (
    "Add-Type -AssemblyName System.Windows.Forms; $i = Get-Clipboard -Format Image; "
    "if ($i) { $m = New-Object System.IO.MemoryStream; $i.Save($m, [System.Drawing.Imaging.ImageFormat]::Png); "
    "[Convert]::ToBase64String($m.ToArray()) }"
)


def raw(output: bytes) -> bytes:
    return output


def from_osascript(output: bytes) -> bytes:
    match = OSASCRIPT_DATA.search(output)
    return binascii.unhexlify(match.group(1)) if match else b""


def from_base64(output: bytes) -> bytes:
    return base64.b64decode(b"".join(output.split()), validate=True)


@dataclass(frozen=True)
class PasteTool:
    """A command that writes the clipboard's image to stdout, and how to turn its output into bytes."""

    command: tuple[str, ...]
    needs: str | None = None  # an environment variable the session must have (WAYLAND_DISPLAY, DISPLAY)
    decode: Callable[[bytes], bytes] = raw
    cap: int = MAX_IMAGE_BYTES

    def available(self) -> bool:
        return (self.needs is None or bool(os.environ.get(self.needs))) and shutil.which(self.command[0]) is not None


PASTE_TOOLS: tuple[PasteTool, ...] = (
    PasteTool(("wl-paste", "--no-newline", "--type", "image/png"), needs="WAYLAND_DISPLAY"),
    PasteTool(("xclip", "-selection", "clipboard", "-t", "image/png", "-o"), needs="DISPLAY"),
    PasteTool(("pngpaste", "-")),
    PasteTool(("osascript", "-e", "get the clipboard as «class PNGf»"), decode=from_osascript, cap=TEXT_CAP),
    PasteTool(
        ("powershell.exe", "-NoProfile", "-NonInteractive", "-Command", POWERSHELL_SCRIPT),
        decode=from_base64,
        cap=TEXT_CAP,
    ),
    PasteTool(
        ("powershell", "-NoProfile", "-NonInteractive", "-Command", POWERSHELL_SCRIPT), decode=from_base64, cap=TEXT_CAP
    ),
)
NO_TOOL = (
    "no clipboard tool to paste an image with: install wl-clipboard (Wayland), xclip (X11) or pngpaste (macOS); "
    "or save the image and give its path"
)


def paste_image(max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageRef:
    """The clipboard's image, checked as an image file is; `InputError` when there is none."""
    tool = next((tool for tool in PASTE_TOOLS if tool.available()), None)
    if tool is None:
        raise InputError(NO_TOOL)
    data = run_tool(tool)
    if not data:
        raise InputError(f"no image on the clipboard ({tool.command[0]} found none): copy an image first")
    return image_from_bytes(data, PASTED_NAME, max_pixels)


def run_tool(tool: PasteTool) -> bytes:
    """The tool's output decoded; empty when it has no image (it fails, or writes nothing)."""
    try:
        process = subprocess.Popen(
            tool.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError as err:
        raise InputError(f"cannot run {tool.command[0]} to paste: {err.strerror or err}") from None
    try:
        output = read_stream(process.stdout, "the clipboard", tool.cap, TOOL_TIMEOUT_S)  # type: ignore[arg-type]
        code = process.wait(timeout=TOOL_TIMEOUT_S)
    except (subprocess.TimeoutExpired, InputError) as err:
        if process.poll() is None:  # silent or endless: read_stream gave up on it, or it would not exit
            raise InputError(f"{tool.command[0]} did not finish within {TOOL_TIMEOUT_S:g} s; nothing pasted") from None
        raise err from None  # too large for an image
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]
    if code != 0:
        return b""
    try:
        return tool.decode(output)
    except (ValueError, binascii.Error):
        raise InputError(f"{tool.command[0]} gave something that is not an image; nothing pasted") from None
