"""`llava serve --keep-alive`: the loaded model's life, unloaded after idle time and loaded again on demand.

Contract: `ModelHolder(engine, load, keep_alive_s, metrics)` holds the engine the server started
with. `keep_alive_s` None keeps it forever (the default); 0 frees it after each answer; N seconds
frees it after N idle seconds. The worker thread (serve/worker.py) asks `idle_wait_s()` how long it
may wait for work before calling `unload()`, and calls `load()` before admitting a job while the
model is out; requests arriving meanwhile wait in the worker's queue. `state` ("loaded",
"unloaded", "loading") is what `/health` reports; it is read from the event loop, written on the
worker thread (a plain attribute: a reader sees the old or the new state, both true a moment ago).

`unload()` drops the holder's engine; the caller drops its own references (batch, prefix caches)
first. Then the garbage is collected, the GPU allocator's idle blocks released and glibc's heap
trimmed, so the memory goes back to the system (bench/serve_keepalive.py measures the RSS).
"""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from llava_cli.base.errors import UsageError
from llava_cli.serve.log import log

if TYPE_CHECKING:
    from llava_cli.engine.local import Engine
    from llava_cli.serve.metrics import Metrics

LOADED, UNLOADED, LOADING = "loaded", "unloaded", "loading"
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_keep_alive(text: str) -> float | None:
    """`--keep-alive`: `-1` never unloads (None), `0` after each answer, else `30s`, `5m`, `1h` or plain seconds."""
    text = text.strip().lower()
    if text == "-1":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if not match:
        raise UsageError(
            f"--keep-alive must be a duration such as 30s, 5m or 1h, 0 (unload after each answer) or -1 (never); got {text!r}"
        )
    return float(match[1]) * DURATION_UNITS[match[2]]


class ModelHolder:
    def __init__(
        self,
        engine: Engine,
        load: Callable[[], Engine] | None = None,
        keep_alive_s: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine: Engine | None = engine
        self.load_engine = load
        self.keep_alive_s = keep_alive_s if load is not None else None  # nothing to reload with: never unload
        self.metrics = metrics
        self.state = LOADED

    def idle_wait_s(self) -> float | None:
        """How long the worker may wait for work before unloading; None: for ever."""
        return self.keep_alive_s if self.engine is not None else None

    def unload(self) -> None:
        self.engine = None
        self.state = UNLOADED
        free_model_memory()
        if self.metrics:
            self.metrics.unloaded()
        log(f"unloaded the model after {self.keep_alive_s:g} s idle (--keep-alive); the next request loads it again")

    def load(self) -> Engine:
        """The engine, loaded again if it was unloaded (`LlavaError` if it cannot be)."""
        if self.engine is None:
            assert self.load_engine is not None
            self.state = LOADING
            try:
                self.engine = self.load_engine()
            finally:
                self.state = LOADED if self.engine is not None else UNLOADED
            if self.metrics:
                self.metrics.loaded()
            log(f"loaded the model again in {self.engine.loaded.load_seconds:.1f} s")
        return self.engine


def free_model_memory() -> None:
    """Collect the dropped model, then hand the GPU's cached blocks and glibc's kept heap back to the system."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    give_memory_back()


def give_memory_back() -> None:
    """glibc's freed-but-kept heap back to the system (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)
