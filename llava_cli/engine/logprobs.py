"""Token logprobs: what each generated token scored, and the top alternatives, as OpenAI's chat API reports them.

A leaf module (standard library only; torch imported lazily inside the hook), so a remote backend
can fill the same types from a server's `choices[i].logprobs.content` (`from_openai`).

- `TokenLogprob(token, logprob, bytes, top)`: one generated token; `top` holds `Alternative`s, the
  N most likely tokens at that step (N = `top_logprobs` or `--logprobs`, 0..options.MAX_TOP_LOGPROBS), most likely first.
  `as_openai` / `from_openai` convert a list of them to and from OpenAI's `logprobs.content` list.
- `LogprobHook`: the `TokenHook` (engine/pipeline.py) that records them, one per row, on every path
  (`ask`, `ask --each`, `serve`, alone or batched). It must be the row's FIRST hook, so it sees the
  model's raw scores: the values are `log_softmax` of the model's logits in float32, before the
  temperature, top-p and any constraint mask, exactly what plain transformers computes from
  `model(**inputs).logits`. vLLM returns the same raw distribution by default (`logprobs_mode`
  "raw_logprobs"): a token's logprob then does not depend on how it was drawn, so greedy, seeded and
  constrained answers report comparable numbers. The end-of-sequence token is not listed, as
  OpenAI does not list it.
- `token_bytes(tokenizer, id)`: a token's own bytes (a byte-level BPE piece or a `<0xNN>` byte
  piece may be part of one UTF-8 character); `token` is those bytes decoded, a split character as U+FFFD.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback pieces


@dataclass(frozen=True)
class Alternative:
    """One of the most likely tokens at a step."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its logprob and the most likely tokens at its step."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[Alternative, ...] = field(default=())


def as_openai(tokens: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's `choices[i].logprobs.content`: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
    return [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": list(t.bytes),
            "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top],
        }
        for t in tokens
    ]


def from_openai(content: list[dict[str, Any]]) -> tuple[TokenLogprob, ...]:
    """The inverse of `as_openai`, for an answer from a server (a missing `bytes` is the token's UTF-8)."""

    def raw(entry: dict[str, Any]) -> tuple[int, ...]:
        return tuple(entry.get("bytes") or entry["token"].encode())

    return tuple(
        TokenLogprob(
            entry["token"],
            float(entry["logprob"]),
            raw(entry),
            tuple(Alternative(a["token"], float(a["logprob"]), raw(a)) for a in entry.get("top_logprobs") or ()),
        )
        for entry in content
    )


@functools.cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the character each byte is written as in a byte-level BPE vocabulary), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes token `token_id` stands for: a byte piece's byte, a byte-level piece's bytes, else its decoded text's UTF-8."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if match := BYTE_PIECE.fullmatch(piece):
            return bytes([int(match[1], 16)])
        decoder = byte_level_decoder()
        if is_byte_level(tokenizer) and all(char in decoder for char in piece):
            return bytes(decoder[char] for char in piece)
    return tokenizer.decode([token_id]).encode()


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer writes bytes as GPT-2's alphabet (its decoder is ByteLevel)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class LogprobHook:
    """A row's `TokenHook` recording each accepted token's logprob and its `top` best alternatives (module docstring)."""

    def __init__(self, tokenizer: Any, top: int) -> None:
        self.tokenizer = tokenizer
        self.top = top
        self.scores: Any = None  # the log-softmax of the step's raw logits
        self.tokens: list[TokenLogprob] = []
        self.pieces: dict[int, tuple[str, tuple[int, ...]]] = {}  # token id -> (text, bytes), memoised

    def constrain(self, logits: Any) -> Any:
        import torch

        self.scores = torch.log_softmax(logits.float(), dim=-1)  # a new tensor: later hooks may mask theirs
        return logits

    def accepted(self, token: int) -> bool:
        top: tuple[Alternative, ...] = ()
        if self.top:
            best = self.scores.topk(self.top)
            top = tuple(
                self.alternative(index, value) for value, index in zip(best.values.tolist(), best.indices.tolist())
            )
        chosen = self.alternative(token, float(self.scores[token]))
        self.tokens.append(TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, top))
        return False  # logprobs never end a row

    def alternative(self, token: int, logprob: float) -> Alternative:
        if token not in self.pieces:
            raw = token_bytes(self.tokenizer, token)
            self.pieces[token] = (raw.decode(errors="replace"), tuple(raw))
        text, raw_bytes = self.pieces[token]
        return Alternative(text, logprob, raw_bytes)


def logprob_hook(hooks: Any) -> LogprobHook | None:
    """The row's `LogprobHook` among its `hooks`, or None when it reports no logprobs."""
    return next((hook for hook in hooks if isinstance(hook, LogprobHook)), None)
