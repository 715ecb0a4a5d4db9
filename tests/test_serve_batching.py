"""`llava serve` answers concurrent requests together (continuous batching, issue 16 item 1).

The server runs in this process (uvicorn on a thread, the tiny model loaded once), so a test can
count the rows of each decode step and hang up mid-stream over a real socket. Every answer is
checked against the answer the request gets alone: a fresh `Engine.generate` (plain transformers'
greedy answer, tests/test_engine.py), seeded sampling included, and so are its usage figures.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_runner import invoke
from fakes import answer_of

from llava_cli.base.settings import Settings
from llava_cli.engine.kvbudget import BATCH, KvBudget, kv_bytes_per_token
from llava_cli.engine.kvrows import new_cache
from llava_cli.engine.local import Engine
from llava_cli.engine.pipeline import PaddedBatch, forward
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.runner import Prompt
from llava_cli.engine.scheduler import DecodeBatch, Sequence
from llava_cli.media.images import load_image
from llava_cli.prompt.conversation import Conversation, Turn
from llava_cli.serve.app import Service
from llava_cli.serve.guard import ServeOptions

CLIENT_TIMEOUT_S = 120


class InProcessServer:
    """A `Service` on the tiny model behind uvicorn on a thread, on a free 127.0.0.1 port."""

    def __init__(self, loaded, settings: Settings, cache_mb: int | None = None, **options) -> None:
        import uvicorn

        from llava_cli.serve.server import bind, local_url

        self.engine = Engine(loaded, cache_mb)
        self.service = Service(self.engine, settings, ServeOptions(host="127.0.0.1", port=0, **options))
        self.batch = self.service.worker.batch
        self.model = settings.model
        sock = bind("127.0.0.1", 0)
        self.url = local_url(sock)
        self.server = uvicorn.Server(uvicorn.Config(self.service.app(), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)
        self.step_rows: list[int] = []  # the rows of every decode step
        step = self.batch.step
        self.batch.step = lambda: (self.step_rows.append(len(self.batch)), step())[1]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.worker.stop()

    def post(self, body: dict) -> dict:
        reply = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def streamed(self, body: dict) -> tuple[str, dict]:
        """The joined text and the usage of a streamed answer."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        text = "".join(choice["delta"].get("content", "") for event in events for choice in event["choices"])
        return text, events[-1]["usage"]

    def wait_until_idle(self) -> None:
        wait_for(lambda: not self.service.worker.answers and not self.service.worker.queued)


@pytest.fixture(scope="module")
def settings(tiny_model) -> Settings:
    return Settings(model=str(tiny_model), max_new_tokens=12)


@pytest.fixture
def serve(tiny_loaded, settings):
    """Start in-process servers with the given options; all closed after the test."""
    started: list[InProcessServer] = []

    def start(**options) -> InProcessServer:
        started.append(InProcessServer(tiny_loaded, settings, **options))
        return started[-1]

    yield start
    for server in started:
        server.close()


@dataclass(frozen=True)
class Ask:
    """One client's request: its text, images (colour names), options and whether it streams."""

    text: str
    colours: tuple[str, ...] = ()
    max_tokens: int = 12
    stream: bool = False
    temperature: float | None = None
    seed: int | None = None

    def body(self, model: str, images: dict[str, Path], history: tuple[dict, ...] = ()) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": data_url(images[colour])}} for colour in self.colours]
        message = {"role": "user", "content": [*parts, {"type": "text", "text": self.text}]}
        body = {"model": model, "messages": [*history, message], "max_tokens": self.max_tokens}
        sampling = {"temperature": self.temperature, "seed": self.seed}
        return {**body, **{key: value for key, value in sampling.items() if value is not None}}

    def alone(
        self, loaded, settings: Settings, images: dict[str, Path], history: tuple[Turn, ...] = ()
    ) -> tuple[str, dict]:
        """The answer and usage this request gets on its own: a fresh engine's `generate`."""
        chosen = {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed}
        request_settings = dataclasses.replace(
            settings, **{key: value for key, value in chosen.items() if value is not None}
        )
        turn = Turn(text=self.text, images=[load_image(str(images[colour])) for colour in self.colours])
        text, stats = answer_of(Engine(loaded).generate(Conversation(turns=[*history, turn]), request_settings))
        return text, {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(
    server: InProcessServer, request: Ask, images: dict[str, Path], history: tuple[dict, ...] = ()
) -> tuple[str, dict]:
    body = request.body(server.model, images, history)
    if request.stream:
        return server.streamed(body)
    reply = server.post(body)
    return reply["choices"][0]["message"]["content"], reply["usage"]


def all_at_once(server: InProcessServer, requests: list[Ask], images: dict[str, Path]) -> list[tuple[str, dict]]:
    """Send every request from its own thread; the first one is admitted only once all have arrived,
    so the rest join a running batch."""
    admit, arrived = server.batch.admit_rows, threading.Event()  # the worker admits a request's rows at once

    def admit_when_all_arrived(*args):
        arrived.wait(CLIENT_TIMEOUT_S)
        return admit(*args)

    server.batch.admit_rows = admit_when_all_arrived
    results: list = [None] * len(requests)
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, ask(server, requests[i], images)))
        for i in range(len(requests))
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(server.service.worker.waiting) == len(requests))
    arrived.set()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    return results


EIGHT = [
    Ask("What is in this picture?", ("red",), max_tokens=12),
    Ask("Describe the colours.", ("green",), max_tokens=5, stream=True),
    Ask("hello", max_tokens=9),
    Ask("Compare these two pictures in detail.", ("blue", "red"), max_tokens=16, stream=True),
    Ask("the quick brown fox jumps over the lazy dog", max_tokens=7, temperature=0.9, seed=1234),
    Ask("how many objects are there?", ("blue",), max_tokens=4),
    Ask("numbers 0 1 2 3", max_tokens=14, stream=True),
    Ask("what colour is the cat?", ("green",), max_tokens=10),
]


def test_eight_concurrent_requests_get_their_one_at_a_time_answers_and_usage(serve, tiny_loaded, settings, images):
    server = serve(max_batch=8, cache_mb=0)
    results = all_at_once(server, EIGHT, images)
    for request, (text, usage) in zip(EIGHT, results, strict=True):
        expected_text, expected_usage = request.alone(tiny_loaded, settings, images)
        assert text == expected_text, request
        assert {key: usage[key] for key in expected_usage} == expected_usage, request
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert max(server.step_rows) == 8  # they were decoded together


def test_a_batch_smaller_than_the_crowd_admits_each_waiting_request_as_a_row_leaves(
    serve, tiny_loaded, settings, images
):
    server = serve(max_batch=3, cache_mb=0)
    results = all_at_once(server, EIGHT, images)
    assert [text for text, _ in results] == [request.alone(tiny_loaded, settings, images)[0] for request in EIGHT]
    assert max(server.step_rows) == 3 and server.step_rows.count(3) > 3


def test_a_full_kv_budget_makes_requests_wait_for_room_and_every_answer_is_the_one_alone(
    serve, tiny_loaded, settings, images
):
    """--cache-mb bounds the running rows: a request the budget has no room for waits at the head of
    the queue until a row leaves; the reservations never pass the budget, and nobody fails."""
    server = serve(max_batch=8, cache_mb=1)
    expected = [request.alone(tiny_loaded, settings, images) for request in EIGHT]
    longest = max(usage["prompt_tokens"] + request.max_tokens for request, (_, usage) in zip(EIGHT, expected))
    budget = server.engine.budget
    budget.limit_bytes = kv_bytes_per_token(tiny_loaded.model) * 2 * longest  # any two rows, never all eight
    reserved = []
    step = server.batch.step
    server.batch.step = lambda: (reserved.append(budget.used), step())[1]
    results = all_at_once(server, EIGHT, images)
    assert [text for text, _ in results] == [text for text, _ in expected]
    assert 2 <= max(server.step_rows) < 8 and max(reserved) <= budget.limit_bytes
    server.wait_until_idle()
    assert budget.held[BATCH] == 0


def test_a_client_hanging_up_mid_stream_stops_only_its_row(serve, tiny_loaded, settings, images):
    server = serve(max_batch=4, cache_mb=0)
    others = [Ask("What is in this picture?", ("red",), max_tokens=200), Ask("hello", max_tokens=200, stream=True)]
    results: list = [None, None]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, ask(server, others[i], images))) for i in range(2)
    ]
    body = {**Ask("Tell me a long story.", ("blue",), max_tokens=900).body(server.model, images), "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        for thread in threads:
            thread.start()
        wait_for(lambda: len(server.batch) == 3)  # the others have joined the story's batch: hang up
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    server.wait_until_idle()
    assert [text for text, _ in results] == [request.alone(tiny_loaded, settings, images)[0] for request in others]
    assert len(server.step_rows) < 400  # the story stopped long before its 900 tokens


def wait_for(condition) -> None:
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_a_growing_chat_reuses_its_cache_and_gets_the_answers_it_gets_without(serve, tiny_loaded, settings, images):
    server = serve(max_batch=4)
    questions = [
        Ask("What is in this picture?", ("red",)),
        Ask("And its colour?"),
        Ask("Compare it with this one.", ("green",)),
    ]
    history: tuple[dict, ...] = ()
    turns: tuple[Turn, ...] = ()
    previous_prompt = 0
    for question in questions:
        text, usage = ask(server, question, images, history)
        assert text == question.alone(tiny_loaded, settings, images, turns)[0]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= previous_prompt  # at least the previous prompt
        previous_prompt = usage["prompt_tokens"]
        body = question.body(server.model, images, history)
        history = (*body["messages"], {"role": "assistant", "content": text})
        turns = (
            *turns,
            Turn(text=question.text, images=[load_image(str(images[c])) for c in question.colours], answer=text),
        )
    assert previous_prompt > 0 and len(server.batch.pool.entries) == 1  # each turn's entry replaced the one before


def test_the_cache_budget_keeps_the_most_recent_chats(serve, tiny_loaded, settings, images):
    server = serve(
        max_batch=2, cache_mb=2
    )  # the tiny model's KV: 512 bytes per token, so ~4,000 tokens in all, running answers included
    filler = "the quick brown fox jumps over the lazy dog " * 50
    chats = [
        Ask(f"{word}: {filler}") for word in ("alpha", "bravo", "charlie", "delta", "echo")
    ]  # ~890 tokens (~450 KB) each: 4 kept (an ended answer gives its reservation back before its cache is kept)
    first = [ask(server, chat, images) for chat in chats[:4]]
    held = list(server.batch.pool.entries.values())
    assert [entry.size for entry in held] == [
        kv_bytes_per_token(tiny_loaded.model) * len(entry.entry.ids) for entry in held
    ]

    def again(index: int) -> int:
        history = (
            chats[index].body(server.model, images)["messages"][0],
            {"role": "assistant", "content": first[index][0]},
        )
        return ask(server, Ask("and then?", max_tokens=2), images, history)[1]["prompt_tokens_details"]["cached_tokens"]

    ask(server, chats[4], images)  # a fifth chat: the least recently used one (alpha) goes
    assert len(server.batch.pool.entries) == 4 and server.batch.pool.held_bytes <= 2 * 2**20
    assert again(2) >= first[2][1]["prompt_tokens"]  # charlie is still held
    assert again(0) < 10  # alpha was evicted: only the prompt format's first tokens are shared


# ---------------------------------------------------------------- failures stay with their request


def test_running_out_of_memory_fails_only_the_request_it_happened_to(serve, tiny_loaded, settings, images, monkeypatch):
    import torch

    from llava_cli.engine import scheduler as decodebatch

    server = serve(max_batch=4, cache_mb=0)
    doomed = Ask("this one runs out of memory")
    doomed_length = len(server.engine.encode(Conversation(turns=[Turn(text=doomed.text)])).ids)

    def forward_or_run_out(model, cache, batch, image_inputs):
        if batch.ids.shape == (1, doomed_length):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(model, cache, batch, image_inputs)

    monkeypatch.setattr(decodebatch, "forward", forward_or_run_out)
    fine = [Ask("What is in this picture?", ("red",)), Ask("hello", stream=True)]
    results: list = [None, None]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, ask(server, fine[i], images))) for i in range(2)
    ]
    for thread in threads:
        thread.start()
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json=doomed.body(server.model, images), timeout=CLIENT_TIMEOUT_S
    )
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    assert reply.status_code == 500 and reply.json()["error"]["message"].startswith("out of memory while answering")
    assert [text for text, _ in results] == [request.alone(tiny_loaded, settings, images)[0] for request in fine]


def test_a_decode_step_that_runs_out_of_memory_once_is_run_row_by_row_and_the_answer_stays(
    serve, tiny_loaded, settings, images, monkeypatch
):
    import torch

    from llava_cli.engine import scheduler as decodebatch

    server = serve(max_batch=4)
    steps_to_fail = [1]

    def forward_or_run_out_once(model, cache, batch, image_inputs):
        if batch.ids.shape[1] == 1 and steps_to_fail:  # a decode step, the first one
            steps_to_fail.pop()
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(model, cache, batch, image_inputs)

    monkeypatch.setattr(decodebatch, "forward", forward_or_run_out_once)
    hello = Ask("hello")
    assert ask(server, hello, images)[0] == hello.alone(tiny_loaded, settings, images)[0] and not steps_to_fail
    assert len(server.batch) == 0


def test_a_temperature_too_small_for_float32_is_greedy_and_spoils_no_other_answer(serve, tiny_loaded, settings, images):
    """Issue 28 item 2: three greedy clients and one sending temperature 3.981e-38 all got 500
    ("probability tensor contains inf, nan"); below 1e-5 is greedy, as in vLLM."""
    server = serve(max_batch=4, cache_mb=0)
    greedy = [
        Ask("What is in this picture?", ("red",)),
        Ask("hello", stream=True),
        Ask("Describe the colours.", ("green",), max_tokens=9),
    ]
    tiny = Ask("the quick brown fox", temperature=3.981e-38, seed=5)
    results = all_at_once(server, [*greedy, tiny], images)
    assert [text for text, _ in results[:3]] == [request.alone(tiny_loaded, settings, images)[0] for request in greedy]
    assert results[3][0] == Ask(tiny.text).alone(tiny_loaded, settings, images)[0]
    assert max(server.step_rows) == 4


def test_a_row_whose_scores_go_bad_fails_alone_and_the_others_keep_their_answers(
    tiny_loaded, settings, images, monkeypatch
):
    """Per-row finite check: NaN scores in one row of a decode step end that row with its `RowFault`;
    the other rows go on in the same batch and get the answers they get alone."""

    from llava_cli.engine import scheduler as decodebatch

    engine = Engine(tiny_loaded)
    batch = DecodeBatch(engine, PrefixPool(None))
    texts = ["hi", "What is in this picture? Tell me more.", "the quick brown fox"]
    prompts = [encoded(engine, texts[0]), encoded(engine, texts[1], images["red"]), encoded(engine, texts[2])]
    sampled = dataclasses.replace(settings, temperature=0.9, seed=3)
    sequences = [
        batch.admit(prompt, row_settings, 12) for prompt, row_settings in zip(prompts, [settings, sampled, sampled])
    ]
    spoilt = []

    def forward_spoiling_row_one(model, cache, padded, image_inputs):
        logits = forward(model, cache, padded, image_inputs)
        if sequences[1] in batch.sequences and len(sequences[1].row.tokens) == 3:
            spoilt.append(len(batch))
            logits[batch.sequences.index(sequences[1])] = float("nan")
        return logits

    monkeypatch.setattr(decodebatch, "forward", forward_spoiling_row_one)
    while len(batch):
        batch.step()
    assert (
        spoilt == [3]
        and "NaN or infinite" in str(sequences[1].error)
        and sequences[1].row.tokens[:3] == sequences[1].row.tokens
    )
    for place in (0, 2):
        conversation = Conversation(turns=[Turn(text=texts[place])])
        request_settings = dataclasses.replace([settings, sampled, sampled][place], max_new_tokens=12)
        alone, _ = answer_of(Engine(tiny_loaded).generate(conversation, request_settings), conversation)
        assert (
            sequences[place].error is None
            and engine.tokenizer.decode(sequences[place].row.tokens, skip_special_tokens=True).strip() == alone
        )


def test_out_of_memory_in_a_step_fails_only_the_request_it_hit(serve, tiny_loaded, settings, images, monkeypatch):
    """An injected out-of-memory error in the step where one row reaches a position: after the batch
    retries each row alone, that request alone gets a 500 naming it; the others get their answers alone."""
    import torch

    from llava_cli.engine import scheduler as decodebatch

    server = serve(max_batch=4, cache_mb=0)
    requests = [
        Ask("hello", max_tokens=9),
        Ask("the quick brown fox jumps over the lazy dog " * 3, max_tokens=9),
        Ask("numbers 0 1 2 3", max_tokens=9),
    ]
    hit = len(server.engine.encode(Conversation(turns=[Turn(text=requests[1].text)])).ids) + 2  # its third step

    def forward_running_out(model, cache, padded, image_inputs):
        if padded.positions.shape[1] == 1 and hit in padded.positions[:, -1].tolist():
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(model, cache, padded, image_inputs)

    monkeypatch.setattr(decodebatch, "forward", forward_running_out)
    replies: list = [None] * len(requests)
    threads = [
        threading.Thread(
            target=lambda i=i: replies.__setitem__(
                i,
                httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json=requests[i].body(server.model, images),
                    timeout=CLIENT_TIMEOUT_S,
                ),
            )
        )
        for i in range(len(requests))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    assert replies[1].status_code == 500 and replies[1].json()["error"]["message"].startswith(
        "out of memory while answering"
    )
    for place in (0, 2):
        assert replies[place].status_code == 200
        assert (
            replies[place].json()["choices"][0]["message"]["content"]
            == requests[place].alone(tiny_loaded, settings, images)[0]
        )


# ---------------------------------------------------------------- the batch itself: merge, positions, trim


def encoded(engine: Engine, text: str, image: Path | None = None) -> Prompt:
    images = [load_image(str(image))] if image else []
    return engine.encode(Conversation(turns=[Turn(text=text, images=images)]))


def logits_alone(engine: Engine, prompt: Prompt, tokens: list[int]):
    """The next-token logits after `prompt` and `tokens`, one forward over them all with no padding."""
    import torch

    ids = prompt.ids + tokens
    alone = PaddedBatch(torch.tensor([ids]), None, torch.arange(len(ids)).unsqueeze(0))
    with torch.inference_mode():
        return forward(engine.model, new_cache(), alone, engine.image_inputs(prompt, 0))[0]


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact-shapes", "captured-shapes"])
def test_the_static_batch_gives_each_row_its_logits_alone_as_rows_join_and_leave(
    tiny_loaded, settings, images, monkeypatch, bucketed
):
    """Issue 21 item 2: the batch's preallocated cache, rows of different lengths (one with an image)
    joining and leaving mid-way: every step's logits for every row are the ones it gets alone. With
    `bucketed`, the step a CUDA graph replays (whole row and column buckets, the write column on the
    device, empty slots masked) runs eagerly on the CPU."""
    import torch

    from llava_cli.engine import scheduler as decodebatch

    engine = Engine(tiny_loaded)
    batch = DecodeBatch(engine, PrefixPool(None), captured_shapes=bucketed)
    seen: list[tuple[Sequence, Any, list[int]]] = []

    def recording(model, cache, padded, image_inputs):
        logits = forward(model, cache, padded, image_inputs)
        if batch.slots is not None and cache is batch.slots.cache:
            seen.extend(
                (sequence, logits[place].clone(), list(sequence.row.tokens))
                for place, sequence in enumerate(batch.sequences)
            )
        return logits

    monkeypatch.setattr(decodebatch, "forward", recording)
    texts = [
        ("hi", None),
        ("What is in this picture? Tell me more.", images["red"]),
        ("the quick brown fox", None),
        ("Describe the colours of this picture, all of them, and then the shapes you see in it.", images["green"]),
    ]
    prompts = [encoded(engine, text, image) for text, image in texts]
    sequences = [batch.admit(prompt, settings, 30) for prompt in prompts[:3]]
    batch.step()
    batch.step()
    assert batch.width == max(sequence.length for sequence in sequences) and batch.slots.capacity_rows == 4
    batch.remove(sequences[1])  # the longest row leaves: its slot is free, its padding columns go
    assert batch.width == max(sequences[0].length, sequences[2].length) and len(batch) == 2
    batch.step()
    sequences.append(batch.admit(prompts[3], settings, 30))  # joins mid-way, longer than the others: they move right
    assert batch.width == len(prompts[3].ids) and batch.slots.capacity_rows == 4
    for _ in range(3):
        batch.step()
    assert len(seen) == 3 * 2 + 2 + 3 * 3
    for sequence, together, tokens in seen:
        alone = logits_alone(engine, prompts[sequences.index(sequence)], tokens)
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
        assert int(together.argmax()) == int(alone.argmax())


def test_the_pool_hands_out_copies_holds_a_chat_once_and_evicts_the_least_recently_used():
    import torch

    from llava_cli.engine.runner import PrefixCache

    def keep(ids: list[int], prompt_tokens: int, replaces: tuple[str, int | None] | None = None) -> None:
        kv = new_cache([(torch.full((1, 1, len(ids), 4), float(ids[0])), torch.zeros(1, 1, len(ids), 4))])
        pool.keep(PrefixCache(kv=kv, ids=ids), prompt_tokens, replaces)

    def held() -> list[list[int]]:
        return [held.entry.ids for held in pool.entries.values()]

    def start(ids: list[int]):
        return pool.start(Prompt(ids=ids, images=[], image_spans=[]))

    pool = PrefixPool(KvBudget(11 * 2 * 4 * 4))  # 11 tokens of keys and values, 4 floats each
    keep([1, 2, 3, 4], prompt_tokens=2)
    keep([5, 6, 7, 8], prompt_tokens=4)
    assert start([5, 6, 0])[1:] == (2, ("", None))  # only the beginning is shared: not that chat's next turn
    cache, reused, source = start([1, 2, 3, 9, 9])  # the next turn of [1, 2 | 3, 4], now the most recently used
    assert reused == 3 and cache.layers[0].keys.shape[2] == 3 and pool.entries[source[1]].entry.ids == [1, 2, 3, 4]
    cache.layers[0].keys.fill_(-1.0)  # what one answer does to its copy ...
    assert pool.entries[source[1]].entry.kv.layers[0].keys[0, 0, 0, 0] == 1.0  # ... never reaches the pool
    keep([1, 2, 3, 9, 9, 7], prompt_tokens=5, replaces=source)  # the chat's next turn takes its last turn's place
    assert held() == [[5, 6, 7, 8], [1, 2, 3, 9, 9, 7]]
    keep([9, 9, 9, 9], prompt_tokens=2)  # over the budget: the least recently used goes
    assert held() == [[1, 2, 3, 9, 9, 7], [9, 9, 9, 9]]
    keep(list(range(1, 13)), prompt_tokens=12)  # over the whole budget: not kept, nothing evicted for it
    assert held() == [[1, 2, 3, 9, 9, 7], [9, 9, 9, 9]]
    keep([9, 9, 9, 9, 1], prompt_tokens=5)  # holds all that [9, 9, 9, 9] held: takes its place
    assert (
        held() == [[1, 2, 3, 9, 9, 7], [9, 9, 9, 9, 1]]
        and pool.held_bytes <= pool.budget.limit_bytes == pool.budget.used
    )


def test_the_pool_reuses_an_entry_only_in_the_scope_that_made_it():
    import torch

    from llava_cli.engine.runner import PrefixCache

    def start(scope: str, ids: list[int]):
        pool.use_scope(scope)
        return pool.start(Prompt(ids=ids, images=[], image_spans=[]))

    pool = PrefixPool(KvBudget(2**20))
    _, _, source = start("key-1", [1, 2, 3])
    kv = new_cache([(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))])
    pool.keep(PrefixCache(kv=kv, ids=[1, 2, 3, 4]), 3, source)
    assert start("key-2", [1, 2, 3, 4, 5])[1] == 0  # another key, or another cache_salt: nothing reused
    assert start("key-1", [1, 2, 3, 4, 5])[1:] == (4, ("key-1", next(iter(pool.entries))))
    pool.keep(PrefixCache(kv=kv, ids=[1, 2, 3, 4]), 3, ("key-2", None))  # the same tokens, another scope: its own entry
    assert [held.scope for held in pool.entries.values()] == ["key-1", "key-2"]


def test_bad_batching_options_are_refused_with_one_line(monkeypatch):
    outcomes = [
        invoke(monkeypatch, "serve", "--model", "m", "--max-batch", "0"),
        invoke(monkeypatch, "serve", "--model", "m", "--cache-mb", "-1"),
    ]
    assert [(outcome.code, outcome.first_error_line) for outcome in outcomes] == [
        (2, "llava: error: --max-batch must be at least 1 (got 0)"),
        (2, "llava: error: --cache-mb must be 0 or more (got -1)"),
    ]
