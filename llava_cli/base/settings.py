"""Settings: every knob a user can turn, validated once, in one frozen dataclass.

Front-ends build a `Settings` from their options; `Settings(...)` raises `UsageError` with a
one-line message for any bad value, so the rest of the program can trust what it is given.
Change a value mid-session with `dataclasses.replace`, which validates again. Each field is a
row of the option table (base/options.py), which holds its default and the rule checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_cli.base.errors import UsageError
from llava_cli.base.options import (
    DEFAULT_ATTN,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    LOGPROBS,
    OPTIONS,
)

DEFAULT_BATCH_SIZE = 1  # llava ask --each: images per forward pass
DEFAULT_PARALLEL = 4  # llava ask --each through a server: requests at once
DEFAULT_SERVER_HOST = "127.0.0.1"  # llava serve: this machine only unless --host says otherwise
DEFAULT_SERVER_PORT = 8700  # clear of vLLM's 8000, llama.cpp's 8080 and Ollama's 11434
DEFAULT_MAX_REQUEST_MB = 64  # llava serve: largest request body, images included
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # llava serve: a request body must arrive within this (slow-body clients)
DEFAULT_HEADER_TIMEOUT_S = 10.0  # llava serve: a request's headers must arrive within this (slowloris)
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # llava serve: idle kept-alive connections closed after this (uvicorn's default)
DEFAULT_MAX_CONNECTIONS = 512  # llava serve: open connections in all (also kept under the open-file limit)
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = (
    128  # llava serve: from one address; above `ask --each --parallel`'s 64 and a chat or two
)
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # llava serve: on SIGTERM, answers in flight get this long to finish
# A temperature below this is greedy, as vLLM does it: dividing by a smaller one overflows float32
# (3.981e-38 made every score inf), and it could not change which token is likeliest anyway.
GREEDY_BELOW = 1e-5
COMPILE_ATTENTION_REASON = "flash-attention 2 would attend over the bucketed step's empty columns"  # they are masked


@dataclass(frozen=True)
class Settings:
    """Everything that shapes how the model is loaded and how it answers."""

    model: str = DEFAULT_MODEL
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    attn: str = DEFAULT_ATTN
    load_4bit: bool = False
    load_8bit: bool = False
    trust_remote_code: bool = False
    compile: bool = False
    no_cuda_graph: bool = False  # the decode step runs uncaptured (exact shapes) on a GPU
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    system: str | None = None
    chat_template: str | None = None  # a file; overrides the checkpoint's prompt format
    max_context: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_tokens: int | None = None  # anyres families: only the pinpoints whose images fit (models/imagetokens.py)
    cache_mb: int | None = (
        None  # the whole process's KV-cache budget (engine/kvbudget.py); None: sized to the device, 0: no bound
    )
    frames: int | None = None  # frames sampled per video; None: the checkpoint's default (or --fps)
    fps: float | None = None  # video frames sampled per second, capped
    allow_pickle: bool = False
    raw: bool = False
    verbose: bool = False
    server: str | None = None  # answer through this OpenAI-compatible server (client/remote.py)
    no_server: bool = False  # load the model here: no --server, no discovered `llava serve`
    # The options the user set (command line, /set): a server is sent only these, its own defaults apply to the rest.
    chosen: frozenset[str] = frozenset()
    # A JSON schema (engine/constraints.py's canonical text) every answer must follow: ask --schema/--format json, serve's response_format.
    constraint: str | None = None
    stop: tuple[
        str, ...
    ] = ()  # the answer ends before the first of these texts (engine/stops.py): ask --stop, serve's stop
    logprobs: int | None = (
        None  # report each token's logprob and this many top alternatives (engine/logprobs.py): ask --logprobs, serve's top_logprobs; None: none
    )

    def __post_init__(self) -> None:
        for option in OPTIONS.values():
            option.check(getattr(self, option.name))
        LOGPROBS.check(self.logprobs)
        if self.load_4bit and self.load_8bit:
            raise UsageError("--load-4bit and --load-8bit exclude each other: pick one")
        if self.frames is not None and self.fps is not None:
            raise UsageError("--frames and --fps exclude each other: pick one")
        if self.compile and self.attn == "flash_attention_2":
            raise UsageError(f"--compile needs --attn sdpa or eager: {COMPILE_ATTENTION_REASON}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
