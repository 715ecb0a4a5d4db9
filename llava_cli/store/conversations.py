"""Saved conversations: one versioned JSON file per conversation in the user's data folder.

Where: `$LLAVA_HOME` when set, else the platform's data folder (`$XDG_DATA_HOME/llava-cli` or
`~/.local/share/llava-cli` on Linux, `~/Library/Application Support/llava-cli` on macOS,
`%LOCALAPPDATA%\\llava-cli` on Windows). Conversations live in `sessions/<id>.json`.

Format (version 1), documented in README.md ("Saved conversations"):
    {"format": "llava-cli-conversation", "version": 1, "id", "name", "created", "updated",
     "model", "settings": {temperature, top_p, max_new_tokens, seed, max_context}, "system",
     "turns": [{"user", "images": [{"name", "path", "sha256"}], "assistant", "answered_at"}]}
Times are ISO 8601 UTC; `path` is absolute (null for an image read from stdin).

Writes are atomic (a 0600 temp file `.ID.json.PID.*.tmp` with a random part, created O_EXCL in the
same folder, fsync, rename: safeio's `write_private_file`), so a crash or Ctrl-C leaves the old file
or the new one, never half of one; temp files left by a process that was killed are removed when
the next store opens. The folders are 0700 whatever the umask, and a `sessions` folder that is a
symlink, another user's or writable by others is refused (`NotPrivate`, an OSError: the
conversation is not saved there, and the front-end says so in one line). Reading a file that is not valid JSON, not this format or from an unknown version raises
`SessionError` and never changes the file.

Session files are untrusted input (they can be edited, planted or shared): they are read through
`safeio.read_regular` (regular files only, never a symlink, at most MAX_SESSION_BYTES); the id and
name inside must match NAME_PATTERN, and where a conversation is saved is decided by the name of
the file it was read from, never by the `id` inside it.

Continuing a saved conversation (its images read again and checked) is store/resume.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import platformdirs

from llava_cli.base.errors import InputError, SessionError, one_line
from llava_cli.base.options import OPTIONS, SAVED
from llava_cli.base.safeio import FileTooLarge, NotRegularFile, private_folder, read_regular, write_private_file
from llava_cli.base.settings import Settings
from llava_cli.client.discovery import model_key, process_alive
from llava_cli.media.images import ImageRef
from llava_cli.prompt.conversation import Conversation, Turn

APP_NAME = "llava-cli"
FORMAT = "llava-cli-conversation"
VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # ids and names: never a path
MAX_SESSION_BYTES = 32 * 1024 * 1024  # text only (images are referenced): far beyond any real conversation
# A turn costs at least five tokens ("USER: x ASSISTANT: y</s>"), so no chat, trimmed to a LLaVA window
# (4k to 32k tokens), keeps 10,000; a file that holds more was not written by one, and parsing it
# whole cost 23.7 s and 2.9 GB at 560,000 turns. Objects are counted while parsing (turns, their
# images, the settings), so such a file is refused before it is all in memory.
MAX_SESSION_TURNS = 10_000
MAX_SESSION_OBJECTS = 4 * MAX_SESSION_TURNS
TEMP_FILE = re.compile(r"\..+\.json\.(\d+)\..*\.tmp")  # safeio.write_private_file's temp files, with the writer's pid


def data_dir() -> Path:
    """llava-cli's data folder: $LLAVA_HOME, else the platform's per-user data location.

    platformdirs only names the folder (on Linux `$XDG_DATA_HOME/llava-cli` when that is absolute, else
    `~/.local/share/llava-cli`, the paths earlier versions used); the store makes it private and
    checks it (safeio.private_folder)."""
    if home := os.environ.get("LLAVA_HOME"):
        return Path(home).expanduser()
    if sys.platform == "darwin":  # platformdirs reads $XDG_DATA_HOME on macOS too: saved conversations stay put
        return Path.home() / "Library" / "Application Support" / APP_NAME
    return platformdirs.user_data_path(APP_NAME, appauthor=False)


def describe_settings(values: dict[str, Any], separator: str = " · ") -> str:
    """Generation settings as their option names say them: temperature 0.2 · top-p 1.0 · seed none."""
    return separator.join(f"{OPTIONS[key].key} {'none' if value is None else value}" for key, value in values.items())


def iso_time(seconds: float) -> str:
    """ISO 8601 UTC to the second: 2026-11-25T12:44:03Z."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def shorten(text: str, width: int = 40) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def utc_now() -> str:
    return iso_time(time.time())


@dataclass(frozen=True)
class SavedImage:
    name: str  # as the user typed it
    path: str | None  # absolute; None when it came from stdin
    sha256: str


@dataclass
class SavedTurn:
    user: str
    images: list[SavedImage]
    assistant: str
    answered_at: str | None


@dataclass
class SavedConversation:
    """One conversation file, parsed and checked."""

    id: str
    model: str
    settings: dict[str, Any]
    created: str
    updated: str
    name: str | None = None
    system: str | None = None
    turns: list[SavedTurn] = field(default_factory=list)
    document: dict[str, Any] = field(default_factory=dict, repr=False)  # the file as read
    path: Path | None = None  # the file it was read from

    @property
    def label(self) -> str:
        return f"{self.id} ({self.name})" if self.name else self.id

    @property
    def first_words(self) -> str:
        return shorten(self.turns[0].user) if self.turns else ""


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of saves whose process is gone (killed mid-save); others may be saving now.
    Only in a folder of ours: through a planted symlink this would delete in someone else's folder."""
    with suppress(OSError):
        private_folder(folder)
        for entry in os.scandir(folder):
            match = TEMP_FILE.fullmatch(entry.name)
            if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
                with suppress(OSError):
                    os.unlink(entry.path)


def check_name(value: str | None, what: str, where: str) -> None:
    """Refuse an id or name that is not a plain file-name-safe word (it could be a path: `../../x`)."""
    if value is not None and not NAME_PATTERN.fullmatch(value):
        raise SessionError(f"{where} has an invalid {what} {value!r}; it was left as it is")


class TooManyObjects(Exception):
    """A JSON document holds more objects than an `ObjectCount` allows."""


class ObjectCount:
    """A `json.loads` object hook that stops the parse after `limit` objects."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, mapping: dict[str, Any]) -> dict[str, Any]:
        self.left -= 1
        if self.left < 0:
            raise TooManyObjects
        return mapping


def too_many_turns(where: str) -> SessionError:
    return SessionError(
        f"{where} holds more than {MAX_SESSION_TURNS:,} turns, more than a chat keeps; it was left as it is"
    )


def parse_document(document: Any, where: str) -> SavedConversation:
    """Check a decoded conversation file; raise `SessionError` naming what is wrong."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SessionError(f"{where} is not a llava-cli conversation file; it was left as it is")
    version = document.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        hint = "upgrade llava-cli to read it" if newer else "this llava-cli reads only version 1"
        raise SessionError(f"{where} has format version {version!r}; {hint} (the file was left as it is)")
    if isinstance(document.get("turns"), list) and len(document["turns"]) > MAX_SESSION_TURNS:
        raise too_many_turns(where)
    try:
        saved = SavedConversation(
            id=expect(document, "id", str),
            name=expect(document, "name", (str, type(None))),
            model=expect(document, "model", str),
            settings={key: expect(document["settings"], key, OPTIONS[key].json_kinds) for key in SAVED},
            created=expect(document, "created", str),
            updated=expect(document, "updated", str),
            system=expect(document, "system", (str, type(None))),
            turns=[parse_turn(turn) for turn in expect(document, "turns", list)],
            document=document,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SessionError(f"{where} is damaged ({err}); it was left as it is") from None
    check_name(saved.id, "id", where)
    check_name(saved.name, "name", where)
    return saved


def expect(mapping: Any, key: str, kinds: type | tuple[type, ...]) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise KeyError(f"no {key!r}")
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{key!r} has the wrong type")
    return value


def parse_turn(turn: Any) -> SavedTurn:
    return SavedTurn(
        user=expect(turn, "user", str),
        images=[
            SavedImage(
                expect(image, "name", str), expect(image, "path", (str, type(None))), expect(image, "sha256", str)
            )
            for image in expect(turn, "images", list)
        ],
        assistant=expect(turn, "assistant", str),
        answered_at=expect(turn, "answered_at", (str, type(None))),
    )


def image_entry(image: ImageRef) -> dict[str, Any]:
    return {"name": image.name, "path": image.path, "sha256": image.digest}


def turn_entry(turn: Turn) -> dict[str, Any]:
    return {
        "user": turn.text,
        "images": [image_entry(image) for image in turn.images],
        "assistant": turn.answer,
        "answered_at": iso_time(turn.answered_at) if turn.answered_at is not None else None,
    }


def modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed since it was listed
        return 0


class SessionStore:
    """The folder of conversation files: save, find by id, name or id prefix, list, remove."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        remove_stale_temp_files(folder)

    @classmethod
    def default(cls) -> SessionStore:
        return cls(data_dir() / "sessions")

    def path(self, session_id: str) -> Path:
        return self.folder / f"{session_id}.json"

    def new_id(self) -> str:
        while True:
            candidate = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
            if not self.path(candidate).exists():
                return candidate

    def write(self, document: dict[str, Any], path: Path) -> Path:
        write_private_file(path, (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        return path

    def read(self, path: Path) -> SavedConversation:
        """The conversation in `path`; its id is the file's name (the `id` inside must be valid, and is not used)."""
        check_name(path.stem, "file name", str(path))
        try:
            text = read_regular(path, MAX_SESSION_BYTES, follow_symlinks=False).decode("utf-8")
        except FileNotFoundError:
            raise SessionError(f"no saved conversation {path.stem}; `llava sessions list` shows them") from None
        except (NotRegularFile, FileTooLarge) as err:
            raise SessionError(f"{path} is not a conversation file: {err.strerror}; it was left as it is") from None
        except (OSError, UnicodeDecodeError) as err:
            raise SessionError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
        try:
            document = json.loads(text, object_hook=ObjectCount(MAX_SESSION_OBJECTS))
        except (json.JSONDecodeError, RecursionError) as err:
            raise SessionError(f"{path} is not valid JSON ({one_line(err)}); it was left as it is") from None
        except TooManyObjects:
            raise too_many_turns(str(path)) from None
        return dataclasses.replace(parse_document(document, str(path)), id=path.stem, path=path)

    def files(self) -> list[Path]:
        """Conversation files, most recently saved first (temp files of a save in progress excluded)."""
        try:
            found = [p for p in self.folder.glob("*.json") if not p.name.startswith(".")]
        except OSError:
            return []
        return sorted(found, key=modified, reverse=True)

    def scan(self) -> Iterator[SavedConversation | SessionError]:
        """Every conversation, newest first; a file that cannot be read yields its error instead."""
        for path in self.files():
            try:
                yield self.read(path)
            except SessionError as err:
                yield err

    def last(self) -> SavedConversation:
        files = self.files()
        if not files:
            raise SessionError(f"no saved conversations yet (in {self.folder})")
        return self.read(files[0])

    def find(self, ref: str) -> SavedConversation:
        """The conversation with this id, name or unique id prefix."""
        return self.read(self.locate(ref))

    def locate(self, ref: str) -> Path:
        if not NAME_PATTERN.fullmatch(ref):
            raise SessionError(f"{ref!r} is not a conversation id or name; `llava sessions list` shows them")
        exact = self.path(ref)
        if exact.exists():
            return exact
        named = self.named(ref)
        if named is not None and named.path is not None:
            return named.path
        matches = [path for path in self.files() if path.stem.startswith(ref)]
        if len(matches) > 1:
            raise SessionError(
                f"{ref} matches {len(matches)} conversations ({', '.join(p.stem for p in matches[:4])}); give more of the id"
            )
        if not matches:
            raise SessionError(f"no saved conversation {ref}; `llava sessions list` shows them")
        return matches[0]

    def named(self, name: str) -> SavedConversation | None:
        """The newest readable conversation given this name with /save."""
        return next(
            (saved for saved in self.scan() if isinstance(saved, SavedConversation) and saved.name == name), None
        )

    def owner_of_name(self, name: str) -> str | None:
        """The id of the conversation that has this name (or this id), if any."""
        if self.path(name).exists():
            return name
        named = self.named(name)
        return named.id if named else None

    def remove(self, ref: str) -> str:
        path = self.locate(ref)
        try:
            path.unlink()
        except OSError as err:
            raise SessionError(f"cannot remove {path}: {err.strerror or err}") from None
        return path.stem


class Recorder:
    """Keeps one conversation's file up to date: the same id, name and creation time on every save."""

    def __init__(self, store: SessionStore, saved: SavedConversation | None = None) -> None:
        self.store = store
        self.switch(saved)

    def save(self, conversation: Conversation, settings: Settings) -> Path:
        """Write the conversation's answered turns now; raises OSError (disk full, read-only...)."""
        if self.session_id is None:
            self.session_id, self.created = self.store.new_id(), utc_now()
        document = {
            "format": FORMAT,
            "version": VERSION,
            "id": self.session_id,
            "name": self.name,
            "created": self.created,
            "updated": utc_now(),
            "model": model_key(settings.model),
            "settings": {key: getattr(settings, key) for key in SAVED},
            "system": conversation.system,
            "turns": [turn_entry(turn) for turn in conversation.turns if turn.answer is not None],
        }
        # A loaded conversation goes back to the file it came from, whatever its `id` says.
        self.path = self.store.write(document, self.path or self.store.path(self.session_id))
        return self.path

    def rename(self, name: str) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise InputError(
                f"a name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (got {name!r})"
            )
        owner = self.store.owner_of_name(name)
        if owner is not None and owner != self.session_id:
            raise InputError(
                f"the name {name} is taken by conversation {owner}; pick another, or `llava sessions rm {name}` first"
            )
        self.name = name

    def switch(self, saved: SavedConversation | None) -> None:
        """Record into `saved` from now on (after /load), or into a new file (None, after /clear)."""
        self.session_id = saved.id if saved else None
        self.name = saved.name if saved else None
        self.created = saved.created if saved else None
        self.path: Path | None = saved.path if saved else None


def parse_time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
