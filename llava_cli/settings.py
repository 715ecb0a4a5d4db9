"""Settings: every knob a user can turn, validated once, in one frozen dataclass.

Front-ends build a `Settings` from their options; `Settings(...)` raises `UsageError` with a
one-line message for any bad value, so the rest of the program can trust what it is given.
Change a value mid-session with `dataclasses.replace`, which validates again.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from llava_cli.errors import UsageError

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_TEMPERATURE = 0.0  # greedy: the same question gets the same answer
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # ~7000x7000; larger is almost surely a decompression bomb
DEFAULT_BATCH_SIZE = 1  # llava ask --each: images per forward pass
DEFAULT_SERVER_HOST = "127.0.0.1"  # llava serve: this machine only unless --host says otherwise
DEFAULT_SERVER_PORT = 8700  # clear of vLLM's 8000, llama.cpp's 8080 and Ollama's 11434
DEFAULT_MAX_REQUEST_MB = 64  # llava serve: largest request body, images included
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # llava serve: a request body must arrive within this (slow-body clients)
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION_BACKENDS = ("auto", "sdpa", "eager", "flash_attention_2")
# --compile's static cache holds empty and stale slots that only an attention mask hides.
COMPILE_ATTENTION_REASON = "flash-attention 2 would attend over the static cache's empty and stale slots"


def server_url(url: str) -> urllib.parse.SplitResult:
    """`url` split, or `UsageError` unless it is http(s)://HOST[:PORT][/PATH]."""
    parts = urllib.parse.urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise UsageError(f"--server must be an http:// or https:// URL such as http://127.0.0.1:8700 (got {url!r})")
    return parts


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{name} must be one of {', '.join(choices)} (got {value!r})")


@dataclass(frozen=True)
class Settings:
    """Everything that shapes how the model is loaded and how it answers."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    load_4bit: bool = False
    load_8bit: bool = False
    trust_remote_code: bool = False
    compile: bool = False
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    system: str | None = None
    chat_template: str | None = None  # a file; overrides the checkpoint's prompt format
    max_context: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_pickle: bool = False
    raw: bool = False
    verbose: bool = False
    server: str | None = None  # answer through this OpenAI-compatible server (remote.py)
    no_server: bool = False  # load the model here: no --server, no discovered `llava serve`
    # The options the user set (command line, /set): a server is sent only these, its own defaults apply to the rest.
    chosen: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise UsageError("--model must name a hub id (org/name) or a local folder")
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("attn", self.attn, ATTENTION_BACKENDS)
        if self.load_4bit and self.load_8bit:
            raise UsageError("--load-4bit and --load-8bit exclude each other: pick one")
        if self.compile and self.attn == "flash_attention_2":
            raise UsageError(f"--compile needs --attn sdpa or eager: {COMPILE_ATTENTION_REASON}")
        if not 0.0 <= self.temperature <= 100.0:
            raise UsageError(f"--temperature must be between 0 and 100 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be between 0 and 2**63-1 (got {self.seed})")
        if self.max_context is not None and self.max_context < 16:
            raise UsageError(f"--max-context must be at least 16 tokens (got {self.max_context})")
        if self.chat_template is not None and not self.chat_template.strip():
            raise UsageError("--chat-template must name a file holding a Jinja chat template")
        if self.server is not None:
            server_url(self.server)
        if self.max_image_pixels < 1:
            raise UsageError(f"--max-image-pixels must be positive (got {self.max_image_pixels})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
