"""`--help` answers at once: it must not import torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cli_env

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
    expected_usage = {
        "--help": "Usage: llava [OPTIONS] COMMAND",
        "ask": "Usage: llava ask [OPTIONS]",
        "chat": "Usage: llava chat [OPTIONS]",
    }
    for result in report["results"]:
        assert result["code"] in (0, None), result["argv"]
        assert expected_usage[result["argv"][1]] in result["help"], result["help"][:300]
    assert "--model" in report["results"][1]["help"] and "--image" in report["results"][2]["help"]


@pytest.mark.parametrize("command", [[], ["ask"], ["sessions", "rm"]])
def test_llava_help_command_shows_the_same_page_as_dash_dash_help(monkeypatch, command):
    from cli_runner import invoke

    through_help = invoke(monkeypatch, "help", *command)
    through_flag = invoke(monkeypatch, *command, "--help")
    assert (through_help.code, through_help.stderr) == (0, "")
    assert through_help.stdout == through_flag.stdout and through_help.stdout.startswith("Usage: llava")


def test_llava_help_of_an_unknown_command_is_a_usage_error(monkeypatch):
    from cli_runner import invoke

    result = invoke(monkeypatch, "help", "pul")
    assert (result.code, result.stdout) == (2, "")
    assert result.stderr == "llava: error: no such command 'pul' in 'llava'; did you mean pull?\n"
