"""`/quit` and Ctrl-C on `llava serve` give the shell back at once (issue 14, section 3): once torch
is loaded, the program exits without the interpreter's teardown, which frees the model and unloads
torch module by module for seconds (bench/exit_speed.py measures it). Exit handlers still run, and
the exit code is the command's."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import cli_env, default_sigint

pytestmark = pytest.mark.slow  # every test here starts processes

CHILD = """
import atexit, os, sys
{import_torch}

class Teardown:
    def __del__(self):
        os.write(1, b"torn down\\n")

kept = Teardown()  # a module global: only the interpreter's teardown deletes it
atexit.register(lambda: os.write(1, b"exit handler ran\\n"))
sys.argv = ["llava", "ask", "x.png", "hi", "--batch-size", "4"]  # a usage error: exit 2
from llava_cli.cli import program
program()
"""


@pytest.mark.parametrize(
    "torch_loaded, output", [(True, "exit handler ran\n"), (False, "exit handler ran\ntorn down\n")]
)
def test_the_program_skips_the_teardown_once_torch_is_loaded(torch_loaded, output):
    script = CHILD.format(import_torch="import torch" if torch_loaded else "")
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        preexec_fn=default_sigint,
    )
    assert (child.returncode, child.stdout) == (2, output), child.stderr
    assert (
        child.stderr
        == "llava: error: --batch-size 4: only with --each or --from-file, which answer images one by one\n"
    )
