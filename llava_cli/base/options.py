"""The option table: every model, generation and client option, declared once, in one row.

A row (`Option`) names the `Settings` field and every way a user spells it: command-line flags
(long first, then short), the `/set` key (the long flag without `--`), the key in a saved
conversation's "settings" (the field name), the JSON fields of an OpenAI chat-completions
request (the first is what llava-cli sends a server); its type, default (a named constant), the
rule its value must follow with the one-line message when it does not, and its help text, help
panel and metavar. Everything else is built from `OPTIONS`:
- cli.py: the options every command takes (`SHARED_OPTIONS`, `CLIENT_OPTIONS`), and usage.py's
  preflight converts given values by the row's type;
- base/settings.py: `Settings` validates each field with its row's `check` (one place for ranges);
- chat/slash.py: `/set KEY VALUE` (`SETTABLE`, `Option.parse_text`) and its help line;
- store/conversations.py: what a conversation saves and restores (`SAVED`, `Option.json_kinds`);
- serve/request.py (llava serve): which request fields are read and their JSON types (`REQUEST_FIELDS`);
- client/remote.py: the request fields sent to a server, only those the user chose (`request_fields`).

This module is a leaf: it imports nothing of llava-cli but base/errors.py, and nothing heavy.
Adding an option is one row here and one field in `Settings` (tests/test_units_options.py
checks that both agree and that every spelling of every row works).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llava_cli.base.errors import UsageError

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE = "auto"
DEFAULT_ATTN = "auto"
DEFAULT_TEMPERATURE = 0.0  # greedy: the same question gets the same answer
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # ~7000x7000; larger is almost surely a decompression bomb
MAX_VIDEO_FRAMES = 64  # frames sampled from one video (--frames, and --fps's cap): more would not fit a context window
MAX_VIDEO_FPS = 30.0
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "mps", "cpu")
ATTENTION_BACKENDS = ("auto", "sdpa", "eager", "flash_attention_2")
NONE_WORDS = ("none", "off")  # `/set seed none`: back to no value

MODEL_PANEL = "Model options"
GENERATION_PANEL = "Generation options"
SERVER_PANEL = "Answer through a server"


@dataclass(frozen=True)
class Option:
    """One option and all its spellings; `valid` and `problem` are the rule `Settings` enforces."""

    name: str  # the Settings field, and the key in a saved conversation's "settings"
    kind: type  # str, int, float or bool
    default: Any
    flags: tuple[str, ...]  # long flag first, then the short one
    help: str
    panel: str | None = None  # the --help section; None: the general "Options"
    metavar: str | None = None  # None: usage.py's default for the type (N, NUMBER, TEXT)
    envvar: str | None = None
    optional: bool = False  # None is a value (no seed, no limit)
    valid: Callable[[Any], object] | None = None  # truthy for a good value; None: any value of `kind`
    problem: str = ""  # after the flag in the error: "must be at least 1 (got {value})"
    settable: bool = False  # `/set KEY VALUE` in a chat
    saved: bool = False  # kept in a saved conversation, restored with it
    request: tuple[str, ...] = ()  # chat-completions request fields; the first is the one sent
    client: bool = False  # only for commands that can answer through a server (ask, chat)

    @property
    def key(self) -> str:
        """How the option is named to a user outside the command line: `/set` key, /show, errors."""
        return self.flags[0].removeprefix("--")

    def check(self, value: Any) -> None:
        """Raise `UsageError` (one line naming the flag) unless `value` follows this option's rule."""
        if (fault := self.fault(value)) is not None:
            raise UsageError(f"{self.flags[0]} {fault}")

    def fault(self, value: Any) -> str | None:
        """What is wrong with `value`, said after the option's name ("must be at least 1 (got 0)"); None if nothing."""
        if value is not None and self.valid is not None and not self.valid(value):
            return self.problem.format(value=value)
        return None

    @property
    def described(self) -> str:
        """What a typed value must look like, for `/set`'s error."""
        text = {int: "a whole number", float: "a number"}.get(self.kind, "text")
        return f"{text} or none" if self.optional else text

    def parse_text(self, text: str) -> Any:
        """A typed value (`/set`) as this option's type; ValueError when it is not one."""
        if self.optional and text.lower() in NONE_WORDS:
            return None
        return self.kind(text)

    @property
    def json_kinds(self) -> tuple[type, ...]:
        """The JSON types a value may have: an integer is a number too (bool is never one)."""
        kinds: tuple[type, ...] = (int, float) if self.kind is float else (self.kind,)
        return kinds + (type(None),) if self.optional else kinds

    @property
    def json_described(self) -> str:
        return "an integer" if self.kind is int else "a number"


def one_of(choices: tuple[str, ...]) -> dict[str, Any]:
    """The rule of an option that takes one of `choices`."""
    return {
        "valid": lambda value: value in choices,
        "problem": f"must be one of {', '.join(choices)} (got {{value!r}})",
    }


def is_server_url(url: str) -> bool:
    """True for http(s)://HOST[:PORT][/PATH]."""
    parts = urllib.parse.urlsplit(url)
    try:
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        return False


ROWS = (
    Option(
        "model",
        str,
        DEFAULT_MODEL,
        ("--model", "-m"),
        "Hub id (org/name) or local folder.",
        MODEL_PANEL,
        metavar="MODEL",
        envvar="LLAVA_MODEL",
        valid=str.strip,
        problem="must name a hub id (org/name) or a local folder",
    ),
    Option(
        "device",
        str,
        DEFAULT_DEVICE,
        ("--device",),
        f"{'|'.join(DEVICES)}; auto picks CUDA, else Apple silicon (MPS), when present.",
        MODEL_PANEL,
        metavar="DEVICE",
        **one_of(DEVICES),
    ),
    Option(
        "dtype",
        str,
        DEFAULT_DTYPE,
        ("--dtype",),
        f"{'|'.join(DTYPES)}; auto is float16 on GPU and MPS, float32 on CPU.",
        MODEL_PANEL,
        metavar="DTYPE",
        **one_of(DTYPES),
    ),
    Option(
        "attn",
        str,
        DEFAULT_ATTN,
        ("--attn",),
        f"Attention backend: {'|'.join(ATTENTION_BACKENDS)}.",
        MODEL_PANEL,
        metavar="BACKEND",
        **one_of(ATTENTION_BACKENDS),
    ),
    Option(
        "compile",
        bool,
        False,
        ("--compile",),
        "Decode steps through torch.compile (fixed bucket shapes); the first answer pays for compiling.",
        MODEL_PANEL,
    ),
    Option(
        "no_cuda_graph",
        bool,
        False,
        ("--no-cuda-graph",),
        "Launch each decode step from Python instead of replaying it as a CUDA graph (done by default on a GPU).",
        MODEL_PANEL,
    ),
    Option("load_4bit", bool, False, ("--load-4bit",), "Quantize to 4-bit NF4 with bitsandbytes.", MODEL_PANEL),
    Option("load_8bit", bool, False, ("--load-8bit",), "Quantize to 8-bit with bitsandbytes.", MODEL_PANEL),
    Option(
        "trust_remote_code",
        bool,
        False,
        ("--trust-remote-code",),
        "Run Python code shipped in the model repo. Only for repos you trust.",
        MODEL_PANEL,
    ),
    Option(
        "allow_pickle",
        bool,
        False,
        ("--allow-pickle",),
        "Load pickle (.bin) weights, which can run code. Only for repos you trust.",
        MODEL_PANEL,
    ),
    Option(
        "max_image_pixels",
        int,
        DEFAULT_MAX_IMAGE_PIXELS,
        ("--max-image-pixels",),
        "Refuse larger images (decompression-bomb guard).",
        MODEL_PANEL,
        valid=lambda pixels: pixels >= 1,
        problem="must be positive (got {value})",
    ),
    Option(
        "frames",
        int,
        None,
        ("--frames",),
        f"Frames sampled from each video, evenly spread (default: the checkpoint's own; at most {MAX_VIDEO_FRAMES}).",
        MODEL_PANEL,
        metavar="N",
        optional=True,
        valid=lambda n: 1 <= n <= MAX_VIDEO_FRAMES,
        problem=f"must be between 1 and {MAX_VIDEO_FRAMES} (got {{value}})",
    ),
    Option(
        "fps",
        float,
        None,
        ("--fps",),
        f"Sample this many video frames per second instead of --frames (at most {MAX_VIDEO_FRAMES} in all).",
        MODEL_PANEL,
        metavar="F",
        optional=True,
        valid=lambda f: 0 < f <= MAX_VIDEO_FPS,
        problem=f"must be above 0 and at most {MAX_VIDEO_FPS} (got {{value}})",
    ),
    Option(
        "max_image_tokens",
        int,
        None,
        ("--max-image-tokens",),
        "Anyres families: use only the tilings whose images take at most N tokens.",
        MODEL_PANEL,
        optional=True,
        valid=lambda tokens: tokens >= 1,
        problem="must be at least 1 (got {value})",
    ),
    Option(
        "cache_mb",
        int,
        None,
        ("--cache-mb",),
        "Bound the KV cache of the whole process to MB: running answers (reserved at their longest), the chat's cache, "
        "and serve's caches of recent answers (dropped oldest first when an answer needs room). An answer that cannot fit "
        "alone fails with an error; serve and ask --each wait for room. 0: no bound but the device's memory, and serve keeps "
        "no caches between requests. Default: 80% of the GPU's free memory after loading, a quarter of the RAM on a CPU.",
        MODEL_PANEL,
        metavar="MB",
        optional=True,
        valid=lambda mb: mb >= 0,
        problem="must be 0 or more (got {value})",
    ),
    Option(
        "temperature",
        float,
        DEFAULT_TEMPERATURE,
        ("--temperature", "-t"),
        "0 is greedy (deterministic), as is anything below 1e-5.",
        GENERATION_PANEL,
        valid=lambda t: 0.0 <= t <= 100.0,
        problem="must be between 0 and 100 (got {value})",
        settable=True,
        saved=True,
        request=("temperature",),
    ),
    Option(
        "top_p",
        float,
        DEFAULT_TOP_P,
        ("--top-p",),
        "Nucleus sampling threshold (with temperature > 0).",
        GENERATION_PANEL,
        valid=lambda p: 0.0 < p <= 1.0,
        problem="must be in (0, 1] (got {value})",
        settable=True,
        saved=True,
        request=("top_p",),
    ),
    Option(
        "max_new_tokens",
        int,
        DEFAULT_MAX_NEW_TOKENS,
        ("--max-new-tokens", "-n"),
        "Longest answer, in tokens.",
        GENERATION_PANEL,
        valid=lambda n: n >= 1,
        problem="must be at least 1 (got {value})",
        settable=True,
        saved=True,
        request=("max_tokens", "max_completion_tokens"),
    ),
    Option(
        "seed",
        int,
        None,
        ("--seed",),
        "Seed for sampling, for repeatable answers.",
        GENERATION_PANEL,
        optional=True,
        valid=lambda seed: 0 <= seed < 2**63,
        problem="must be between 0 and 2**63-1 (got {value})",
        settable=True,
        saved=True,
        request=("seed",),
    ),
    Option(
        "system",
        str,
        None,
        ("--system",),
        "System text placed before the first message.",
        GENERATION_PANEL,
        optional=True,
    ),
    Option(
        "chat_template",
        str,
        None,
        ("--chat-template",),
        "Jinja chat template (or chat_template.json) to prompt with, instead of the model's own.",
        GENERATION_PANEL,
        metavar="FILE",
        optional=True,
        valid=str.strip,
        problem="must name a file holding a Jinja chat template",
    ),
    Option(
        "max_context",
        int,
        None,
        ("--max-context",),
        "Use at most this many tokens of context.",
        GENERATION_PANEL,
        optional=True,
        valid=lambda tokens: tokens >= 16,
        problem="must be at least 16 tokens (got {value})",
        settable=True,
        saved=True,
    ),
    Option("raw", bool, False, ("--raw",), "Write model output to a terminal unfiltered (escape sequences included)."),
    Option(
        "verbose",
        bool,
        False,
        ("--verbose", "-v"),
        "Show library warnings, load details and per-answer figures on stderr.",
    ),
    Option(
        "server",
        str,
        None,
        ("--server",),
        "Send the conversation to this OpenAI-compatible server (llava serve, vLLM, llama.cpp, Ollama) instead of loading the model.",
        SERVER_PANEL,
        metavar="URL",
        envvar="LLAVA_SERVER",
        optional=True,
        client=True,
        valid=is_server_url,
        problem="must be an http:// or https:// URL such as http://127.0.0.1:8700 (got {value!r})",
    ),
    Option(
        "no_server",
        bool,
        False,
        ("--no-server",),
        "Load the model here: ignore --server, LLAVA_SERVER and any running llava serve.",
        SERVER_PANEL,
        envvar="LLAVA_NO_SERVER",
        client=True,
    ),
)
OPTIONS: dict[str, Option] = {option.name: option for option in ROWS}  # in --help order

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for `top_logprobs`
# `ask --logprobs N` only (not a row: no other command reports logprobs); serve's `top_logprobs` follows the same rule.
LOGPROBS = Option(
    "logprobs",
    int,
    None,
    ("--logprobs",),
    f"In the JSON record (--json, --each): each answer token's logprob and the N most likely tokens at its step (0-{MAX_TOP_LOGPROBS}).",
    metavar="N",
    optional=True,
    valid=lambda n: 0 <= n <= MAX_TOP_LOGPROBS,
    problem=f"must be between 0 and {MAX_TOP_LOGPROBS} (got {{value}})",
)
SETTABLE: dict[str, Option] = {option.key: option for option in ROWS if option.settable}  # by /set key
SAVED: tuple[str, ...] = tuple(option.name for option in ROWS if option.saved)
REQUEST_FIELDS: dict[str, Option] = {field: option for option in ROWS for field in option.request}


def server_url(url: str) -> urllib.parse.SplitResult:
    """`url` split, or `UsageError` (--server's message) unless it is http(s)://HOST[:PORT][/PATH]."""
    OPTIONS["server"].check(url)
    return urllib.parse.urlsplit(url)


def request_fields(settings: Any) -> dict[str, Any]:
    """The request fields for `settings` (a `Settings`): only the options the user chose
    (`settings.chosen`), so that a server's own defaults apply to the rest."""
    return {
        option.request[0]: getattr(settings, option.name)
        for option in ROWS
        if option.request and option.name in settings.chosen and getattr(settings, option.name) is not None
    }
