"""Issue 12, the file side: what another local user, a session file or a crafted image sends cannot
hang, exhaust or escape llava-cli.

Special files (FIFOs, /dev/zero, symlinks to them) as images, session files, image lists and
discovery files; Ghostscript through an EPS named .png; extreme aspect ratios and huge images;
private folders and files; session ids that are paths; escape sequences from session files at a
terminal; SIGTERM in `chat`. Subprocesses that could hang or eat the memory on a regression run
with a timeout and an address-space limit (`resource.setrlimit` in the child).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
from cli_runner import FakeTerminal, invoke
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import cli_env, render_llava15

from llava_cli.media.images import image_from_bytes

# The documented limits (media/images.py), written out so these tests also run, and fail, on older code.
MAX_ASPECT_RATIO = 50
MAX_IMAGE_SIDE = 4096

FIFO_TIMEOUT_S = 60  # the refusal is immediate; a regression would block for ever
MEMORY_LIMIT = 6 * 2**30  # address space for a child: enough for torch and the tiny model, not for /dev/zero
OTHER_UID = 54321
OSC52 = b"\x1b]52;c;ZXZpbA==\x07"
OSC8 = b"\x1b]8;;http://evil.example\x07"
CLEAR = b"\x1b[2J"
HOSTILE = (OSC52 + OSC8 + CLEAR).decode()


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_bounded(
    *args: str, env: dict[str, str] | None = None, stdin: bytes = b"", timeout: float = 180
) -> subprocess.CompletedProcess:
    """`llava ARGS` in a child with a memory limit; raises TimeoutExpired when it hangs."""
    return subprocess.run(
        [sys.executable, "-m", "llava_cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        env=env or cli_env(),
        timeout=timeout,
        preexec_fn=limit_memory,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return result.stderr.decode("utf-8", "replace").splitlines()


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


@pytest.fixture
def zero_link(tmp_path) -> Path:
    path = tmp_path / "zero.png"
    path.symlink_to("/dev/zero")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session_document(
    session_id: str, model: str, turns: list[dict], name: str | None = None, system: str | None = None
) -> dict:
    return {
        "format": "llava-cli-conversation",
        "version": 1,
        "id": session_id,
        "name": name,
        "created": "2026-11-25T12:44:03Z",
        "updated": "2026-11-25T12:46:10Z",
        "model": model,
        "settings": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "seed": None, "max_context": None},
        "system": system,
        "turns": turns,
    }


def image_turn(name: str, path: Path | str, digest: str, user: str = "what is it?", answer: str = "a picture") -> dict:
    return {
        "user": user,
        "images": [{"name": name, "path": str(path), "sha256": digest}],
        "assistant": answer,
        "answered_at": "2026-11-25T12:44:09Z",
    }


def write_session(home: Path, file_stem: str, document: dict) -> Path:
    folder = home / "sessions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_stem}.json"
    path.write_text(json.dumps(document))
    return path


# --- Finding 1: special files -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "symlink to /dev/zero"])
def test_ask_refuses_a_special_file_at_once_with_one_line(kind, fifo, zero_link, tiny_model):
    path = {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "symlink to /dev/zero": zero_link}[kind]
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    result = run_bounded("ask", "--model", tiny_model, path, "q", timeout=FIFO_TIMEOUT_S)
    assert (result.returncode, error_lines(result)) == (2, [f"llava: error: {path} is {what}, not an image"])


def test_piped_chat_image_command_and_image_list_refuse_a_fifo(fifo, tiny_model, tmp_path):
    chat = run_bounded("chat", "--model", tiny_model, stdin=f"/image {fifo}\n".encode(), timeout=FIFO_TIMEOUT_S)
    assert (chat.returncode, error_lines(chat)) == (1, [f"llava: error: {fifo} is a FIFO (named pipe), not an image"])
    listed = run_bounded("ask", "--model", tiny_model, "--from-file", fifo, "-p", "q", timeout=FIFO_TIMEOUT_S)
    assert (listed.returncode, error_lines(listed)) == (
        2,
        [
            f"llava: error: --from-file {fifo}: it is a FIFO (named pipe), not a regular file; pipe a list in with --from-file -"
        ],
    )


def test_resuming_a_conversation_whose_image_became_a_fifo_is_refused(fifo, images, tiny_model, tmp_path):
    home = tmp_path / "home"
    write_session(
        home,
        "20261125-124403-3f2a",
        session_document("20261125-124403-3f2a", str(tiny_model), [image_turn("cat.png", fifo, sha256(images["red"]))]),
    )
    result = run_bounded("ask", "-c", "and now?", env=cli_env(LLAVA_HOME=str(home)), timeout=FIFO_TIMEOUT_S)
    assert (result.returncode, error_lines(result)) == (
        2,
        [
            f"llava: error: cannot continue 20261125-124403-3f2a: turn 1: {fifo} is a FIFO (named pipe), not an image. "
            "Put the image back, or continue without it with --drop-missing-images"
        ],
    )


def test_sessions_list_reports_fifos_and_links_in_the_sessions_folder_and_lists_the_rest(tiny_model, tmp_path):
    home = tmp_path / "home"
    write_session(home, "good", session_document("good", "some-model", []))
    folder = home / "sessions"
    os.mkfifo(folder / "pipe.json")
    (folder / "zero.json").symlink_to("/dev/zero")
    (folder / "elsewhere.json").symlink_to(folder / "good.json")  # even a link to a real conversation is not followed
    result = run_bounded("sessions", "list", "--json", env=cli_env(LLAVA_HOME=str(home)), timeout=FIFO_TIMEOUT_S)
    assert result.returncode == 0
    assert [row["id"] for row in json.loads(result.stdout)] == ["good"]
    assert sorted(error_lines(result)) == sorted(
        [
            f"llava: warning: {folder / 'pipe.json'} is not a conversation file: it is a FIFO (named pipe), not a regular file; it was left as it is",
            f"llava: warning: {folder / 'zero.json'} is not a conversation file: it is a symbolic link, not a regular file; it was left as it is",
            f"llava: warning: {folder / 'elsewhere.json'} is not a conversation file: it is a symbolic link, not a regular file; it was left as it is",
        ]
    )
    shown = run_bounded("sessions", "show", "pipe", env=cli_env(LLAVA_HOME=str(home)), timeout=FIFO_TIMEOUT_S)
    assert (shown.returncode, error_lines(shown)) == (
        2,
        [
            f"llava: error: {folder / 'pipe.json'} is not a conversation file: it is a FIFO (named pipe), not a regular file; it was left as it is"
        ],
    )


# --- Finding 2: Ghostscript -------------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"


@pytest.fixture
def fake_ghostscript(tmp_path) -> tuple[dict[str, str], Path]:
    """A `gs` first on PATH that records that it ran: (environment, marker file)."""
    folder, marker = tmp_path / "bin", tmp_path / "gs-ran"
    folder.mkdir()
    script = folder / "gs"
    script.write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    script.chmod(0o755)
    return cli_env(PATH=f"{folder}{os.pathsep}{os.environ['PATH']}"), marker


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_an_eps_named_png_never_reaches_ghostscript(source, fake_ghostscript, tiny_model, tmp_path):
    env, marker = fake_ghostscript
    evil = tmp_path / "evil.png"
    evil.write_bytes(EPS)
    name, stdin = (evil, b"") if source == "file" else ("-", EPS)
    result = run_bounded("ask", "--model", tiny_model, name, "q", env=env, stdin=stdin)
    shown = evil if source == "file" else "<stdin>"
    assert (result.returncode, error_lines(result)) == (
        2,
        [f"llava: error: {shown} is not an image Pillow can read (try PNG, JPEG, GIF, WebP, BMP or TIFF)"],
    )
    assert not marker.exists()


def test_image_bytes_as_a_server_data_url_never_reach_ghostscript(fake_ghostscript, monkeypatch):
    from llava_cli.base.errors import InputError

    env, marker = fake_ghostscript
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(InputError, match=r"^the data: URL is not an image Pillow can read"):
        image_from_bytes(EPS, "the data: URL")
    assert not marker.exists()


# --- Finding 3: aspect ratio and size -----------------------------------------------------------


def test_a_few_hundred_byte_1x100000_png_is_refused_before_the_model_loads(tmp_path, tiny_model):
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("1", (1, 100_000)).save(thin, optimize=True)
    result = run_bounded("ask", "--model", tiny_model, thin, "q")
    assert (result.returncode, error_lines(result)) == (
        2,
        [
            f"llava: error: {thin} is 1x100000: its sides differ by more than {MAX_ASPECT_RATIO}:1, "
            "which the model cannot use; crop it or cut it into pieces"
        ],
    )
    panorama = io.BytesIO()  # the limit leaves long panoramas alone
    Image.new("RGB", (MAX_ASPECT_RATIO * 10, 10), (10, 20, 30)).save(panorama, "PNG")
    assert image_from_bytes(panorama.getvalue(), "panorama").image.size == (MAX_ASPECT_RATIO * 10, 10)


def test_a_7000_pixel_image_is_shrunk_before_the_processor_and_answered_as_transformers_does(
    tmp_path, tiny_model, reference, images
):
    from PIL import Image

    ordinary = image_from_bytes(images["blue"].read_bytes(), "blue").image  # smaller images: pixel for pixel
    assert ordinary.tobytes() == Image.open(images["blue"]).convert("RGB").tobytes()

    big = tmp_path / "big.png"
    Image.new("RGB", (7000, 7000), (200, 30, 30)).save(big)
    assert image_from_bytes(big.read_bytes(), "big").image.size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    result = run_bounded("ask", "--model", tiny_model, "-n", MAX_NEW, big, "what is it?")
    expected = reference.answer(render_llava15([("what is it?", 1, None)]), [big], MAX_NEW)
    assert (result.returncode, result.stdout.decode()) == (0, expected + "\n")


# --- Finding 6: other local users ---------------------------------------------------------------


def test_every_folder_llava_creates_is_0700_whatever_the_umask(tmp_path, images, tiny_model, monkeypatch):
    home = tmp_path / "data" / "llava-home"
    result = subprocess.run(
        [sys.executable, "-m", "llava_cli", "ask", "--model", str(tiny_model), "-n", "2", str(images["red"]), "q"],
        capture_output=True,
        env=cli_env(LLAVA_HOME=str(home), LLAVA_NO_SERVER="1"),
        timeout=180,
        preexec_fn=lambda: os.umask(0),
    )
    assert result.returncode == 0, result.stderr
    for folder in (tmp_path / "data", home, home / "sessions"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder

    from llava_cli.client.discovery import runtime_dir, write_server_file

    monkeypatch.delenv("LLAVA_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    old_umask = os.umask(0)
    try:
        write_server_file("http://127.0.0.1:1", "m")
    finally:
        os.umask(old_umask)
    assert runtime_dir() == tmp_path / "user" / ".cache" / "llava-cli" / "run"
    for folder in (tmp_path / "user" / ".cache", tmp_path / "user" / ".cache" / "llava-cli", runtime_dir()):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(folder))
    return folder


def plant(folder: Path, url: str = "http://127.0.0.1:8700", mode: int = 0o600, owner: int | None = None) -> Path:
    path = folder / f"server-{os.getpid()}.json"
    path.write_text(json.dumps({"url": url, "model": "m", "model_key": "m", "pid": os.getpid()}))
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner, -1)
    return path


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda folder: plant(folder, mode=0o666), "others may write to it (mode 0666)"),
        (lambda folder: plant(folder, owner=OTHER_UID), f"it belongs to another user (uid {OTHER_UID})"),
        (
            lambda folder: plant(folder, url="http://192.0.2.7:8700"),
            "its url 'http://192.0.2.7:8700' is not on this machine",
        ),
        (
            lambda folder: plant(folder, url="https://evil.example:8700"),
            "its url 'https://evil.example:8700' is not on this machine",
        ),
        (
            lambda folder: (folder / f"server-{os.getpid()}.json").symlink_to(plant(folder.parent)),
            "it is a symbolic link, not a regular file",
        ),
    ],
    ids=["world-writable", "other owner", "lan address", "remote host", "symlink"],
)
def test_a_discovery_file_others_could_plant_is_ignored_with_a_note(runtime, setup, reason):
    from llava_cli.client.discovery import find_server

    setup(runtime)
    notes: list[str] = []
    assert find_server("m", notes.append) is None
    assert notes == [f"ignoring {runtime / f'server-{os.getpid()}.json'}: {reason}"]


@pytest.mark.parametrize("change", ["chmod 0777", "chown"])
def test_a_discovery_folder_others_can_write_is_ignored(runtime, change):
    from llava_cli.client.discovery import find_server

    plant(runtime)
    if change == "chmod 0777":
        runtime.chmod(0o777)
        reason = "others may write to it (mode 0777)"
    else:
        os.chown(runtime, OTHER_UID, -1)
        reason = f"it belongs to another user (uid {OTHER_UID})"
    notes: list[str] = []
    assert find_server("m", notes.append) is None
    assert notes == [f"not looking for a running server in {runtime}: {reason}"]


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self) -> None:
        RecordingHandler.seen.append(self.headers.get("Authorization"))
        body = b'{"object": "list", "data": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow  # an HTTP server
def test_the_api_key_is_never_sent_to_a_discovered_server(runtime, monkeypatch):
    from llava_cli.base.settings import Settings
    from llava_cli.client.remote import choose_server

    server = http.server.HTTPServer(("127.0.0.1", 0), RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plant(runtime, url=f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("LLAVA_API_KEY", "sk-secret")
        RecordingHandler.seen = []
        engine = choose_server(Settings(model="m"), notify=lambda message: None)
        assert (
            engine is not None and engine.url == f"http://127.0.0.1:{server.server_port}"
        )  # a private loopback file is used
        assert engine.api_key is None and RecordingHandler.seen == [None]
        named = choose_server(Settings(model="m", server=engine.url), notify=lambda message: None)
        assert named.api_key == "sk-secret"  # a server the user named does get it
    finally:
        server.shutdown()


@pytest.mark.parametrize("problem", ["mode 0666", "other owner", "folder 0777", "folder of another user", "symlink"])
def test_an_input_history_others_could_read_or_plant_is_not_used(problem, tmp_path):
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from llava_cli.chat.inputline import history_at

    folder = tmp_path / "home"
    folder.mkdir(mode=0o700)
    history = folder / "input-history"
    history.write_text("")
    history.chmod(0o600)
    reason = {
        "mode 0666": f"{history}: others may write to it (mode 0666)",
        "other owner": f"{history}: it belongs to another user (uid {OTHER_UID})",
        "folder 0777": f"{folder}: others may write to it (mode 0777)",
        "folder of another user": f"{folder}: it belongs to another user (uid {OTHER_UID})",
        "symlink": f"{history}: it is a symbolic link, not a regular file",
    }[problem]
    if problem == "mode 0666":
        history.chmod(0o666)
    elif problem == "other owner":
        os.chown(history, OTHER_UID, -1)
    elif problem == "folder 0777":  # ours, but others may have planted files in it: refused, not tightened (issue 28)
        folder.chmod(0o777)
    elif problem == "folder of another user":
        os.chown(folder, OTHER_UID, -1)
    else:
        history.unlink()
        history.symlink_to(tmp_path / "collector")
    notes: list[str] = []
    assert isinstance(history_at(history, notes.append), InMemoryHistory)
    assert notes == [f"input history is kept for this session only: {reason}"]
    (tmp_path / "mine").mkdir(mode=0o700)
    assert isinstance(history_at(tmp_path / "mine" / "input-history", notes.append), FileHistory)


# --- Finding 7: session ids are never paths -----------------------------------------------------


@pytest.mark.parametrize("bad_id", ["../../../x", "{tmp}/escape/x"])
def test_a_session_whose_id_is_a_path_is_refused_and_nothing_is_written_outside(bad_id, tiny_model, tmp_path):
    bad_id = bad_id.format(tmp=tmp_path)  # an absolute path
    home = tmp_path / "a" / "b" / "home"
    path = write_session(home, "crafted", session_document(bad_id, str(tiny_model), []))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for args in (["chat", "--resume", "crafted"], ["ask", "-c", "hello"]):
        result = run_bounded(*args, "-n", 2, env=cli_env(LLAVA_HOME=str(home)), stdin=b"hello\n")
        assert (result.returncode, error_lines(result)) == (
            2,
            [f"llava: error: {path} has an invalid id {bad_id!r}; it was left as it is"],
        )
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_session_is_saved_back_to_its_own_file_whatever_id_it_holds(tiny_model, tmp_path):
    home = tmp_path / "home"
    path = write_session(home, "mine", session_document("someone-else", str(tiny_model), []))
    result = run_bounded("chat", "--resume", "mine", "-n", 2, env=cli_env(LLAVA_HOME=str(home)), stdin=b"hello\n")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (home / "sessions").iterdir()) == ["mine.json"]
    saved = json.loads(path.read_text())
    assert (saved["id"], [turn["user"] for turn in saved["turns"]]) == ("mine", ["hello"])


def test_a_session_with_a_bad_name_is_refused_by_name(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LLAVA_HOME", str(home))
    path = write_session(home, "named", session_document("named", "m", [], name="../evil"))
    outcome = invoke(monkeypatch, "sessions", "show", "named")
    assert (outcome.code, outcome.stderr) == (
        2,
        f"llava: error: {path} has an invalid name '../evil'; it was left as it is\n",
    )


# --- Finding 8: escape sequences from session files ---------------------------------------------


@pytest.fixture
def hostile_session(tmp_path, images, tiny_model) -> tuple[Path, str]:
    """A saved conversation whose model, system text, image name and texts carry OSC 52, OSC 8 and CSI 2J."""
    home = tmp_path / "home"
    turn = image_turn(
        f"cat{HOSTILE}.png", images["red"], sha256(images["red"]), user=f"hi{HOSTILE}", answer=f"hello{HOSTILE}"
    )
    write_session(
        home, "hostile", session_document("hostile", f"evil{HOSTILE}/model", [turn], system=f"be{HOSTILE} nice")
    )
    return home, str(tiny_model)


def test_session_file_text_reaches_the_repl_and_sessions_without_escape_sequences(hostile_session, monkeypatch):
    home, model = hostile_session
    env = cli_env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", LLAVA_HOME=str(home))
    args = ["-m", "llava_cli", "chat", "--model", model, "--resume", "hostile", "-n", "2", "--no-markdown"]
    log = io.BytesIO()
    child = pexpect.spawn(sys.executable, args, env=env, timeout=120, dimensions=(40, 400))
    child.logfile_read = log
    for command, reply in [
        ("", "resumed hostile"),
        ("/system", "system text: be"),
        ("/show", "markdown"),
        ("/images", "turn 1: cat"),
        ("/load hostile", "loaded hostile"),
    ]:
        if command:
            child.sendline(command)
        child.expect_exact(reply)
        child.expect_exact(">>>")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    shown = log.getvalue()
    assert b"continuing with" in shown and b"evil" in shown  # the resume note naming the saved model was shown
    for sequence in (OSC52, b"\x1b]52", OSC8, b"\x1b]8;", CLEAR):
        assert sequence not in shown

    monkeypatch.setenv("LLAVA_HOME", str(home))
    for args in (["sessions", "list"], ["sessions", "show", "hostile"]):
        terminal = invoke(monkeypatch, *args, stdout=FakeTerminal())
        assert terminal.code == 0 and "evil" in terminal.stdout
        assert not any(sequence.decode() in terminal.stdout for sequence in (OSC52, OSC8, CLEAR))
    piped = invoke(monkeypatch, "sessions", "show", "hostile")
    assert f"system    be{HOSTILE} nice" in piped.stdout  # a pipe gets the bytes as saved


def test_a_newline_in_a_file_name_stays_inside_one_error_line(tmp_path, monkeypatch):
    name = str(tmp_path / "two\nlines\r.png")
    outcome = invoke(monkeypatch, "ask", name, "hi")
    shown = name.replace("\n", "\\n").replace("\r", "\\r")
    assert (outcome.code, outcome.stderr) == (2, f"llava: error: image not found: {shown}\n")


# --- Finding 9: SIGTERM in chat ---------------------------------------------------------------


def test_sigterm_ends_a_terminal_chat_cleanly_with_the_conversation_saved(tiny_model, tmp_path):
    home = tmp_path / "home"
    env = cli_env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", LLAVA_HOME=str(home))
    args = ["-m", "llava_cli", "chat", "--model", str(tiny_model), "-n", "2", "--no-markdown"]
    log = io.BytesIO()
    child = pexpect.spawn(sys.executable, args, env=env, timeout=120, dimensions=(40, 400))
    child.logfile_read = log
    child.expect_exact(">>>")
    child.sendline("hello there")
    deadline = time.monotonic() + 120
    while not list((home / "sessions").glob("*.json")) and time.monotonic() < deadline:  # saved after the answer
        time.sleep(0.1)
    child.expect_exact(">>>")
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF)
    child.close()
    assert (child.exitstatus, child.signalstatus) == (0, None)
    assert b"Traceback" not in log.getvalue()
    files = list((home / "sessions").iterdir())
    assert [turn["user"] for turn in json.loads(files[0].read_text())["turns"]] == ["hello there"]
    assert len(files) == 1


def test_sigterm_in_the_middle_of_a_save_leaves_no_temp_file(tmp_path, monkeypatch):
    from llava_cli.base.safeio import write_private_file
    from llava_cli.frontend.signals import Terminated, sigterm_raises

    path = tmp_path / "sessions" / "x.json"
    write_private_file(path, b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Terminated), sigterm_raises(Terminated):
        write_private_file(path, b"new")
    assert [p.name for p in path.parent.iterdir()] == ["x.json"] and path.read_text() == "old"


@pytest.mark.slow  # starts processes
def test_temp_files_of_killed_saves_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LLAVA_HOME", str(home))
    write_session(home, "good", session_document("good", "m", []))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = home / "sessions" / f".good.json.{dead.pid}.k2j4h.tmp"
    live = home / "sessions" / f".good.json.{os.getppid()}.a8f3x.tmp"  # a save in progress in another process
    stale.write_text("half")
    live.write_text("half")
    assert invoke(monkeypatch, "sessions", "list").code == 0
    assert sorted(p.name for p in (home / "sessions").iterdir()) == sorted(["good.json", live.name])
