"""The `IMAGE... [PROMPT]` grammar of `llava ask` and `ask --each`, the chat's `/image PATH...
[question]`, where a prompt or an image comes from (argument or stdin), and `AskOptions`.

One rule decides what is an image: `is_image_argument` (an http(s) URL, an existing file, or a
name with an image or video extension); the last argument is the prompt unless it is one. Every
error is a `UsageError`/`InputError` with a one-line message that says what to type instead.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.base.errors import InputError, UsageError
from llava_cli.base.options import LOGPROBS
from llava_cli.base.settings import DEFAULT_BATCH_SIZE, Settings
from llava_cli.base.terminal import is_terminal
from llava_cli.frontend.output import OUTPUT_FORMATS
from llava_cli.media.attachments import Media, media_from_bytes, open_media
from llava_cli.media.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, looks_like_image, read_stream
from llava_cli.media.urls import is_url

STDIN = "-"
MAX_BATCH_SIZE = 256
MAX_PARALLEL = 64  # --parallel: requests at once to a server (beyond, a server queues or refuses them anyway)
MAX_ACTORS = 256  # --actors: a pool larger than this is a typo, not a cluster
# --ray: local, auto, ray://HOST:PORT or HOST:PORT (a cluster's head; an IPv6 host in brackets).
RAY_ADDRESS = re.compile(r"local|auto|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
SHELL_SAFE_IN_DOUBLE_QUOTES = re.compile(r'[^"$`\\!]*')
# A path in /image: "quoted", 'quoted', or unquoted with backslash-escaped spaces (as terminals drop them).
PATH_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|((?:[^\s\\]|\\.)+)')


def is_image_argument(arg: str) -> bool:
    """An http(s) URL, or what `looks_like_image` (a file that exists, or an image's extension)."""
    return is_url(arg) or looks_like_image(arg)


def split_images_and_prompt(
    args: list[str], prompt: str | None = None, images_optional: bool = False, each: bool = False
) -> tuple[list[str], str | None]:
    """`IMAGE... [PROMPT]`: the last argument is the prompt unless it is an image argument (with
    -p/--prompt, every argument is an image); None: the prompt comes from stdin.

    `llava ask`: a lone argument is an image, and `-` last asks for the prompt from stdin;
    `images_optional` (-c): `[IMAGE...] [PROMPT]`. `each` (--each, --from-file): images may all
    come from the list file, so a lone argument is the prompt, and `-` is an image read from stdin."""
    if not args:
        if images_optional or each:
            return [], prompt
        raise UsageError("give at least one image: llava ask IMAGE... [PROMPT]")
    if prompt is not None:
        return list(args), prompt
    *images, last = args
    if not images and not (images_optional or each):
        return [last], None
    if last == STDIN:
        return (list(args) if each else images), None
    if is_image_argument(last):
        return list(args), None
    return images, last


def images_and_prompt(
    args: list[str], prompt: str | None, command: str, images_optional: bool = False, each: bool = False
) -> tuple[list[str], str | None]:
    """`split_images_and_prompt`, then checked: an unquoted prompt (the shell split it) and a blank
    one are refused with a one-line error naming `command` (`llava ask`, `llava ask --each`...)."""
    images, chosen = split_images_and_prompt(args, prompt, images_optional, each)
    if prompt is None:
        refuse_unquoted_prompt(images, chosen, command)
    if chosen is not None:
        checked_prompt(chosen)
    return images, chosen


def folder_images(names: list[str], recursive: bool = False) -> tuple[list[str], list[str]]:
    """`ask --each`'s names with each folder replaced by its images (by image extension), sorted by
    path; with `recursive`, its subfolders' too. Returns them and one note per entry skipped (hidden
    entries are skipped quietly, as a shell's `*` does). A folder without images is a `UsageError`."""
    images: list[str] = []
    notes: list[str] = []
    for name in names:
        if name == STDIN or is_url(name) or not os.path.isdir(name):
            images.append(name)
            continue
        found, skipped = images_in_folder(Path(name), recursive)
        if not found:
            raise UsageError(
                f"no images in the folder {name} ({len(skipped)} other entries{'' if recursive else '; --recursive looks in its subfolders'})"
            )
        images += found
        notes += skipped
    return images, notes


ANSWERABLE_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES  # what `--each FOLDER` answers: images and video clips


def images_in_folder(folder: Path, recursive: bool) -> tuple[list[str], list[str]]:
    """The image and video files under `folder` and a note for each other entry, in path order."""
    try:
        entries = sorted(
            folder.rglob("*") if recursive else folder.iterdir(), key=lambda path: path.relative_to(folder).parts
        )
    except OSError as err:
        raise UsageError(f"cannot list the folder {folder}: {err.strerror or err}") from None
    found, skipped = [], []
    for path in entries:
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_dir():
            if not recursive:
                skipped.append(f"skipping {path}: a folder (--recursive includes its images)")
        elif path.suffix.lower() in ANSWERABLE_SUFFIXES and path.is_file():
            found.append(str(path))
        else:
            skipped.append(f"skipping {path}: not an image or a video ({', '.join(sorted(ANSWERABLE_SUFFIXES))})")
    return found, skipped


def split_image_command(argument: str) -> tuple[list[str], str]:
    """`/image a.png "my b.png" what is this?` -> (["a.png", "my b.png"], "what is this?").

    Only local files: the chat reads no URLs, so an image needs a name that `looks_like_image`."""
    paths, position = [], 0
    while match := PATH_TOKEN.match(argument, position):
        token = next(group for group in match.groups() if group is not None)
        if paths and not looks_like_image(unescape(token)):
            break
        paths.append(unescape(token))
        position = match.end()
        while position < len(argument) and argument[position].isspace():
            position += 1
    return paths, argument[position:].strip()


def unescape(token: str) -> str:
    """A typed path as meant: backslash escapes removed; a dragged-in file:// URL made a path."""
    if token.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(token).path)
    return re.sub(r"\\(.)", r"\1", token)


def refuse_unquoted_prompt(images: list[str], prompt: str | None, command: str = "llava ask") -> None:
    """`llava ask img.png what is this`: the words before the prompt are no files but the rest of a
    sentence the shell split; say how to quote it rather than 'image not found: what'."""
    words: list[str] = []
    for name in reversed(images):
        if name == STDIN or is_image_argument(name) or "/" in name or os.path.lexists(name):
            break
        words.insert(0, name)
    if prompt is None or not words:
        return
    kept = [shlex.quote(name) for name in images[: len(images) - len(words)]]
    sentence = " ".join([*words, prompt])
    quoted = f'"{sentence}"' if SHELL_SAFE_IN_DOUBLE_QUOTES.fullmatch(sentence) else shlex.quote(sentence)
    raise UsageError(f"the prompt must be one argument; quote it: {' '.join([command, *kept, quoted])}")


def checked_prompt(prompt: str, source: str = "the prompt") -> str:
    """`prompt`, unless it is empty or blank: a question about nothing gets an answer about nothing."""
    if not prompt.strip():
        raise InputError(f'{source} is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"')
    return prompt


def read_prompt_from_stdin() -> str:
    if sys.stdin is None or is_terminal(sys.stdin):
        raise UsageError("no prompt: give it after the images, or pipe it in (echo 'what is this?' | llava ask IMG)")
    return checked_prompt(sys.stdin.read().strip(), "the prompt read from stdin")


def read_image_from_stdin() -> bytes:
    if is_terminal(sys.stdin):
        raise UsageError("'-' reads the image from stdin, but stdin is a terminal: pipe the image in")
    return read_stream(sys.stdin.buffer, "<stdin>")


def image_argument(name: str, stdin_image: bytes, settings: Settings) -> Media:
    """The image or video an argument names: `-` is `stdin_image` (read once beforehand), else a file or URL."""
    if name == STDIN:
        return media_from_bytes(stdin_image, "<stdin>", settings)
    return open_media(name, settings)


@dataclass(frozen=True)
class AskOptions:
    """How `llava ask` takes its images and prompt and writes its answers; validated on creation."""

    json: bool = False
    output_format: str | None = None  # None: text for one question, JSON lines for --each
    prompt: str | None = None
    each: bool = False
    from_file: str | None = None
    output: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    parallel: int | None = None  # None: DEFAULT_PARALLEL, when a server answers
    ray: str | None = None  # --ray ADDRESS: answer on a Ray cluster (ask/via_ray.py)
    actors: int | None = None  # None: one per GPU (or per node) of the cluster
    gpus_per_actor: float | None = None  # None: 1 on a cluster with GPUs, else 0
    clipboard: bool = False  # --clipboard: the clipboard's image goes with the question (media/paste.py)
    pages: str | None = None  # --pages 1-3,7: the pages of a PDF argument (media/pdfpages.py); None: the first
    recursive: bool = False  # --each FOLDER: its subfolders' images too
    logprobs: int | None = (
        None  # --logprobs N: each token's logprob and N alternatives in the JSON record (ask --json, --each's lines)
    )

    def __post_init__(self) -> None:
        if self.output_format is not None and self.output_format not in OUTPUT_FORMATS:
            raise UsageError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)} (got {self.output_format!r})")
        if self.json and self.output_format == "text":
            raise UsageError("--json and --output-format text exclude each other: pick one")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise UsageError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE} (got {self.batch_size})")
        if self.parallel is not None and not 1 <= self.parallel <= MAX_PARALLEL:
            raise UsageError(f"--parallel must be between 1 and {MAX_PARALLEL} (got {self.parallel})")
        if not self.is_batch and (used := self.batch_only_options()):
            raise UsageError(f"{used}: only with --each or --from-file, which answer images one by one")
        if self.clipboard and self.is_batch:
            raise UsageError("--clipboard pastes one image for one question; it does not go with --each or --from-file")
        if self.pages is not None and self.is_batch:
            raise UsageError(
                "--pages selects pages of a PDF for one question; it does not go with --each or --from-file"
            )
        if self.output is not None and self.format == "text":
            raise UsageError("-o writes JSON lines or CSV (so that a rerun can resume); drop --output-format text")
        self.check_logprobs()
        self.check_ray_options()

    def check_logprobs(self) -> None:
        if self.logprobs is None:
            return
        LOGPROBS.check(self.logprobs)
        if self.ray is not None:
            raise UsageError(
                "--logprobs is not carried back from Ray workers yet: drop --ray to answer with the model loaded here"
            )
        if self.format not in ("json", "jsonl"):
            raise UsageError("--logprobs N adds the tokens' logprobs to the JSON record: add --json")

    def check_ray_options(self) -> None:
        if self.ray is not None and not RAY_ADDRESS.fullmatch(self.ray):
            raise UsageError(f"--ray takes local, auto, ray://HOST:PORT or HOST:PORT (got {self.ray!r})")
        if self.actors is not None and not 1 <= self.actors <= MAX_ACTORS:
            raise UsageError(f"--actors must be between 1 and {MAX_ACTORS} (got {self.actors})")
        if self.gpus_per_actor is not None and not (math.isfinite(self.gpus_per_actor) and self.gpus_per_actor >= 0):
            raise UsageError(f"--gpus-per-actor must be 0 or more (got {self.gpus_per_actor:g})")
        if self.ray is None and (self.actors is not None or self.gpus_per_actor is not None):
            raise UsageError("--actors and --gpus-per-actor shape the Ray actor pool: only with --ray ADDRESS")
        if self.ray is not None and self.parallel is not None:
            raise UsageError("--parallel sends requests to a server; with --ray, --actors sets how many answer at once")

    @classmethod
    def from_command_line(cls, values: Mapping[str, Any]) -> AskOptions:
        """From `llava ask`'s option values by parameter name: typer's, or (in usage.py's preflight,
        so that a bad combination costs no typer start-up) click's parser's, not yet converted."""
        return cls(
            json=bool(values.get("json_output")),
            output_format=values.get("output_format"),
            prompt=values.get("prompt"),
            each=bool(values.get("each")),
            from_file=values.get("from_file"),
            output=values.get("output"),
            batch_size=int(values.get("batch_size") or DEFAULT_BATCH_SIZE),
            parallel=None if values.get("parallel") is None else int(values["parallel"]),
            ray=values.get("ray"),
            actors=None if values.get("actors") is None else int(values["actors"]),
            gpus_per_actor=None if values.get("gpus_per_actor") is None else float(values["gpus_per_actor"]),
            clipboard=bool(values.get("clipboard")),
            pages=values.get("pages"),
            recursive=bool(values.get("recursive")),
            logprobs=None if values.get("logprobs") is None else int(values["logprobs"]),
        )

    def batch_only_options(self) -> str:
        """The options given that only --each and --from-file use, as typed, or ''."""
        used = [f"-o {self.output}"] if self.output is not None else []
        used += [f"--batch-size {self.batch_size}"] if self.batch_size != DEFAULT_BATCH_SIZE else []
        used += [f"--parallel {self.parallel}"] if self.parallel is not None else []
        used += [f"--ray {self.ray}"] if self.ray is not None else []
        used += ["--recursive"] if self.recursive else []
        return " and ".join(used)

    @property
    def is_batch(self) -> bool:
        return self.each or self.from_file is not None

    @property
    def format(self) -> str:
        if self.output_format:
            return self.output_format
        return "json" if self.json else "jsonl" if self.is_batch else "text"


def check_chat_arguments(values: Mapping[str, Any]) -> None:
    """`llava chat ID` continues conversation ID only with --resume: say so rather than guess."""
    session = values.get("session")
    if session is not None and not values.get("resume"):
        raise UsageError(f"to continue conversation {session}, add --resume: llava chat --resume {session}")
