"""The option table (base/options.py) walked row by row: every option is reachable by each of its
spellings (each flag parses, the `/set` key is accepted, each request field is read and the one
sent is what the server reads, the saved key is restored), refused the same way everywhere, and
agrees with the `Settings` field it fills. A new row fails here until it has a sample value below
and a `Settings` field; each of its surfaces is then built from the row."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Optional

import pytest
import typer

from llava_cli.base.errors import InputError, UsageError
from llava_cli.base.options import (
    LOGPROBS,
    OPTIONS,
    REQUEST_FIELDS,
    SAVED,
    SETTABLE,
    Option,
    request_fields,
)
from llava_cli.base.settings import Settings
from llava_cli.chat.slash import changed_settings, find
from llava_cli.cli import app
from llava_cli.prompt.conversation import Conversation
from llava_cli.serve import request as apirequest
from llava_cli.store.conversations import Recorder, SessionStore
from llava_cli.store.resume import restored_settings
from llava_cli.usage import preflight

# A valid value other than the default, for every row that takes a value (flags take none: True).
SAMPLES: dict[str, Any] = {
    "frames": 4,
    "fps": 0.5,
    "model": "org/other-model",
    "device": "cpu",
    "dtype": "bfloat16",
    "attn": "eager",
    "max_image_pixels": 1234,
    "max_image_tokens": 600,
    "cache_mb": 256,
    "temperature": 0.5,
    "top_p": 0.25,
    "max_new_tokens": 7,
    "seed": 42,
    "system": "be brief",
    "chat_template": "template.jinja",
    "max_context": 64,
    "server": "http://127.0.0.1:9",
}
# A value of the right type that the row's rule refuses, for every row that has a rule.
REFUSED: dict[str, Any] = {
    "cache_mb": -1,
    "frames": 0,
    "fps": 100.0,
    "model": "  ",
    "device": "tpu",
    "dtype": "int3",
    "attn": "fast",
    "max_image_pixels": 0,
    "max_image_tokens": 0,
    "temperature": 100.5,
    "top_p": 0.0,
    "max_new_tokens": 0,
    "seed": -1,
    "chat_template": " ",
    "max_context": 15,
    "server": "ftp://example.com",
}
ROWS = list(OPTIONS.values())


def sample(option: Option) -> Any:
    if option.kind is bool:
        return True
    assert option.name in SAMPLES, f"add a sample value for the new option {option.name} to SAMPLES"
    return SAMPLES[option.name]


def command_line(flag: str, option: Option) -> list[str]:
    return [flag] if option.kind is bool else [flag, str(sample(option))]


def commands_taking(option: Option) -> list[str]:
    return ["ask", "chat"] if option.client else ["ask", "chat", "serve"]


@pytest.mark.parametrize("option", ROWS, ids=lambda option: option.name)
def test_every_row_is_a_settings_field_of_its_type_and_default(option):
    field = {field.name: field for field in dataclasses.fields(Settings)}[option.name]
    kind = Optional[option.kind] if option.optional else option.kind  # noqa: UP045 (compared with get_type_hints' form)
    assert typing.get_type_hints(Settings)[option.name] == kind
    assert field.default == option.default
    Settings(**{option.name: sample(option)})  # the sample is a value Settings accepts


def test_every_settings_field_is_a_row():
    assert {field.name for field in dataclasses.fields(Settings)} - {
        "chosen",
        "constraint",
        "stop",
        LOGPROBS.name,
    } == set(OPTIONS)


def test_ask_only_logprobs_option_agrees_with_its_settings_field():
    """--logprobs is declared once (options.LOGPROBS, not a row: only `ask --json` takes it)."""
    assert typing.get_type_hints(Settings)["logprobs"] == Optional[int]  # noqa: UP045 (get_type_hints' form)
    assert Settings(logprobs=20).logprobs == 20
    with pytest.raises(UsageError, match="--logprobs must be between 0 and 20"):
        Settings(logprobs=21)


@pytest.mark.parametrize("option", ROWS, ids=lambda option: option.name)
def test_every_flag_parses_into_its_settings_field(option):
    group = typer.main.get_command(app)
    for name in commands_taking(option):
        for flag in option.flags:
            argv = command_line(flag, option)
            assert preflight(group, [name, *argv]) is None
            context = group.commands[name].make_context(name, list(argv))
            assert context.params[option.name] == sample(option), (name, flag)


@pytest.mark.parametrize("option", ROWS, ids=lambda option: option.name)
def test_a_client_option_is_not_taken_by_serve(option):
    serve = typer.main.get_command(app).commands["serve"]
    taken = {flag for param in serve.params for flag in param.opts}
    assert bool(taken & set(option.flags)) is not option.client


@pytest.mark.parametrize("option", [row for row in ROWS if row.name in REFUSED], ids=lambda option: option.name)
def test_a_refused_value_gets_the_same_message_from_settings_the_command_line_and_set(option):
    with pytest.raises(UsageError) as refused:
        Settings(**{option.name: REFUSED[option.name]})
    message = str(refused.value)
    assert message.startswith(f"{option.flags[0]} ")
    group = typer.main.get_command(app)
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        preflight(group, ["ask", option.flags[0], str(REFUSED[option.name])])
    if option.settable:
        with pytest.raises(InputError) as set_refused:
            changed_settings(Settings(), option.key, str(REFUSED[option.name]))
        assert str(set_refused.value) == message.removeprefix("--")


@pytest.mark.parametrize("option", ROWS, ids=lambda option: option.name)
def test_set_accepts_every_settable_option_by_its_key(option):
    assert (option.key in SETTABLE) is option.settable
    if not option.settable:
        return
    changed = changed_settings(Settings(), option.key, str(sample(option)))
    assert getattr(changed, option.name) == sample(option)
    assert option.name in changed.chosen
    set_help = find("set").help
    assert option.key in set_help.removeprefix("show or change ").split(", ")


@pytest.mark.parametrize(
    "option", [row for row in ROWS if row.settable and row.optional], ids=lambda option: option.name
)
def test_set_none_clears_an_optional_value(option):
    settings = Settings(**{option.name: sample(option)})
    assert getattr(changed_settings(settings, option.key, "none"), option.name) is None


@pytest.mark.parametrize("option", ROWS, ids=lambda option: option.name)
def test_every_request_field_is_read_and_the_one_sent_is_read_back(option):
    assert {field for field, row in REQUEST_FIELDS.items() if row is option} == set(option.request)
    if not option.request:
        return
    for field in option.request:
        assert getattr(apirequest.request_settings({field: sample(option)}, Settings()), option.name) == sample(option)
        with pytest.raises(apirequest.ApiError) as wrong_type:
            apirequest.request_settings({field: "7"}, Settings())
        assert (wrong_type.value.status, wrong_type.value.param) == (400, field)
    chosen = Settings(**{option.name: sample(option)}, chosen=frozenset({option.name}))
    sent = request_fields(chosen)
    assert sent == {option.request[0]: sample(option)}
    assert getattr(apirequest.request_settings(sent, Settings()), option.name) == sample(option)
    assert request_fields(Settings(**{option.name: sample(option)})) == {}  # not chosen: not sent


@pytest.mark.parametrize("option", ROWS, ids=lambda option: option.name)
def test_every_saved_option_is_restored_from_its_saved_key(option, tmp_path: Path):
    assert (option.name in SAVED) is option.saved
    store = SessionStore(tmp_path)
    recorder = Recorder(store)
    recorder.save(Conversation(), Settings(**{option.name: sample(option)}))
    saved = store.find(recorder.session_id)
    assert (option.name in saved.document["settings"]) is option.saved
    if option.saved:
        assert getattr(restored_settings(Settings(), saved, frozenset()), option.name) == sample(option)
        assert getattr(restored_settings(Settings(), saved, frozenset({option.name})), option.name) == option.default
