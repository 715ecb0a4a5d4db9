"""`llava models`: the LLaVA-family checkpoints already in the local Hugging Face cache.

`find_models(cache)` scans the hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`) with
`huggingface_hub.scan_cache_dir` and returns one `CachedModel` per model repo whose snapshot (the
one `refs/main` names, else the newest) has a config.json of a supported family: its id, family,
size on disk and what, if anything, keeps it from loading offline, in `download.snapshot_gaps`'s
words ("1 of 3 weight shards missing: model-00002-of-00003.safetensors"). Nothing is downloaded or
loaded; the output is a table on stdout, or JSON with --json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.filesize import decimal

from llava_cli.base.families import MODEL_TYPES, family_for
from llava_cli.base.terminal import emit
from llava_cli.models.download import read_json_file, snapshot_gaps


@dataclass(frozen=True)
class CachedModel:
    """A LLaVA-family checkpoint found in the cache."""

    model: str
    family: str
    size_bytes: int
    missing: list[str] = field(default_factory=list)  # why it cannot load offline; empty when it can

    @property
    def offline(self) -> bool:
        return not self.missing

    def as_dict(self) -> dict[str, Any]:
        """The stable --json keys."""
        return {
            "model": self.model,
            "family": self.family,
            "size_bytes": self.size_bytes,
            "offline": self.offline,
            "missing": self.missing,
        }


def run_models(as_json: bool) -> int:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE  # HF_HUB_CACHE, else HF_HOME/hub
    found = find_models(cache)
    if as_json:
        emit(json.dumps([model.as_dict() for model in found], ensure_ascii=False), sys.stdout)
    elif found:
        emit(format_table(found), sys.stdout)  # ids and config text come from downloaded files
    else:
        emit(f"no LLaVA-family checkpoints in the Hugging Face cache ({cache})", sys.stderr)
    return 0


def find_models(cache: str) -> list[CachedModel]:
    """The LLaVA-family checkpoints in the hub cache folder `cache`, sorted by id."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(cache).repos
    except CacheNotFound:
        return []
    found = [describe(repo) for repo in repos if repo.repo_type == "model" and repo.revisions]
    return sorted((model for model in found if model is not None), key=lambda model: model.model.lower())


def describe(repo: Any) -> CachedModel | None:
    """The repo as a `CachedModel`, or None when it is not a LLaVA-family checkpoint."""
    snapshot = current_snapshot(repo)
    config = read_json_file(snapshot / "config.json")
    if not isinstance(config, dict) or config.get("model_type") not in MODEL_TYPES:
        return None
    return CachedModel(
        model=repo.repo_id,
        family=family_for(config).label,
        size_bytes=repo.size_on_disk,
        missing=snapshot_gaps(snapshot),
    )


def current_snapshot(repo: Any) -> Path:
    """The snapshot `--model ID` loads: the revision refs/main points at, else the newest."""
    revisions = sorted(repo.revisions, key=lambda revision: ("main" in revision.refs, revision.last_modified))
    return Path(revisions[-1].snapshot_path)


def format_table(models: list[CachedModel]) -> str:
    rows = [("MODEL", "FAMILY", "SIZE", "OFFLINE")] + [
        (
            model.model,
            model.family,
            decimal(model.size_bytes),
            "yes" if model.offline else "no: " + "; ".join(model.missing),
        )
        for model in models
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows)
