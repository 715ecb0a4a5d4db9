"""Schema-constrained answers: a JSON schema from the user, and the `TokenHook` that makes every row obey it.

Contract:
- `schema_text(spec)`: `--schema`'s value (a file, inline JSON, or the short form
  `'name, age int, colours list'`) as the canonical JSON text of a schema, checked by the grammar
  engine (xgrammar) without a tokenizer, so a bad schema gets one line (`UsageError`) before the
  model loads, naming where inside the schema the engine balks (a JSON pointer, found by compiling
  its parts alone: xgrammar's messages name no place). `where` names the option or command (`/schema`).
  `ANY_OBJECT` is `--format json`'s schema (any JSON object).
- `Grammars(tokenizer, vocab_size)`: one per engine, so per process; compiles a schema text for
  this tokenizer once (xgrammar's compiler caches what it compiled) and hands out a new
  `GrammarHook` per row.
- `GrammarHook`: `constrain` applies the grammar's token bitmask to the row's logits (forbidden
  tokens at -inf, on the logits' device); `accepted` advances the matcher and ends the row ("stop")
  when the grammar has terminated. Once an answer's JSON is complete only end-of-sequence is
  allowed, so the answer ends there.
- JSON is written compactly (no free whitespace between tokens), so a model cannot wander in blanks.
- `response_format_constraint(value)`: serve's `response_format` (text, json_object, json_schema)
  as the same schema text, or `UsageError` (a 400 naming `response_format`).
- `parsed_answer(text)`: the answer as a JSON value, or `LlavaError` (exit 1) when it was cut off (budget spent);
  `answer_value(text, settings)`: what a record holds, the parsed value under a constraint, else the text.
- `ask_constraint(settings, schema, answer_format)`: `llava ask --schema/--format json` applied to its
  settings (a server is sent it as `response_format`: client/remote.py).

xgrammar is an optional dependency (`pip install 'llava-cli[schema]'`), imported only when a schema is used.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_cli.base.errors import LlavaError, UsageError
from llava_cli.base.settings import Settings

ANY_OBJECT = json.dumps({"type": "object"})
SHORT_TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "list": {"type": "array", "items": {"type": "string"}},
}
MAX_SCHEMA_BYTES = 1 << 20
# A bad schema's parts are compiled alone to find where it is bad: at most this many, and at most
# PROBE_BUDGET times the schema's size in all (each compile takes about 0.1 ms plus its size's share).
MAX_PROBED, PROBE_BUDGET = 256, 8
LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[10:45:11] /project/cpp/x.cc:5082: "
INSTALL = "schema-constrained answers need xgrammar: pip install 'llava-cli[schema]'"


def xgrammar() -> Any:
    try:
        import xgrammar as xgr
    except ImportError:
        raise UsageError(INSTALL) from None
    return xgr


def schema_text(spec: str, where: str = "--schema") -> str:
    """`--schema`'s value (`where`: the option or command named in errors) as canonical schema JSON,
    checked by the grammar engine; `UsageError` if unusable."""
    text = read_spec(spec, where)
    if text.lstrip().startswith(("{", "[", '"')) or text.strip() in ("true", "false"):
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where} is not valid JSON: {err}") from None
    else:
        schema = short_form(text, where)
    if not isinstance(schema, dict):
        raise UsageError(f'{where} must be a JSON object (a JSON schema such as {{"type": "object", ...}})')
    canonical = json.dumps(schema)  # property order kept: the answer writes them in this order
    check_schema(canonical, where)
    return canonical


def read_spec(spec: str, where: str) -> str:
    """The file `spec` names, if it names one (a regular file within MAX_SCHEMA_BYTES); else `spec` itself."""
    if not names_file(spec):
        return spec
    try:
        if Path(spec).stat().st_size > MAX_SCHEMA_BYTES:
            raise UsageError(f"{where} file {spec} is larger than {MAX_SCHEMA_BYTES:,} bytes")
        return Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{where} file {spec} cannot be read: {err}") from None


def names_file(spec: str) -> bool:
    try:
        return len(spec) < 4096 and Path(spec).is_file()
    except OSError:  # inline JSON longer than a file name may be (ENAMETOOLONG) names no file
        return False


def short_form(text: str, where: str) -> dict[str, Any]:
    """'name, age int, colours list' -> an object schema with those required fields (str unless typed)."""
    properties: dict[str, Any] = {}
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] not in SHORT_TYPES):
            raise UsageError(
                f"{where}: cannot read {part.strip()!r}; write a JSON schema, a file, or "
                f"'name, age int' with types {', '.join(SHORT_TYPES)}"
            )
        properties[words[0]] = SHORT_TYPES[words[1] if len(words) == 2 else "str"]
    return {"type": "object", "properties": properties, "required": list(properties)}


def check_schema(canonical: str, where: str) -> None:
    """`UsageError` unless the grammar engine can compile `canonical` (needs no tokenizer, so no model),
    naming where inside the schema the problem is (a JSON pointer such as /properties/age)."""
    problem = compile_problem(canonical)
    if problem is not None:
        inside = problem_path(json.loads(canonical), problem)
        at = f" at {inside}" if inside else ""
        raise UsageError(f"{where}: the grammar engine cannot use this schema{at}: {problem}")


def compile_problem(canonical: str) -> str | None:
    """xgrammar's complaint about a schema text, without its log prefix (time, C++ source line); None if it compiles."""
    try:
        xgrammar().Grammar.from_json_schema(canonical, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as err:
        lines = str(err).strip().splitlines()
        return LOG_PREFIX.sub("", lines[-1]).strip() if lines else type(err).__name__
    return None


def problem_path(schema: dict[str, Any], problem: str) -> str:
    """The JSON pointer of the deepest part of `schema` that fails alone with the same `problem`
    ("" when only the whole schema does). xgrammar's messages name no place, and a schema its user
    did not write (an API client's) is hard to fix without one. At most MAX_PROBED parts, adding up to
    at most PROBE_BUDGET times the schema's size, are compiled: a request's bad schema costs a few
    compiles of itself (past that the line names no place)."""
    found, budget = "", PROBE_BUDGET * len(json.dumps(schema))
    for probed, (pointer, part) in enumerate(schema_parts(schema)):
        text = json.dumps(part)
        budget -= len(text)
        if budget < 0 or probed == MAX_PROBED:
            break
        if pointer.count("/") > found.count("/") and compile_problem(text) == problem:
            found = pointer
    return found


def schema_parts(value: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object nested in `value` with its JSON pointer, parents before children."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        inner = f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}"
        if isinstance(child, dict):
            yield inner, child
        yield from schema_parts(child, inner)


class Grammars:
    """The compiled grammars of one tokenizer (xgrammar's compiler caches them by schema)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        xgr = xgrammar()
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size), max_threads=1
        )

    def hook(self, schema: str) -> GrammarHook:
        """A new row's hook for the schema text (compiled on first use)."""
        return GrammarHook(self.compiler.compile_json_schema(schema, any_whitespace=False), self.vocab_size)


class GrammarHook:
    """One row's grammar matcher as a `TokenHook` (engine/pipeline.py)."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        xgr = xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.apply = xgr.apply_token_bitmask_inplace

    def constrain(self, logits: Any) -> Any:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.unsqueeze(0).clone()  # the batch's logits tensor is not this row's to change
        self.apply(masked, self.bitmask.to(masked.device))
        return masked[0]

    def accepted(self, token: int) -> bool:
        self.matcher.accept_token(token)
        return self.matcher.is_terminated()


def ask_constraint(settings: Settings, schema: str | None, answer_format: str | None) -> Settings:
    """`settings` with the constraint `--schema` or `--format json` asks for (checked before the model loads)."""
    if answer_format not in (None, "json"):
        raise UsageError(f"--format takes json (any JSON object); for a schema use --schema (got {answer_format!r})")
    if schema is not None and answer_format is not None:
        raise UsageError("--schema already asks for JSON: drop --format")
    if schema is None and answer_format is None:
        return settings
    constraint = schema_text(schema) if schema is not None else ANY_OBJECT
    return dataclasses.replace(settings, constraint=constraint)


def response_format_constraint(response_format: Any) -> str | None:
    """A chat-completions `response_format` as a schema text (None: free text); `UsageError` naming what is wrong."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        xgrammar()
        return ANY_OBJECT
    if kind != "json_schema":
        raise UsageError("`response_format.type` must be text, json_object or json_schema")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise UsageError("`response_format.json_schema.schema` must be a JSON schema object")
    canonical = json.dumps(schema)
    check_schema(canonical, "response_format.json_schema.schema")
    return canonical


def answer_value(text: str, settings: Settings) -> Any:
    """What a record holds as the answer: the parsed JSON under a schema (or --format json), else the text."""
    return parsed_answer(text) if settings.constraint else text


def parsed_answer(text: str) -> Any:
    """The constrained answer as a JSON value; `InputError` when it ended before its JSON did."""
    try:
        return json.loads(
            text, strict=False
        )  # xgrammar lets a string hold raw control characters, which strict JSON does not
    except json.JSONDecodeError:
        raise LlavaError("the answer ran out of tokens before its JSON was complete; raise --max-new-tokens") from None
