"""Schema-constrained answers (engine/constraints.py) against plain transformers `generate` with xgrammar's own
transformers logits processor, on the same prompt: the greedy answers must be identical, alone
(`Engine.generate`, ask/chat) and as rows of a batch (`DecodeBatch`, serve and `ask --each`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fakes import answer_of
from helpers import Repl, render_llava15, visible

from llava_cli.base.errors import UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine.constraints import ANY_OBJECT, schema_text
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.prompt.conversation import Conversation

xgr = pytest.importorskip("xgrammar")

MAX_NEW = 40
SCHEMAS = {
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "nested object": {
        "type": "object",
        "required": ["item"],
        "properties": {
            "item": {
                "type": "object",
                "required": ["name", "count"],
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "count": {"type": "integer", "minimum": 0, "maximum": 99},
                },
            }
        },
    },
    "array of numbers": {
        "type": "object",
        "required": ["values"],
        "properties": {"values": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
    },
}
QUESTION = "What is in this picture?"


def reference_answer(reference, schema: str, image) -> str:
    """Plain transformers greedy `generate` with xgrammar's logits processor (helpers' `Reference`)."""
    return reference.answer(render_llava15([(QUESTION, 1, None)]), [image], MAX_NEW, schema=schema)


@pytest.fixture(scope="module")
def engine(tiny_loaded) -> Engine:
    return Engine(tiny_loaded)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_a_constrained_greedy_answer_equals_transformers_with_xgrammars_processor(
    engine, tiny_model, reference, images, name
):
    schema = schema_text(json.dumps(SCHEMAS[name]))
    settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, constraint=schema)
    expected = reference_answer(reference, schema, images["red"])
    conversation = Conversation()
    conversation.ask(QUESTION, [load_image(str(images["red"]))])
    streamed, figures = answer_of(engine.generate(conversation, settings), conversation)
    assert streamed == expected
    if figures.finish_reason == "stop":
        json.loads(streamed)  # a finished answer is JSON
    plain = Conversation()
    plain.ask(QUESTION, [load_image(str(images["red"]))])
    assert answer_of(engine.generate(plain, dataclasses.replace(settings, constraint=None)), plain)[0] != expected


def test_rows_of_a_batch_each_follow_their_own_schema(tiny_loaded, tiny_model, reference, images):
    from llava_cli.engine.prefixpool import PrefixPool
    from llava_cli.engine.scheduler import DecodeBatch

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
    for spec, message in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "no-such-type"}', "cannot use this schema"),
        ("name, age integer", "cannot read"),
    ]:
        with pytest.raises(UsageError, match=message) as refused:
            schema_text(spec)
        assert "\n" not in str(refused.value)


def test_a_file_inline_json_and_the_short_form_are_the_same_schema(tmp_path):
    short = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "colours": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "colours"],
    }
    saved = tmp_path / "s.json"
    saved.write_text(json.dumps(short, indent=2))
    assert schema_text("name, age int, colours list") == schema_text(json.dumps(short)) == schema_text(str(saved))
    long_inline = json.dumps({**short, "description": "x" * 300})  # longer than a file name may be
    assert json.loads(schema_text(long_inline))["description"] == "x" * 300
    assert json.loads(ANY_OBJECT) == {"type": "object"}


def test_ask_json_holds_the_parsed_object_the_reference_gives(monkeypatch, tiny_model, reference, images, tmp_path):
    from cli_runner import invoke

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "data"))
    schema = SCHEMAS["enum"]
    expected = reference_answer(reference, schema_text(json.dumps(schema)), images["red"])
    outcome = invoke(
        monkeypatch,
        "ask",
        str(images["red"]),
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--schema",
        json.dumps(schema),
        "--json",
        "--no-save",
    )
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["answer"] == json.loads(expected)
    plain = invoke(
        monkeypatch,
        "ask",
        str(images["red"]),
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--format",
        "json",
        "--no-save",
    )
    assert plain.code == 0 and isinstance(json.loads(plain.stdout), dict), plain.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--schema", "{oops"), "--schema is not valid JSON"),
        (
            ("--schema", '{"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}'),
            "--schema: the grammar engine cannot use this schema",
        ),
        (("--format", "yaml"), "--format takes json"),
    ],
)
def test_a_bad_schema_option_is_one_line_and_exit_2_before_the_model_loads(
    monkeypatch, images, tmp_path, args, message
):
    from cli_runner import invoke

    outcome = invoke(
        monkeypatch, "ask", str(images["red"]), QUESTION, "--model", str(tmp_path / "no-such-model"), *args
    )
    assert outcome.code == 2 and message in outcome.first_error_line and len(outcome.stderr.splitlines()) == 1, (
        outcome.stderr
    )


# --- the schema in chat, in ask --each records, in CSV, and bad schemas everywhere (issue 23) -----------


def test_chat_schema_command_answers_under_each_schema_until_off(tiny_model, images, reference, tmp_path):
    from helpers import run_llava

    red = images["red"]
    enum, nested = (schema_text(json.dumps(SCHEMAS[name])) for name in ("enum", "nested object"))
    saved = tmp_path / "nested.json"
    saved.write_text(json.dumps(SCHEMAS["nested object"], indent=2))
    lines = [
        f"/schema {json.dumps(SCHEMAS['enum'])}",
        QUESTION,
        '/schema {"type": "nope"}',
        "/schema",
        f"/schema {saved}",
        "Describe it.",
        "/schema off",
        "And now?",
    ]
    result = run_llava(
        "chat",
        "--image",
        red,
        "--json",
        "--no-save",
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        stdin="\n".join(lines) + "\n",
    )
    history: list[tuple[str, int, str | None]] = []
    expected = []
    for text, schema, count in [(QUESTION, enum, 1), ("Describe it.", nested, 0), ("And now?", None, 0)]:
        answer = reference.answer(render_llava15(history + [(text, count, None)]), [red], MAX_NEW, schema=schema)
        history.append((text, count, answer))
        expected.append(answer)
    assert result.returncode == 1, result.stderr_text  # the bad schema failed; nothing else did
    assert result.stderr_text.splitlines() == [
        'llava: error: /schema: the grammar engine cannot use this schema: Unsupported type "nope"',
        f"schema: {enum}",  # the bad one did not replace it
    ]
    records = [json.loads(line) for line in result.stdout_text.splitlines()]
    assert [record["answer"] for record in records] == [
        json.loads(expected[0]),
        json.loads(expected[1], strict=False),
        expected[2],
    ]


def test_chat_schema_answers_stream_as_text_lines(tiny_model, images, reference):
    from helpers import run_llava

    schema = schema_text("seen bool, ok bool")
    result = run_llava(
        "chat",
        "--image",
        images["green"],
        "--no-save",
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        stdin=f"/schema seen bool, ok bool\n{QUESTION}\n",
    )
    expected = reference.answer(render_llava15([(QUESTION, 1, None)]), [images["green"]], MAX_NEW, schema=schema)
    assert result.returncode == 0 and result.stderr_text == "", result.stderr_text
    assert result.stdout_text == expected + "\n"


CSV_SCHEMA = {
    "type": "object",
    "required": ["colour", "sizes"],
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
    },
}


def expected_csv_rows(reference, names) -> list[list[str]]:
    """The CSV rows the reference answers give, written out with the csv module's reader view."""
    rows = []
    for image in names:
        value = json.loads(reference_answer(reference, schema_text(json.dumps(CSV_SCHEMA)), image))
        rows.append([str(image), value["colour"], json.dumps(value["sizes"], separators=(",", ":"))])
    return rows


def read_csv(data: bytes) -> list[list[str]]:
    import csv
    import io

    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def test_each_records_hold_parsed_answers_and_resume_under_a_schema(
    monkeypatch, tiny_model, reference, images, tmp_path
):
    from cli_runner import invoke

    out = tmp_path / "out.jsonl"
    schema = json.dumps(SCHEMAS["enum"])
    common = ("-p", QUESTION, "--model", str(tiny_model), "-n", str(MAX_NEW), "--schema", schema, "-o", str(out))
    first = invoke(monkeypatch, "ask", "--each", str(images["red"]), *common)
    assert first.code == 0, first.stderr
    second = invoke(monkeypatch, "ask", "--each", str(images["red"]), str(images["green"]), *common)
    assert second.code == 0 and "skipping 1 of 2 images" in second.stderr, second.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [json.loads(reference_answer(reference, schema_text(schema), images[name])) for name in ("red", "green")]
    assert [(record["image"], record["answer"]) for record in records] == [
        (str(images["red"]), expected[0]),
        (str(images["green"]), expected[1]),
    ]


def test_each_answer_cut_off_before_its_json_ended_is_an_error_a_rerun_retries(
    monkeypatch, tiny_model, reference, images, tmp_path
):
    from cli_runner import invoke

    out = tmp_path / "out.jsonl"
    schema = json.dumps(SCHEMAS["enum"])
    common = (
        "--each",
        str(images["red"]),
        "-p",
        QUESTION,
        "--model",
        str(tiny_model),
        "--schema",
        schema,
        "-o",
        str(out),
    )
    short = invoke(monkeypatch, "ask", *common, "-n", "3")
    assert short.code == 1
    message = f"{images['red']}: the answer ran out of tokens before its JSON was complete; raise --max-new-tokens"
    assert short.stderr == f"llava: error: {message}\n"
    assert json.loads(out.read_text())["error"] == message and json.loads(out.read_text())["answer"] is None
    retried = invoke(monkeypatch, "ask", *common, "-n", str(MAX_NEW))
    assert retried.code == 0 and "skipping" not in retried.stderr, retried.stderr
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["answer"] == json.loads(reference_answer(reference, schema_text(schema), images["red"]))


def test_each_csv_on_stdout_and_resumed_in_a_file_holds_the_reference_answers(
    monkeypatch, tiny_model, reference, images, tmp_path
):
    from cli_runner import BytesStdout, invoke

    names = [images["red"], images["green"]]
    expected = [["image", "colour", "sizes"], *expected_csv_rows(reference, names)]
    common = (
        "-p",
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--schema",
        json.dumps(CSV_SCHEMA),
        "--output-format",
        "csv",
    )
    stdout = BytesStdout()
    shown = invoke(monkeypatch, "ask", "--each", *map(str, names), *common, stdout=stdout)
    assert shown.code == 0, shown.stderr
    assert read_csv(stdout.getvalue().encode()) == expected
    out = tmp_path / "out.csv"
    assert invoke(monkeypatch, "ask", "--each", str(names[0]), *common, "-o", str(out)).code == 0
    with out.open("ab") as half:
        half.write(b'/gone.png,"gre')  # a run killed mid-row
    resumed = invoke(monkeypatch, "ask", "--each", *map(str, names), *common, "-o", str(out))
    assert resumed.code == 0 and "skipping 1 of 2 images" in resumed.stderr, resumed.stderr
    assert out.read_bytes() == stdout.getvalue().encode()  # the same bytes as on stdout, half row gone


def test_one_answer_as_csv_is_the_header_and_its_row(monkeypatch, tiny_model, reference, images):
    from cli_runner import BytesStdout, invoke

    stdout = BytesStdout()
    outcome = invoke(
        monkeypatch,
        "ask",
        str(images["red"]),
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--no-save",
        "--schema",
        json.dumps(CSV_SCHEMA),
        "--output-format",
        "csv",
        stdout=stdout,
    )
    assert outcome.code == 0, outcome.stderr
    assert read_csv(stdout.getvalue().encode()) == [
        ["image", "colour", "sizes"],
        *expected_csv_rows(reference, [images["red"]]),
    ]


def test_csv_cells_are_quoted_and_guarded_against_formulas(tmp_path):
    from llava_cli.frontend.output import CsvWriter
    from llava_cli.frontend.records import CsvFile, make_record

    schema = schema_text("name, count int, tags list")
    hostile = {"name": '=HYPERLINK("http://x","a,b\r\nc")', "count": -3, "tags": ["+1", "@x"]}
    writer = CsvWriter(schema)
    record = make_record("-rf.png", "q", "m", answer=hostile)
    assert writer.header() + writer.record_row(record).encode() == (
        b'image,name,count,tags\r\n\'-rf.png,"\'=HYPERLINK(""http://x"",""a,b\r\nc"")",-3,"[""+1"",""@x""]"\r\n'
    )
    assert CsvWriter(None).record_row(make_record("a.png", "q", "m", answer="'tis @home")) == "a.png,''tis @home\r\n"
    assert (
        CsvWriter(schema).record_row(make_record("a.png", "q", "m", answer={"name": "x"})) == "a.png,x,,\r\n"
    )  # left out: empty

    out = tmp_path / "out.csv"
    first = CsvFile(out, schema)
    first.write(record)
    first.write(make_record("bad.png", "q", "m", error="bad.png: broken"))  # errors go to stderr, not the CSV
    first.close()
    assert CsvFile(out, schema).done == {"-rf.png"}  # read back through the guard
    with pytest.raises(UsageError, match="not a CSV with this run's columns"):
        CsvFile(out, schema_text("other"))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--schema", "{oops"), "--schema is not valid JSON"),
        (
            ("--schema", '{"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}'),
            "--schema: the grammar engine cannot use this schema at /properties/a: Value must be a number",
        ),
        (("--schema", "[1]"), "--schema must be a JSON object"),
        (
            ("--schema", "image, colour", "--output-format", "csv"),
            "the schema's property 'image' would clash with the image column",
        ),
    ],
)
def test_a_bad_schema_with_each_is_one_line_and_exit_2_before_the_model_loads(
    monkeypatch, images, tmp_path, args, message
):
    from cli_runner import invoke

    outcome = invoke(
        monkeypatch,
        "ask",
        "--each",
        str(images["red"]),
        "-p",
        QUESTION,
        "--model",
        str(tmp_path / "no-such-model"),
        *args,
    )
    assert outcome.code == 2 and message in outcome.first_error_line and len(outcome.stderr.splitlines()) == 1, (
        outcome.stderr
    )


def test_serve_refuses_an_unusable_schema_with_400_naming_where_inside_it():
    from llava_cli.serve.request import ApiError, response_constraint

    schema = {
        "type": "object",
        "properties": {"item": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": []}}}}},
    }
    with pytest.raises(ApiError) as refused:
        response_constraint(
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
        )
    assert refused.value.status == 400 and refused.value.param == "response_format"
    assert str(refused.value) == (
        "response_format.json_schema.schema: the grammar engine cannot use this schema "
        "at /properties/item/properties/tags/items: enum array must not be empty"
    )


def test_schema_at_a_terminal_streams_the_reference_answer(tiny_model, images, reference, tmp_path):

    enum = json.dumps(SCHEMAS["enum"])
    repl = Repl(tiny_model, MAX_NEW, tmp_path)
    repl.command(f"/image {images['red']}", "attached")
    repl.command(
        '/schema {"type": 5}', "error: /schema: the grammar engine cannot use this schema: Type should be a string"
    )
    repl.command(f"/schema {enum}", "schema set")
    assert repl.ask(QUESTION) == visible(reference_answer(reference, schema_text(enum), images["red"]))
    repl.command("/schema off", "schema removed")
    repl.child.sendline("/quit")
    assert repl.exit_status() == 0
    assert "Traceback" not in repl.screen()


def test_each_text_lines_show_a_parsed_answer_as_compact_json():
    from llava_cli.frontend.output import WRITERS
    from llava_cli.frontend.records import make_record

    record = make_record("a.png", "q", "m", answer={"name": "Ann\nLee", "tags": ["x"]})
    assert WRITERS["text"](None).line(record, raw=False) == b'a.png\t{"name":"Ann\\nLee","tags":["x"]}\n'
