"""Logprobs and `n`: each answer token's logprob and top alternatives equal log_softmax of the raw logits
plain transformers computes (`generate(output_logits=True)`), within 1e-4 in float32, through
`Engine.generate`, a `DecodeBatch` row, `llava ask --json --logprobs N`, `ask --each` and `llava serve` with the
official openai client (streamed and not); serve's `n` gives n seeded rows from one prefill, each the
answer a single request seeded seed + i gets."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from helpers import Server, data_url, render_llava15, user

from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.engine.logprobs import as_openai, from_openai, logprob_hook
from llava_cli.media.images import load_image
from llava_cli.prompt.conversation import Conversation

MAX_NEW = 12  # the server's -n (test_server.Server)
TOP = 3
QUESTION = "What is in this picture?"
TOLERANCE = 1e-4


def expected_logprobs(reference, image, top: int, max_new: int = MAX_NEW) -> list[dict]:
    """Plain transformers: greedy `generate`, each step's raw logits -> log_softmax (float32); OpenAI's content shape."""
    import torch
    from PIL import Image

    processor, model = reference.processor, reference.model
    inputs = processor(
        text=render_llava15([(QUESTION, 1, None)]), images=[Image.open(image).convert("RGB")], return_tensors="pt"
    )
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    content = []
    for token, logits in zip(tokens, out.logits):
        if token == eos:
            break
        scores = torch.log_softmax(logits[0].float(), dim=-1)
        best = scores.topk(top)
        content.append(
            {
                "id": token,
                "logprob": float(scores[token]),
                "top": list(zip(best.indices.tolist(), best.values.tolist())),
            }
        )
    return content


def assert_matches(content: list[dict], expected: list[dict], tokenizer) -> None:
    """`content` (OpenAI's shape) against `expected_logprobs`: same tokens (their bytes joined are the
    answer's text), logprobs and alternatives within TOLERANCE."""
    assert len(content) == len(expected) > 0
    for got, want in zip(content, expected):
        assert abs(got["logprob"] - want["logprob"]) < TOLERANCE
        assert [abs(a["logprob"] - value) < TOLERANCE for a, (_, value) in zip(got["top_logprobs"], want["top"])] == [
            True
        ] * len(want["top"])
        assert len(got["top_logprobs"]) == len(want["top"])
        text = tokenizer.decode([want["id"]])
        if "\ufffd" not in text:  # a whole character: the token's text and bytes are it
            assert got["token"] == text and bytes(got["bytes"]) == text.encode()
    joined = b"".join(bytes(entry["bytes"]) for entry in content).decode(
        errors="replace"
    )  # a random model writes any bytes
    assert joined == tokenizer.decode([want["id"] for want in expected])


@pytest.fixture(scope="module")
def engine(tiny_loaded) -> Engine:
    return Engine(tiny_loaded)


def test_the_engine_reports_the_logprobs_plain_transformers_computes(engine, tiny_model, reference, images):
    expected = expected_logprobs(reference, images["red"], TOP)
    conversation = Conversation()
    conversation.ask(QUESTION, [load_image(str(images["red"]))])
    events = list(engine.generate(conversation, Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, logprobs=TOP)))
    done = events[-1]
    assert_matches(as_openai(done.logprobs), expected, reference.processor.tokenizer)
    assert from_openai(as_openai(done.logprobs)) == done.logprobs  # what a remote backend reads back
    assert done.stats.completion_tokens == len(done.logprobs)


def test_a_batch_row_reports_them_too_sampled_rows_beside_it(engine, tiny_model, reference, images):
    from llava_cli.engine.prefixpool import PrefixPool
    from llava_cli.engine.scheduler import DecodeBatch

    expected = expected_logprobs(reference, images["green"], TOP)
    batch = DecodeBatch(engine, PrefixPool(None))

    def prompt(image):
        asked = Conversation()
        asked.ask(QUESTION, [load_image(str(image))])
        return engine.fit(asked, Settings(model=str(tiny_model)))[0]

    sampled = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, temperature=1.0, seed=3, logprobs=TOP)
    others = batch.admit_rows(prompt(images["red"]), [sampled, sampled], MAX_NEW)
    [row] = batch.admit_rows(prompt(images["green"]), [Settings(model=str(tiny_model), logprobs=TOP)], MAX_NEW)
    assert batch.prefills == 2
    while len(batch):
        batch.step()
    assert_matches(as_openai(logprob_hook(row.sampler.hooks).tokens), expected, reference.processor.tokenizer)
    assert others[0].row.tokens == others[1].row.tokens  # the same seed: the same answer, from one prefill


def test_ask_json_logprobs_holds_them_in_the_record(monkeypatch, tiny_model, reference, images, tmp_path):
    from cli_runner import invoke

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    expected = expected_logprobs(reference, images["blue"], 2)
    outcome = invoke(
        monkeypatch,
        "ask",
        str(images["blue"]),
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--json",
        "--logprobs",
        "2",
        "--no-save",
    )
    assert outcome.code == 0, outcome.stderr
    record = json.loads(outcome.stdout)
    assert_matches(record["logprobs"], expected, reference.processor.tokenizer)
    assert record["completion_tokens"] == len(record["logprobs"])


def test_ask_each_logprobs_holds_each_images_in_its_line(monkeypatch, tiny_model, reference, images, tmp_path):
    from cli_runner import BytesStdout, invoke

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    args = (
        "ask",
        "--each",
        str(images["red"]),
        str(images["green"]),
        "-p",
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--batch-size",
        "2",
        "--logprobs",
        "2",
    )  # both images decoded together
    outcome = invoke(monkeypatch, *args, stdout=BytesStdout())
    assert outcome.code == 0, outcome.stderr
    records = [json.loads(line) for line in outcome.stdout.splitlines()]
    for record, image in zip(records, (images["red"], images["green"]), strict=True):
        assert_matches(record["logprobs"], expected_logprobs(reference, image, 2), reference.processor.tokenizer)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--logprobs", "2"), "--logprobs N adds the tokens' logprobs to the JSON record: add --json"),
        (("--json", "--logprobs", "21"), "--logprobs must be between 0 and 20 (got 21)"),
        (("--each", "--logprobs", "2", "--ray", "local"), "--logprobs is not carried back from Ray workers yet"),
    ],
)
def test_ask_logprobs_without_json_or_out_of_range_is_a_usage_error(monkeypatch, images, args, message):
    from cli_runner import invoke

    outcome = invoke(monkeypatch, "ask", str(images["red"]), QUESTION, *args)
    assert outcome.code == 2
    assert message in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- llava serve, with the openai client


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    running = Server(tiny_model, tmp_path_factory.mktemp("serve-logprobs"), options=("--cache-mb", "0"))
    yield running
    if running.process.poll() is None:
        import signal

        running.stop(signal.SIGTERM)


def client_for(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_serve_logprobs_streamed_or_not_are_plain_transformers_ones(server, reference, images):
    from openai import BadRequestError

    client = client_for(server)
    expected = expected_logprobs(reference, images["green"], TOP)
    messages = [user(QUESTION, data_url(images["green"]))]
    reply = client.chat.completions.create(model=server.model, messages=messages, logprobs=True, top_logprobs=TOP)
    content = [entry.model_dump() for entry in reply.choices[0].logprobs.content]
    assert_matches(content, expected, reference.processor.tokenizer)
    chunks = list(
        client.chat.completions.create(
            model=server.model, messages=messages, logprobs=True, top_logprobs=TOP, stream=True
        )
    )
    streamed = [
        entry.model_dump()
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs
        for entry in choice.logprobs.content
    ]
    assert streamed == content
    with_text = [choice for chunk in chunks for choice in chunk.choices if choice.delta.content]
    assert (
        all(choice.logprobs.content for choice in with_text) and len(with_text) > 1
    )  # each chunk carries its own tokens
    plain = client.chat.completions.create(model=server.model, messages=messages)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    contents = [
        choice.delta.content
        for chunk in client.chat.completions.create(model=server.model, messages=messages, stream=True)
        for choice in chunk.choices
    ]
    assert contents[0] == "" and "" not in contents[1:]  # without logprobs no chunk is sent for nothing
    only_chosen = client.chat.completions.create(model=server.model, messages=messages, logprobs=True)
    assert [entry.top_logprobs for entry in only_chosen.choices[0].logprobs.content] == [[]] * len(content)
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}):
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=server.model, messages=messages, **bad)
        assert refused.value.body["param"] == "top_logprobs" and "`top_logprobs`" in refused.value.body["message"]


@pytest.mark.parametrize("each", [False, True])
def test_ask_logprobs_through_a_server_are_the_servers_ones(monkeypatch, server, reference, images, tmp_path, each):
    """Client mode sends `logprobs`/`top_logprobs` and reads them back: the record holds plain transformers' values."""
    from cli_runner import BytesStdout, invoke

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    shape = ("--each", "-p", QUESTION) if each else ("--json", QUESTION, "--no-save")
    outcome = invoke(
        monkeypatch,
        "ask",
        str(images["red"]),
        *shape,
        "--server",
        server.url,
        "--model",
        server.model,
        "--logprobs",
        "2",
        stdout=BytesStdout(),
    )
    assert outcome.code == 0, outcome.stderr
    record = json.loads(outcome.stdout)
    assert_matches(record["logprobs"], expected_logprobs(reference, images["red"], 2), reference.processor.tokenizer)


def metrics(server: Server) -> tuple[float, float, float]:
    """/metrics' prompts prefilled, prompt tokens and generated tokens."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return tuple(
        float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE)[1])
        for name in ("llava_prefills", "llava_prompt_tokens_total", "llava_generated_tokens_total")
    )


def test_n_gives_n_seeded_answers_from_one_prefill_each_a_single_seeded_requests(server, images):
    from openai import BadRequestError

    client = client_for(server)
    messages = [user(QUESTION, data_url(images["red"]))]
    sampling = {"model": server.model, "messages": messages, "temperature": 1.0, "max_tokens": MAX_NEW}
    before = metrics(server)
    reply = client.chat.completions.create(n=3, seed=11, **sampling)
    after = metrics(server)
    assert after[0] == before[0] + 1  # one prefill for the three answers
    assert (after[1] - before[1], after[2] - before[2]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    answers = [choice.message.content for choice in reply.choices]
    assert [choice.index for choice in reply.choices] == [0, 1, 2] and len(set(answers)) == 3
    singles = [client.chat.completions.create(seed=11 + index, **sampling) for index in range(3)]
    assert answers == [single.choices[0].message.content for single in singles]
    assert reply.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    assert reply.usage.prompt_tokens == singles[0].usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(n=3, seed=11, stream=True, stream_options={"include_usage": True}, **sampling)
    )
    pieces: dict[int, str] = {0: "", 1: "", 2: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert list(pieces.values()) == answers
    assert sorted(choice.index for chunk in chunks for choice in chunk.choices if choice.finish_reason) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(n=9, **sampling)
    assert refused.value.body["param"] == "n"
