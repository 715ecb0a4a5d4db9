"""What an answer streams as, shared by every backend: its figures (`Stats`) and its text (`TextStream`).

A leaf module (standard library only), so a client of a remote server uses the same figures and the
same whitespace rules as the local engine without importing the engine or torch.

- `Stats`: one answer's figures; `as_dict` gives the stable JSON keys, `stats_line` the `--verbose` line.
- `TextStream`: an incremental detokenizer. Each pushed token id gives the newly visible text; joined
  with `finish()`, the chunks equal `decode(all ids).strip()`: a character split across tokens is
  held back until complete, and whitespace is held back until text follows it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    """Figures for one answer; `as_dict` gives the stable JSON keys."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    load_s: float = 0.0
    peak_memory_mb: float = 0.0
    dropped_turns: int = 0
    finish_reason: str = "stop"
    # each video of the prompt: {"name", "frames": the frame indices sampled, "video_tokens"}; left out when none
    videos: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}
        if not self.videos:
            del figures["videos"]
        return figures

    def end(self, completion_tokens: int, finish_reason: str, seconds: float, peak_memory_mb: float) -> None:
        """Fill in the figures known when the answer ends (`seconds` since it started, `ttft_s` already set).
        The decode rate counts the tokens after the first, which `ttft_s` already paid for."""
        self.completion_tokens, self.finish_reason = completion_tokens, finish_reason
        self.seconds, self.peak_memory_mb = seconds, peak_memory_mb
        self.tokens_per_s = decode_rate(completion_tokens, seconds - self.ttft_s)


def decode_rate(completion_tokens: int, decode_seconds: float) -> float:
    """Tokens per second after the first token (which the time to first token already paid for)."""
    return (completion_tokens - 1) / decode_seconds if completion_tokens > 1 and decode_seconds > 0 else 0.0


def stats_line(figures: dict[str, Any]) -> str:
    """One line of an answer's figures (`Stats.as_dict()`), as `--verbose` shows them on stderr."""
    return (
        f"stats: {figures['prompt_tokens']} prompt tokens ({figures['cached_tokens']} cached), "
        f"first token {figures['ttft_s']:.3f}s, {figures['completion_tokens']} tokens at "
        f"{figures['tokens_per_s']:.1f} tokens/s, {figures['seconds']:.2f}s in all, "
        f"peak memory {figures['peak_memory_mb']:.0f} MB"
    )


class TextStream:
    """Incremental detokenizer: each pushed token gives the newly visible text, whitespace-stripped.

    Decodes a sliding window of tokens (as text-generation-inference does) so multi-byte characters
    split across tokens are held back until complete, and holds back trailing whitespace so the
    chunks joined equal `decode(all tokens).strip()`. `release` alone serves text that arrives
    already decoded (a server's chunks): then `tokenizer` may be None.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.held_whitespace = ""
        self.text = ""  # what has been handed out so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.release(after[len(before) :])

    def finish(self) -> str:
        """Release what was held back waiting for more tokens (an incomplete character at the end)."""
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return self.release(after[len(before) :]) if len(after) > len(before) else ""

    def release(self, new_text: str) -> str:
        pending = self.held_whitespace + new_text
        if not self.text:
            pending = pending.lstrip()
        visible = pending.rstrip()
        self.held_whitespace = pending[len(visible) :]
        self.text += visible
        return visible

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
