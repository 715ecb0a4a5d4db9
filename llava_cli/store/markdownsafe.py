"""Markdown from untrusted text: what `sessions export --format markdown` writes of a saved
conversation (every field of which may have been edited, planted or written by a prompt-injected
model) cannot become raw HTML, a script link, or a heading of the transcript itself.

Each field is encoded for where it goes:
- `text(value)`: a plain one-line field (an image name, a time, the settings, the system text):
  line breaks become spaces and every character Markdown or HTML could act on is backslash-escaped,
  so it renders as exactly its characters.
- `code(value)`: a one-line field shown as code (the model name): a code span fenced with more
  backticks than the value holds, so it cannot close early.
- `file_link(path)`: a local path as a link target: percent-encoded, so it has no scheme
  (`javascript:` becomes the harmless relative name `javascript%3A...`).
- `is_sha256(value)`: whether a digest is 64 hex digits (anything else is not written).
- `message(value)`: the Markdown of a message, kept but made safe:
  - raw HTML is escaped (`<` written `&lt;`) outside code blocks and inline code spans; when the
    spans found on each line are not those a renderer finds (the check below says so), `<` is
    escaped inside inline code too (shown there as `&lt;`);
  - a link or image target, or a link definition's, that does not start with http://, https://
    or mailto: gets a `#` in front: it becomes a link to nowhere on the page (`#javascript:...`);
  - headings go two levels down (level 3 to 6) and setext underlines are escaped, so a message
    never makes the transcript's own `#` and `##` headings;
  - a code fence left open is closed, so it cannot swallow the rest of the transcript.
  The result is then parsed (CommonMark, markdown-it-py) and checked for all of the above; when
  anything is left (input built to fool the line-based rewrite), the whole message is written as
  one code block instead.
A leaf: imports nothing of llava-cli's; markdown-it-py (rich's Markdown parser) is imported when used.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

LINE_BREAK = re.compile(r"\r\n|[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
TEXT_SPECIAL = re.compile(r"([\\`*_\[\]<>()!&|~#])")
SHA256 = re.compile(r"[0-9a-f]{64}")
SAFE_TARGETS = ("http://", "https://", "mailto:")
CHECKED_TARGETS = (*SAFE_TARGETS, "#")
LINK_TARGET = re.compile(r"\]\(|\]:")  # an inline link's target follows `](`, a definition's `]:`
CONTAINER = (
    r"^((?:[ \t]*(?:>|[-+*]|\d{1,9}[.)])(?=[ \t]|$))*[ \t]*)"  # block quote and list markers before a line's text
)
ATX_HEADING = re.compile(CONTAINER + r"(#{1,6})")
SETEXT_UNDERLINE = re.compile(CONTAINER + r"([=-])")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)")  # a run of backticks, then the same run closing it
CLOSING_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
TRANSCRIPT_LEVELS = 2  # the transcript's own headings: # and ##
SENTINEL = "## end"


def text(value: str) -> str:
    return TEXT_SPECIAL.sub(r"\\\1", " ".join(LINE_BREAK.split(value)))


def code(value: str) -> str:
    value = " ".join(LINE_BREAK.split(value))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", value)), default=0) + 1)
    return f"{fence} {value} {fence}"


def file_link(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def is_sha256(value: str) -> bool:
    return SHA256.fullmatch(value) is not None


def message(value: str) -> str:
    lines = LINE_BREAK.split(value)
    tokens = parser().parse("\n".join(lines))
    verbatim = code_lines(tokens)
    headings = {token.map[0]: token.markup for token in tokens if token.type == "heading_open" and token.map}
    underlines = {
        token.map[1] - 1
        for token in tokens
        if token.type == "heading_open" and token.map and token.markup in ("=", "-")
    }
    for keep_code_spans in (True, False):
        safe = [
            line if number in verbatim else safe_line(line, headings.get(number), number in underlines, keep_code_spans)
            for number, line in enumerate(lines)
        ]
        result = "\n".join(safe + unclosed_fence(tokens, lines))
        if is_safe(result):
            return result
    return as_code_block(value)


def parser() -> Any:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")
    md.validateLink = lambda url: True  # see every link target, not only those markdown-it would render
    return md


def code_lines(tokens: list[Any]) -> set[int]:
    """The lines inside fenced and indented code blocks: kept as they are."""
    return {
        line for token in tokens if token.type in ("fence", "code_block") and token.map for line in range(*token.map)
    }


def safe_line(line: str, heading: str | None, underline: bool, keep_code_spans: bool) -> str:
    if heading and heading.startswith("#"):
        line = ATX_HEADING.sub(lambda m: m.group(1) + "#" * min(6, len(m.group(2)) + TRANSCRIPT_LEVELS), line, count=1)
    if underline:
        line = SETEXT_UNDERLINE.sub(r"\1\\\2", line, count=1)
    return neutralise_targets(escape_html(line, keep_code_spans))


def escape_html(line: str, keep_code_spans: bool) -> str:
    """`<` written `&lt;`, except inside what looks like an inline code span when `keep_code_spans`."""
    if not keep_code_spans:
        return line.replace("<", "&lt;")
    parts, last = [], 0
    for span in CODE_SPAN.finditer(line):
        parts += [line[last : span.start()].replace("<", "&lt;"), span.group()]
        last = span.end()
    return "".join(parts) + line[last:].replace("<", "&lt;")


def neutralise_targets(line: str) -> str:
    """Put `#` before every link target on the line that is not http(s) or mailto."""
    parts, last = [], 0
    for match in LINK_TARGET.finditer(line):
        parts.append(line[last : match.end()])
        if not line[match.end() :].lstrip(" \t").lower().startswith(SAFE_TARGETS):
            parts.append("#")
        last = match.end()
    return "".join(parts) + line[last:]


def unclosed_fence(tokens: list[Any], lines: list[str]) -> list[str]:
    """A closing fence for a top-level code fence that runs to the end of the message, or nothing."""
    for token in tokens:
        if token.type == "fence" and token.level == 0 and token.map and token.map[1] >= len(lines):
            last = lines[token.map[1] - 1] if token.map[1] - 1 > token.map[0] else ""
            closing = CLOSING_FENCE.match(last)
            if not (closing and closing.group(1)[0] == token.markup[0] and len(closing.group(1)) >= len(token.markup)):
                return [token.markup]
    return []


def is_safe(markdown: str) -> bool:
    """No HTML, no link target but http(s), mailto or `#...`, no heading of the transcript's levels,
    and nothing left open that would take in what follows."""
    tokens = parser().parse(markdown + "\n\n" + SENTINEL)
    headings = [token for token in tokens if token.type == "heading_open"]
    if not headings or headings[-1].tag != "h2" or tokens[-2].content != SENTINEL[3:]:
        return False
    if any(int(token.tag[1:]) <= TRANSCRIPT_LEVELS for token in headings[:-1]):
        return False
    for token in walk(tokens):
        if token.type in ("html_block", "html_inline"):
            return False
        target = (
            token.attrGet("href")
            if token.type == "link_open"
            else token.attrGet("src")
            if token.type == "image"
            else None
        )
        if target is not None and not str(target).lower().startswith(CHECKED_TARGETS):
            return False
    return True


def walk(tokens: list[Any]) -> Any:
    for token in tokens:
        yield token
        if token.children:
            yield from walk(token.children)


def as_code_block(value: str) -> str:
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", value)), default=0) + 1)
    return f"{fence}\n{value}\n{fence}"
