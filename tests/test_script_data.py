"""Data that scripts read (issue 14, section 5): `sessions list --json` gives the saved file's
values (null for no name, ISO 8601 UTC times, the full model id), and piped `chat --json` carries
exactly the keys of `ask --json`, `session` included, as the README lists them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cli_runner import invoke

MAX_NEW = 4
README = Path(__file__).resolve().parent.parent / "README.md"


def test_sessions_list_json_uses_the_saved_files_values(monkeypatch, llava_home_dir, images, tiny_model):
    ask = invoke(
        monkeypatch, "ask", "--no-server", "--model", tiny_model, "-n", MAX_NEW, "--json", images["red"], "what is it?"
    )
    assert ask.code == 0, ask.stderr
    session = json.loads(ask.stdout)["session"]
    saved = json.loads(next((llava_home_dir / "sessions").glob("*.json")).read_text())
    listed = json.loads(invoke(monkeypatch, "sessions", "list", "--json").stdout)
    assert listed == [
        {
            "id": session,
            "updated": saved["updated"],
            "turns": 1,
            "model": saved["model"],
            "name": None,
            "first_words": "what is it?",
        }
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", listed[0]["updated"])


def test_piped_chat_json_has_the_keys_of_ask_json(monkeypatch, llava_home_dir, images, tiny_model):
    common = ("--no-server", "--model", tiny_model, "-n", MAX_NEW, "--json")
    ask = json.loads(invoke(monkeypatch, "ask", *common, images["red"], "what is it?").stdout)
    chat = invoke(monkeypatch, "chat", *common, stdin=f"/image {images['red']} what is it?\nand now?\n".encode())
    first, second = [json.loads(line) for line in chat.stdout.splitlines()]
    assert list(first) == list(ask) == list(second)
    assert (first["model"], first["images"], second["images"]) == (str(tiny_model), [str(images["red"])], [])
    assert first["answer"] == ask["answer"]
    assert first["session"] == second["session"] != ask["session"]  # both turns are saved in the chat's own file
    assert (llava_home_dir / "sessions" / f"{first['session']}.json").is_file()


def test_piped_chat_json_session_is_null_when_not_saved(monkeypatch, llava_home_dir, images, tiny_model):
    chat = invoke(
        monkeypatch,
        "chat",
        "--no-server",
        "--no-save",
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        "--json",
        stdin=b"hello\n",
    )
    assert json.loads(chat.stdout)["session"] is None


def test_readme_lists_every_json_key_of_an_answer(monkeypatch, llava_home_dir, images, tiny_model):
    ask = json.loads(
        invoke(
            monkeypatch, "ask", "--no-server", "--model", tiny_model, "-n", MAX_NEW, "--json", images["red"], "hi"
        ).stdout
    )
    documented = README.read_text(encoding="utf-8").split("`--json` keys (`ask` and piped `chat`):")[1].split("\n\n")[0]
    keys = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", documented))  # not the values in parentheses
    assert keys == list(ask)
