"""Discovery files: how `llava ask` and `llava chat` find a `llava serve` already running here.

A running server writes `server-<pid>.json` (url, model, model_key, pid) into `runtime_dir()` and
removes it when it shuts down. `find_server(model)` returns (url, the model's name on that server)
of a live server for `model`, or None: a file whose process is gone is deleted, a file that cannot
be read is ignored. The model is matched by `model_key`: a local folder by its absolute path (so `./m` and `/abs/m` match), a hub
id as written. The files hold no secrets (never the API key) and are readable by their owner only.

Location: `$LLAVA_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/llava-cli`, else `~/.cache/llava-cli/run`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def runtime_dir() -> Path:
    if explicit := os.environ.get("LLAVA_RUNTIME_DIR"):
        return Path(explicit)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "llava-cli"
    return Path.home() / ".cache" / "llava-cli" / "run"


def model_key(model: str) -> str:
    """The same string for every spelling of the same model: a folder's absolute path, or the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def write_server_file(url: str, model: str) -> Path:
    """Announce this process's server; returns the file to remove at shutdown."""
    folder = runtime_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"url": url, "model": model, "model_key": model_key(model), "pid": os.getpid()}
    path = folder / f"server-{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    temporary.chmod(0o600)
    temporary.replace(path)  # atomic: a reader never sees half a file
    return path


def remove_server_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def find_server(model: str) -> tuple[str, str] | None:
    """(url, the model's name on that server) of a running server for `model`, or None."""
    wanted = model_key(model)
    folder = runtime_dir()
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("server-*.json")):
        record = read_record(path)
        if record is None or record.get("model_key") != wanted:
            continue
        if process_alive(record.get("pid")):
            return str(record.get("url")), str(record.get("model"))
        remove_server_file(path)  # left behind by a server that was killed
    return None


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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
