"""`llava show MODEL` and `llava rm MODEL`: what a checkpoint on disk is, and removing one from the hub cache.

`model_facts(name)` reads a local folder, or the snapshot of a hub id in the local cache, without
loading any weights: family, decoder, context window, parameters and weight dtype (from the
safetensors headers: at most MAX_HEADER_BYTES each, never the tensors), the dtype config.json names,
size on disk, image tokens per image (the processor's own count; a range for anyres families),
where the chat template comes from, and the revision. Nothing is downloaded.

`remove_model(repo_id, yes)` deletes a cached hub model's snapshots and blobs through
huggingface_hub's own cache API (`scan_cache_dir(...).delete_revisions(...)`), after a y/N prompt
on the terminal or with `--yes`, and only when every path it would delete lies inside the cache
folder: a local folder, or anything not in the cache, is refused in one line. The API is handed this
repo alone (its `delete_revisions` matches a commit hash in every repo it holds), and every path
it would delete must lie in the repo's own folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.filesize import decimal

from llava_cli.base.errors import ModelError, UsageError
from llava_cli.base.families import PromptStyle, text_model_type
from llava_cli.base.safeio import open_regular
from llava_cli.base.terminal import emit, is_terminal
from llava_cli.manage.models import current_snapshot
from llava_cli.models.download import cached_snapshot, read_json_file

MAX_HEADER_BYTES = 100 * 1024 * 1024  # a safetensors header lists tensors: megabytes at most
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def model_folder(name: str) -> tuple[Path, str]:
    """The folder of `name` and its revision: a local folder as is, else the cached snapshot."""
    from llava_cli.models.loader import looks_like_path

    path = Path(name).expanduser()
    if path.is_dir():
        return path, f"local folder {path.resolve()}"
    if looks_like_path(name) or path.exists():
        raise ModelError(f"model folder not found: {name}")
    folder = cached_snapshot(name)
    if folder is None:
        raise ModelError(
            f"{name} is not in the local Hugging Face cache; `llava models` lists what is, `llava pull {name}` downloads it"
        )
    return folder, folder.name


def model_facts(name: str) -> dict[str, Any]:
    """The facts `llava show` prints, as the stable --json keys."""
    from llava_cli.base.families import family_for
    from llava_cli.base.settings import Settings
    from llava_cli.models.imagetokens import token_range
    from llava_cli.models.loader import load_processor, read_config

    folder, revision = model_folder(name)
    config = read_config(name, folder)
    family = family_for(config)
    parameters, weight_dtypes = weights_summary(folder)
    fewest, most = token_range(load_processor(Settings(model=name), folder, family), family)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {
        "model": name,
        "family": family.label,
        "decoder": text_model_type(config),
        "context_window": text_config.get("max_position_embeddings"),
        "parameters": parameters,
        "dtype": config.get("dtype")
        or config.get("torch_dtype")
        or text_config.get("dtype")
        or text_config.get("torch_dtype"),
        "weight_dtypes": weight_dtypes,
        "size_bytes": folder_size(folder),
        "image_tokens": {"min": fewest, "max": most},
        "chat_template": template_source(folder, family.prompt_style),
        "revision": revision,
    }


def weights_summary(folder: Path) -> tuple[int, list[str]]:
    """Parameters and their dtypes, from the headers of the top-level safetensors files."""
    counts: Counter[str] = Counter()
    for path in sorted(folder.glob("*.safetensors")):
        for key, entry in safetensors_header(path).items():
            if key != "__metadata__" and isinstance(entry, dict):
                size = 1
                for side in entry.get("shape", []):
                    size *= int(side)
                counts[str(entry.get("dtype"))] += size
    return sum(counts.values()), [dtype for dtype, _ in counts.most_common()]


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (8-byte little-endian length, then JSON); `ModelError` when it is not one."""
    fd = open_regular(path)
    try:
        prefix = os.read(fd, 8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ModelError(f"{path.name} is not a safetensors file (header of {length} bytes); re-download the model")
        data = os.read(fd, length)
        header = json.loads(data) if len(data) == length else None
    except ValueError:
        header = None
    finally:
        os.close(fd)
    if not isinstance(header, dict):
        raise ModelError(f"{path.name} has a broken safetensors header; re-download the model")
    return header


def folder_size(folder: Path) -> int:
    """Bytes of the folder's files (a cache snapshot's links count as the blobs they point at)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def template_source(folder: Path, style: PromptStyle) -> str:
    if style is PromptStyle.LLAVA15:
        return "llava-1.5 format (built in, as the model card documents)"
    for name in TEMPLATE_FILES:
        data = read_json_file(folder / name) if name.endswith(".json") else None
        if (name.endswith(".jinja") and (folder / name).is_file()) or (
            isinstance(data, dict) and data.get("chat_template")
        ):
            return name
    return "none (pass --chat-template FILE)"


def show_lines(facts: dict[str, Any]) -> list[tuple[str, str]]:
    tokens = facts["image_tokens"]
    window = facts["context_window"]
    return [
        ("model", facts["model"]),
        ("family", facts["family"]),
        ("decoder", facts["decoder"]),
        ("context", f"{window:,} tokens" if isinstance(window, int) else "unknown"),
        ("parameters", f"{facts['parameters']:,}" if facts["parameters"] else "no weights on disk"),
        ("dtype", f"{facts['dtype'] or 'not stated'} (weights: {', '.join(facts['weight_dtypes']) or 'none'})"),
        ("size", decimal(facts["size_bytes"])),
        (
            "image tokens",
            f"{tokens['min']:,}"
            if tokens["min"] == tokens["max"]
            else f"{tokens['min']:,} to {tokens['max']:,} (anyres: by image size)",
        ),
        ("template", facts["chat_template"]),
        ("revision", facts["revision"]),
    ]


def run_show(name: str, as_json: bool) -> int:
    facts = model_facts(name)
    if as_json:
        emit(json.dumps(facts, ensure_ascii=False), sys.stdout)
    else:
        emit("\n".join(f"{label:<13}{value}" for label, value in show_lines(facts)), sys.stdout)
    return 0


def run_rm(repo_id: str, yes: bool) -> int:
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = Path(constants.HF_HUB_CACHE)
    try:
        scanned = scan_cache_dir(cache)
    except CacheNotFound:
        scanned = None
    repo = (
        next((repo for repo in scanned.repos if repo.repo_type == "model" and repo.repo_id == repo_id), None)
        if scanned
        else None
    )
    if repo is None:
        raise ModelError(
            f"{repo_id} is not in the Hugging Face cache ({cache}); llava rm only removes cached hub models, `llava models` lists them"
        )
    # delete_revisions matches commit hashes across every repo it holds: give it this repo alone, so
    # that another repo with the same revision (a copied snapshot) is never touched.
    only_this = dataclasses.replace(scanned, repos=frozenset({repo}), size_on_disk=repo.size_on_disk)
    strategy = only_this.delete_revisions(*(revision.commit_hash for revision in repo.revisions))
    check_inside(Path(repo.repo_path), strategy)
    if not (
        yes or confirm(f"delete {repo_id} ({decimal(repo.size_on_disk)}, {current_snapshot(repo).name}) from {cache}?")
    ):
        emit("nothing deleted", sys.stderr)
        return 1
    strategy.execute()
    emit(f"deleted {repo_id}: {decimal(strategy.expected_freed_size)} freed", sys.stderr)
    return 0


def check_inside(folder: Path, strategy: Any) -> None:
    """Every path the strategy would delete must be the repo's folder or lie in it (no link may lead out)."""
    root = folder.resolve()
    for path in [*strategy.blobs, *strategy.refs, *strategy.repos, *strategy.snapshots]:
        resolved = (
            Path(path).parent.resolve() / Path(path).name
        )  # the path itself may be a link: it is removed, not followed
        if resolved != root and root not in resolved.parents:
            raise ModelError(f"refusing to delete {path}: it lies outside {folder} in the Hugging Face cache")


def confirm(question: str) -> bool:
    """y/N on the terminal; without one, `--yes` is needed."""
    if not is_terminal(sys.stdin):
        raise UsageError("llava rm asks before deleting: pass --yes to delete without a terminal")
    emit(f"{question} [y/N] ", sys.stderr, end="", flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")
