"""Schema-constrained answers (constraints.py) against plain transformers `generate` with xgrammar's own
transformers logits processor, on the same prompt: the greedy answers must be identical, alone
(`Engine.generate`, ask/chat) and as rows of a batch (`DecodeBatch`, serve and `ask --each`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import render_llava15
from fakes import answer_of
from llava_cli.constraints import ANY_OBJECT, schema_text
from llava_cli.conversation import Conversation
from llava_cli.engine import Engine
from llava_cli.errors import UsageError
from llava_cli.images import load_image
from llava_cli.settings import Settings

xgr = pytest.importorskip("xgrammar")

MAX_NEW = 40
SCHEMAS = {
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "nested object": {"type": "object", "required": ["item"], "properties": {"item": {
        "type": "object", "required": ["name", "count"],
        "properties": {"name": {"type": "string", "maxLength": 6}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
    "array of numbers": {"type": "object", "required": ["values"], "properties": {"values": {
        "type": "array", "items": {"type": "number"}, "maxItems": 3}}},
}
QUESTION = "What is in this picture?"


def reference_answer(reference, schema: str, image) -> str:
    """Plain transformers greedy `generate` with xgrammar's logits processor (conftest's `Reference`)."""
    return reference.answer(render_llava15([(QUESTION, 1, None)]), [image], MAX_NEW, schema=schema)


@pytest.fixture(scope="module")
def engine(tiny_loaded) -> Engine:
    return Engine(tiny_loaded)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_a_constrained_greedy_answer_equals_transformers_with_xgrammars_processor(engine, tiny_model, reference, images, name):
    schema = schema_text(json.dumps(SCHEMAS[name]))
    settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, constraint=schema)
    expected = reference_answer(reference, schema, images["red"])
    conversation = Conversation()
    conversation.ask(QUESTION, [load_image(str(images["red"]))])
    streamed, figures = answer_of(engine.generate(conversation, settings))
    assert streamed == expected
    if figures.finish_reason == "stop":
        json.loads(streamed)  # a finished answer is JSON
    plain = Conversation()
    plain.ask(QUESTION, [load_image(str(images["red"]))])
    assert answer_of(engine.generate(plain, dataclasses.replace(settings, constraint=None)))[0] != expected


def test_rows_of_a_batch_each_follow_their_own_schema(tiny_loaded, tiny_model, reference, images):
    from llava_cli.decodebatch import DecodeBatch
    from llava_cli.prefixpool import PrefixPool

    schemas = [schema_text(json.dumps(schema)) for schema in SCHEMAS.values()]
    expected = [reference_answer(reference, schema, images["red"]) for schema in schemas]
    engine = Engine(tiny_loaded)
    batch = DecodeBatch(engine, PrefixPool(None))
    rows = []
    for schema in schemas:
        settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, constraint=schema)
        conversation = Conversation()
        conversation.ask(QUESTION, [load_image(str(images["red"]))])
        prompt, _ = engine.fit(conversation, settings)
        rows.append(batch.admit(prompt, settings, engine.token_budget(prompt, settings)))
    while len(batch):
        batch.step()
    assert [engine.decode(row.row.tokens) for row in rows] == expected


def test_bad_schemas_get_one_line_before_any_model_loads(tmp_path):
    for spec, message in [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                          ('{"type": "no-such-type"}', "cannot use this schema"), ("name, age integer", "cannot read")]:
        with pytest.raises(UsageError, match=message) as refused:
            schema_text(spec)
        assert "\n" not in str(refused.value)


def test_a_file_inline_json_and_the_short_form_are_the_same_schema(tmp_path):
    short = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "colours": {"type": "array", "items": {"type": "string"}}},
             "required": ["name", "age", "colours"]}
    saved = tmp_path / "s.json"
    saved.write_text(json.dumps(short, indent=2))
    assert schema_text("name, age int, colours list") == schema_text(json.dumps(short)) == schema_text(str(saved))
    assert json.loads(ANY_OBJECT) == {"type": "object"}


def test_ask_json_holds_the_parsed_object_the_reference_gives(monkeypatch, tiny_model, reference, images, tmp_path):
    from cli_runner import invoke

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "data"))
    schema = SCHEMAS["enum"]
    expected = reference_answer(reference, schema_text(json.dumps(schema)), images["red"])
    outcome = invoke(monkeypatch, "ask", str(images["red"]), QUESTION, "--model", str(tiny_model), "-n", str(MAX_NEW),
                     "--schema", json.dumps(schema), "--json", "--no-save")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["answer"] == json.loads(expected)
    plain = invoke(monkeypatch, "ask", str(images["red"]), QUESTION, "--model", str(tiny_model), "-n", str(MAX_NEW),
                   "--format", "json", "--no-save")
    assert plain.code == 0 and isinstance(json.loads(plain.stdout), dict), plain.stderr


@pytest.mark.parametrize("args, message", [
    (("--schema", "{oops"), "--schema is not valid JSON"),
    (("--schema", '{"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}'), "--schema: the grammar engine cannot use this schema"),
    (("--format", "yaml"), "--format takes json"),
    (("--format", "json", "--server", "http://127.0.0.1:9"), "not sent to a server"),
])
def test_a_bad_schema_option_is_one_line_and_exit_2_before_the_model_loads(monkeypatch, images, tmp_path, args, message):
    from cli_runner import invoke

    outcome = invoke(monkeypatch, "ask", str(images["red"]), QUESTION, "--model", str(tmp_path / "no-such-model"), *args)
    assert outcome.code == 2 and message in outcome.first_error_line and len(outcome.stderr.splitlines()) == 1, outcome.stderr
