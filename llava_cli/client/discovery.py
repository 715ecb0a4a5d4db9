"""Discovery files: how `llava ask` and `llava chat` find a `llava serve` already running here.

A running server writes `server-<pid>.json` (url, model: the id clients send, model_key, pid) into
`runtime_dir()` and removes it when it shuts down. `find_server(model)` returns (url, the model's
name on that server) of a live server for `model`, or None; `only_server()` the same for the one
live server when exactly one runs (for a command that names no model), and `live_servers()` all: a file whose process is gone is deleted, a file that cannot
be read is ignored. The model is matched by `model_key`: a local folder by its absolute path (so
`./m` and `/abs/m` match), a hub id as written. The files hold no secrets (never the API key) and
are readable by their owner only.

Another local user could plant a file pointing at a server of theirs, which would then receive
the user's images and prompts. So a discovery file is trusted only when the folder and the file
both belong to the current user and nobody else may write to them, the file is a regular file
(not a link) of at most MAX_RECORD_BYTES, and its url is http:// on a loopback address; anything
else is skipped and reported through `notify`. The folder is created 0700 whatever the umask, and
written only when it is ours (safeio's `make_private_dir`: another user's `llava-cli` folder, or a
symlink in its place, in a shared XDG_RUNTIME_DIR is refused); the file goes in under a random
temporary name (safeio's `write_private_file`), never through a name someone could plant.

Location: `$LLAVA_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/llava-cli`, else `~/.cache/llava-cli/run`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from llava_cli.base.safeio import (
    FileTooLarge,
    NotPrivate,
    NotRegularFile,
    private_folder,
    read_regular,
    write_private_file,
)

MAX_RECORD_BYTES = 64 * 1024  # a record is about 200 bytes
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})  # hosts that are this machine, by name


def runtime_dir() -> Path:
    # Not platformdirs.user_runtime_dir: it falls back to /run/user/UID (not where earlier versions looked) and warns;
    # the checks on a shared XDG_RUNTIME_DIR are safeio.private_folder's.
    if explicit := os.environ.get("LLAVA_RUNTIME_DIR"):
        return Path(explicit)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "llava-cli"
    return Path.home() / ".cache" / "llava-cli" / "run"


def model_key(model: str) -> str:
    """The same string for every spelling of the same model: a folder's absolute path, or the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def served_name(model: str) -> str:
    """The id `llava serve` gives `model` by default: a folder's name (never its absolute path), or the hub id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def write_server_file(url: str, model: str, served_as: str | None = None) -> Path:
    """Announce this process's server of `model`, which clients name `served_as` (default: `model`);
    returns the file to remove at shutdown.

    Raises OSError (`NotPrivate` when the folder is not ours) and writes nothing when it cannot."""
    record = {"url": url, "model": served_as or model, "model_key": model_key(model), "pid": os.getpid()}
    path = runtime_dir() / f"server-{os.getpid()}.json"
    write_private_file(path, json.dumps(record).encode("utf-8"))  # atomic: a reader never sees half a file
    return path


def remove_server_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def find_server(model: str, notify: Callable[[str], None] = lambda message: None) -> tuple[str, str] | None:
    """(url, the model's name on that server) of a running server for `model`, or None.

    Files and folders that others could have planted or changed are skipped, with a note."""
    wanted = model_key(model)
    return next(((url, served) for url, served, key in live_servers(notify) if key == wanted), None)


def only_server(notify: Callable[[str], None] = lambda message: None) -> tuple[str, str] | list[str] | None:
    """(url, model's name) of the one running server; the names of the models served when several
    run (none is picked); None when none runs."""
    servers = list(live_servers(notify))
    if len(servers) == 1:
        url, served, _ = servers[0]
        return url, served
    return [served for _, served, _ in servers] or None


def live_servers(notify: Callable[[str], None]) -> Iterator[tuple[str, str, str]]:
    """(url, model's name, model_key) of each trusted discovery file whose server is alive."""
    folder = runtime_dir()
    if not folder.is_dir():
        return
    try:
        private_folder(folder)
    except OSError as err:
        notify(f"not looking for a running server in {folder}: {err.strerror or err}")
        return
    for path in sorted(folder.glob("server-*.json")):
        record = read_record(path, notify)
        if record is None:
            continue
        if not is_loopback_url(record.get("url")):
            notify(f"ignoring {path}: its url {record.get('url')!r} is not on this machine")
            continue
        if process_alive(record.get("pid")):
            yield str(record.get("url")), str(record.get("model")), str(record.get("model_key"))
        else:
            remove_server_file(path)  # left behind by a server that was killed


def read_record(path: Path, notify: Callable[[str], None]) -> dict | None:
    try:
        record = json.loads(read_regular(path, MAX_RECORD_BYTES, follow_symlinks=False, private=True))
    except (NotRegularFile, NotPrivate, FileTooLarge) as err:
        notify(f"ignoring {path}: {err.strerror}")
        return None
    except (OSError, ValueError, RecursionError):  # vanished (its server stopped) or half-written
        return None
    return record if isinstance(record, dict) else None


def is_loopback_url(url: object) -> bool:
    """True for http://HOST[:PORT] where HOST is localhost or a loopback address (127.0.0.0/8, ::1)."""
    if not isinstance(url, str):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError:
        return False
    if parts.scheme != "http" or not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def process_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True
