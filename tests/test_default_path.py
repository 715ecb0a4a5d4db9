"""Issue 17, findings 3 and 4: the default decode path (engine/graphstep.py's `StaticPath`: a bucketed static
cache, the next token chosen on the device, one step of look-ahead, a CUDA graph on a GPU) answers
token for token like plain `generate` and like the eager dynamic-cache path, across turns with
cache reuse and crops, context dropping, a bucket outgrown mid-conversation and seeded sampling;
its step never waits for the host; a capture that fails falls back with one --verbose line.

Buckets are made small by passing sizes to `StaticPath`, so a short chat outgrows several."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from fakes import answer_of, answer_text, with_notes
from helpers import HUB_ID, chat, cli_env, render_llava15, run_llava
from helpers import SHORT_ANSWER as MAX_NEW
from tiny_checkpoint import build_family_checkpoint

from llava_cli.base.settings import Settings
from llava_cli.engine import graphstep
from llava_cli.engine.graphstep import (
    BUCKET_TOKENS,
    CPU_NOTE,
    FLASH_NOTE,
    DecodeStep,
    StaticPath,
    TokenReader,
    bucket_size,
    default_path,
    uncaptured_reason,
)
from llava_cli.engine.local import Engine
from llava_cli.engine.paths import EagerPath
from llava_cli.media.images import load_image
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

SMALL_BUCKETS = (48, 96)  # then 192, 384, ...: the script below outgrows two of them


@pytest.fixture
def settings(tiny_settings) -> Settings:
    return tiny_settings


@pytest.fixture
def loaded(tiny_loaded):
    return tiny_loaded


def engine_on(loaded, path_kind: str, window: int | None = None, notes: list[str] | None = None) -> Engine:
    engine = Engine(loaded) if notes is None else with_notes(Engine(loaded), notes)
    window = window or loaded.context_window
    engine.path = (
        StaticPath(loaded.model, window, buckets=SMALL_BUCKETS) if path_kind == "static" else EagerPath(loaded.model)
    )
    return engine


def write_position(engine: Engine) -> int:
    return int(engine.cache.kv.layers[0].cumulative_length)


def shorten_last_answer(conversation: Conversation) -> None:
    """Edit the history as a user would: the next prompt then diverges inside cached tokens (a crop)."""
    turn = conversation.turns[-1]
    turn.answer = " ".join((turn.answer or "x").split()[:2]) or "x"


def test_bucket_sizes_follow_the_table_then_double_and_stop_at_the_window():
    assert BUCKET_TOKENS == (1024, 2048, 4096)
    assert [bucket_size(n, 4096) for n in (1, 1024, 1025, 2049, 4096)] == [1024, 1024, 2048, 4096, 4096]
    assert [bucket_size(n, 32768) for n in (4097, 9000)] == [8192, 16384]
    assert bucket_size(10, 700) == 700 and bucket_size(50, 64, (48, 96)) == 64


def test_capture_is_decided_by_device_flag_and_sampling():
    assert uncaptured_reason("cuda", True, True) is None
    assert uncaptured_reason("cpu", True, True) == "no CUDA device"
    assert uncaptured_reason("cuda", False, True) == "--no-cuda-graph"
    assert uncaptured_reason("cuda", True, False).startswith("sampling")


def test_flash_attention_keeps_the_eager_dynamic_cache_and_says_so():
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    path = default_path(flash, Settings(), 4096)
    assert isinstance(path, EagerPath) and path.take_notes() == [FLASH_NOTE] and path.take_notes() == []


def test_a_gpu_gets_the_static_path_with_or_without_its_graph_and_a_cpu_the_eager_one(loaded, settings):
    import torch

    on_gpu = SimpleNamespace(config=loaded.model.config, device=torch.device("cuda"))
    captured = default_path(on_gpu, settings, 4096)
    assert isinstance(captured, StaticPath) and captured.cuda_graph is True
    uncaptured = default_path(on_gpu, dataclasses.replace(settings, no_cuda_graph=True), 4096)
    assert (
        isinstance(uncaptured, StaticPath)
        and uncaptured.cuda_graph is False
        and not captured.suits(dataclasses.replace(settings, no_cuda_graph=True), 4096)
    )
    engine = Engine(loaded)
    engine.use_path_for(settings)
    assert isinstance(engine.path, EagerPath) and engine.path.take_notes() == [CPU_NOTE]


def test_turns_with_reuse_crops_and_outgrown_buckets_equal_plain_generate_and_the_eager_path(
    loaded, settings, reference, images
):
    static, eager = engine_on(loaded, "static"), engine_on(loaded, "eager")
    script = [
        ("What is in this picture?", [images["red"]]),
        ("Describe the colours.", []),
        ("Compare these two.", [images["green"], images["blue"]]),
        ("Which one is brightest?", []),
    ]
    answers, sizes, cached = {}, [], []
    for name, engine in (("static", static), ("eager", eager)):
        conversation = Conversation()
        for turn, (text, paths) in enumerate(script):
            if turn == 3:
                shorten_last_answer(conversation)
            stats = chat(engine, settings, conversation, reference, [(text, paths)])  # each answer == plain generate
            if name == "static":
                sizes.append(static.path.size)
                cached.append(stats[0].cached_tokens)
                assert write_position(static) == len(static.cache.ids)  # the bookkeeping mirrors the cache
        answers[name] = [turn.answer for turn in conversation.turns]
    assert answers["static"] == answers["eager"]
    assert sizes[0] == SMALL_BUCKETS[0] and len(set(sizes)) >= 3  # outgrown twice, the held keys copied over
    assert all(reused > 0 for reused in cached[1:])  # every later turn reused the (copied) cache
    # A different, shorter conversation: the write position moves back over stale keys.
    stats = chat(static, settings, Conversation(), reference, [("what is this?", [images["green"]])])
    assert stats[0].cached_tokens <= 5


def test_dropping_old_turns_in_a_small_window_answers_like_plain_generate(loaded, reference, images):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, max_context=80)
    engine = engine_on(loaded, "static", window=80)
    conversation = Conversation()
    for text in ["first question here", "second question", "third question please", "fourth"]:
        conversation.ask(text, [load_image(str(images["red"]))] if text == "fourth" else [])
        _, figures = answer_of(engine.generate(conversation, settings), conversation)
    assert figures.dropped_turns >= 1 and engine.path.size == 80  # the bucket stopped at the window
    kept = [(t.text, len(t.images), t.answer) for t in conversation.turns]
    expected = reference.answer(
        render_llava15(kept[:-1] + [(kept[-1][0], kept[-1][1], None)]), [images["red"]], MAX_NEW
    )
    assert conversation.turns[-1].answer == expected


def test_seeded_sampling_gives_the_eager_paths_answers(loaded):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.9, seed=7)
    answers = {}
    for name in ("static", "eager"):
        engine, conversation, said = engine_on(loaded, name), Conversation(), []
        for text in ("tell me something", "and more"):
            conversation.ask(text)
            said.append(answer_text(engine.generate(conversation, settings), conversation))
        answers[name] = said
    assert answers["static"] == answers["eager"]


@pytest.mark.slow  # builds and loads checkpoints
@pytest.mark.parametrize("family", ["llava-interleave", "llava-next"])
def test_another_family_answers_like_the_eager_path(family, tmp_path_factory, images):
    folder = build_family_checkpoint(family, tmp_path_factory.mktemp(family))
    settings = Settings(model=str(folder), max_new_tokens=MAX_NEW)
    loaded = load_model(settings)
    answers = {}
    for name in ("static", "eager"):
        engine, conversation = engine_on(loaded, name), Conversation()
        for text, paths in [("What is this?", [images["red"]]), ("And this one?", [images["blue"]]), ("Colours?", [])]:
            conversation.ask(text, [load_image(str(p)) for p in paths])
            answer_of(engine.generate(conversation, settings), conversation)
        answers[name] = [turn.answer for turn in conversation.turns]
    assert answers["static"] == answers["eager"]


class StepLog:
    """Records launches, host reads and host syncs inside a decode step, in order."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[str] = []
        self.in_step = False
        run, value = DecodeStep.run, TokenReader.value

        def logged_run(step, choose, replay):
            self.events.append("launch")
            self.in_step = True
            try:
                run(step, choose, replay)
            finally:
                self.in_step = False

        def logged_value(reader):
            self.events.append("read")
            return value(reader)

        monkeypatch.setattr(DecodeStep, "run", logged_run)
        monkeypatch.setattr(TokenReader, "value", logged_value)
        for sync in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, sync, self.watch(getattr(torch.Tensor, sync), sync))

    def watch(self, method, name):
        def watched(tensor, *args, **kwargs):
            if self.in_step:
                self.events.append(f"sync {name}")
            return method(tensor, *args, **kwargs)

        return watched


def test_the_step_chooses_on_the_device_and_the_host_reads_one_step_behind(loaded, settings, monkeypatch):
    engine = engine_on(loaded, "static")
    engine.eos_ids = set()  # a fixed-length answer: MAX_NEW tokens
    log = StepLog(monkeypatch)
    conversation = Conversation()
    conversation.ask("tell me something")
    prompt = engine.encode(conversation).ids
    answer_of(engine.generate(conversation, settings), conversation)
    # Step N+1 is launched before token N is read; the last token is read without a launch after it;
    # nothing inside a step waits for the host.
    assert log.events == ["launch", "read"] * (MAX_NEW - 1) + ["read"]
    monkeypatch.undo()
    assert engine.cache.ids[: len(prompt)] == prompt and len(engine.cache.ids) == len(prompt) + MAX_NEW - 1
    assert write_position(engine) == len(engine.cache.ids)


def fake_cuda_that_fails_at_capture(monkeypatch) -> None:
    """The CUDA calls of a capture on a CPU: streams are no-ops, the warm-up step really runs, and
    the capture block runs its body (changing the cache, as a real run would) and then raises."""

    @contextlib.contextmanager
    def failing_capture(graph, **options):
        yield
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    monkeypatch.setattr(graphstep, "uncaptured_reason", lambda *args: None)  # as on a GPU


def test_a_failed_capture_falls_back_to_the_uncaptured_step_with_one_verbose_line(
    loaded, reference, images, monkeypatch
):
    fake_cuda_that_fails_at_capture(monkeypatch)
    notes: list[str] = []
    engine = engine_on(loaded, "static", notes=notes)
    verbose = Settings(model=loaded.name, max_new_tokens=MAX_NEW, verbose=True)
    script = [("What is in this picture?", [images["red"]]), ("Describe the colours.", [])]
    chat(engine, verbose, Conversation(), reference, script)  # the warm-up and the failed capture changed nothing
    assert notes == [
        "CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing); decoding without it"
    ]


def test_without_verbose_a_failed_capture_says_nothing(loaded, settings, monkeypatch):
    monkeypatch.setattr(graphstep, "uncaptured_reason", lambda *args: None)  # on a CPU, capture itself raises
    notes: list[str] = []
    engine = engine_on(loaded, "static", notes=notes)
    conversation = Conversation()
    conversation.ask("tell me something")
    assert answer_text(engine.generate(conversation, settings), conversation) == conversation.turns[-1].answer
    assert notes == [] and engine.path.capture_failure


def test_stopping_or_closing_mid_answer_leaves_the_bookkeeping_exact_for_the_next_turn(
    loaded, settings, reference, images
):
    engine = engine_on(loaded, "static")
    conversation = Conversation()
    conversation.ask("What is in this picture?", [load_image(str(images["red"]))])
    polls = iter(range(100))
    list(engine.generate(conversation, settings, stop=lambda: next(polls) >= 5))  # stopped after a few tokens
    assert conversation.pending and write_position(engine) == len(engine.cache.ids)
    events = engine.generate(conversation, settings)
    next(events)
    events.close()  # as Ctrl-C does at a streamed chunk
    assert conversation.pending and write_position(engine) == len(engine.cache.ids)
    conversation.discard_pending()
    chat(engine, settings, conversation, reference, [("What is in this picture?", [images["red"]])])


def test_ask_with_no_cuda_graph_answers_like_plain_generate(hf_home, images, reference):
    result = run_llava(
        "ask",
        "--model",
        HUB_ID,
        "--no-cuda-graph",
        "-n",
        MAX_NEW,
        images["green"],
        "what is it?",
        env=cli_env(HF_HOME=str(hf_home), LLAVA_NO_SERVER="1"),
    )
    assert result.returncode == 0, result.stderr_text
    assert (
        result.stdout_text
        == reference.answer(render_llava15([("what is it?", 1, None)]), [images["green"]], MAX_NEW) + "\n"
    )
