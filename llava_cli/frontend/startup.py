"""Start-up shared by the front-ends: quiet libraries, load the model, build the backend.

`start_engine` decides where answers come from and returns it as a `Backend` (engine/backend.py): a server
(`RemoteEngine`: --server, or a running `llava serve` for the model; see client/remote.py) or a model
loaded here. `load_engine` always loads the model here and returns the local `Engine` itself, for
the callers that need more than the protocol (`llava serve`, `ask --each`'s batches).

Loading messages go to stderr only: a spinner when stderr is a terminal (after the download's
progress bar, when the model has to be fetched), a line with --verbose, nothing otherwise, so
stdout stays clean for pipes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING

from llava_cli.base.settings import Settings
from llava_cli.base.terminal import is_terminal, make_console, shown
from llava_cli.client.remote import RemoteEngine, choose_server, model_named
from llava_cli.engine.backend import Backend
from llava_cli.engine.local import Engine

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
    if (
        "transformers" in sys.modules
    ):  # imported already (xgrammar, for --schema, imports it): too late for the variables above
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def start_engine(settings: Settings) -> Backend:
    """A server's engine when one is asked for or running for the model, else a model loaded here."""
    remote = connect_server(settings)
    return load_engine(settings) if remote is None else remote


def connect_server(settings: Settings, remember_images: bool = True) -> RemoteEngine | None:
    """client/remote.py's `connect`, its notes on stderr (and with --verbose, the server it chose)."""
    stderr = make_console(sys.stderr)
    remote = choose_server(settings, lambda message: say(stderr, f"note: {message}"), remember_images)
    if remote is not None and settings.verbose:
        say(stderr, f"answering through the server at {remote.url}")
        if not settings.server and not model_named(settings):
            say(stderr, f"no model named: using the one running llava serve, which serves {remote.model}")
    return remote


def load_engine(settings: Settings) -> Engine:
    from llava_cli.models.loader import check_device, load_model, resolve_model

    check_device(settings)
    if not settings.verbose:
        quiet_libraries()
    stderr = make_console(sys.stderr)
    folder = resolve_model(settings.model)  # before the spinner: a download draws its own progress bar
    if is_terminal(sys.stderr):
        from rich.text import Text

        with stderr.status(Text(shown(f"Loading {settings.model}…", sys.stderr))):
            loaded = load_model(settings, folder)
    else:
        loaded = load_model(settings, folder)
    if settings.verbose:
        say(stderr, f"loaded {loaded.name} on {loaded.device} ({loaded.dtype}) in {loaded.load_seconds:.1f}s")
    return Engine(loaded, settings.cache_mb)


def show_note(text: str) -> None:
    """How `ask` and `chat` show a backend's `Note`: one line on stderr."""
    say(make_console(sys.stderr), f"note: {text}")


def say(console: Console, message: str) -> None:
    """A diagnostic on stderr: no Rich markup, escape sequences stripped on a terminal (names are untrusted)."""
    console.print(message, markup=False, highlight=False)
