"""The `IMAGE... [PROMPT]` grammar of `llava ask` and of `ask --each` (frontend/arguments.py), on argument
lists alone (no model)."""

from __future__ import annotations

import pytest

from llava_cli.base.errors import UsageError
from llava_cli.frontend.arguments import split_images_and_prompt

LONG_PROMPT = "describe " * 100  # longer than any file name may be


@pytest.mark.parametrize(
    "args, expected",
    [
        (["a.png", "what is it?"], (["a.png"], "what is it?")),
        (["a.png", "b.JPG", "compare them"], (["a.png", "b.JPG"], "compare them")),
        (["a.png", "b.webp"], (["a.png", "b.webp"], None)),  # the last looks like an image: prompt from stdin
        (["a.png", "-"], (["a.png"], None)),  # '-' after images: the prompt from stdin
        (["what is it?"], (["what is it?"], None)),  # one argument is always an image (a missing one fails later)
        (["a.png", "two\nlines.png"], (["a.png"], "two\nlines.png")),  # a name never holds a newline
        (["a.png", LONG_PROMPT], (["a.png"], LONG_PROMPT)),
        (
            ["a.png", "https://example.com/picture"],
            (["a.png", "https://example.com/picture"], None),
        ),  # a URL is an image
        (["a.png", "HTTP://example.com/cat?size=2"], (["a.png", "HTTP://example.com/cat?size=2"], None)),
    ],
)
def test_ask_takes_the_last_argument_as_the_prompt_unless_it_is_an_image_or_url(args, expected):
    assert split_images_and_prompt(args) == expected


@pytest.mark.parametrize(
    "args, expected",
    [
        (["a.png", "what is it?"], (["a.png"], "what is it?")),
        (["a.png", "b.webp"], (["a.png", "b.webp"], None)),
        (["a.png", "-"], (["a.png", "-"], None)),  # for --each, '-' is an image read from stdin
        (["a.png", "https://example.com/picture"], (["a.png", "https://example.com/picture"], None)),
        (["what is it?"], ([], "what is it?")),
        ([], ([], None)),
    ],
)
def test_each_takes_the_last_argument_as_the_prompt_unless_it_is_an_image_or_url(args, expected):
    assert split_images_and_prompt(args, each=True) == expected


def test_an_existing_file_without_an_image_extension_is_an_image(tmp_path):
    photo = tmp_path / "photo"
    photo.write_bytes(b"")
    assert split_images_and_prompt(["a.png", str(photo)]) == (["a.png", str(photo)], None)
    assert split_images_and_prompt(["a.png", str(photo)], each=True) == (["a.png", str(photo)], None)


def test_with_a_prompt_option_every_argument_is_an_image():
    args = ["a.png", "what is it?"]
    assert split_images_and_prompt(args, prompt="Q") == (args, "Q")
    assert split_images_and_prompt(args, "Q", each=True) == (args, "Q")


def test_no_images_is_a_usage_error_unless_continuing():
    with pytest.raises(UsageError) as caught:
        split_images_and_prompt([])
    assert str(caught.value) == "give at least one image: llava ask IMAGE... [PROMPT]"
    assert split_images_and_prompt([], images_optional=True) == ([], None)
    assert split_images_and_prompt(["and the colour?"], images_optional=True) == ([], "and the colour?")
    assert split_images_and_prompt(["b.png"], images_optional=True) == (["b.png"], None)
