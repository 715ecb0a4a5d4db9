"""Safety: hostile output cannot drive the terminal, resource faults keep the chat, Ctrl-C while
loading exits 130, pickle weights need --allow-pickle, and no secret or traceback leaks out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import FakeTerminal, invoke
from fake_io import FakeIO
from fakes import FakeBackend, answer_text, use_backend
from helpers import cli_env, default_sigint, render_llava15, run_llava
from tiny_checkpoint import copy_without_weights

from llava_cli.base.errors import InputError, ModelError
from llava_cli.base.settings import Settings
from llava_cli.base.terminal import safe_for_terminal
from llava_cli.chat.loop import ChatLoop
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

MAX_NEW = 8
SECRET = "hf_SeCrEtToKeN1234567890abcdef"
HOSTILE = [
    "\x1b]52;c;ZXZpbA==\x07",
    "red \x1b[31mball\x1b[0m",
    "\x1b]8;;http://evil.example\x1b\\",
    "link\x1b]8;;\x1b\\ \x9b2J",
    "\rhidden\u202e",
]
HOSTILE_SHOWN = "red balllink 2Jhidden"  # what a terminal may show of it


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("\x1b[1;31mred\x1b[0m", "red"),  # colours
        ("\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\", "click"),  # OSC 8 hyperlink
        ("\x1b]52;c;cm0gLXJmIH4=\x07ok", "ok"),  # OSC 52 clipboard write
        ("\x1b]0;owned\x07title", "title"),  # window title
        ("safe text\rrm -rf ~", "safe textrm -rf ~"),  # a carriage return that would hide the start
        ("\x9b31mC1 CSI", "31mC1 CSI"),  # 8-bit CSI: the introducer goes, the rest is plain text
        ("abc\u202edcba", "abcdcba"),  # right-to-left override
        ("invoice\u200fgpj.exe", "invoicegpj.exe"),  # right-to-left mark (issue 28)
        ("one line\u2028forged line\u2029", "one lineforged line"),  # line and paragraph separators
        ("zero\u200bwidth\ufeff\U000e0068\U000e0069", "zerowidth"),  # invisible format and tag characters
        ("emoji \U0001f468\u200d\U0001f469 keep ZWJ", "emoji \U0001f468\u200d\U0001f469 keep ZWJ"),
        ("tabs\tand\nnewlines stay, é and 猫 too", "tabs\tand\nnewlines stay, é and 猫 too"),
    ],
)
def test_safe_for_terminal_removes_control_sequences(text, safe):
    assert safe_for_terminal(text) == safe


@pytest.fixture
def hostile(monkeypatch):
    """The model stands in: its answer is made of escape sequences (the subject here is output)."""
    use_backend(monkeypatch, FakeBackend(HOSTILE))


@pytest.mark.parametrize(
    ("terminal", "flags", "expected"),
    [
        (True, [], HOSTILE_SHOWN + "\n"),
        (True, ["--raw"], "".join(HOSTILE) + "\n"),
        (False, [], "".join(HOSTILE) + "\n"),  # piped: byte for byte as generated
    ],
)
def test_ask_strips_escapes_only_on_a_terminal_without_raw(hostile, monkeypatch, images, terminal, flags, expected):
    stdout = FakeTerminal() if terminal else None
    outcome = invoke(monkeypatch, "ask", images["red"], "hi", *flags, stdout=stdout)
    assert (outcome.code, outcome.stdout) == (0, expected)


def test_piped_chat_writing_to_a_terminal_strips_escapes(hostile, monkeypatch):
    outcome = invoke(monkeypatch, "chat", stdin=b"hello\n", stdout=FakeTerminal())
    assert (outcome.code, outcome.stdout) == (0, HOSTILE_SHOWN + "\n")


@pytest.mark.parametrize("terminal", [True, False])
def test_error_messages_naming_hostile_files_are_stripped_on_a_terminal(monkeypatch, tmp_path, terminal):
    name = str(tmp_path / "\x1b]52;c;ZXZpbA==\x07cat\x1b[2J.png")
    outcome = invoke(monkeypatch, "ask", name, "hi", stderr=FakeTerminal() if terminal else None)
    shown = safe_for_terminal(name) if terminal else name
    assert (outcome.code, outcome.stderr) == (2, f"llava: error: image not found: {shown}\n")


def out_of_memory(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_in_chat_frees_the_cache_keeps_the_conversation_and_recovers(
    tiny_model, tiny_loaded, monkeypatch, images, reference
):
    settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW)
    engine = Engine(tiny_loaded)
    io = FakeIO()
    loop = ChatLoop(engine, settings, io)
    loop.handle("first question")
    first = loop.conversation.turns[0].answer
    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "forward", out_of_memory)
        loop.handle(f"/image {images['red']} second")
    assert io.errors == [
        "out of memory while answering; try --load-4bit, a smaller --max-context, a shorter conversation (/clear) or a smaller model"
    ]
    assert [turn.text for turn in loop.conversation.turns] == ["first question"]
    assert [image.name for image in loop.attached] == [str(images["red"])]  # the image waits for a retry
    assert engine.history.entries == {}  # freed
    loop.handle("second")
    expected = reference.answer(
        render_llava15([("first question", 0, first), ("second", 1, None)]), [images["red"]], MAX_NEW
    )
    assert loop.conversation.turns[1].answer == expected
    assert io.answers[-1] == expected


def test_out_of_memory_in_ask_exits_1_with_the_options_that_help(monkeypatch, tiny_model, images):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", out_of_memory)
    outcome = invoke(monkeypatch, "ask", images["red"], "hi", "--model", tiny_model)
    assert outcome.code == 1
    assert outcome.first_error_line.startswith("llava: error: out of memory while answering; try --load-4bit")
    assert outcome.stdout == ""


SLOW_LOAD_HOOK = """
import sys, time
import llava_cli.models.loader as loader

real = loader.load_weights

def slow_load_weights(*args, **kwargs):
    print("hook: loading weights", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(*args, **kwargs)

loader.load_weights = slow_load_weights
"""


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def torch_is_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("moment", ["importing torch", "loading weights"])
def test_ctrl_c_while_loading_exits_130_without_a_traceback(tmp_path, tiny_model, images, moment):
    (tmp_path / "sitecustomize.py").write_text(SLOW_LOAD_HOOK)  # the load cannot finish first
    env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    process = subprocess.Popen(
        [sys.executable, "-m", "llava_cli", "ask", str(images["red"]), "hi", "--model", str(tiny_model)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=default_sigint,
    )
    try:
        if moment == "importing torch":
            wait_for(lambda: torch_is_mapped(process.pid))
        else:
            assert process.stderr.readline() == b"hook: loading weights\n"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert b"Traceback" not in stderr and stdout == b""


def test_a_hostile_model_folder_name_is_shown_plainly_in_verbose_notes(monkeypatch, tiny_model, images, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_model, tmp_path / "tiny[/bold]\x1b]0;owned\x07[red]x")
    outcome = invoke(
        monkeypatch, "ask", images["red"], "hi", "--model", folder, "-n", "2", "--verbose", stderr=FakeTerminal()
    )
    assert outcome.code == 0
    assert f"loaded {tmp_path}/tiny[/bold][red]x on cpu (float32)" in outcome.stderr
    assert "\x1b]0;owned" not in outcome.stderr  # (the spinner's own cursor codes are Rich's, not the name's)


@pytest.fixture(scope="module")
def pickle_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny checkpoint with its weights as a pickle pytorch_model.bin instead of safetensors."""
    import torch

    folder = tmp_path_factory.mktemp("pickle-llava")
    torch.save(copy_without_weights(tiny_model, folder), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_without_allow_pickle(pickle_model):
    with pytest.raises(
        ModelError,
        match=r"only has pickle \(\.bin\) weights, which can run arbitrary code when loaded; .*--allow-pickle",
    ):
        load_model(Settings(model=str(pickle_model)))


def test_pickle_weights_load_with_allow_pickle_and_answer_like_the_safetensors_model(pickle_model, images, reference):
    settings = Settings(model=str(pickle_model), max_new_tokens=MAX_NEW, allow_pickle=True)
    conversation = Conversation()
    conversation.ask("what is it?", [load_image(str(images["green"]))])
    answer = answer_text(Engine(load_model(settings)).generate(conversation, settings), conversation)
    assert answer == reference.answer(render_llava15([("what is it?", 1, None)]), [images["green"]], MAX_NEW)


def test_llava_debug_shows_the_traceback_instead_of_one_line(monkeypatch):
    monkeypatch.setenv("LLAVA_DEBUG", "1")
    with pytest.raises(InputError, match=r"image not found: missing\.png"):
        invoke(monkeypatch, "ask", "missing.png", "hi")


def test_an_unexpected_exception_is_one_line_pointing_at_llava_debug(monkeypatch, images):
    def broken(*args, **kwargs):
        raise RuntimeError("something internal\nwith a second line")

    monkeypatch.setattr("llava_cli.frontend.startup.start_engine", broken)
    outcome = invoke(monkeypatch, "ask", images["red"], "hi")
    assert outcome.code == 1
    assert outcome.stderr == (
        "llava: error: unexpected RuntimeError: something internal "
        "(LLAVA_DEBUG=1 shows the traceback; please report it)\n"
    )
    monkeypatch.setenv("LLAVA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something internal"):
        invoke(monkeypatch, "ask", images["red"], "hi")


def test_verbose_goes_to_stderr_and_hf_token_is_never_printed(monkeypatch, tiny_model, images):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    answered = invoke(monkeypatch, "ask", images["red"], "hi", "--model", tiny_model, "-n", "4", "--verbose")
    missing = invoke(monkeypatch, "ask", images["red"], "hi", "--model", "nobody/not-cached", "--verbose")
    debug = run_llava(
        "ask", images["red"], "hi", "--model", "nobody/not-cached", env=cli_env(HF_TOKEN=SECRET, LLAVA_DEBUG="1")
    )
    assert answered.code == 0 and f"loaded {tiny_model} on cpu" in answered.stderr
    assert "loaded" not in answered.stdout  # diagnostics never mix into the answer
    assert missing.code == 2 and missing.first_error_line.startswith(
        "llava: error: nobody/not-cached is not in the local"
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr_text and "ModelError" in debug.stderr_text
    for output in (
        answered.stdout,
        answered.stderr,
        missing.stdout,
        missing.stderr,
        debug.stdout_text,
        debug.stderr_text,
    ):
        assert SECRET not in output


HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops over a list": "{% set xs = [1] * 1000 %}{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "huge string": "{{ 'x' * 10000000000 }}",
    "huge power": "{{ 10 ** 64 ** 64 ** 64 ** 64 ** 64 ** 64 }}",
    "endless output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_hostile_chat_template_fails_fast_in_one_line(template, tmp_path, tiny_model, images, monkeypatch):
    """Issue 28, item 10: two nested range(100000) loops in a checkpoint's chat_template.jinja hung
    `ask` with no output; every rendering runs in a sandbox with a budget of steps and output."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "chat_template.jinja").write_text(template + "{{ '<image>' }}")
    started = time.monotonic()
    result = invoke(
        monkeypatch,
        "ask",
        str(images["red"]),
        "what is it?",
        "--model",
        str(model),
        "--chat-template",
        str(model / "chat_template.jinja"),
    )
    assert time.monotonic() - started < 30
    assert (result.code, result.stdout) == (2, "")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"llava: error: the chat template in {model / 'chat_template.jinja'} does not render a simple message"
    ), lines


@pytest.mark.slow  # builds checkpoints
def test_the_bounded_sandbox_renders_as_transformers_does_and_keeps_its_guards(tmp_path):
    from tiny_checkpoint import build_family_checkpoint
    from transformers import AutoProcessor

    from llava_cli.media.images import ImageRef
    from llava_cli.prompt.conversation import ChatTemplateFormat

    for family in ("llava-interleave", "llava-next"):
        processor = AutoProcessor.from_pretrained(build_family_checkpoint(family, tmp_path / family))
        conversation = Conversation(system="be brief")
        image = ImageRef(name="x", digest="d", image=None)
        conversation.ask("hi <image> there", [image])
        conversation.answer("ok")
        conversation.ask("more {{ 7 * 7 }}", [image, image])
        expected = processor.apply_chat_template(conversation.messages(), add_generation_prompt=True, tokenize=False)
        assert ChatTemplateFormat(processor).render(conversation) == expected
        processor.chat_template = "{{ messages.__class__.__mro__ }}"  # the sandbox's own guard still holds
        with pytest.raises(InputError, match="the chat template cannot render this conversation"):
            ChatTemplateFormat(processor).render(conversation)
