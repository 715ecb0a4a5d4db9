"""`llava sessions`: list, show, export and remove saved conversations (files described in store/conversations.py).

Everything goes to stdout (escape sequences removed when it is a terminal); warnings about files
that cannot be read go to stderr. `show --json` and `export --format json` print the file's
document as stored; `export --format markdown` writes a Markdown transcript with image links, each
field encoded for its place by store/markdownsafe.py (a saved file is untrusted: no raw HTML, no
`javascript:` or `data:` link, no forged heading survives; the rest of the answers' Markdown does). `prune` removes unnamed
conversations last updated before `--older-than` and/or beyond the `--keep` newest (both given: only
those that are both); named ones (`/save NAME`) and unreadable files are left alone.
"""

from __future__ import annotations

import json
import re
import sys
import time

from llava_cli.base.errors import UsageError
from llava_cli.base.terminal import emit, one_line_text
from llava_cli.store import markdownsafe as md
from llava_cli.store.conversations import (
    SavedConversation,
    SavedImage,
    SessionStore,
    describe_settings,
    parse_time,
    shorten,
)

EXPORT_FORMATS = ("markdown", "json")
DURATION = re.compile(r"(\d+)([mhdw])")
UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
LIST_COLUMNS = "{id:<21} {updated:<16} {turns:>5}  {model:<28} {name:<12} {words}"


def out(text: str) -> None:
    emit(text, sys.stdout)


def local_time(iso: str) -> str:
    """An ISO UTC time as local 'YYYY-MM-DD HH:MM' (the text itself if it is not a time)."""
    from datetime import datetime

    seconds = parse_time(iso)
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M") if seconds is not None else iso


def list_sessions(as_json: bool) -> int:
    store = SessionStore.default()
    found = []
    for saved in store.scan():
        if isinstance(saved, SavedConversation):
            found.append(saved)
        else:
            emit(f"llava: warning: {one_line_text(str(saved))}", sys.stderr)
    if as_json:
        out(json.dumps([summary(saved) for saved in found], ensure_ascii=False, indent=2))
        return 0
    if not found:
        emit(f"no saved conversations yet (in {store.folder})", sys.stderr)
        return 0
    out(LIST_COLUMNS.format(id="ID", updated="UPDATED", turns="TURNS", model="MODEL", name="NAME", words="FIRST WORDS"))
    for saved in found:
        row = dict(
            summary(saved), updated=local_time(saved.updated), model=shorten(saved.model, 28), name=saved.name or "-"
        )
        out(LIST_COLUMNS.format(**row, words=row["first_words"]).rstrip())
    return 0


def summary(saved: SavedConversation) -> dict[str, object]:
    """A conversation as `list --json` gives it: values as in the saved file (UTC ISO 8601 times, null name)."""
    return {
        "id": saved.id,
        "updated": saved.updated,
        "turns": len(saved.turns),
        "model": saved.model,
        "name": saved.name,
        "first_words": saved.first_words,
    }


def show_session(ref: str, as_json: bool) -> int:
    saved = SessionStore.default().find(ref)
    out(as_json_text(saved) if as_json else transcript(saved))
    return 0


def export_session(ref: str, fmt: str) -> int:
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    saved = SessionStore.default().find(ref)
    out(as_json_text(saved) if fmt == "json" else as_markdown(saved))
    return 0


def remove_session(ref: str) -> int:
    out(f"removed {SessionStore.default().remove(ref)}")
    return 0


def parse_duration(text: str) -> int:
    """`30m`, `12h`, `7d`, `2w` as seconds; `UsageError` otherwise."""
    match = DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"--older-than takes a number and a unit: 30m, 12h, 7d or 2w (got {text!r})")
    return int(match[1]) * UNIT_SECONDS[match[2]]


def prune_sessions(older_than: str | None, keep: int | None) -> int:
    if older_than is None and keep is None:
        raise UsageError("say which conversations to remove: --older-than 7d, --keep N, or both")
    if keep is not None and keep < 0:
        raise UsageError(f"--keep must be 0 or more (got {keep})")
    cutoff = time.time() - parse_duration(older_than) if older_than is not None else None
    store = SessionStore.default()
    unnamed = [saved for saved in store.scan() if isinstance(saved, SavedConversation) and saved.name is None]
    unnamed.sort(key=lambda saved: parse_time(saved.updated) or 0.0, reverse=True)
    doomed = [
        saved
        for index, saved in enumerate(unnamed)
        if (keep is None or index >= keep) and (cutoff is None or (parse_time(saved.updated) or 0.0) < cutoff)
    ]
    for saved in doomed:
        store.remove(saved.id)
    out(
        f"removed {len(doomed)} conversation(s); {len(unnamed) - len(doomed)} unnamed kept, named ones are never pruned"
    )
    return 0


def as_json_text(saved: SavedConversation) -> str:
    return json.dumps(saved.document, ensure_ascii=False, indent=2)


def transcript(saved: SavedConversation) -> str:
    """The conversation as a person reads it: a header, then each message and answer."""
    lines = [
        f"conversation {saved.label}",
        f"model     {saved.model}",
        f"created   {local_time(saved.created)} · updated {local_time(saved.updated)}",
        f"settings  {describe_settings(saved.settings)}",
    ]
    if saved.system:
        lines.append(f"system    {saved.system}")
    for turn in saved.turns:
        lines.append("")
        lines += [f">>> [image: {image.name}]" for image in turn.images]
        lines += [f">>> {turn.user}", turn.assistant]
    return "\n".join(lines)


def as_markdown(saved: SavedConversation) -> str:
    """A Markdown document of the conversation; images are links to the files they came from."""
    name = f" ({md.text(saved.name)})" if saved.name else ""
    lines = [
        f"# Conversation {md.text(saved.id)}{name}",
        "",
        f"- Model: {md.code(saved.model)}",
        f"- Created: {md.text(saved.created)}; updated: {md.text(saved.updated)}",
        f"- Settings: {md.text(describe_settings(saved.settings, ', '))}",
    ]
    if saved.system:
        lines.append(f"- System: {md.text(saved.system)}")
    for number, turn in enumerate(saved.turns, 1):
        lines += ["", f"## {number}. User", ""]
        for image in turn.images:
            lines += [image_line(image), ""]
        lines += [md.message(turn.user), "", f"## {number}. Assistant", "", md.message(turn.assistant)]
    return "\n".join(lines)


def image_line(image: SavedImage) -> str:
    """An image as a link to its file (or a note when it came from stdin), with its sha256 in a comment."""
    name = md.text(image.name)
    link = f"![{name}]({md.file_link(image.path)})" if image.path else f"*(image {name}, not from a file)*"
    digest = f" <!-- sha256 {image.sha256} -->" if md.is_sha256(image.sha256) else ""
    return link + digest
