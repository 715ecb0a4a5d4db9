import pytest
from helpers import render_llava15

from llava_cli.media.images import ImageRef
from llava_cli.prompt.conversation import Conversation, Llava15Format


def image(name: str) -> ImageRef:
    return ImageRef(name=name, digest=name, image=None)


def test_llava15_format_matches_the_documented_multi_turn_prompt():
    conversation = Conversation()
    conversation.ask("What is shown?", [image("a")])
    conversation.answer("  A red stop sign.\n")
    conversation.ask("And now?", [image("b"), image("c")])
    conversation.answer("Two cats.")
    conversation.ask("Which is larger?")

    expected = (
        "USER: <image>\nWhat is shown? ASSISTANT: A red stop sign.</s>"
        "USER: <image>\n<image>\nAnd now? ASSISTANT: Two cats.</s>"
        "USER: Which is larger? ASSISTANT:"
    )
    assert Llava15Format().render(conversation) == expected


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_llava15_format_is_the_prompt_the_exactness_tests_give_plain_transformers(system):
    """helpers.render_llava15 writes the prompt every answer is compared against; llava_cli's own
    format must render a conversation to exactly that text."""
    turns = [("What is shown?", 1, "A red stop sign."), ("And now?", 2, "Two cats."), ("Which is larger?", 0, None)]
    conversation = Conversation(system=system)
    for number, (text, image_count, answer) in enumerate(turns):
        conversation.ask(text, [image(f"{number}.{index}") for index in range(image_count)])
        if answer is not None:
            conversation.answer(f"  {answer}\n")  # as generated: the format strips it
    assert Llava15Format().render(conversation) == render_llava15(turns, system)


def test_system_text_goes_before_the_first_user_turn():
    conversation = Conversation(system="Answer briefly.")
    conversation.ask("hi")
    assert Llava15Format().render(conversation) == "Answer briefly. USER: hi ASSISTANT:"


def test_images_are_listed_in_prompt_order_and_pending_turns_can_be_discarded():
    conversation = Conversation()
    conversation.ask("one", [image("a")])
    conversation.answer("x")
    conversation.ask("two", [image("b")])
    assert [i.name for i in conversation.images] == ["a", "b"]
    turn = conversation.discard_pending()
    assert turn.text == "two" and [i.name for i in conversation.images] == ["a"]
    assert not conversation.pending
