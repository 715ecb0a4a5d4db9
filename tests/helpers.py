"""Helpers shared by the test modules: import them from here, never from conftest.py (the fixtures)
or another test module. The tiny checkpoint's constants, `slow_fixture`, the llava-1.5 prompt
written out independently, the plain-transformers `Reference`, the real `llava` command in a
subprocess (`run_llava`), and decodepool's helper run in this process (`HelperHere`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llava_cli.decodepool import REQUEST, DecoderGone, Helper
from llava_cli.decodechild import reply

HUB_ID = "llava-tests/tiny-llava"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
SHORT_ANSWER = 12  # tokens: enough to tell answers apart, quick on a CPU


def slow_fixture(function=None, **kwargs):
    """`pytest.fixture` for a fixture that starts a process or a server, or builds or loads a
    checkpoint: every test using it, directly or through another fixture, is marked `slow`.
    Used bare (`@slow_fixture`) or with pytest.fixture's keywords (`@slow_fixture(scope="session")`)."""

    def declare(function):
        function.makes_tests_slow = True
        return pytest.fixture(**kwargs)(function)

    return declare(function) if function is not None else declare


def render_llava15(turns: list[tuple[str, int, str | None]], system: str | None = None) -> str:
    """The documented llava-1.5 format, written out independently of llava_cli:
    USER: <image>\\n<prompt1> ASSISTANT: <answer1></s>USER: <prompt2> ASSISTANT:"""
    prompt = f"{system} " if system else ""
    for text, image_count, answer in turns:
        prompt += "USER: " + "<image>\n" * image_count + text + " ASSISTANT:"
        if answer is not None:
            prompt += " " + answer + "</s>"
    return prompt


class Reference:
    """Plain transformers greedy generation on the full prompt: the answers llava-cli must match."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = LlavaForConditionalGeneration.from_pretrained(folder).eval()

    def answer(self, prompt: str, image_paths: list[Path], max_new_tokens: int, schema: str | None = None) -> str:
        """`schema`: a JSON schema's text, enforced by xgrammar's own transformers logits processor."""
        from PIL import Image

        pictures = [Image.open(path).convert("RGB") for path in image_paths] or None
        inputs = self.processor(text=prompt, images=pictures, return_tensors="pt")
        processors = [self.grammar_processor(schema)] if schema is not None else None
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, logits_processor=processors)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new_tokens, skip_special_tokens=True).strip()

    def grammar_processor(self, schema: str):
        """xgrammar's logits processor for transformers, compiled independently of llava_cli (compact JSON)."""
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        vocab_size = self.model.config.get_text_config().vocab_size
        info = xgr.TokenizerInfo.from_huggingface(self.processor.tokenizer, vocab_size=vocab_size)
        return LogitsProcessor(xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False))


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "LLAVA_MODEL", "LLAVA_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def default_sigint() -> None:
    """`preexec_fn` of every process a test starts: SIGINT back to its default action. An ignored
    signal is inherited (`nohup ... &`, some CI runners), and a Python started with SIGINT ignored
    never turns Ctrl-C into KeyboardInterrupt, so the Ctrl-C tests would fail under such a launcher."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_llava(*args: str, stdin: bytes | str | None = b"", env: dict[str, str] | None = None, timeout: float = 120):
    """Run the real command line in a subprocess; returns CompletedProcess with text output."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run(
        [sys.executable, "-m", "llava_cli", *map(str, args)],
        input=data,
        capture_output=True,
        env=env or cli_env(),
        timeout=timeout,
        preexec_fn=default_sigint,
    )
    result.stdout_text = result.stdout.decode("utf-8", errors="replace")
    result.stderr_text = result.stderr.decode("utf-8", errors="replace")
    return result


class ChildHere:
    """The pipes of a decodepool helper whose child (decodechild) answers each request in this
    process, when the request is flushed."""

    def __init__(self) -> None:
        self.stdin = self
        self.request = bytearray()
        self.replies = bytearray()

    def write(self, data: bytes) -> None:
        self.request += data

    def flush(self) -> None:
        max_pixels, size, name_size = REQUEST.unpack_from(self.request)
        name = bytes(self.request[REQUEST.size : REQUEST.size + name_size])
        data = bytes(self.request[REQUEST.size + name_size :])
        assert len(data) == size, "decodepool sent a request of the wrong size"
        self.replies += reply(data, name.decode("utf-8", "replace"), max_pixels)
        self.request.clear()

    def poll(self) -> None:
        return None  # never ends on its own


class HelperHere(Helper):
    """decodepool's `Helper` with its child in this process (`ChildHere`): fast tests decode images
    through the same framing and `images.decode` without starting a process."""

    def __init__(self) -> None:
        self.process = ChildHere()

    def read(self, size: int, deadline: float) -> bytes:
        data = bytes(self.process.replies[:size])
        del self.process.replies[:size]
        if len(data) < size:
            raise DecoderGone
        return data

    def kill(self) -> None:
        self.process.replies.clear()
