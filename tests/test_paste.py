"""Pasting the clipboard's image (`llava ask --clipboard`, `/paste`) through fake clipboard tools on PATH."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_runner import invoke
from fake_io import FakeIO
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import render_llava15, slow_fixture

from llava_cli.chat.loop import ChatLoop
from llava_cli.engine.local import Engine
from llava_cli.media.paste import from_osascript
from llava_cli.store.conversations import Recorder, SessionStore

QUESTION = "What is in this picture?"
FAKE_XCLIP = """#!/bin/sh
[ "$*" = "-selection clipboard -t image/png -o" ] || exit 3
[ -f "$FAKE_CLIPBOARD" ] || { echo "Error: target image/png not available" >&2; exit 1; }
cat "$FAKE_CLIPBOARD"
"""
FAKE_POWERSHELL = """#!/bin/sh
base64 -w0 "$FAKE_CLIPBOARD"
"""


@slow_fixture  # the fake clipboard tools are processes
def clipboard(tmp_path, monkeypatch):
    """put(path or None): what the fake X11 clipboard holds; only the fake tools are on PATH."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("sh", "cat", "base64"):
        os.symlink(f"/bin/{name}" if Path(f"/bin/{name}").exists() else f"/usr/bin/{name}", tools / name)
    (tools / "xclip").write_text(FAKE_XCLIP)
    (tools / "xclip").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)

    def put(path: Path | None) -> Path:
        monkeypatch.setenv("FAKE_CLIPBOARD", str(path) if path else str(tmp_path / "empty"))
        return tools

    return put


def test_ask_clipboard_answers_about_the_pasted_image_and_it_cannot_be_resumed(
    clipboard, tiny_model, images, reference, llava_home_dir, monkeypatch
):
    clipboard(images["red"])
    outcome = invoke(monkeypatch, "ask", "--clipboard", QUESTION, "--model", tiny_model, "-n", MAX_NEW, "--json")
    assert outcome.code == 0, outcome.stderr
    record = json.loads(outcome.stdout)
    assert record["answer"] == reference.answer(render_llava15([(QUESTION, 1, None)]), [images["red"]], MAX_NEW)
    assert record["images"] == ["<clipboard>"]
    saved = json.loads(next((llava_home_dir / "sessions").rglob("*.json")).read_text())
    assert saved["turns"][0]["images"][0]["name"] == "<clipboard>" and saved["turns"][0]["images"][0]["path"] is None

    resumed = invoke(monkeypatch, "ask", "-c", "and now?", "--model", tiny_model, "-n", MAX_NEW)
    assert resumed.code == 2
    assert "<clipboard> was pasted from the clipboard and cannot be read again" in resumed.stderr


def test_paste_in_chat_attaches_the_image_to_the_next_message(
    clipboard, tiny_loaded, tiny_settings, images, reference, llava_home_dir
):
    clipboard(images["green"])
    io = FakeIO()
    io.lines = ["/paste", QUESTION]
    loop = ChatLoop(Engine(tiny_loaded), tiny_settings, io, Recorder(SessionStore.default()))
    loop.run([])
    assert io.infos[0] == "attached the clipboard's image (64x40); it goes with your next message"
    assert io.answers == [reference.answer(render_llava15([(QUESTION, 1, None)]), [images["green"]], MAX_NEW)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no image on the clipboard (xclip found none): copy an image first"),
        (
            b"just some copied text",
            "<clipboard> is not an image Pillow can read (try PNG, JPEG, GIF, WebP, BMP or TIFF)",
        ),
        (
            "sliver",
            "<clipboard> is 1x200: its sides differ by more than 50:1, which the model cannot use; crop it or cut it into pieces",
        ),
    ],
)
def test_what_is_no_usable_image_on_the_clipboard_is_one_line(clipboard, tmp_path, content, message, monkeypatch):
    path = None
    if content == "sliver":
        from PIL import Image

        path = tmp_path / "sliver.png"
        Image.new("RGB", (1, 200)).save(path)
    elif content is not None:
        path = tmp_path / "text"
        path.write_bytes(content)
    clipboard(path)
    outcome = invoke(monkeypatch, "ask", "--clipboard", QUESTION, "--model", "unused/never-loaded")
    assert (outcome.code, outcome.stdout, outcome.stderr) == (2, "", f"llava: error: {message}\n")


def test_without_a_clipboard_tool_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    outcome = invoke(monkeypatch, "ask", "--clipboard", QUESTION)
    assert outcome.code == 2 and outcome.stderr.startswith(
        "llava: error: no clipboard tool to paste an image with: install wl-clipboard"
    )


def test_powershell_on_wsl_hands_the_image_over_in_base64(clipboard, images, monkeypatch):
    from llava_cli.media.paste import paste_image

    tools = clipboard(images["blue"])
    (tools / "powershell.exe").write_text(FAKE_POWERSHELL)
    (tools / "powershell.exe").chmod(0o755)
    monkeypatch.delenv("DISPLAY")
    pasted = paste_image()
    import hashlib

    assert pasted.digest == hashlib.sha256(images["blue"].read_bytes()).hexdigest() and pasted.path is None


def test_osascript_output_is_decoded_from_its_hex_form(images):
    png = images["red"].read_bytes()
    assert from_osascript("«data PNGf".encode() + png.hex().upper().encode() + "»\n".encode()) == png
    assert from_osascript(b"") == b""


def test_clipboard_does_not_go_with_each(monkeypatch, images):
    outcome = invoke(monkeypatch, "ask", "--each", "--clipboard", images["red"], "-p", QUESTION)
    assert outcome.code == 2 and "--clipboard pastes one image for one question" in outcome.stderr
