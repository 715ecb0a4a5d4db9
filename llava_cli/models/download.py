"""Hub downloads: only the files llava-cli loads, one progress bar for the whole model, resumable.

`snapshot_for(repo_id)` is how the loader reaches a hub id: the cached snapshot when it is complete
(no network at all), else the missing files downloaded (`pull`), else, offline, a `ModelError`
naming the missing files and how to finish. `pull(repo_id)` downloads ahead of time (`llava pull`)
and returns a `PullResult`. `snapshot_gaps(folder)` says, in words, what an offline load of a
snapshot would lack (`llava models` shows the same words).

Files go through huggingface_hub into its cache (HF_HOME / HF_HUB_CACHE; HF_ENDPOINT selects the
hub): the top-level config, safetensors weights and their index, tokenizer, processor, chat-template
and generation files (`WANTED_PATTERNS`), never pickle weights nor other formats. They are fetched
one at a time, small files first and weights last, and each enters the cache only once complete: an
interrupted download keeps every finished file and the next run fetches the rest (the file that was
cut short starts over). A hub silent for `HUB_TIMEOUT_S` seconds fails the download with one line
(HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT, read by huggingface_hub, change it). On a terminal,
stderr shows one progress bar for the whole model (bytes, speed, ETA); nothing when it is not one.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.filesize import decimal  # sizes as `du -h --si` prints them: 512 bytes, 3.4 MB, 13.5 GB

from llava_cli.base.errors import LlavaError, ModelError, one_line
from llava_cli.base.safeio import read_regular
from llava_cli.base.terminal import emit, is_terminal, make_console, progress_bar, shown

DEFAULT_HUB = "https://huggingface.co"
HUB_TIMEOUT_S = "10"  # seconds of silence from the hub before a download fails: it must not hang
WANTED_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
WEIGHT_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # config and index files are kilobytes
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # the largest tokenizer.json files (256k-token vocabularies) are about 35 MB
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")  # model-00001-of-00003.safetensors


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None  # None: the hub did not say

    @property
    def is_weights(self) -> bool:
        return self.name.endswith(".safetensors")


@dataclass(frozen=True)
class PullResult:
    """What `pull` did: the snapshot folder, and the files and bytes it had to fetch."""

    folder: Path
    files: int
    fetched_files: int
    total_bytes: int
    fetched_bytes: int
    seconds: float


def is_wanted(name: str) -> bool:
    """A top-level file the loader reads (no subfolders: they hold other formats, e.g. onnx/)."""
    return "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in WANTED_PATTERNS)


def snapshot_gaps(folder: Path) -> list[str]:
    """What an offline load of `folder` would lack, one phrase each; empty when it would load."""
    gaps = [] if (folder / "config.json").is_file() else ["no config.json"]
    gaps += weight_gaps(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        gaps.append("no tokenizer files")
    if not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        gaps.append("no image processor files")
    return gaps


def weight_gaps(folder: Path) -> list[str]:
    """Safetensors weights with every shard their index names (a cut-off download has fewer)."""
    index = read_json_file(folder / WEIGHT_INDEX)
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        shards = sorted({str(shard) for shard in index["weight_map"].values()})
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if not shards:
            return [f"no weights ({WEIGHT_INDEX} lists none)"]
        return [f"{len(missing)} of {len(shards)} weight shards missing: {', '.join(missing)}"] if missing else []
    present = [path.name for path in folder.glob("*.safetensors") if path.is_file()]
    if any(SHARD_NAME.search(name) for name in present):
        return [f"no {WEIGHT_INDEX} (the list of weight shards)"]
    return [] if present else ["no weights (*.safetensors)"]


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(read_regular(path, MAX_CONFIG_BYTES))  # a downloaded repo may hold a FIFO or a huge file
    except (OSError, ValueError, RecursionError):  # absent (a broken blob link too) or unreadable
        return None


def snapshot_for(repo_id: str) -> Path:
    """The folder `--model repo_id` loads from: the complete cached snapshot, else downloaded."""
    from huggingface_hub import constants

    folder, gaps = cached_state(repo_id)
    if folder is not None and not gaps:
        return folder
    if constants.HF_HUB_OFFLINE:
        raise ModelError(offline_message(repo_id, gaps, constants.HF_HUB_CACHE))
    return pull(repo_id, incomplete=gaps).folder


def offline_message(repo_id: str, gaps: list[str], cache: str) -> str:
    finish = f"unset HF_HUB_OFFLINE and run again to finish the download, or run `llava pull {repo_id}` once online"
    if gaps:
        return f"the download of {repo_id} is incomplete ({'; '.join(gaps)}) and HF_HUB_OFFLINE is set; {finish}"
    return (
        f"{repo_id} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
        f"download it first (llava pull {repo_id}) or pass a local folder"
    )


def set_short_timeouts() -> None:
    """huggingface_hub reads these when first imported; the user's own values win."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", HUB_TIMEOUT_S)
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", HUB_TIMEOUT_S)


def cached_state(repo_id: str) -> tuple[Path | None, list[str]]:
    """The cached snapshot of `repo_id` (None when there is none) and what it lacks."""
    set_short_timeouts()
    folder = cached_snapshot(repo_id)
    return folder, snapshot_gaps(folder) if folder is not None else []


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder refs/main names in the local cache (complete or not), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # not cached, or not a valid id (the hub will say which), or incomplete:
        path = getattr(
            err, "snapshot_path", None
        )  # huggingface_hub 2's IncompleteSnapshotError: we say what is missing
        return Path(path) if path else None


def pull(repo_id: str, incomplete: list[str] | None = None, weights: bool = True) -> PullResult:
    """Download what the cache lacks of `repo_id`'s wanted files; `incomplete` names the gaps already known;
    without `weights`, only the config, tokenizer and processor files (`llava tokens`)."""
    set_short_timeouts()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry notes would break the one-line rule
    started = time.perf_counter()
    commit, files = list_wanted_files(repo_id, incomplete or [])
    files = [file for file in files if weights or not file.is_weights]
    folder = snapshot_folder(repo_id, commit)
    needed = [file for file in files if not (folder / file.name).is_file()]
    sizes_known = all(file.size is not None for file in files)
    total = sum(file.size or 0 for file in files) if sizes_known else None  # None: a bar of bytes so far, no end
    with ModelProgress(repo_id, total, done=size_on_disk(folder, files), files=len(needed)) as progress:
        bar_class = progress.file_bar_class()
        for index, file in enumerate(needed):
            progress.next_file(index)
            try:
                fetch(repo_id, file, commit, bar_class, incomplete or [])
            except KeyboardInterrupt:
                progress.stop()
                emit(stopped_line(repo_id, index, len(needed), size_on_disk(folder, needed[:index])), sys.stderr)
                raise
    return PullResult(
        folder=folder,
        files=len(files),
        fetched_files=len(needed),
        total_bytes=size_on_disk(folder, files),
        fetched_bytes=size_on_disk(folder, needed),  # the bytes that arrived, whatever the hub said
        seconds=time.perf_counter() - started,
    )


def size_on_disk(folder: Path, files: list[HubFile]) -> int:
    """The bytes of those of `files` that are in the snapshot folder."""
    return sum((folder / file.name).stat().st_size for file in files if (folder / file.name).is_file())


def stopped_line(repo_id: str, finished: int, needed: int, size: int) -> str:
    """Ctrl-C during a download: what is kept, and that the same command finishes it."""
    return (
        f"llava: download of {repo_id} stopped: {finished} of {needed} files finished ({decimal(size)}), "
        "kept in the cache; run the same command again to resume"
    )


def list_wanted_files(repo_id: str, incomplete: list[str]) -> tuple[str, list[HubFile]]:
    """The commit `main` points at and its wanted files, small ones first and weights last."""
    from huggingface_hub import HfApi, constants

    try:
        info = HfApi().model_info(repo_id, files_metadata=True, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:
        raise download_error(repo_id, err, incomplete, kept=bool(incomplete)) from None
    files = [HubFile(s.rfilename, s.size) for s in info.siblings or [] if is_wanted(s.rfilename)]
    if not any(file.is_weights for file in files):
        raise ModelError(
            f"{repo_id} has no safetensors weights on the hub (llava-cli never downloads pickle .bin weights)"
        )
    return str(info.sha), sorted(files, key=lambda file: (file.is_weights, file.size or 0, file.name))


def snapshot_folder(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def fetch(repo_id: str, file: HubFile, commit: str, bar_class: type, incomplete: list[str]) -> None:
    """One file into the cache; `refs/main` is written too, so the next run finds the snapshot offline."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        # hf_hub_download retries a silent file look-up for minutes (60 s a try, whatever the settings):
        # one look-up first, with the short timeout and no retry, turns a dead hub into an error at once.
        get_hf_file_metadata(hf_hub_url(repo_id, file.name), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        downloaded = hf_hub_download(
            repo_id, file.name, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT, tqdm_class=bar_class
        )
    except Exception as err:
        raise download_error(repo_id, err, incomplete, kept=True) from None
    if Path(downloaded).parent.name != commit:  # main moved on while we were downloading
        raise LlavaError(f"{repo_id} changed on the hub during the download; run again to fetch the new version")


def download_error(repo_id: str, err: Exception, incomplete: list[str], kept: bool) -> ModelError:
    """One line for a failed hub request; names the hub when it is not the default one, and says
    whether files already downloaded are `kept`. Exit 2, as for any model that cannot be had."""
    from huggingface_hub import constants

    kind = type(err).__name__
    hub = "the Hugging Face hub" if constants.ENDPOINT == DEFAULT_HUB else f"the hub at {constants.ENDPOINT}"
    if "RepositoryNotFound" in kind or "HFValidationError" in kind:
        return ModelError(f"model {repo_id!r} was not found on {hub} nor in the local cache; check the id")
    if "GatedRepo" in kind:
        return ModelError(f"{repo_id} is gated: accept its licence on the hub and log in (hf auth login)")
    state = (
        f"the download of {repo_id} is incomplete ({'; '.join(incomplete)})"
        if incomplete
        else f"{repo_id} could not be downloaded"
    )
    cause = root_cause(err)
    if "Timeout" in type(cause).__name__:
        reason = f"{hub} did not answer within {constants.HF_HUB_DOWNLOAD_TIMEOUT} s (HF_HUB_DOWNLOAD_TIMEOUT, HF_HUB_ETAG_TIMEOUT)"
    else:
        reason = f"{hub} could not be reached ({type(cause).__name__}: {one_line(cause)})"
    again = "run again: the files already downloaded are kept" if kept else "run again"
    return ModelError(f"{state}: {reason}; check the connection and {again}")


def root_cause(err: BaseException) -> BaseException:
    """The network error under huggingface_hub's own (a failed file look-up wraps the timeout)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


class FileBar:
    """What huggingface_hub asks of a tqdm class for one file, counted into the whole model's bar.

    huggingface_hub makes one per file (two for Xet storage, one of which never counts) and calls
    `update` with each chunk's size; a retry that restarts a file calls it with a negative size.
    """

    advance: Callable[[int], None] = staticmethod(lambda n: None)

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
        self.total = total
        self.n = initial

    def __enter__(self) -> FileBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        type(self).advance(int(n or 0))

    def update_transfer(self, n: int | float | None = 1) -> None:
        """Network bytes of an Xet download: already counted by `update` as they reach the disk."""

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        """The bar shows its own speed."""

    set_transfer_postfix_str = set_postfix_str

    def refresh(self) -> None:
        """Drawn by the model's bar."""

    def close(self) -> None:
        """Nothing to release."""


class ModelProgress:
    """One Rich progress bar on stderr for the whole model, when stderr is a terminal and files are
    missing: the file being fetched (2 of 7), bytes, speed, ETA; bytes so far when the hub gave no
    sizes (`total` None)."""

    def __init__(self, repo_id: str, total: int | None, done: int, files: int) -> None:
        self.bar: Any = None
        self.label, self.files = shown(f"Downloading {repo_id}", sys.stderr), files
        if is_terminal(sys.stderr) and files:
            self.bar = make_download_progress(make_console(sys.stderr))
            self.task = self.bar.add_task(self.label, total=total, completed=done)

    def __enter__(self) -> ModelProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def next_file(self, index: int) -> None:
        """The bar names the file being fetched: `index` counts from 0 among the missing ones."""
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.label}: file {index + 1} of {self.files}")

    def file_bar_class(self) -> type[FileBar]:
        """A `FileBar` class whose instances count into this bar (a class: huggingface_hub instantiates it)."""
        if self.bar is None:
            return FileBar
        bar, task = self.bar, self.task
        return type("ModelFileBar", (FileBar,), {"advance": staticmethod(lambda n: bar.advance(task, n))})


def make_download_progress(console: Any) -> Any:
    from rich.progress import DownloadColumn, TransferSpeedColumn

    return progress_bar(console, DownloadColumn(), TransferSpeedColumn())


def run_pull(repo_id: str) -> int:
    """`llava pull`: a complete cached model is reported at once, with no network; else it is downloaded."""
    from huggingface_hub import constants

    folder, gaps = cached_state(repo_id)
    if folder is not None and not gaps:
        message = f"{repo_id} is already complete in the local cache: {folder}"
    elif constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it and run `llava pull {repo_id}` again"
        )
    else:
        message = summary(repo_id, pull(repo_id, incomplete=gaps))
    emit(message, sys.stderr)
    return 0


def summary(repo_id: str, result: PullResult) -> str:
    """`llava pull`'s one line after a download."""
    return (
        f"downloaded {repo_id}: {result.fetched_files} of {result.files} files, {decimal(result.fetched_bytes)} "
        f"in {result.seconds:.1f} s, into {result.folder}"
    )
