"""The seed contract: `--seed S` makes each sampled answer reproducible on its own.

`llava ask IMG` for each image, `llava chat` (`/image IMG` then the question), `ask --each` at any
`--batch-size` and `llava serve` (the request's `seed`) give each image the same answer for the same
seed, temperature and top-p (every row draws from its own generator seeded with S), and another seed
gives another answer for at least one image, so the test can fail. The real commands run in this
process (`cli_runner.invoke`; serve's app through starlette's TestClient): no subprocess per answer.
"""

from __future__ import annotations

import concurrent.futures
import io
import json

import pytest
from cli_runner import invoke
from helpers import client_for, data_url, user

from llava_cli.base.settings import Settings

PROMPT = "describe the picture"
TEMPERATURE, TOP_P, MAX_NEW = 0.9, 0.9, 12
SAMPLING = ("--temperature", TEMPERATURE, "--top-p", TOP_P, "-n", MAX_NEW, "--no-server", "--no-save")


class BinaryStdout(io.TextIOWrapper):
    """A captured stdout with the `.buffer` that JSON-lines output writes its bytes to."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")

    def getvalue(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode()


def ask_one(monkeypatch, model, image, seed: int) -> str:
    outcome = invoke(monkeypatch, "ask", "--model", model, image, "-p", PROMPT, "--seed", seed, *SAMPLING)
    assert outcome.code == 0, outcome.stderr
    return outcome.stdout.removesuffix("\n")


def ask_each(monkeypatch, model, images, seed: int, batch_size: int) -> list[str]:
    args = ["ask", "--model", model, "--each", *images, "-p", PROMPT, "--seed", seed, "--batch-size", batch_size]
    outcome = invoke(monkeypatch, *args, *SAMPLING, stdout=BinaryStdout())
    assert outcome.code == 0, outcome.stderr
    return [json.loads(line)["answer"] for line in outcome.stdout.splitlines()]


def chat_once(monkeypatch, model, image, seed: int) -> str:
    """A piped `llava chat` whose one turn adds the image and asks the question."""
    stdin = f"/image {image}\n{PROMPT}\n".encode()
    outcome = invoke(monkeypatch, "chat", "--model", model, "--json", "--seed", seed, *SAMPLING, stdin=stdin)
    assert outcome.code == 0, outcome.stderr
    (record,) = [json.loads(line) for line in outcome.stdout.splitlines()]
    return record["answer"]


def served(tiny_loaded, tiny_model, paths, seed: int) -> list[str]:
    """Each image asked of `llava serve`'s app, the requests sent together, each with the request's `seed`."""
    client, service = client_for(tiny_loaded, Settings(model=str(tiny_model)))
    try:
        bodies = [
            {
                "model": str(tiny_model),
                "messages": [user(PROMPT, data_url(path))],
                "seed": seed,
                "temperature": TEMPERATURE,
                "top_p": TOP_P,
                "max_tokens": MAX_NEW,
            }
            for path in paths
        ]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # together: rows of one batch
            replies = list(pool.map(lambda body: client.post("/v1/chat/completions", json=body), bodies))
    finally:
        service.worker.stop()
    assert [reply.status_code for reply in replies] == [200] * len(paths)
    return [reply.json()["choices"][0]["message"]["content"] for reply in replies]


@pytest.fixture(scope="module")
def paths(images) -> list:
    return [images["red"], images["green"], images["blue"]]


def test_each_image_gets_the_same_sampled_answer_however_it_is_asked(monkeypatch, tiny_model, paths):
    alone = [ask_one(monkeypatch, tiny_model, path, seed=7) for path in paths]
    assert all(alone)
    for batch_size in (1, 2, 3):
        assert ask_each(monkeypatch, tiny_model, paths, seed=7, batch_size=batch_size) == alone, (
            f"--batch-size {batch_size}"
        )
    assert ask_each(monkeypatch, tiny_model, paths, seed=8, batch_size=3) != alone
    assert [chat_once(monkeypatch, tiny_model, path, seed=7) for path in paths] == alone


def test_llava_serve_gives_each_image_the_same_sampled_answer_as_ask(monkeypatch, tiny_model, tiny_loaded, paths):
    alone = [ask_one(monkeypatch, tiny_model, path, seed=7) for path in paths]
    assert served(tiny_loaded, tiny_model, paths, seed=7) == alone
    assert served(tiny_loaded, tiny_model, paths, seed=8) != alone
