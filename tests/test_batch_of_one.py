"""Issue 21: `ask` and `chat` answer as a batch of one on the scheduler (engine/scheduler.py's
`DecodeBatch`, the engine's own, its pool the chat's history), token for token like plain `generate`,
with the exact-shapes step (a CPU's default) and the bucketed one (the shapes CUDA captures, run here
eagerly), across turns with cache reuse and crops, context dropping, a column bucket outgrown
mid-conversation and seeded sampling; a capture that fails falls back with one --verbose line; a stopped
answer leaves its cache for the next turn.

Buckets are made small (`SLOT_COLUMNS`), so a short chat outgrows several."""

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
from llava_cli.engine import scheduler
from llava_cli.engine.kvbudget import CHAT
from llava_cli.engine.local import Engine
from llava_cli.engine.scheduler import DecodeBatch, columns_bucket
from llava_cli.media.images import load_image
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

SMALL_COLUMNS = (48, 96)  # then 192, 384, ...: the script below outgrows two of them
SHAPES = ("exact", "bucketed")


@pytest.fixture
def settings(tiny_settings) -> Settings:
    return tiny_settings


@pytest.fixture
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture
def small_columns(monkeypatch):
    monkeypatch.setattr(scheduler, "SLOT_COLUMNS", SMALL_COLUMNS)


def engine_on(loaded, shapes: str, notes: list[str] | None = None) -> Engine:
    """An engine whose batch of one steps with `shapes` ("bucketed": as CUDA captures them)."""
    engine = Engine(loaded) if notes is None else with_notes(Engine(loaded), notes)
    engine.batch = DecodeBatch(engine, engine.history, holder=CHAT, captured_shapes=shapes == "bucketed")
    return engine


def shorten_last_answer(conversation: Conversation) -> None:
    """Edit the history as a user would: the next prompt then diverges inside cached tokens (a crop)."""
    turn = conversation.turns[-1]
    turn.answer = " ".join((turn.answer or "x").split()[:2]) or "x"


def test_column_buckets_follow_the_table_then_double():
    assert scheduler.SLOT_COLUMNS == (256, 512, 1024, 2048, 4096)
    assert [columns_bucket(n) for n in (1, 256, 257, 2049, 4096, 4097, 9000)] == [
        256,
        256,
        512,
        4096,
        4096,
        8192,
        16384,
    ]


def test_a_cpu_steps_exact_shapes_and_reuses_one_batch_until_compile_switches(loaded, settings):
    engine = Engine(loaded)
    batch = engine.batch_for(settings)
    assert batch.captured_shapes is False and engine.batch_for(settings) is batch
    assert engine.batch_for(dataclasses.replace(settings, compile=True)) is not batch


def test_turns_with_reuse_crops_and_outgrown_buckets_equal_plain_generate_on_both_shapes(
    loaded, settings, reference, images, small_columns
):
    engines = {shapes: engine_on(loaded, shapes) for shapes in SHAPES}
    script = [
        ("What is in this picture?", [images["red"]]),
        ("Describe the colours.", []),
        ("Compare these two.", [images["green"], images["blue"]]),
        ("Which one is brightest?", []),
    ]
    answers, sizes, cached = {}, [], []
    for name, engine in engines.items():
        conversation = Conversation()
        for turn, (text, paths) in enumerate(script):
            if turn == 3:
                shorten_last_answer(conversation)
            stats = chat(engine, settings, conversation, reference, [(text, paths)])  # each answer == plain generate
            if name == "bucketed":
                sizes.append(engine.batch.live_slots.capacity_columns)
                cached.append(stats[0].cached_tokens)
            (entry,) = (held.entry for held in engine.history.entries.values())
            assert len(entry.ids) == entry.kv.get_seq_length()  # the history holds exactly what it says
        answers[name] = [turn.answer for turn in conversation.turns]
    assert answers["bucketed"] == answers["exact"]
    assert sizes[0] == SMALL_COLUMNS[0] and len(set(sizes)) >= 3  # outgrown twice, the live row copied over
    assert all(reused > 0 for reused in cached[1:])  # every later turn reused the history
    # A different, shorter conversation: only the shared beginning is reused, and nothing stale leaks.
    stats = chat(engines["bucketed"], settings, Conversation(), reference, [("what is this?", [images["green"]])])
    assert stats[0].cached_tokens <= 5


def test_dropping_old_turns_in_a_small_window_answers_like_plain_generate(loaded, reference, images):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, max_context=80)
    engine = engine_on(loaded, "bucketed")
    conversation = Conversation()
    for text in ["first question here", "second question", "third question please", "fourth"]:
        conversation.ask(text, [load_image(str(images["red"]))] if text == "fourth" else [])
        _, figures = answer_of(engine.generate(conversation, settings), conversation)
    assert figures.dropped_turns >= 1
    kept = [(t.text, len(t.images), t.answer) for t in conversation.turns]
    expected = reference.answer(
        render_llava15(kept[:-1] + [(kept[-1][0], kept[-1][1], None)]), [images["red"]], MAX_NEW
    )
    assert conversation.turns[-1].answer == expected


def test_seeded_sampling_gives_the_same_answers_on_both_shapes(loaded):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.9, seed=7)
    answers = {}
    for name in SHAPES:
        engine, conversation, said = engine_on(loaded, name), Conversation(), []
        for text in ("tell me something", "and more"):
            conversation.ask(text)
            said.append(answer_text(engine.generate(conversation, settings), conversation))
        answers[name] = said
    assert answers["bucketed"] == answers["exact"]


@pytest.mark.slow  # builds and loads checkpoints
@pytest.mark.parametrize("family", ["llava-interleave", "llava-next"])
def test_another_family_answers_alike_on_both_shapes(family, tmp_path_factory, images):
    folder = build_family_checkpoint(family, tmp_path_factory.mktemp(family))
    settings = Settings(model=str(folder), max_new_tokens=MAX_NEW)
    loaded = load_model(settings)
    answers = {}
    for name in SHAPES:
        engine, conversation = engine_on(loaded, name), Conversation()
        for text, paths in [("What is this?", [images["red"]]), ("And this one?", [images["blue"]]), ("Colours?", [])]:
            conversation.ask(text, [load_image(str(p)) for p in paths])
            answer_of(engine.generate(conversation, settings), conversation)
        answers[name] = [turn.answer for turn in conversation.turns]
    assert answers["bucketed"] == answers["exact"]


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
    monkeypatch.setattr(scheduler, "replays_graphs", lambda model: True)  # as on a GPU


def test_a_failed_capture_falls_back_to_the_uncaptured_step_with_one_verbose_line(
    loaded, reference, images, monkeypatch
):
    fake_cuda_that_fails_at_capture(monkeypatch)
    notes: list[str] = []
    engine = engine_on(loaded, "bucketed", notes=notes)
    verbose = Settings(model=loaded.name, max_new_tokens=MAX_NEW, verbose=True)
    script = [("What is in this picture?", [images["red"]]), ("Describe the colours.", [])]
    chat(engine, verbose, Conversation(), reference, script)  # the warm-up and the failed capture changed nothing
    assert notes == [
        "CUDA graph capture of the batch step failed (RuntimeError: operation not permitted when stream is capturing); decoding without it"
    ]


def test_without_verbose_a_failed_capture_says_nothing(loaded, settings, monkeypatch):
    monkeypatch.setattr(scheduler, "replays_graphs", lambda model: True)  # on a CPU, capture itself raises
    notes: list[str] = []
    engine = engine_on(loaded, "bucketed", notes=notes)
    conversation = Conversation()
    conversation.ask("tell me something")
    assert answer_text(engine.generate(conversation, settings), conversation) == conversation.turns[-1].answer
    assert notes == [] and engine.batch.capture_failure


def test_stopping_or_closing_mid_answer_leaves_the_bookkeeping_exact_for_the_next_turn(
    loaded, settings, reference, images
):
    engine = engine_on(loaded, "bucketed")
    conversation = Conversation()
    conversation.ask("What is in this picture?", [load_image(str(images["red"]))])
    prompt = engine.encode(conversation).ids
    polls = iter(range(100))
    events = list(engine.generate(conversation, settings, stop=lambda: next(polls) >= 5))  # stopped after a few tokens
    assert conversation.pending and not [event for event in events if type(event).__name__ == "Done"]
    (entry,) = (held.entry for held in engine.history.entries.values())
    assert entry.ids[: len(prompt)] == prompt and len(entry.ids) == entry.kv.get_seq_length() > len(prompt)
    events = engine.generate(conversation, settings)
    next(events)
    events.close()  # as Ctrl-C does at a streamed chunk
    assert conversation.pending and len(engine.batch) == 0
    conversation.discard_pending()
    stats = chat(engine, settings, conversation, reference, [("What is in this picture?", [images["red"]])])
    assert stats[0].cached_tokens == len(prompt) - 1  # the whole prompt but the token that is always run


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


def test_the_history_is_handed_to_the_next_turn_not_copied(loaded, settings):
    """A chat never holds its conversation twice: the next turn's prefill starts from the history's own
    tensors (views of its first columns), and the pool is empty until that answer's cache replaces it."""
    engine, conversation = Engine(loaded), Conversation()
    conversation.ask("tell me something")
    answer_of(engine.generate(conversation, settings), conversation)
    (entry,) = (held.entry for held in engine.history.entries.values())
    conversation.ask("and more")
    cache, keep, _ = engine.history.start(engine.encode(conversation))
    assert 0 < keep < len(entry.ids) and engine.history.entries == {}
    for given, held in zip(cache.layers, entry.kv.layers):
        assert given.keys.untyped_storage().data_ptr() == held.keys.untyped_storage().data_ptr()
        assert given.keys.shape[2] == keep
