"""Start-up shared by the front-ends: quiet libraries, load the model, build the engine.

`start_engine` decides where answers come from: a server (`RemoteEngine`: --server, or a running
`llava serve` for the model; see remote.py) or a model loaded here (`load_engine`, which
`llava serve` itself uses). Both give the front-ends the same interface.

Loading messages go to stderr only: a spinner when stderr is a terminal, a line with --verbose,
nothing otherwise, so stdout stays clean for pipes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING

from llava_cli.engine import Engine
from llava_cli.remote import RemoteEngine, connect
from llava_cli.settings import Settings
from llava_cli.terminal import is_terminal, make_console, shown

if TYPE_CHECKING:
    from rich.console import Console

# Libraries that warn through `logging` rather than transformers' verbosity (bitsandbytes on a CPU
# without optional kernels, accelerate's device placement notes).
QUIET_LOGGERS = ("bitsandbytes", "accelerate")


def quiet_libraries() -> None:
    """Silence transformers/hub warnings and progress bars (kept with --verbose)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def start_engine(settings: Settings) -> Engine | RemoteEngine:
    """A server's engine when one is asked for or running for the model, else a model loaded here."""
    stderr = make_console(sys.stderr)
    remote = connect(settings, notify=lambda message: say(stderr, f"note: {message}"))
    if remote is None:
        return load_engine(settings)
    if settings.verbose:
        say(stderr, f"answering through the server at {remote.url}")
    return remote


def load_engine(settings: Settings) -> Engine:
    from llava_cli.loader import load_model

    if not settings.verbose:
        quiet_libraries()
    stderr = make_console(sys.stderr)
    if is_terminal(sys.stderr):
        from rich.text import Text

        with stderr.status(Text(shown(f"Loading {settings.model}…", sys.stderr))):  # a spinner label is no print
            loaded = load_model(settings)
    else:
        loaded = load_model(settings)
    if settings.verbose:
        say(stderr, f"loaded {loaded.name} on {loaded.device} ({loaded.dtype}) in {loaded.load_seconds:.1f}s")
    return Engine(loaded, notify=lambda message: say(stderr, f"note: {message}"))


def say(console: Console, message: str) -> None:
    """A diagnostic on stderr: no Rich markup, escape sequences stripped on a terminal (names are untrusted)."""
    console.print(message, markup=False, highlight=False)
