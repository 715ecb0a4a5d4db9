"""`llava serve`'s log: one-line messages on stderr, never a traceback.

`log` always prints; `log_detail` only with --verbose (`set_verbose`), for what a client is not
told (why a local image was refused). `one_line_records` is a logging filter that folds uvicorn's
and asyncio's tracebacks into one line.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from llava_cli.base.errors import one_line

VERBOSE = False  # --verbose: also log why requests were refused (details a client is not told)


def set_verbose(verbose: bool) -> None:
    global VERBOSE
    VERBOSE = verbose


def log(message: str) -> None:
    print(f"llava serve: {message}", file=sys.stderr, flush=True)


def log_detail(message: str) -> None:
    if VERBOSE:
        log(message)


def one_line_records(record: logging.LogRecord) -> bool:
    """A logging filter: a record with a traceback (uvicorn cancelling a request at shutdown) becomes one line."""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        if isinstance(error, asyncio.CancelledError):
            record.msg = "a request still open at shutdown was cancelled"
        else:
            record.msg = f"{record.getMessage().strip()}: {type(error).__name__}: {one_line(error)}"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
    return True
