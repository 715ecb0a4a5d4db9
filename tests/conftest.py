"""Shared fixtures: a tiny random LLaVA checkpoint (as a folder and as a hub cache), test images,
a plain-transformers reference, and a runner for the real `llava` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_checkpoint import build_checkpoint, lay_out_hub_cache

HUB_ID = "llava-tests/tiny-llava"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
SHORT_ANSWER = 12  # tokens: enough to tell answers apart, quick on a CPU


CHECKPOINT_FIXTURE = "tiny_model"  # every checkpoint the tests build or load starts from this one


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that builds or loads a checkpoint is `slow`, marked here once rather than in every file;
    tests that start processes without one carry the mark themselves."""
    for item in items:
        if CHECKPOINT_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def restored_environment():
    """Each test starts from the same environment: in-process commands set variables for themselves
    (startup.py quiets huggingface_hub's own progress bars with HF_HUB_DISABLE_PROGRESS_BARS, for one),
    and a subprocess a later test starts from `os.environ` (cli_env) must not inherit them."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def fake_clipboard(tmp_path, monkeypatch) -> Path:
    """A Wayland session whose only clipboard tool, `wl-copy`, writes what it is given to the returned file."""
    bin_dir, clipboard = tmp_path / "bin", tmp_path / "clipboard.txt"
    bin_dir.mkdir()
    tool = bin_dir / "wl-copy"
    tool.write_text(f"#!/bin/sh\nexec /bin/cat > {clipboard}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    return clipboard


@pytest.fixture(scope="session", autouse=True)
def llava_home(tmp_path_factory) -> Path:
    """Saved conversations and input history go to a temporary LLAVA_HOME, never the real home dir."""
    home = tmp_path_factory.mktemp("llava-home")
    os.environ["LLAVA_HOME"] = str(home)
    return home


@pytest.fixture
def tiny_settings(tiny_model):
    """Settings for the tiny checkpoint with short answers (SHORT_ANSWER tokens)."""
    from llava_cli.settings import Settings

    return Settings(model=str(tiny_model), max_new_tokens=SHORT_ANSWER)


@pytest.fixture
def llava_home_dir(tmp_path, monkeypatch) -> Path:
    """A test's own empty LLAVA_HOME (saved conversations, input history)."""
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny checkpoint loaded once (float32 on CPU): build an `Engine` on it for in-process tests."""
    from llava_cli.loader import load_model
    from llava_cli.settings import Settings

    return load_model(Settings(model=str(tiny_model)))


@pytest.fixture(scope="session")
def hf_home(tiny_model, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    lay_out_hub_cache(tiny_model, home, HUB_ID)
    return home


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    for index, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (48 + 16 * index, 40), colour)
        ImageDraw.Draw(image).ellipse((4, 4, 30, 30), fill=(255, 255, 255))
        image.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def images(image_dir) -> dict[str, Path]:
    return {name: image_dir / f"{name}.png" for name in COLOURS}


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


@pytest.fixture(scope="session")
def reference(tiny_model) -> Reference:
    return Reference(tiny_model)


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
