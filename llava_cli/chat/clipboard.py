"""Copy text to the system clipboard for `/copy`, honestly reporting how (or that it cannot).

A clipboard tool is used when the session has one: `wl-copy` (Wayland), `xclip` or `xsel` (X11),
`pbcopy` (macOS), `clip.exe` (Windows, WSL). Otherwise, at a terminal, the text is sent with the
OSC 52 escape sequence, which many terminals (also over SSH) put on the clipboard and others
silently ignore; the message says so, since there is no way to know. With neither, `LlavaError`.

What is copied is the text as the screen showed it: escape sequences, controls and the invisible
characters base/terminal.py strips are left out, so a paste never carries what the reader did not see.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from typing import IO

from llava_cli.base.errors import LlavaError
from llava_cli.base.terminal import safe_for_terminal

# (environment variable that must be set, or None; the command that reads the text on stdin)
CLIPBOARD_TOOLS: list[tuple[str | None, list[str]]] = [
    ("WAYLAND_DISPLAY", ["wl-copy"]),
    ("DISPLAY", ["xclip", "-selection", "clipboard"]),
    ("DISPLAY", ["xsel", "--clipboard", "--input"]),
    (None, ["pbcopy"]),
    (None, ["clip.exe"]),
]
TOOL_TIMEOUT_S = 5


def copy_to_clipboard(text: str, terminal: IO[str] | None) -> str:
    """Put `text`, as shown, on the clipboard and say how; `terminal` (a tty or None) allows the OSC 52 fallback."""
    text = safe_for_terminal(text)
    for variable, command in CLIPBOARD_TOOLS:
        if (variable is None or os.environ.get(variable)) and shutil.which(command[0]) and run_tool(command, text):
            return f"copied the last answer with {command[0]}"
    if terminal is not None:
        terminal.write(osc52(text))
        terminal.flush()
        return "sent the last answer to your terminal's clipboard (OSC 52); terminals that do not allow this ignore it"
    raise LlavaError("no clipboard available: install wl-copy (Wayland), xclip or xsel (X11), or use a terminal")


def run_tool(command: list[str], text: str) -> bool:
    try:
        # No pipes for its output: xclip stays behind to own the selection and would hold them open.
        subprocess.run(
            command,
            input=text.encode(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=TOOL_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def osc52(text: str) -> str:
    return f"\x1b]52;c;{base64.b64encode(text.encode()).decode()}\x07"
