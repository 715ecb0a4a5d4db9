"""Prompt text to token ids, where the user's words can never become control tokens.

Contract: `render_segments(prompt_format, conversation)` renders the conversation as a list of
`Segment`s: template text (trusted: its `<image>`, `<s>`, `</s>` are real) and untrusted text
(the system text, every message and every earlier answer, verbatim). `expand_images` then widens
each trusted image placeholder to the number of tokens its image needs, and `tokenize` gives the
ids, guaranteeing:

- no token from untrusted text is an added/special token (image, BOS, EOS, chat markers...);
  such text is tokenized as the plain characters it is;
- when untrusted text holds no such token, the ids are exactly what the tokenizer gives for the
  joined text (one ordinary tokenizer call), so answers equal plain `transformers` on that prompt.

Long text is refused before the tokenizer sees it: `tokenize(..., limit=N)` raises `TooLong` when the
text cannot fit in N tokens, judged from its length alone (`least_tokens`). The tokenizer then
never gets more than N times its longest token's characters: one request of 60 MB of text costs no
memory or time in the tokenizer (which aborts the process when it runs out of memory).

Text such as `USER:` or `ASSISTANT:` inside a message is ordinary text to llava-1.5's tokenizer; it
stays inside its own user turn (it creates no turn in the `Conversation`, no end-of-sequence token)
and the model reads it as what the user typed.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import weakref
from dataclasses import dataclass, replace
from typing import Any

from llava_cli.prompt.conversation import Conversation, PromptFormat, Turn

MARK = "\ue000{}\ue001"  # private-use characters: stand-ins for untrusted text while the template renders
MARKS = re.compile("\ue000(\\d+)\ue001")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes in argv; tokenizers refuse them


class TooLong(Exception):
    """The text needs more tokens than the limit: at least `at_least` (a lower bound, not a count)."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"at least {at_least} tokens")
        self.at_least = at_least


@dataclass(frozen=True)
class Segment:
    """A stretch of prompt text; only trusted (template) text may hold control tokens."""

    text: str
    trusted: bool


def render_segments(prompt_format: PromptFormat, conversation: Conversation) -> list[Segment]:
    """Render with every untrusted text replaced by a marker, then split the markers back out."""
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(LONE_SURROGATE.sub("\ufffd", text))
        return MARK.format(len(texts) - 1)

    masked = Conversation(
        system=mark(conversation.system) if conversation.system else None,
        turns=[
            Turn(text=mark(turn.text), images=turn.images, answer=None if turn.answer is None else mark(turn.answer))
            for turn in conversation.turns
        ],
    )
    pieces = MARKS.split(prompt_format.render(masked))
    # re.split with a group alternates: template text, marker number, template text, ...
    segments = [Segment(texts[int(piece)], False) if i % 2 else Segment(piece, True) for i, piece in enumerate(pieces)]
    return [segment for segment in segments if segment.text]


def expand_images(segments: list[Segment], placeholder: str, counts: list[int]) -> list[Segment]:
    """Repeat the n-th trusted `placeholder` counts[n] times (the model wants one token per image feature)."""
    pending = iter(counts)
    found = 0

    def widen(match: re.Match[str]) -> str:
        nonlocal found
        found += 1
        return placeholder * next(pending, 1)

    pattern = re.compile(re.escape(placeholder))
    expanded = [replace(s, text=pattern.sub(widen, s.text)) if s.trusted else s for s in segments]
    if found != len(counts):
        raise ValueError(f"the prompt format placed {found} images for {len(counts)} attached")
    return expanded


def tokenize(tokenizer: Any, segments: list[Segment], limit: int | None = None) -> list[int]:
    """Token ids for the joined segments (with the tokenizer's BOS unless the template wrote it), untrusted text kept plain.

    With a `limit`, text that cannot fit in `limit` tokens raises `TooLong` before it is tokenized."""
    text = "".join(segment.text for segment in segments)
    if limit is not None and (at_least := least_tokens(tokenizer, len(text))) > limit:
        raise TooLong(at_least)
    # As apply_chat_template does: a chat template that starts with the BOS gets no second one.
    writes_bos = (
        bool(segments)
        and segments[0].trusted
        and tokenizer.bos_token is not None
        and text.startswith(tokenizer.bos_token)
    )
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not writes_bos)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    control = control_tokens(tokenizer)
    untrusted = untrusted_ranges(segments)
    injected = {
        index
        for index, token in enumerate(ids)
        if token in control and overlaps(content_span(text, offsets[index], control[token]), untrusted)
    }
    return retokenize_plain(tokenizer, text, ids, offsets, control, injected) if injected else ids


def control_tokens(tokenizer: Any) -> dict[int, str]:
    """Every added token (special or not): id -> its text."""
    return {token_id: str(token) for token_id, token in tokenizer.added_tokens_decoder.items()}


def untrusted_ranges(segments: list[Segment]) -> list[tuple[int, int]]:
    ranges, position = [], 0
    for segment in segments:
        end = position + len(segment.text)
        if not segment.trusted:
            ranges.append((position, end))
        position = end
    return ranges


def content_span(text: str, offset: tuple[int, int], content: str) -> tuple[int, int]:
    """Where the token's own characters are: an added token's span may include whitespace it absorbed."""
    start, end = offset
    inner = text.find(content, start, end)
    return (inner, inner + len(content)) if inner >= 0 else (start, end)


def overlaps(span: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    """Whether `span` overlaps one of `ranges` (sorted and disjoint): a bisection, so that a long
    history with many control tokens costs no more than its length."""
    start, end = span
    before_end = bisect.bisect_left(ranges, end, key=lambda candidate: candidate[0])  # ranges starting before `end`
    return before_end > 0 and ranges[before_end - 1][1] > start


def retokenize_plain(
    tokenizer: Any,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    control: dict[int, str],
    injected: set[int],
) -> list[int]:
    """Re-tokenize, as plain text, each run of text between trusted control tokens that held an injected one.

    The tokenizer already splits at control tokens and tokenizes the stretches between them on
    their own, so the untouched stretches keep their ids and only the affected ones change.
    """
    boundaries = [i for i, token in enumerate(ids) if token in control and i not in injected]
    result: list[int] = []
    run_start = 0
    for stop in boundaries + [len(ids)]:
        run = range(run_start, stop)
        if injected.intersection(run):
            begin, end = offsets[run_start][0], offsets[stop - 1][1]
            result.extend(plain_ids(tokenizer, text[begin:end], control, at_start=begin == 0))
        else:
            result.extend(ids[run_start:stop])
        if stop < len(ids):
            result.append(ids[stop])
        run_start = stop + 1
    return result


def plain_ids(tokenizer: Any, text: str, control: dict[int, str], at_start: bool) -> list[int]:
    """`text` through the tokenizer's normalizer, pre-tokenizer and model, with no added-token matching."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pre_tokenizer = in_context(backend.pre_tokenizer, at_start)
    pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)] if pre_tokenizer else [text]
    ids: list[int] = []
    for piece in pieces:
        tokens = [token.id for token in backend.model.tokenize(piece)]
        if control.keys() & set(tokens):  # the vocabulary rebuilt a control token from its letters
            tokens = spelled_out(backend.model, piece, control)
        ids.extend(tokens)
    return ids


def spelled_out(model: Any, piece: str, control: dict[int, str]) -> list[int]:
    """Tokenize `piece` with each occurrence of a control token's text fed to the model a character at a time."""
    contents = sorted(set(control.values()), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, contents)) + ")", piece)
    words = [word for index, part in enumerate(parts) for word in (list(part) if index % 2 else [part]) if word]
    return [token.id for word in words for token in model.tokenize(word)]


def in_context(pre_tokenizer: Any, at_start: bool) -> Any:
    """The pre-tokenizer as it acts on text that does not open the prompt.

    Metaspace with prepend_scheme "first" (Llama-style tokenizers) adds its leading "▁" only at the
    very start of the input; text after a control token gets none, and neither may this run.
    """
    from tokenizers import pre_tokenizers

    if at_start or not isinstance(pre_tokenizer, pre_tokenizers.Metaspace) or pre_tokenizer.prepend_scheme != "first":
        return pre_tokenizer
    return pre_tokenizers.Metaspace(
        replacement=pre_tokenizer.replacement, prepend_scheme="never", split=pre_tokenizer.split
    )


# Per tokenizer, computed once: the most characters of input one token can stand for (None: no bound).
TOKEN_SPANS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()
# Pieces that never make the text shorter before the model splits it: they keep, replace or add
# characters (NFD/NFKD and lowercasing only lengthen), or split without dropping anything.
KEEPING_NORMALIZERS = {"Sequence", "Prepend", "Replace", "NFD", "NFKD", "Lowercase"}
COMPOSING_NORMALIZERS = {"NFC", "NFKC"}  # may join up to 4 characters (the longest canonical decomposition) into one
KEEPING_PRE_TOKENIZERS = {"Sequence", "ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}
LONGEST_DECOMPOSITION = 4


def least_tokens(tokenizer: Any, characters: int) -> int:
    """A lower bound on the tokens `characters` characters of text become, 0 where none is known.

    Every character of the input ends up inside some token, and a token stands for at most the
    characters of its own text (byte-level tokens: bytes, each at least one character; byte-fallback
    tokens like <0x41>: one). So N characters need at least ceil(N / longest token). That holds while
    nothing before the model drops or merges characters; for pieces that may (whitespace-dropping
    pre-tokenizers, unknown-character fusing, custom normalizers) no bound is claimed.
    """
    if tokenizer not in TOKEN_SPANS:
        TOKEN_SPANS[tokenizer] = longest_token_span(tokenizer)
    span = TOKEN_SPANS[tokenizer]
    return math.ceil(characters / span) if span else 0


def longest_token_span(tokenizer: Any) -> int | None:
    """The most input characters one token can cover, or None where the tokenizer can shrink its input."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    layout = json.loads(backend.to_str())
    model = layout.get("model") or {}
    if model.get("fuse_unk") and not model.get("byte_fallback"):
        return None  # a run of unknown characters becomes one token, however long
    shrink = shrink_factor(layout.get("normalizer"), layout.get("pre_tokenizer"))
    if shrink is None:
        return None
    return shrink * max(len(token) for token in tokenizer.get_vocab())


def shrink_factor(normalizer: dict | None, pre_tokenizer: dict | None) -> int | None:
    """How many input characters may become one before the model sees them (None: unbounded)."""
    normalizers = list(pieces(normalizer, "normalizers"))
    pre_tokenizers = list(pieces(pre_tokenizer, "pretokenizers"))
    if any(piece.get("type") == "Replace" and not piece.get("content") for piece in normalizers):
        return None  # replacing with nothing deletes characters
    if any(piece.get("type") == "Split" and piece.get("behavior") == "Removed" for piece in pre_tokenizers):
        return None
    types = {piece.get("type") for piece in normalizers}
    if (
        not types <= KEEPING_NORMALIZERS | COMPOSING_NORMALIZERS
        or not {p.get("type") for p in pre_tokenizers} <= KEEPING_PRE_TOKENIZERS
    ):
        return None
    return LONGEST_DECOMPOSITION if types & COMPOSING_NORMALIZERS else 1


def pieces(component: dict | None, children: str) -> list[dict]:
    """A normalizer or pre-tokenizer and, for a Sequence, the pieces inside it."""
    if not component:
        return []
    return [component] + [inner for child in component.get(children, []) for inner in pieces(child, children)]
