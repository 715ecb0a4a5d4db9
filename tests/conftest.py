"""Shared fixtures: a tiny random LLaVA checkpoint (as a folder and as a hub cache), test images and
a plain-transformers reference; and what keeps `-m "not slow"` fast: tests using a `slow_fixture`
are marked slow, and a test not marked slow fails if it starts a process, listens on a socket or
builds a checkpoint. Helpers the test modules share are in helpers.py."""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tiny_checkpoint
from helpers import COLOURS, HUB_ID, SHORT_ANSWER, HelperHere, Reference, slow_fixture
from tiny_checkpoint import build_checkpoint, lay_out_hub_cache

from llava_cli.media import decodepool


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test using a `slow_fixture` is `slow`, marked here once rather than in every file; tests
    that start processes without one carry the mark themselves (`fast_stays_fast` finds any that do not)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info else ()
        if any(getattr(definition.func, "makes_tests_slow", False) for chain in definitions for definition in chain):
            item.add_marker(pytest.mark.slow)


class SlowWork(BaseException):
    """A test not marked `slow` started a process, listened on a socket or built a checkpoint. A BaseException, so that
    the code under test's own `except Exception` cannot hide it (`fast_stays_fast` also re-raises it)."""


# What `-m "not slow"` must never do, as (owner, attribute, what it does): every way the standard
# library starts a process (subprocess, multiprocessing, pty/pexpect, os.system, Ray's launcher)
# ends in one of these, every server (uvicorn, http.server, Ray) listens through socket.listen, and
# a checkpoint to load is first built by tiny_checkpoint.
GUARDED: tuple[tuple[object, str, str], ...] = (
    (subprocess.Popen, "_execute_child", "started a process"),
    (_posixsubprocess, "fork_exec", "started a process"),
    (os, "fork", "forked"),
    (os, "forkpty", "forked"),
    (os, "posix_spawn", "started a process"),
    (os, "posix_spawnp", "started a process"),
    (os, "system", "started a shell"),
    (socket.socket, "listen", "listened on a socket"),
    (tiny_checkpoint, "save_checkpoint", "built a checkpoint"),  # every tiny_checkpoint builder saves through it
)


def refusing(what: str, caught: list[str]) -> Callable[..., None]:
    def refuse(*args: object, **kwargs: object) -> None:
        message = f"a test not marked slow {what}: mark it @pytest.mark.slow, or use a fake"
        caught.append(message)
        raise SlowWork(message)

    return refuse


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from fast_stays_fast(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from fast_stays_fast(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    return (yield from fast_stays_fast(item))


def fast_stays_fast(item: pytest.Item) -> Iterator[None]:
    """Run one phase of a test not marked `slow` (its fixtures included, session-scoped ones too)
    with GUARDED refusing: the phase fails if it tried, even if the code under test swallowed the error."""
    if item.get_closest_marker("slow"):
        return (yield)
    caught: list[str] = []
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in GUARDED]
    for owner, name, what in GUARDED:
        setattr(owner, name, refusing(what, caught))
    try:
        result = yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    if caught:
        raise SlowWork(caught[0])
    return result


@pytest.fixture(autouse=True)
def images_decode_here(request, monkeypatch) -> None:
    """In a test not marked `slow`, decodepool's helper runs in this process (`HelperHere`): the same
    framing, `decodechild.reply` and `images.decode`, without starting `python -m llava_cli.media.decodechild`.
    Tests of the helper process itself (killed at its budget, crashed) are slow and get the real one."""
    if request.node.get_closest_marker("slow"):
        return
    monkeypatch.setattr(decodepool, "Helper", HelperHere)
    monkeypatch.setattr(decodepool, "POOL", decodepool.DecoderPool())  # no real helper left idle by a slow test


@pytest.fixture(autouse=True)
def restored_environment():
    """Each test starts from the same environment: in-process commands set variables for themselves
    (frontend/startup.py quiets huggingface_hub's own progress bars with HF_HUB_DISABLE_PROGRESS_BARS, for one),
    and a subprocess a later test starts from `os.environ` (cli_env) must not inherit them."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@slow_fixture  # the clipboard tool is a process
def fake_clipboard(tmp_path, monkeypatch) -> Path:
    """A Wayland session whose only clipboard tool, `wl-copy`, writes what it is given to the returned file."""
    bin_dir, clipboard = tmp_path / "bin", tmp_path / "clipboard.txt"
    bin_dir.mkdir()
    tool = bin_dir / "wl-copy"
    tool.write_text(f"#!/bin/sh\nexec /bin/cat > {clipboard}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    return clipboard


@pytest.fixture(scope="session", autouse=True)
def llava_home(tmp_path_factory) -> Path:
    """Saved conversations and input history go to a temporary LLAVA_HOME, never the real home dir."""
    home = tmp_path_factory.mktemp("llava-home")
    os.environ["LLAVA_HOME"] = str(home)
    return home


@pytest.fixture
def tiny_settings(tiny_model):
    """Settings for the tiny checkpoint with short answers (SHORT_ANSWER tokens)."""
    from llava_cli.base.settings import Settings

    return Settings(model=str(tiny_model), max_new_tokens=SHORT_ANSWER)


@pytest.fixture
def llava_home_dir(tmp_path, monkeypatch) -> Path:
    """A test's own empty LLAVA_HOME (saved conversations, input history)."""
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@slow_fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny checkpoint loaded once (float32 on CPU): build an `Engine` on it for in-process tests."""
    from llava_cli.base.settings import Settings
    from llava_cli.models.loader import load_model

    return load_model(Settings(model=str(tiny_model)))


@pytest.fixture(scope="session")
def hf_home(tiny_model, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    lay_out_hub_cache(tiny_model, home, HUB_ID)
    return home


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    for index, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (48 + 16 * index, 40), colour)
        ImageDraw.Draw(image).ellipse((4, 4, 30, 30), fill=(255, 255, 255))
        image.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def images(image_dir) -> dict[str, Path]:
    return {name: image_dir / f"{name}.png" for name in COLOURS}


@pytest.fixture(scope="session")
def reference(tiny_model) -> Reference:
    return Reference(tiny_model)
