"""Helpers shared by the test modules: import them from here, never from conftest.py (the fixtures)
or another test module. The tiny checkpoint's constants and `slow_fixture`; the llava-1.5 prompt
written out independently and the plain-transformers `Reference`; the real `llava` command in a
subprocess (`run_llava`); an engine chat checked turn by turn (`chat`); `llava serve` in a
subprocess (`Serve`, `Server`) or in this process (`client_for`) and OpenAI messages; `ask --each`
inputs and lines; `llava chat` at a pseudo-terminal (`Repl`); and decodepool's helper run in this
process (`HelperHere`)."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pexpect
import pytest
from fakes import answer_of

from llava_cli.media.decodechild import reply
from llava_cli.media.decodepool import REQUEST, DecoderGone, Helper

if TYPE_CHECKING:
    import httpx

HUB_ID = "llava-tests/tiny-llava"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
SHORT_ANSWER = 12  # tokens: enough to tell answers apart, quick on a CPU
READY_TIMEOUT_S = 90  # a `llava serve` subprocess loads its model within this
EXIT_TIMEOUT_S = 20
SERVING = re.compile(rb"llava serve: serving .* at (http://\S+)/v1")  # its line once ready (serve/server.py)
# What a terminal shows is not what was written: colours, cursor moves and control characters go.
TERMINAL_NOISE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b.?|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


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
        output = self.model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, logits_processor=processors
        )
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


# The engine against plain transformers ------------------------------------------------------------


def chat(engine, settings, conversation, reference, script, system=None):
    """Run `script` [(text, [image paths])] through the engine and the reference; return stats per turn."""
    from llava_cli.media.images import load_image

    history = [(turn.text, len(turn.images), turn.answer) for turn in conversation.turns]
    paths, stats = [image.name for image in conversation.images], []
    for text, image_paths in script:
        conversation.ask(text, [load_image(str(p)) for p in image_paths])
        streamed, figures = answer_of(engine.generate(conversation, settings), conversation)
        answer = conversation.turns[-1].answer
        paths += map(str, image_paths)
        expected = reference.answer(
            render_llava15(history + [(text, len(image_paths), None)], system), paths, settings.max_new_tokens
        )
        assert answer == expected, f"turn {len(history) + 1}"
        assert streamed == answer
        history.append((text, len(image_paths), answer))
        stats.append(figures)
    return stats


# HTTP: a quiet test server; `llava serve` in a subprocess and in this process; OpenAI messages --


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a test hanging up on purpose is expected, not worth a traceback


class Serve(subprocess.Popen):
    """A `llava serve` process whose stderr a thread copies, line by line, to `log_path`. `url()`
    waits for the line saying it serves (written once it listens and has announced itself): the
    event that it is ready. `wait()` returns once the log holds all the process wrote."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str], **popen: object) -> None:
        super().__init__(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, **popen)
        self.log_path = log_path
        self.urls: queue.Queue[str | None] = queue.Queue()
        self.copier = threading.Thread(target=self.copy_log, daemon=True)
        self.copier.start()

    def copy_log(self) -> None:
        with open(self.log_path, "wb") as log:
            for line in self.stderr:
                log.write(line)
                log.flush()
                if serving := SERVING.match(line):
                    self.urls.put(serving[1].decode())
        self.urls.put(None)  # the process ended

    def url(self) -> str:
        try:
            url = self.urls.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"llava serve did not start: {self.log_path.read_text(errors='replace')}") from None
        if url is None:
            raise AssertionError(f"llava serve exited with {self.wait()}: {self.log_path.read_text(errors='replace')}")
        return url

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self.copier.join(timeout)
        return code


class Server:
    """A `llava serve` subprocess, started at once; `url` waits until it is ready."""

    def __init__(
        self, model: Path, folder: Path, env: dict[str, str] | None = None, options: tuple[str, ...] = ()
    ) -> None:
        self.model = str(model)
        self.runtime = folder / "run"
        self.log_path = folder / "serve.log"
        self.env = cli_env(LLAVA_RUNTIME_DIR=str(self.runtime), **(env or {}))
        command = [
            sys.executable,
            "-m",
            "llava_cli",
            "serve",
            "--model",
            self.model,
            "--port",
            "0",
            "-n",
            str(SHORT_ANSWER),
            "--max-request-mb",
            "1",
            *options,
        ]
        self.process = Serve(command, self.log_path, self.env, preexec_fn=default_sigint)

    @functools.cached_property
    def url(self) -> str:
        return self.process.url()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, body: dict | bytes, **headers: str) -> httpx.Response:
        import httpx

        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **headers}
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, headers=headers, timeout=120)

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=EXIT_TIMEOUT_S)


def client_for(tiny_loaded, settings, **options):
    """A starlette TestClient on `llava serve`'s app over `tiny_loaded` (no socket), and its Service."""
    from starlette.testclient import TestClient

    from llava_cli.engine.local import Engine
    from llava_cli.serve.app import Service
    from llava_cli.serve.guard import ServeOptions

    service = Service(Engine(tiny_loaded), settings, ServeOptions(host="127.0.0.1", port=0, **options))
    return TestClient(service.app(), base_url="http://127.0.0.1:8700"), service


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, *image_urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


# `ask --each`: its inputs and its JSON lines ----------------------------------------------------


def copies(images: dict[str, Path], folder: Path, count: int) -> list[Path]:
    """`count` distinct files cycling through the test images (red, green, blue, red...)."""
    folder.mkdir(exist_ok=True)
    colours = list(images)
    paths = []
    for index in range(count):
        path = folder / f"{index:02d}-{colours[index % 3]}.png"
        shutil.copy(images[colours[index % 3]], path)
        paths.append(path)
    return paths


def lines_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# `llava chat` at a pseudo-terminal --------------------------------------------------------------


def visible(text: str) -> str:
    return TERMINAL_NOISE.sub("", text)


class Repl:
    """`llava chat` at a pseudo-terminal, with everything it wrote kept for inspection."""

    def __init__(self, model, max_new: int, home, **env_extra: str) -> None:
        env = cli_env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", LLAVA_HOME=str(home), **env_extra)
        # --no-markdown: the answer is shown exactly as streamed, so it can be compared with the reference.
        args = ["-m", "llava_cli", "chat", "--model", str(model), "-n", str(max_new), "--no-markdown"]
        self.log = io.BytesIO()
        self.child = pexpect.spawn(
            sys.executable, args, env=env, timeout=120, dimensions=(40, 400), preexec_fn=default_sigint
        )
        self.child.logfile_read = self.log
        self.prompt()

    def prompt(self) -> None:
        self.child.expect_exact(">>>")

    def screen(self) -> str:
        return visible(self.log.getvalue().decode("utf-8", errors="replace"))

    def command(self, line: str, reply: str) -> None:
        self.child.sendline(line)
        self.child.expect_exact(reply)
        self.prompt()

    def ask(self, question: str) -> str:
        """Send `question`, wait for the next prompt after its answer, and return the answer as shown."""
        self.child.sendline(question)
        answered = re.compile(re.escape(question) + r"\n(.*?)\n>>>", re.DOTALL)
        while not (found := answered.findall(self.screen())):
            self.prompt()
        return found[-1]

    def exit_status(self) -> int | None:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


# Images decoded without decodepool's process ----------------------------------------------------


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
