"""`llava ask --each --server URL --parallel N`: a folder through an OpenAI-compatible server.

One real `llava serve` of the tiny checkpoint serves the module. The reference is a local `--each`
over the same folder (good images, stdin, a broken and a missing file): through the server, every
line must be the local line (all keys but `seconds`, byte for byte, in input order), with the
same stderr and exit code. A stand-in server in front of `llava serve` (`StandIn`) answers 503,
429 with Retry-After, resets the connection, refuses one image, or holds requests, to check the
retries, the error lines and the resume after a Ctrl-C.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    QuietServer,
    Server,
    cli_env,
    copies,
    default_sigint,
    lines_of,
    run_llava,
)
from PIL import Image

from llava_cli.ask import via_server as batchserver
from llava_cli.ask.each import run_batch
from llava_cli.ask.via_server import MAX_ATTEMPTS, retry_delay
from llava_cli.base.errors import LlavaError, ModelError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.client.remote import seconds_to_wait
from llava_cli.frontend.arguments import AskOptions

MAX_NEW = 12  # the server's -n too (test_server.Server)
PROMPT = "describe the picture"
REFUSED_WIDTH = 90  # the stand-in refuses the image this wide (odd.png; the test images are 48 to 80)


@pytest.fixture(scope="module")
def serve(tiny_model, tmp_path_factory):
    running = Server(tiny_model, tmp_path_factory.mktemp("serve-each"))
    yield running
    running.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def folder(images, tmp_path_factory) -> dict[str, Path]:
    """Eight good copies (`good`), one more good image of its own width (`odd`), a broken one, a missing one."""
    root = tmp_path_factory.mktemp("photos")
    odd = root / "odd.png"
    Image.new("RGB", (REFUSED_WIDTH, 40), (200, 180, 20)).save(odd)
    broken = root / "broken.png"
    broken.write_bytes(images["red"].read_bytes()[:60])  # a PNG cut short
    return {"good": copies(images, root / "good", 8), "odd": odd, "broken": broken, "missing": root / "missing.png"}


@pytest.fixture(scope="module")
def arguments(folder) -> list[str]:
    return [
        "-",
        *map(str, folder["good"][:4]),
        str(folder["broken"]),
        str(folder["odd"]),
        str(folder["missing"]),
        *map(str, folder["good"][4:]),
    ]


@pytest.fixture(scope="module")
def local(serve, tiny_model, arguments, images, tmp_path_factory):
    """The local `--each` of `arguments` (a model loaded here, as before this feature), run once;
    `--no-server` although the server can be found."""
    serve.url  # noqa: B018 - wait for the server first: the two model loads would fight for the CPUs
    result = run_llava(
        "ask",
        "--no-server",
        "--model",
        str(tiny_model),
        "-n",
        MAX_NEW,
        "--each",
        *arguments,
        "-p",
        PROMPT,
        stdin=images["blue"].read_bytes(),
        env=serve.client_env(),
    )
    assert result.returncode == 1, result.stderr_text
    return result


def without_seconds(records: list[dict]) -> list[dict]:
    assert all(isinstance(record["seconds"], float) for record in records if record["answer"] is not None)
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def local_lines(local, names: list[str]) -> list[dict]:
    """The local records of `names`, in that order."""
    by_image = {record["image"]: record for record in without_seconds(lines_of(local.stdout_text))}
    return [by_image[name] for name in names]


def test_through_llava_serve_every_line_is_the_local_line(serve, tiny_model, arguments, local, images):
    result = run_llava(
        "ask",
        "--server",
        serve.url,
        "--parallel",
        4,
        "--model",
        str(tiny_model),
        "-n",
        MAX_NEW,
        "--each",
        *arguments,
        "-p",
        PROMPT,
        stdin=images["blue"].read_bytes(),
        env=serve.client_env(),
    )

    assert (result.returncode, result.stderr_text) == (local.returncode, local.stderr_text)
    assert [list(record) for record in lines_of(result.stdout_text)] == [
        list(record) for record in lines_of(local.stdout_text)
    ]
    assert without_seconds(lines_of(result.stdout_text)) == without_seconds(lines_of(local.stdout_text))
    assert sum(record["answer"] is not None for record in lines_of(result.stdout_text)) == 10


def test_a_running_llava_serve_is_found_by_each_and_parallel_needs_a_server(
    serve, tiny_model, folder, local, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(serve.runtime))
    names = list(map(str, folder["good"][:3]))
    settings = Settings(
        model=str(tiny_model), max_new_tokens=MAX_NEW, verbose=True, chosen=frozenset({"max_new_tokens"})
    )

    assert (
        run_batch(names, settings, AskOptions(each=True, prompt=PROMPT, output=str(tmp_path / "a.jsonl"), batch_size=2))
        == 0
    )

    assert without_seconds(lines_of((tmp_path / "a.jsonl").read_text())) == local_lines(local, names)
    assert capsys.readouterr().err.splitlines() == [
        f"answering through the server at {serve.url}",
        f"note: answering through the llava serve at {serve.url}; --batch-size applies only with --no-server",
    ]
    with pytest.raises(
        UsageError, match=r"^--parallel 2 sends requests to a server: give --server URL or start `llava serve`"
    ):
        run_batch(
            names, Settings(model=str(tiny_model), no_server=True), AskOptions(each=True, prompt=PROMPT, parallel=2)
        )


class StandIn(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible server in front of `upstream` (a llava serve), misbehaving on purpose.

    `plan`: what the next requests get, in arrival order: an HTTP status (with `retry_after`), or
    "reset" (the connection closed without an answer); after the plan, requests are forwarded,
    except an image REFUSED_WIDTH wide (400) and, once `hold_after` were forwarded, every request
    waits for `release`. `log`: what each request got."""

    daemon_threads = True

    def __init__(
        self,
        upstream: str,
        plan: tuple[int | str, ...] = (),
        retry_after: str | None = None,
        hold_after: int | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.plan = list(plan)
        self.retry_after = retry_after
        self.hold_after = hold_after
        self.release = threading.Event()
        self.logged = threading.Condition()  # notified at each entry of `log`
        self.log: list[int | str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for_log(self, done: Callable[[list[int | str]], bool], timeout: float) -> bool:
        with self.logged:
            return self.logged.wait_for(lambda: done(self.log), timeout)

    def action(self, body: dict) -> int | str:
        with self.logged:
            if self.plan:
                action = self.plan.pop(0)
            elif image_width(body) == REFUSED_WIDTH:
                action = 400
            elif self.hold_after is not None and self.log.count("forward") >= self.hold_after:
                action = "hold"
            else:
                action = "forward"
            self.log.append(action)
            self.logged.notify_all()
            return action

    def handle_error(self, request, client_address) -> None:
        pass  # a held request whose client was interrupted: expected

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


def image_width(body: dict) -> int:
    content = body["messages"][-1]["content"]
    url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).width


class StandInHandler(http.server.BaseHTTPRequestHandler):
    server: StandIn

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        action = self.server.action(json.loads(data))
        if action == "reset":
            self.close_connection = True
            return
        if action == "hold":
            self.server.release.wait(60)
            action = "forward"
        if action == "forward":
            self.forward(data)
        else:
            self.refuse(action)

    def refuse(self, status: int) -> None:
        body = json.dumps({"error": {"message": f"stand-in says {status}", "type": "invalid_request_error"}}).encode()
        self.send_response(status)
        if self.server.retry_after is not None and status == 429:
            self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def forward(self, data: bytes) -> None:
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        upstream.request("POST", self.path, body=data, headers={"Content-Type": "application/json"})
        answer = upstream.getresponse()
        body = answer.read()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        upstream.close()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in(serve):
    made: list[StandIn] = []

    def make(**behaviour) -> StandIn:
        made.append(StandIn(serve.url, **behaviour))
        return made[-1]

    yield make
    for running in made:
        running.close()


def answer_through(url: str, model: Path, names: list[str], output: Path, parallel: int = 4) -> int:
    settings = Settings(model=str(model), max_new_tokens=MAX_NEW, server=url, chosen=frozenset({"max_new_tokens"}))
    return run_batch(names, settings, AskOptions(each=True, prompt=PROMPT, output=str(output), parallel=parallel))


def test_503_twice_429_with_retry_after_and_a_reset_are_retried_into_the_same_lines(
    stand_in, tiny_model, folder, local, tmp_path, capsys
):
    names = list(map(str, folder["good"][:6]))
    standing = stand_in(plan=[503, 503, 429, "reset"], retry_after="1")

    assert answer_through(standing.url, tiny_model, names, tmp_path / "out.jsonl") == 0

    assert without_seconds(lines_of((tmp_path / "out.jsonl").read_text())) == local_lines(local, names)
    assert standing.log == [503, 503, 429, "reset"] + ["forward"] * len(names)
    assert capsys.readouterr().err == ""


def test_an_image_the_server_refuses_gets_its_error_line_and_the_others_their_answers(
    stand_in, tiny_model, folder, local, tmp_path, capsys
):
    names = [str(folder["good"][0]), str(folder["odd"]), str(folder["good"][1])]
    standing = stand_in()

    assert answer_through(standing.url, tiny_model, names, tmp_path / "out.jsonl", parallel=3) == 1

    records = without_seconds(lines_of((tmp_path / "out.jsonl").read_text()))
    error = f"{folder['odd']}: {standing.url} refused the request: stand-in says 400"
    assert records[1] == {
        **local_lines(local, [names[1]])[0],
        "answer": None,
        "error": error,
        "prompt_tokens": None,
        "completion_tokens": None,
        "finish_reason": None,
    }
    assert [records[0], records[2]] == local_lines(local, [names[0], names[2]])
    assert capsys.readouterr().err.splitlines() == [f"llava: error: {error}"]


@pytest.mark.parametrize(
    "status, kind, message",
    [
        (401, UsageError, "refused the request (stand-in says 401); set LLAVA_API_KEY to the server's API key"),
        (404, ModelError, "stand-in says 404 (--model must name a model the server lists at /v1/models)"),
    ],
)
def test_a_refused_key_or_model_stops_the_run_at_once(stand_in, tiny_model, folder, tmp_path, status, kind, message):
    standing = stand_in(plan=[status] * 10)
    with pytest.raises(kind) as caught:
        answer_through(standing.url, tiny_model, list(map(str, folder["good"])), tmp_path / "out.jsonl", parallel=2)
    assert str(caught.value) == f"{standing.url}{': ' if status == 404 else ' '}{message}"
    assert (tmp_path / "out.jsonl").read_text() == ""  # the first image was refused: nothing before it to write
    assert len(standing.log) <= 3  # at most the requests already in flight, then none


def test_a_dead_server_gives_error_lines_for_the_images_sent_then_stops(tiny_model, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(batchserver, "FIRST_BACKOFF_S", 0.001)
    closed = QuietServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()  # nothing listens there any more: connections are refused
    names = list(map(str, folder["good"]))

    with pytest.raises(LlavaError) as caught:
        answer_through(url, tiny_model, names, tmp_path / "out.jsonl", parallel=2)

    records = lines_of((tmp_path / "out.jsonl").read_text())
    assert 1 <= len(records) <= 2  # those in flight when the first one gave up
    assert [record["image"] for record in records] == names[: len(records)]
    for record in records:
        assert record["error"] == (
            f"{record['image']}: cannot reach the server at {url} (Connection refused); "
            f"is `llava serve` running? (gave up after {MAX_ATTEMPTS} attempts)"
        )
    assert str(caught.value) == (
        f"stopped: the server at {url} did not answer after {MAX_ATTEMPTS} attempts; "
        f"{len(names) - len(records)} of {len(names)} images were not sent "
        "(run the same command with -o FILE again to finish them)"
    )


def test_ctrl_c_keeps_the_lines_finished_in_order_and_a_rerun_finishes_the_rest(
    stand_in, tiny_model, folder, local, tmp_path
):
    names = list(map(str, folder["good"]))
    output = tmp_path / "answers.jsonl"
    standing = stand_in(hold_after=3)
    command = [
        sys.executable,
        "-m",
        "llava_cli",
        "ask",
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--each",
        *names,
        "-p",
        PROMPT,
        "-o",
        str(output),
        "--server",
        standing.url,
        "--parallel",
        "4",
    ]
    env = cli_env(LLAVA_RUNTIME_DIR=str(tmp_path / "run"))
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    assert standing.wait_for_log(
        lambda log: log.count("hold") == 4, timeout=60
    )  # every request thread waits on the stand-in
    # Ctrl-C now: of the 3 answers that came back, those in input order may be in the file (which
    # requests arrived first decides how many); whatever is there is a finished prefix.
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=30)

    assert run.returncode == 130, stderr
    assert stdout == b"" and b"Traceback" not in stderr
    finished = lines_of(output.read_text())
    assert len(finished) <= 3
    assert [record["image"] for record in finished] == names[: len(finished)]

    standing.hold_after = None
    standing.release.set()
    rerun = subprocess.run(command, capture_output=True, env=env, timeout=60)

    skipped = (
        f"llava: skipping {len(finished)} of {len(names)} images, already answered in {output}\n" if finished else ""
    )
    assert (rerun.returncode, rerun.stdout, rerun.stderr.decode()) == (0, b"", skipped)
    assert without_seconds(lines_of(output.read_text())) == local_lines(local, names)  # every image once, in order


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["x.png", "hi", "--parallel", "4"],
            "--parallel 4: only with --each or --from-file, which answer images one by one",
        ),
        (["--each", "x.png", "-p", "hi", "--parallel", "0"], "--parallel must be between 1 and 64 (got 0)"),
        (["--each", "x.png", "-p", "hi", "--parallel", "65"], "--parallel must be between 1 and 64 (got 65)"),
        (
            ["--each", "x.png", "-p", "hi", "--server", "http://127.0.0.1:9", "--batch-size", "2"],
            "--batch-size 2 batches on a model loaded here; with --server, send requests at once with --parallel N",
        ),
    ],
)
@pytest.mark.slow  # starts a process
def test_parallel_and_batch_size_misuse_is_a_usage_error(args, message, tmp_path):
    result = run_llava("ask", *args, env=cli_env(LLAVA_RUNTIME_DIR=str(tmp_path)))
    assert (result.returncode, result.stdout_text, result.stderr_text) == (2, "", f"llava: error: {message}\n")


def test_retry_delays_double_from_half_a_second_and_follow_retry_after_up_to_the_cap():
    assert [retry_delay(attempt) for attempt in range(1, MAX_ATTEMPTS)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert retry_delay(9) == 8.0
    assert [retry_delay(1, seconds) for seconds in (0.0, 3.0, 120.0)] == [0.0, 3.0, 8.0]
    assert [seconds_to_wait(value) for value in (None, "", "2", "1.5", "-4", "soon")] == [
        None,
        None,
        2.0,
        1.5,
        0.0,
        None,
    ]
    assert seconds_to_wait("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: at once
    assert 55 < seconds_to_wait(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))) <= 60


# --- what the answer must be, sent to the server: a schema (response_format) and stops (issue 23) -----------

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer"}},
    "required": ["colour", "size"],
}
SHAPED_NEW = 40  # room for the schema's JSON to end


def ask_both(serve, tiny_model, image: Path, *args: str):
    """`llava ask IMAGE PROMPT ARGS` answered by a model loaded here, then through the server."""
    common = ("ask", str(image), PROMPT, "--model", str(tiny_model), "-n", SHAPED_NEW, "--no-save", *args)
    local = run_llava(*common, "--no-server", env=serve.client_env())
    assert (local.returncode, local.stderr_text) == (
        0,
        "",
    )  # no loading bar either, although xgrammar imported transformers first
    return local, run_llava(*common, "--server", serve.url, env=serve.client_env())


@pytest.mark.parametrize(
    "args", [("--schema", json.dumps(SCHEMA), "--json"), ("--format", "json")], ids=["schema", "format json"]
)
def test_a_schema_is_sent_to_the_server_and_its_answer_is_the_local_one(serve, tiny_model, images, args):
    pytest.importorskip("xgrammar")
    local, remote = ask_both(serve, tiny_model, images["red"], *args)
    assert (remote.returncode, remote.stderr_text) == (0, "")
    if "--json" in args:
        answer = json.loads(local.stdout_text)["answer"]
        assert set(answer) == {"colour", "size"} and answer["colour"] in (
            "red",
            "green",
            "blue",
        )  # the schema was followed
        assert json.loads(remote.stdout_text)["answer"] == answer
    else:
        assert isinstance(json.loads(local.stdout_text), dict)
        assert remote.stdout_text == local.stdout_text


def test_a_stop_is_sent_to_the_server_and_its_answer_ends_where_the_local_one_does(serve, tiny_model, images):
    free = run_llava(
        "ask",
        str(images["red"]),
        PROMPT,
        "--model",
        str(tiny_model),
        "-n",
        SHAPED_NEW,
        "--no-save",
        "--no-server",
        env=serve.client_env(),
    )
    text = free.stdout_text.strip()
    stop = text.split()[-1]
    assert text.index(stop) > 0, text  # the answer has text before its stop
    local, remote = ask_both(serve, tiny_model, images["red"], "--stop", stop, "--stop", "never in it \x01")
    assert local.stdout_text.strip() == text[: text.index(stop)].strip()
    assert (remote.returncode, remote.stdout_text, remote.stderr_text) == (0, local.stdout_text, "")


def test_each_through_the_server_with_a_schema_gives_the_local_records(serve, tiny_model, folder):
    pytest.importorskip("xgrammar")
    common = (
        "ask",
        "--model",
        str(tiny_model),
        "-n",
        SHAPED_NEW,
        "--each",
        *map(str, folder["good"][:3]),
        str(folder["odd"]),
        "-p",
        PROMPT,
        "--schema",
        json.dumps(SCHEMA),
    )
    local = run_llava(*common, "--no-server", env=serve.client_env())
    remote = run_llava(*common, "--server", serve.url, "--parallel", 2, env=serve.client_env())
    assert local.returncode == 0, local.stderr_text
    assert all(isinstance(record["answer"], dict) for record in lines_of(local.stdout_text))
    assert (remote.returncode, remote.stderr_text) == (0, local.stderr_text)
    assert without_seconds(lines_of(remote.stdout_text)) == without_seconds(lines_of(local.stdout_text))


def test_chat_schema_command_is_sent_to_the_server_and_its_answers_are_the_local_ones(serve, tiny_model, images):
    pytest.importorskip("xgrammar")
    lines = f"/schema {json.dumps(SCHEMA)}\n{PROMPT}\n/schema off\nAnd now?\n"
    common = (
        "chat",
        "--image",
        str(images["red"]),
        "--json",
        "--no-save",
        "--model",
        str(tiny_model),
        "-n",
        SHAPED_NEW,
    )
    local = run_llava(*common, "--no-server", stdin=lines, env=serve.client_env())
    remote = run_llava(*common, "--server", serve.url, stdin=lines, env=serve.client_env())
    assert (local.returncode, local.stderr_text) == (0, ""), local.stderr_text
    answers = [record["answer"] for record in lines_of(local.stdout_text)]
    assert (
        len(answers) == 2 and isinstance(answers[0], dict) and isinstance(answers[1], str)
    )  # under the schema, then free
    assert (remote.returncode, remote.stderr_text) == (0, "")
    assert [record["answer"] for record in lines_of(remote.stdout_text)] == answers
