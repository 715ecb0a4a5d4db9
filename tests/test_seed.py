"""The seed contract: `--seed S` makes each sampled answer reproducible on its own.

`llava ask IMG` for each image, `ask --each` and any `--batch-size` give each image the same
answer for the same seed, temperature and top-p (every row draws from its own generator seeded
with S), and another seed gives another answer for at least one image, so the test can fail.
The real command runs in this process (`cli_runner.invoke`): no subprocess start per answer.
"""

from __future__ import annotations

import io
import json

import pytest
from cli_runner import invoke

PROMPT = "describe the picture"
SAMPLING = ("--temperature", "0.9", "--top-p", "0.9", "-n", "12", "--no-server", "--no-save")


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
