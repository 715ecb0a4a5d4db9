"""The suite under any launcher (issue 14, section 6): a launcher that ignores SIGINT (`nohup ... &`,
some CI runners) passes the ignored signal on to every process; the processes the tests start get
SIGINT back (helpers.default_sigint), so the Ctrl-C tests still pass."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import default_sigint

pytestmark = pytest.mark.slow  # every test here starts processes

READ_SIGIGN = "print(next(line for line in open('/proc/self/status') if line.startswith('SigIgn:')).split()[1])"


@contextmanager
def sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def sigint_ignored_in_child(**popen: object) -> bool:
    mask = subprocess.run(
        [sys.executable, "-c", READ_SIGIGN], capture_output=True, text=True, check=True, **popen
    ).stdout
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def test_children_get_sigint_back_when_the_launcher_ignores_it():
    with sigint_ignored():
        assert sigint_ignored_in_child()  # what a launcher passes on
        assert not sigint_ignored_in_child(preexec_fn=default_sigint)


def test_a_ctrl_c_test_passes_when_started_with_sigint_ignored():
    root = Path(__file__).resolve().parent.parent
    test = "tests/test_security.py::test_ctrl_c_while_loading_exits_130_without_a_traceback[importing torch]"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `nohup ... &` starts it
    )
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 passed" in run.stdout
