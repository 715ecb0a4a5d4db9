"""Usage errors and help pages (issue 14, sections 2 and 4): every mistake on the command line is
one `llava: error:` line with exit 2 and a suggestion where there is one; `--help` reads like a
man page at any width; neither imports what typer would (pydantic, Rich) nor torch.

All but the last run the real entry point in-process and fail before any model loads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from cli_runner import invoke
from helpers import cli_env


def error(message: str) -> str:
    return f"llava: error: {message}\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("ask", "--temprature", "0.5", "x.png", "hi"),
            "no such option --temprature for 'llava ask'; did you mean --temperature? (llava ask --help lists them)",
        ),
        (
            ("chat", "--resme"),
            "no such option --resme for 'llava chat'; did you mean --resume? (llava chat --help lists them)",
        ),
        (("ask", "--xyzzy", "x.png"), "no such option --xyzzy for 'llava ask' (llava ask --help lists them)"),
        (("aks", "x.png", "hi"), "no such command 'aks' in 'llava'; did you mean ask?"),
        (("sessions", "lst"), "no such command 'lst' in 'llava sessions'; did you mean list?"),
        (("ask", "x.png", "hi", "--temperature"), "--temperature needs a value: llava ask --temperature NUMBER"),
        (("ask", "x.png", "hi", "-n", "lots"), "--max-new-tokens wants a whole number (got 'lots')"),
        (("ask", "x.png", "hi", "--top-p", "high"), "--top-p wants a number (got 'high')"),
        (("serve", "--port", "http"), "--port wants a whole number (got 'http')"),
        (("sessions", "show"), "missing ID: llava sessions show ID"),
        (("sessions", "rm", "a", "b"), "unexpected argument 'b': llava sessions rm takes ID"),
        (("models", "all"), "unexpected argument 'all': llava models takes no arguments"),
        (("chat", "--json=yes"), "--json is a flag and takes no value"),
        (("--model", "m", "chat"), "--model goes after the command: llava COMMAND --model ..."),
        (
            ("ask", "x.png", "hi", "--batch-size", "4"),
            "--batch-size 4: only with --each or --from-file, which answer images one by one",
        ),
        (
            ("ask", "x.png", "hi", "-o", "out.jsonl"),
            "-o out.jsonl: only with --each or --from-file, which answer images one by one",
        ),
    ],
)
def test_every_usage_error_is_one_line_with_exit_2(monkeypatch, args, message):
    outcome = invoke(monkeypatch, *args)
    assert (outcome.code, outcome.stderr, outcome.stdout) == (2, error(message), "")


@pytest.mark.parametrize(
    "args, message",
    [
        (("ask", "{red}", ""), 'the prompt is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"'),
        (
            ("ask", "{red}", "   "),
            'the prompt is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"',
        ),
        (
            ("ask", "{red}", "-p", ""),
            'the prompt is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"',
        ),
        (
            ("ask", "--each", "{red}", "{blue}", "-p", " "),
            'the prompt is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"',
        ),
        (
            ("ask", "--each", "{red}", ""),
            'the prompt is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"',
        ),
        (
            ("ask", "{red}", "what", "is", "this"),
            'the prompt must be one argument; quote it: llava ask {red} "what is this"',
        ),
        (
            ("ask", "{red}", "{blue}", "what's", "in", "them?"),
            'the prompt must be one argument; quote it: llava ask {red} {blue} "what\'s in them?"',
        ),
        (("ask", "{red}", "say", "$HOME"), "the prompt must be one argument; quote it: llava ask {red} 'say $HOME'"),
        (
            ("ask", "--each", "{red}", "describe", "it"),
            'the prompt must be one argument; quote it: llava ask --each {red} "describe it"',
        ),
    ],
)
def test_empty_and_unquoted_prompts_are_refused_before_the_model_loads(monkeypatch, images, args, message):
    paths = {name: str(path) for name, path in images.items()}
    command, *rest = [arg.format(**paths) for arg in args]
    outcome = invoke(monkeypatch, command, "--model", "/nonexistent/model", *rest)
    assert (outcome.code, outcome.stderr, outcome.stdout) == (2, error(message.format(**paths)), "")


def test_the_prompt_is_refused_on_stdin_too(monkeypatch, images):
    outcome = invoke(monkeypatch, "ask", images["red"], stdin=b"  \n")
    assert (outcome.code, outcome.stderr) == (
        2,
        error('the prompt read from stdin is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"'),
    )


def test_device_cuda_without_a_gpu_is_refused_before_the_model_is_looked_for(monkeypatch, images, tiny_model):
    import torch

    import llava_cli.models.loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_run(name):
        raise AssertionError("the model was looked for before --device was checked")

    monkeypatch.setattr(llava_cli.models.loader, "resolve_model", must_not_run)
    outcome = invoke(monkeypatch, "ask", "--no-server", "--device", "cuda", "--model", tiny_model, images["red"], "hi")
    assert (outcome.code, outcome.stderr) == (
        2,
        error("--device cuda was asked for but no CUDA GPU is visible; use --device cpu"),
    )


HELP_PAGES = [(), ("ask",), ("chat",), ("serve",), ("models",), ("sessions",), ("sessions", "export")]


@pytest.mark.parametrize("command", HELP_PAGES, ids=lambda command: " ".join(command) or "llava")
def test_help_reads_like_a_man_page(monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "80")
    outcome = invoke(monkeypatch, *command, "--help")
    assert outcome.code == 0 and outcome.stderr == ""
    page = outcome.stdout
    assert not re.search(r"<(bool|str|int|float|list\[str\])>", page)
    usage = page.splitlines()[0]
    assert usage.startswith(f"Usage: {' '.join(['llava', *command])} [OPTIONS]") and not usage.endswith("...")


def test_help_names_values_with_metavars(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    ask, chat = invoke(monkeypatch, "ask", "-h").stdout, invoke(monkeypatch, "chat", "-h").stdout
    assert ask.splitlines()[0] == "Usage: llava ask [OPTIONS] IMAGE... [PROMPT]"
    for term in (
        "-p, --prompt TEXT",
        "--from-file FILE",
        "-o, --output FILE",
        "-b, --batch-size N",
        "--server URL",
        "-n, --max-new-tokens N",
        "-m, --model MODEL",
        "--each  ",
        "--json  ",
    ):
        assert f"  {term}" in ask, term
    assert "  -i, --image IMAGE  " in chat and "Usage: llava chat [OPTIONS] [ID]" in chat


@pytest.mark.parametrize("command", HELP_PAGES, ids=lambda command: " ".join(command) or "llava")
def test_help_wraps_between_words_at_any_width(monkeypatch, command):
    def page(columns: int) -> str:
        monkeypatch.setenv("COLUMNS", str(columns))
        return invoke(monkeypatch, *command, "--help").stdout

    words = Counter(page(500).split())
    for columns in (40, 57, 80):
        text = page(columns)
        assert Counter(text.split()) == words, f"a word was split at {columns} columns"
        prose = text.split("\nExamples:\n")[0]  # example command lines are never wrapped
        too_long = [line for line in prose.splitlines() if len(line) > columns and " " in line.strip()]
        assert too_long == [], columns


# Runs in a fresh interpreter: help pages and usage errors through the real entry point, then
# what got imported. pydantic is what typer converts values with; Rich draws typer's help.
PROBE = """
import contextlib, io, json, sys
from llava_cli.cli import main

codes = []
for argv in (
    ["--help"], ["ask", "--help"], ["ask", "--temprature", "1"], ["ask", "-n", "x"], ["frob"], ["chat", "--device", "tpu"],
    ["ask", "a.png", "hi", "--batch-size", "4"], ["ask", "a.png", "hi", "--output-format", "xml"], ["chat", "some-id"],
):
    sys.argv = ["llava", *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main()
        except SystemExit as exit_:
            codes.append(exit_.code)
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "pydantic", "rich"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


@pytest.mark.slow  # starts a process
def test_help_and_usage_errors_import_neither_typer_conversion_nor_rich():
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.splitlines()[-1]) == {"codes": [0, 0, 2, 2, 2, 2, 2, 2, 2], "heavy": []}
