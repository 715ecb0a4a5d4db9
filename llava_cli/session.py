"""Start-up shared by the front-ends: quiet libraries, load the model, build the engine.

Loading messages go to stderr only: a spinner when stderr is a terminal, a line with --verbose,
nothing otherwise, so stdout stays clean for pipes.
"""

from __future__ import annotations

import os
import sys
import warnings

from llava_cli.engine import Engine
from llava_cli.settings import Settings
from llava_cli.terminal import is_terminal, make_console


def quiet_libraries() -> None:
    """Silence transformers/hub warnings and progress bars (kept with --verbose)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")


def start_engine(settings: Settings) -> Engine:
    from llava_cli.loader import load_model

    if not settings.verbose:
        quiet_libraries()
    stderr = make_console(sys.stderr)
    if is_terminal(sys.stderr):
        with stderr.status(f"Loading {settings.model}…"):
            loaded = load_model(settings)
    else:
        loaded = load_model(settings)
    if settings.verbose:
        stderr.print(f"loaded {loaded.name} on {loaded.device} ({loaded.dtype}) in {loaded.load_seconds:.1f}s")
    return Engine(loaded, notify=lambda message: stderr.print(f"note: {message}"))
