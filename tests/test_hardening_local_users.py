"""Issue 28, items 3 and 8: another local user on the same machine.

Item 3: files and folders llava-cli writes (the server's discovery file, saved conversations, the
input history, `-o FILE`) are never written through a folder or a name someone else prepared.
Another user is simulated by chowning what they plant to `nobody` (the tests run as root); the
"root file" they aim at is a file of ours that must come out unchanged, content and mode.

Item 8: `--allowed-local-media-path` reads the file it checked, even while a path in the folder is
swapped between a regular file and a symlink to a file outside it (CWE-367).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_runner import invoke
from helpers import cli_env
from PIL import Image

from llava_cli.base.settings import Settings

NOBODY = 65534
FIFO_TIMEOUT_S = 60  # the refusal is immediate; a regression blocks for ever
MEMORY_LIMIT = 4 * 2**30


def victim(folder: Path) -> Path:
    """A file of root's that an attacker would like overwritten or chmodded."""
    path = folder / "precious"
    path.write_text("root's own data\n")
    path.chmod(0o644)
    return path


def unchanged(path: Path) -> bool:
    return path.read_text() == "root's own data\n" and stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.fixture
def shared_runtime(tmp_path, monkeypatch) -> Path:
    """A shared XDG_RUNTIME_DIR (1777, like /tmp) with no LLAVA_RUNTIME_DIR set."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.delenv("LLAVA_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    return shared


def plant_links(folder: Path, target: Path, pids: range) -> None:
    """What `nobody` plants: `server-<pid>.tmp` links to the target for the next pids."""
    for pid in pids:
        link = folder / f"server-{pid}.tmp"
        link.symlink_to(target)
        os.chown(link, NOBODY, NOBODY, follow_symlinks=False)


# --- Item 3: the discovery file -------------------------------------------------------------------


def test_another_users_runtime_folder_with_planted_links_is_refused_and_nothing_is_touched(shared_runtime, tmp_path):
    from llava_cli.base.safeio import NotPrivate
    from llava_cli.client.discovery import write_server_file

    target = victim(tmp_path)
    planted = shared_runtime / "llava-cli"
    planted.mkdir()
    planted.chmod(0o777)
    os.chown(planted, NOBODY, NOBODY)
    plant_links(planted, target, range(os.getpid(), os.getpid() + 1))

    with pytest.raises(NotPrivate, match=f"it belongs to another user \\(uid {NOBODY}\\)"):
        write_server_file("http://127.0.0.1:8700", "m")
    assert unchanged(target)
    assert stat.S_IMODE(planted.stat().st_mode) == 0o777  # not chmodded either
    assert sorted(p.name for p in planted.iterdir()) == [f"server-{os.getpid()}.tmp"]


def test_a_runtime_folder_that_is_a_symlink_is_refused_and_its_target_left_alone(shared_runtime, tmp_path):
    from llava_cli.base.safeio import NotPrivate
    from llava_cli.client.discovery import write_server_file

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    link = shared_runtime / "llava-cli"
    link.symlink_to(elsewhere)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)

    with pytest.raises(NotPrivate, match="it is a symbolic link, not a folder"):
        write_server_file("http://127.0.0.1:8700", "m")
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755
    assert list(elsewhere.iterdir()) == []


def test_a_planted_temporary_name_in_our_own_folder_is_never_written_through(tmp_path, monkeypatch):
    """The temporary file has a random name and is created O_EXCL|O_NOFOLLOW: a name planted by
    whoever (before the folder became ours) cannot redirect the write."""
    from llava_cli.client.discovery import find_server, write_server_file

    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(folder))
    target = victim(tmp_path)
    plant_links(folder, target, range(os.getpid(), os.getpid() + 1))
    (folder / f"server-{os.getpid()}.json.tmp").symlink_to(target)

    path = write_server_file("http://127.0.0.1:8700", "m")
    assert unchanged(target)
    assert json.loads(path.read_text())["url"] == "http://127.0.0.1:8700"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert find_server("m") == ("http://127.0.0.1:8700", "m")


def test_the_server_serves_unannounced_with_one_line_when_the_runtime_folder_is_not_ours(
    shared_runtime, tmp_path, capsys
):
    from llava_cli.serve.server import announce

    planted = shared_runtime / "llava-cli"
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    assert announce("http://127.0.0.1:8700", "m", "m") is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"not announced to llava ask/chat on this machine: cannot write in {planted}: it belongs to another user (uid {NOBODY})"
    )


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_folder_of_ours_that_others_may_write_is_refused_not_tightened(tmp_path, mode):
    """Others may already have planted files in it: refusing is the only safe answer."""
    from llava_cli.base.safeio import NotPrivate, make_private_dir

    folder = tmp_path / "ours"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(NotPrivate, match=f"others may write to it \\(mode {mode:04o}\\)"):
        make_private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == mode


def test_every_created_folder_is_0700_and_checked_with_lstat_under_umask_0(tmp_path):
    from llava_cli.base.safeio import make_private_dir

    old = os.umask(0)
    try:
        make_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(folder.lstat().st_mode) == 0o700, folder


# --- Item 3: saved conversations --------------------------------------------------------------------


def test_a_sessions_folder_that_is_a_symlink_gets_no_conversation(tmp_path, monkeypatch, images, tiny_model):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (home / "sessions").symlink_to(elsewhere)
    monkeypatch.setenv("LLAVA_HOME", str(home))
    monkeypatch.setenv("LLAVA_NO_SERVER", "1")

    result = invoke(monkeypatch, "ask", "--model", str(tiny_model), "-n", "2", str(images["red"]), "what?")
    assert result.code == 0
    assert result.stderr.splitlines() == [
        f"llava: warning: the conversation could not be saved: it is a symbolic link, not a folder ({home / 'sessions'})"
    ]
    assert list(elsewhere.iterdir()) == []


def test_stale_temp_files_are_not_removed_through_a_symlinked_sessions_folder(tmp_path):
    from llava_cli.store.conversations import SessionStore

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    stale = elsewhere / ".x.json.999999999.abc.tmp"  # a pid that is not running
    stale.write_text("someone else's file")
    (tmp_path / "sessions").symlink_to(elsewhere)
    SessionStore(tmp_path / "sessions")
    assert stale.exists()


# --- Item 3: -o FILE ----------------------------------------------------------------------------


def each_to(output: Path, *images: Path) -> tuple[str, ...]:
    return ("ask", "--each", *map(str, images), "-p", "q", "-o", str(output))


@pytest.mark.parametrize("kind", ["symlink to root's file", "file of another user", "hard link to root's file"])
def test_output_file_is_never_written_through_a_planted_name(kind, tmp_path, monkeypatch, images):
    target = victim(tmp_path)
    output = tmp_path / "out.jsonl"
    if kind == "symlink to root's file":
        output.symlink_to(target)
        reason = "it is a symbolic link, not a regular file"
    elif kind == "file of another user":
        output.write_text("")
        os.chown(output, NOBODY, NOBODY)
        reason = f"it belongs to another user (uid {NOBODY})"
    else:
        os.link(target, output)
        reason = "it has 1 other hard link(s); write to a file of its own"
    result = invoke(monkeypatch, *each_to(output, images["red"]))
    assert (result.code, result.stderr.splitlines()) == (
        2,
        [f"llava: error: cannot write {output}: {reason}; choose another -o"],
    )
    assert unchanged(target)


def limit_memory() -> None:
    """Reading /dev/zero, as before the fix, ends in MemoryError at this limit instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_bounded(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llava_cli", *args],
        capture_output=True,
        env=cli_env(),
        timeout=FIFO_TIMEOUT_S,
        preexec_fn=limit_memory,
    )


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_output_to_a_fifo_or_dev_zero_is_refused_at_once(kind, tmp_path, images):
    output = Path("/dev/zero") if kind == "/dev/zero" else tmp_path / "out.jsonl"
    if kind == "fifo":
        os.mkfifo(output)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    result = run_bounded(*each_to(output, images["red"]))
    assert (result.returncode, result.stderr.decode().splitlines()) == (
        2,
        [f"llava: error: cannot write {output}: it is {what}, not a regular file; choose another -o"],
    )


# --- Item 8: the allowed local media folder -------------------------------------------------------


@pytest.fixture
def swapping(tmp_path):
    """A media folder whose `x.png` keeps turning from a non-image into a link to an image outside it."""
    media = tmp_path / "media"
    media.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    path = media / "x.png"
    done = threading.Event()

    def swap() -> None:
        staged_file, staged_link = media / ".file", media / ".link"
        while not done.is_set():
            staged_file.write_bytes(b"not an image at all")
            os.replace(staged_file, path)
            staged_link.symlink_to(outside)
            os.replace(staged_link, path)

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    yield media, path, hashlib.sha256(outside.read_bytes()).hexdigest()
    done.set()
    thread.join()


def test_a_file_swapped_for_a_symlink_while_requests_run_never_serves_outside_bytes(swapping):
    from llava_cli.prompt.conversation import Turn
    from llava_cli.serve.guard import Guard, ServeOptions
    from llava_cli.serve.request import ApiError, PendingImage

    media, path, secret_digest = swapping
    guard = Guard(ServeOptions(host="127.0.0.1", port=0, allowed_local_media_path=str(media)))
    served, refused = [], 0
    for attempt in range(3000):
        url = f"file://{path}" if attempt % 2 else str(path)
        try:
            served.append(
                PendingImage(Turn(text="q"), url, "messages[0]")
                .load(guard, Settings(model="m", max_image_pixels=10**6))
                .digest
            )
        except ApiError:
            refused += 1
    assert secret_digest not in served
    assert refused == 3000 - len(served)


def test_a_swap_right_after_the_path_is_resolved_is_refused(tmp_path, monkeypatch):
    """The unlucky moment of the loop above, made certain: the file becomes a link to an outside
    file just after the path was resolved and checked, before it is opened."""
    from llava_cli.prompt.conversation import Turn
    from llava_cli.serve.guard import Guard, ServeOptions
    from llava_cli.serve.request import ApiError, PendingImage

    media = tmp_path / "media"
    media.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    path = media / "x.png"
    path.write_bytes(b"not an image at all")
    guard = Guard(ServeOptions(host="127.0.0.1", port=0, allowed_local_media_path=str(media)))
    resolve = os.path.realpath

    def resolve_then_swap(name, *args, **kwargs):
        real = resolve(name, *args, **kwargs)
        if Path(real) == path and not path.is_symlink():
            path.unlink()
            path.symlink_to(outside)
        return real

    monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
    with pytest.raises(ApiError):
        PendingImage(Turn(text="q"), str(path), "messages[0]").load(guard, Settings(model="m", max_image_pixels=10**6))
    assert path.is_symlink()  # the swap happened


def test_a_symlink_inside_the_folder_to_a_file_inside_it_is_still_read(tmp_path):
    from llava_cli.prompt.conversation import Turn
    from llava_cli.serve.guard import Guard, ServeOptions
    from llava_cli.serve.request import PendingImage

    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(media / "sub" / "real.png")
    (media / "alias.png").symlink_to(media / "sub" / "real.png")
    guard = Guard(ServeOptions(host="127.0.0.1", port=0, allowed_local_media_path=str(media)))
    image = PendingImage(Turn(text="q"), str(media / "alias.png"), "messages[0]").load(
        guard, Settings(model="m", max_image_pixels=10**6)
    )
    assert image.path == str(media / "sub" / "real.png")
    assert image.digest == hashlib.sha256((media / "sub" / "real.png").read_bytes()).hexdigest()
