"""`--compile` (the batch step over whole buckets through `torch.compile`) answers like the default
step and plain transformers, and an answer's figures reach `--json` and `--verbose` exactly. Speed is
measured by bench/compile_cpu.py and bench/chat_ttft.py, not here."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest
from helpers import HUB_ID, chat, cli_env, render_llava15, run_llava
from PIL import Image

from llava_cli.base.settings import Settings
from llava_cli.engine import scheduler
from llava_cli.engine.local import Engine
from llava_cli.engine.streaming import stats_line
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

MAX_NEW = 10
FIGURES = ("prompt_tokens", "cached_tokens", "ttft_s", "completion_tokens", "tokens_per_s", "seconds")


@pytest.fixture(scope="module")
def settings(tiny_model) -> Settings:
    return Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, compile=True)


@pytest.fixture(scope="module")
def loaded(settings):
    return load_model(settings)


def test_the_compile_step_uncompiled_equals_plain_transformers_across_turns_and_crops(
    loaded, settings, reference, images, monkeypatch
):
    """The --compile step with compiling switched off: whole buckets, their masks, the history's crops."""
    monkeypatch.setattr(scheduler, "compiled", lambda model: model)
    engine = Engine(loaded)
    script = [
        ("What is in this picture?", [images["red"]]),
        ("Describe the colours.", []),
        ("Compare these two.", [images["green"], images["blue"]]),
        ("Which one is brightest?", []),
    ]
    stats = chat(engine, settings, Conversation(), reference, script)
    batch = engine.batch
    assert batch is not None and batch.compile_step and batch.captured_shapes and batch.captured
    assert [s.cached_tokens >= previous.prompt_tokens for previous, s in itertools.pairwise(stats)] == [True] * 3
    # A shorter, different conversation: only the shared beginning is reused.
    stats = chat(engine, settings, Conversation(), reference, [("what is this?", [images["green"]])])
    assert stats[0].cached_tokens <= 5
    engine.reset()  # /clear: nothing reused, the same slots and steps
    stats = chat(engine, settings, Conversation(), reference, [("and this?", [images["blue"]]), ("colours?", [])])
    assert stats[0].cached_tokens == 0 and stats[1].cached_tokens >= stats[0].prompt_tokens
    assert engine.batch is batch


def test_compiled_decode_gives_the_default_steps_answers(loaded, settings, reference, images):
    """Really compiled (torch.compile on the CPU): same greedy answers as the default step and the reference."""
    compiled, default = Engine(loaded), Engine(loaded)
    script = [("What is in this picture?", [images["blue"]]), ("And the colours?", [])]
    chat(compiled, settings, Conversation(), reference, script)
    assert compiled.batch is not None and compiled.batch.call is not loaded.model
    chat(default, dataclasses.replace(settings, compile=False), Conversation(), reference, script)
    assert default.batch is not None and not default.batch.captured_shapes  # the default on a CPU: exact shapes


def test_switching_compile_off_keeps_the_history_and_the_answers_right(
    loaded, settings, reference, images, monkeypatch
):
    monkeypatch.setattr(scheduler, "compiled", lambda model: model)
    engine = Engine(loaded)
    conversation = Conversation()
    chat(engine, settings, conversation, reference, [("What is in this picture?", [images["red"]])])
    compiled = engine.batch
    stats = chat(engine, dataclasses.replace(settings, compile=False), conversation, reference, [("more?", [])])
    assert engine.batch is not compiled and stats[0].cached_tokens > 0  # the history is the step's to reuse


def test_piped_chat_json_shows_reused_tokens_and_verbose_stats(hf_home, images, reference):
    script = f"/image {images['red']} what is it?\nand the colour?\nanything else?\n"
    result = run_llava(
        "chat",
        "--model",
        HUB_ID,
        "--json",
        "--verbose",
        "-n",
        MAX_NEW,
        stdin=script,
        env=cli_env(HF_HOME=str(hf_home), LLAVA_NO_SERVER="1"),
    )
    assert result.returncode == 0, result.stderr_text
    records = [json.loads(line) for line in result.stdout_text.splitlines()]
    assert [set(FIGURES) <= record.keys() for record in records] == [True] * 3
    assert records[0]["cached_tokens"] == 0
    assert records[1]["cached_tokens"] > 0 and records[2]["cached_tokens"] > 0
    assert records[2]["cached_tokens"] >= records[1]["prompt_tokens"]
    history = [("what is it?", 1, records[0]["answer"]), ("and the colour?", 0, records[1]["answer"])]
    expected = reference.answer(render_llava15(history + [("anything else?", 0, None)]), [images["red"]], MAX_NEW)
    assert records[2]["answer"] == expected
    stats_lines = [line for line in result.stderr_text.splitlines() if line.startswith("stats: ")]
    assert stats_lines == [stats_line(record) for record in records]  # the same figures on both


def test_ask_with_compile_and_verbose_answers_right_with_one_stats_line_on_stderr(hf_home, images, reference):
    result = run_llava(
        "ask",
        "--model",
        HUB_ID,
        "--compile",
        "--verbose",
        "-n",
        MAX_NEW,
        images["green"],
        "what is it?",
        env=cli_env(HF_HOME=str(hf_home), LLAVA_NO_SERVER="1"),
    )
    assert result.returncode == 0, result.stderr_text
    expected = reference.answer(render_llava15([("what is it?", 1, None)]), [images["green"]], MAX_NEW)
    assert result.stdout_text == expected + "\n"
    stats_lines = [line for line in result.stderr_text.splitlines() if line.startswith("stats: ")]
    figures = r"stats: (\d+) prompt tokens \(0 cached\), first token [\d.]+s, (\d+) tokens at [\d.]+ tokens/s, [\d.]+s in all, peak memory \d+ MB"
    assert len(stats_lines) == 1
    counts = re.fullmatch(figures, stats_lines[0])
    assert counts is not None, stats_lines[0]
    prompt = reference.processor(
        text=render_llava15([("what is it?", 1, None)]), images=[Image.open(images["green"])], return_tensors="pt"
    )
    assert int(counts[1]) == prompt["input_ids"].shape[1] and 1 <= int(counts[2]) <= MAX_NEW
