"""`--help` answers at once: it must not import torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import cli_env

# Runs in a fresh interpreter: each --help through the real entry point, then what got imported.
PROBE = """
import contextlib, io, json, sys
from llava_cli.cli import main

results = []
for argv in (["llava", "--help"], ["llava", "ask", "--help"], ["llava", "chat", "--help"]):
    sys.argv = argv
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
    results.append({"argv": argv, "code": code, "help": shown.getvalue()})
heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


@pytest.mark.slow  # starts a process
def test_help_does_not_import_torch_or_transformers():
    env = cli_env(COLUMNS="200")
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.splitlines()[-1])
    assert report["heavy"] == []
    expected_usage = {"--help": "Usage: llava [OPTIONS] COMMAND", "ask": "Usage: llava ask [OPTIONS]", "chat": "Usage: llava chat [OPTIONS]"}
    for result in report["results"]:
        assert result["code"] in (0, None), result["argv"]
        assert expected_usage[result["argv"][1]] in result["help"], result["help"][:300]
    assert "--model" in report["results"][1]["help"] and "--image" in report["results"][2]["help"]
