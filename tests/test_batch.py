"""`llava ask --each` / `--from-file`: one answer per image, batched, resumable, shell-friendly.

Answers are checked against plain transformers greedy decoding of each image alone (`reference`);
the real command runs in a few subprocesses where the subject is the process itself (pipes,
signals, stdin, exit codes), everything else runs in-process.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from helpers import (
    QuietServer,
    cli_env,
    copies,
    default_sigint,
    lines_of,
    render_llava15,
    run_llava,
    slow_fixture,
)

from llava_cli.ask.each import BatchProgress, run_batch
from llava_cli.ask.one import sigterm_as_interrupt
from llava_cli.base.errors import InputError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.engine.pipeline import forward
from llava_cli.engine.runner import Prompt
from llava_cli.engine.scheduler import DecodeBatch, answers_in_order
from llava_cli.frontend.arguments import ANSWERABLE_SUFFIXES, AskOptions
from llava_cli.frontend.output import json_line
from llava_cli.frontend.records import RECORD_KEYS, RecordFile, make_record
from llava_cli.media.images import load_image
from llava_cli.media.urls import fetch_image_url
from llava_cli.prompt.conversation import Conversation

MAX_NEW = 10
PROMPT = "describe the picture"


@pytest.fixture(scope="module")
def settings(tiny_model) -> Settings:
    return Settings(model=str(tiny_model), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def engine(tiny_loaded) -> Engine:
    return Engine(tiny_loaded)


@pytest.fixture(scope="module")
def expected(reference, images):
    """The answer plain transformers gives for `PROMPT` about each test image alone."""
    prompt = render_llava15([(PROMPT, 1, None)])
    return {name: reference.answer(prompt, [path], MAX_NEW) for name, path in images.items()}


class ImageServer(http.server.BaseHTTPRequestHandler):
    """GET /NAME serves routes[NAME]; /slow answers late; anything else is a 404."""

    routes: dict[str, bytes] = {}

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(1.5)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if not self.path.startswith("/no-length"):  # else the body simply ends when the connection closes
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@slow_fixture(scope="module")  # an HTTP server
def server(images):
    green = images["green"].read_bytes()
    ImageServer.routes = {"/green.png": green, "/no-length-big": b"x" * 5000, "/big": b"x" * 5000, "/slow": green}
    httpd = QuietServer(("127.0.0.1", 0), ImageServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# Batched generation -----------------------------------------------------------------------------


def test_a_batch_of_prompts_of_different_lengths_answers_each_as_plain_transformers_alone(
    engine, settings, reference, images
):
    questions = [
        ("describe", "red"),
        ("what is in this image? describe the picture in detail", "green"),
        ("how many objects are there?", "blue"),
        ("hi", "red"),
    ]
    prompts = []
    for text, colour in questions:
        conversation = Conversation()
        conversation.ask(text, [load_image(str(images[colour]))])
        prompts.append(engine.encode(conversation))
    assert len({len(prompt.ids) for prompt in prompts}) == 4  # every row is padded differently

    answers = together(engine, prompts, settings)

    for (text, colour), answer, prompt in zip(questions, answers, prompts):
        assert answer.text == reference.answer(render_llava15([(text, 1, None)]), [images[colour]], MAX_NEW)
        assert answer.prompt_tokens == len(prompt.ids)
        assert answer.completion_tokens == MAX_NEW and answer.finish_reason == "length"


def test_each_row_stops_at_its_own_budget(engine, settings, reference, images):
    """A longer prompt has less room in a small context window: its row ends earlier, as alone."""
    red, green = (Conversation(), Conversation())
    red.ask("hi", [load_image(str(images["red"]))])
    green.ask("what is in this image? describe the picture in detail", [load_image(str(images["green"]))])
    prompts = [engine.encode(red), engine.encode(green)]
    tight = Settings(model=settings.model, max_new_tokens=MAX_NEW, max_context=len(prompts[1].ids) + 3)

    short, long = together(engine, prompts, tight)

    assert (short.completion_tokens, long.completion_tokens) == (MAX_NEW, 3)
    assert long.text == reference.answer(render_llava15([(green.turns[0].text, 1, None)]), [images["green"]], 3)


def together(engine: Engine, prompts: list[Prompt], settings: Settings, rows: int | None = None) -> list:
    """Each prompt's answer from the scheduler, `rows` (default: all) decoding at once."""
    return list(
        answers_in_order(engine, [lambda prompt=prompt: prompt for prompt in prompts], settings, rows or len(prompts))
    )


def test_a_row_that_ends_is_replaced_at_once_and_every_answer_stays_the_one_alone(
    engine, settings, reference, images, monkeypatch
):
    """Continuous admission: with prompts waiting, every decode step runs `rows` rows (fixed batches
    would run a short answer's batch on with a row missing until its longest answer ends)."""
    questions = [
        ("hi", "red"),
        ("what is in this image? describe the picture in detail", "green"),
        ("describe", "blue"),
        ("how many objects are there?", "red"),
        ("what colour?", "green"),
    ]
    prompts = []
    for text, colour in questions:
        conversation = Conversation()
        conversation.ask(text, [load_image(str(images[colour]))])
        prompts.append(engine.encode(conversation))
    window = max(len(prompt.ids) for prompt in prompts) + 2
    tight = Settings(model=settings.model, max_new_tokens=MAX_NEW, max_context=window)
    budgets = [min(MAX_NEW, window - len(prompt.ids)) for prompt in prompts]
    assert len(set(budgets)) > 2  # answers of different lengths
    admitted, step_rows = [], []
    admit, step = DecodeBatch.admit, DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "admit", lambda batch, *args: (admitted.append(1), admit(batch, *args))[1])
    monkeypatch.setattr(
        DecodeBatch, "step", lambda batch: (step_rows.append((len(batch), len(admitted))), step(batch))[1]
    )

    answers = together(engine, prompts, tight, rows=2)

    assert all(rows == 2 for rows, seen in step_rows if seen < len(prompts)) and step_rows[-1][0] == 1
    for (text, colour), answer, budget in zip(questions, answers, budgets):
        assert answer.text == reference.answer(render_llava15([(text, 1, None)]), [images[colour]], budget)
        assert answer.completion_tokens == budget


def test_out_of_memory_fails_only_the_images_it_hit_and_the_run_goes_on(
    engine, settings, reference, images, monkeypatch
):
    """Out of memory in one image's prefill fails that image; in a decode step, the step runs again row
    by row and only a row that runs out alone too fails; every other image is answered as alone."""
    import torch

    from llava_cli.engine import scheduler as decodebatch

    questions = [("hi", "red"), ("describe", "green"), ("how many objects are there?", "blue"), ("what colour?", "red")]
    prompts = []
    for text, colour in questions:
        conversation = Conversation()
        conversation.ask(text, [load_image(str(images[colour]))])
        prompts.append(engine.encode(conversation))
    doomed_prefill, steps = len(prompts[0].ids), []

    def forward_or_run_out(model, cache, padded, image_inputs):
        if padded.ids.shape == (1, doomed_prefill):
            raise torch.OutOfMemoryError("out of memory (simulated)")
        if padded.ids.shape[1] == 1:
            steps.append(padded.ids.shape[0])
            if len(steps) in (2, 3):  # the second decode step (rows 1 and 2), then row 1 alone
                raise torch.OutOfMemoryError("out of memory (simulated)")
        return forward(model, cache, padded, image_inputs)

    monkeypatch.setattr(decodebatch, "forward", forward_or_run_out)
    results = together(engine, prompts, settings, rows=2)

    assert [type(result).__name__ for result in results] == [
        "ResourceError",
        "ResourceError",
        "BatchAnswer",
        "BatchAnswer",
    ]
    assert (
        str(results[0]).startswith("out of memory")
        and str(results[1]).startswith("out of memory")
        and steps[:4] == [2, 2, 1, 1]
    )
    for place in (2, 3):
        text, colour = questions[place]
        assert results[place].text == reference.answer(render_llava15([(text, 1, None)]), [images[colour]], MAX_NEW)


# The command line: one subprocess per behaviour that only a real process shows --------------------


def test_mixed_batch_stdin_url_broken_and_missing_images(images, image_dir, server, expected, tmp_path, hf_home):
    broken = tmp_path / "broken.png"
    broken.write_bytes(images["red"].read_bytes()[:60])  # a PNG cut short
    args = ["-", f"{server}/green.png", str(broken), f"{server}/missing.png", str(images["blue"])]

    result = run_llava(
        "ask",
        "--model",
        "llava-tests/tiny-llava",
        "-n",
        MAX_NEW,
        "--each",
        *args,
        "-p",
        PROMPT,
        "--batch-size",
        2,
        stdin=images["red"].read_bytes(),
        env=cli_env(HF_HOME=str(hf_home)),
    )

    assert result.returncode == 1, result.stderr_text
    records = lines_of(result.stdout_text)
    assert [r["image"] for r in records] == args
    assert all(list(r) == list(RECORD_KEYS) for r in records)
    assert [r["answer"] for r in records] == [expected["red"], expected["green"], None, None, expected["blue"]]
    assert records[2]["error"].startswith(f"{broken} is truncated or corrupt")
    assert records[3]["error"] == f"cannot fetch {server}/missing.png: HTTP 404 Not Found"
    assert [r["error"] is None for r in records] == [True, True, False, False, True]
    assert all(r["prompt"] == PROMPT and r["completion_tokens"] == MAX_NEW for r in records if r["answer"])
    assert result.stderr_text.splitlines() == [
        f"llava: error: {records[2]['error']}",
        f"llava: error: {records[3]['error']}",
    ]


def llava_command(*args) -> list[str]:
    return [sys.executable, "-m", "llava_cli", "ask", "--model", "llava-tests/tiny-llava", *map(str, args)]


def test_a_list_piped_in_and_head_closing_the_pipe_end_quietly(images, tmp_path, hf_home, expected):
    paths = copies(images, tmp_path / "many", 30)
    command = " ".join(map(str, llava_command("-n", MAX_NEW, "--from-file", "-", "-p", f"'{PROMPT}'")))
    listing = " ".join(map(str, paths))
    script = (
        f"printf '%s\\n' {listing} | {command} 2>{tmp_path / 'stderr'} | head -1; echo \"status=${{PIPESTATUS[1]}}\""
    )

    result = subprocess.run(["bash", "-c", script], capture_output=True, env=cli_env(HF_HOME=str(hf_home)), timeout=120)

    first, status = result.stdout.decode().splitlines()
    assert json.loads(first)["answer"] == expected["red"]
    assert status in ("status=0", "status=141")
    assert (tmp_path / "stderr").read_text() == ""  # no traceback, no "Broken pipe" message


def test_sigint_keeps_finished_lines_and_a_rerun_finishes_the_rest(images, tmp_path, hf_home, expected):
    paths = copies(images, tmp_path / "many", 12)
    output = tmp_path / "answers.jsonl"
    command = llava_command("-n", MAX_NEW, "--each", *paths, "-p", PROMPT, "-o", output)
    env = cli_env(HF_HOME=str(hf_home))
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (output.exists() and output.read_bytes().count(b"\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)

    assert run.returncode == 130, stderr
    assert stdout == b"" and b"Traceback" not in stderr
    finished = lines_of(output.read_text())
    assert 2 <= len(finished) < len(paths)
    assert [r["image"] for r in finished] == list(map(str, paths[: len(finished)]))
    stop = f"llava: stopped at {len(finished)}/{len(paths)}; rerun the same command to resume (the answers so far are in {output})"
    assert stderr.decode().split("\n")[0] == stop

    # A run killed inside a write leaves half a line: it is cut off and that image redone.
    with output.open("ab") as file:
        file.write(json.dumps({"image": str(paths[len(finished)]), "prompt": PROMPT}).encode()[:30])
    result = subprocess.run(command + ["--batch-size", "8"], capture_output=True, env=env, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert (
        result.stderr.decode()
        == f"llava: skipping {len(finished)} of {len(paths)} images, already answered in {output}\n"
    )
    records = lines_of(output.read_text())
    assert [r["image"] for r in records] == list(map(str, paths))
    assert [r["answer"] for r in records] == [expected[path.stem.split("-")[1]] for path in paths]


# In-process: options, resume files, URLs, signals, progress, text output ------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(output="a.jsonl"), "-o a.jsonl: only with --each or --from-file, which answer images one by one"),
        (dict(batch_size=4), "--batch-size 4: only with --each or --from-file, which answer images one by one"),
        (
            dict(output="a.jsonl", batch_size=4),
            "-o a.jsonl and --batch-size 4: only with --each or --from-file, which answer images one by one",
        ),
        (dict(each=True, batch_size=0), "--batch-size must be between 1 and 256 (got 0)"),
        (
            dict(each=True, output="a.jsonl", output_format="text"),
            "-o writes JSON lines or CSV (so that a rerun can resume); drop --output-format text",
        ),
        (dict(json=True, output_format="text"), "--json and --output-format text exclude each other: pick one"),
        (dict(output_format="yaml"), "--output-format must be one of text, json, jsonl, csv (got 'yaml')"),
    ],
)
def test_bad_option_combinations_are_usage_errors(options, message):
    with pytest.raises(UsageError) as caught:
        AskOptions(**options)
    assert str(caught.value) == message


def test_output_format_defaults():
    assert AskOptions().format == "text"
    assert AskOptions(json=True).format == "json"
    assert AskOptions(each=True).format == "jsonl"
    assert AskOptions(from_file="-", output_format="text").format == "text"


def record_line(image: str, answer: str | None = "an answer", prompt: str = PROMPT) -> str:
    error = None if answer is not None else "broken"
    return json.dumps({"image": image, "prompt": prompt, "answer": answer, "error": error}) + "\n"


def read_answered(path: Path) -> set[tuple[str, str]]:
    """What a rerun with `-o path` skips (opening the file cuts a half-written last line)."""
    records = RecordFile(path)
    records.close()
    return records.done


def test_resume_reads_answers_and_cuts_a_half_written_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = record_line("a.png") + record_line("b.png", answer=None) + record_line("c.png", prompt="other")
    path.write_text(whole + record_line("d.png")[:25])

    assert read_answered(path) == {("a.png", PROMPT), ("c.png", "other")}  # b failed: it is retried
    assert path.read_text() == whole


@pytest.mark.parametrize(
    "content",
    ["my notes\nabout things\n", '{"image": "a.png"}\n', "# a list\nno newline", '{"image": "a.png"}\n{"image": "b'],
)
def test_resume_refuses_a_file_that_is_not_a_llava_answer_file(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(UsageError, match="choose another -o"):
        read_answered(path)
    assert path.read_text() == content  # never touched


def test_a_file_name_that_is_not_utf8_gives_valid_utf8_json_that_reads_back(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as argv delivers them: a surrogate escape
    line = json_line(make_record(name, PROMPT, "m", answer="ok"))
    line.decode("utf-8")  # strict: valid UTF-8
    path = tmp_path / "out.jsonl"
    path.write_bytes(line)
    assert read_answered(path) == {(name, PROMPT)}


def test_url_images_are_fetched(server, images):
    image = fetch_image_url(f"{server}/green.png")
    assert image.digest == hashlib.sha256(images["green"].read_bytes()).hexdigest()
    assert image.image.size == load_image(str(images["green"])).image.size


@pytest.mark.parametrize(
    "route, limits, message",
    [
        ("/missing.png", {}, "cannot fetch {url}: HTTP 404 Not Found"),
        ("/big", {"max_bytes": 1000}, "{url} is larger than 1,000 bytes; is it really an image?"),
        ("/no-length-big", {"max_bytes": 1000}, "{url} is larger than 1,000 bytes; is it really an image?"),
        ("/slow", {"timeout": 0.3}, "cannot fetch {url}: no complete answer within 0.3 s"),
    ],
)
def test_url_failures_are_one_line_input_errors(server, route, limits, message):
    url = f"{server}{route}"
    with pytest.raises(InputError) as caught:
        fetch_image_url(url, **limits)
    assert str(caught.value) == message.format(url=url)


def test_credentials_in_a_url_are_not_shown(server):
    with pytest.raises(InputError) as caught:
        fetch_image_url(server.replace("http://", "http://user:s3cret@") + "/missing.png")
    assert "s3cret" not in str(caught.value) and "user" not in str(caught.value)


def test_sigterm_interrupts_like_ctrl_c_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert signal.getsignal(signal.SIGTERM) is before


def test_progress_bar_shows_count_rate_and_errors_on_a_terminal():
    from rich.console import Console

    screen = StringIO()
    with BatchProgress(3, console=Console(file=screen, force_terminal=True, width=100)) as progress:
        progress.advance()
        progress.report("llava: error: image not found: x.png")
        progress.advance()
    shown = screen.getvalue()
    assert "2/3" in shown and "images/s" in shown and "ETA" in shown
    assert "llava: error: image not found: x.png" in shown


def test_text_output_from_a_file_list(settings, images, expected, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images['blue']}\n\n{images['red']}\n")
    options = AskOptions(from_file=str(listing), output_format="text", batch_size=2)

    code = run_batch([PROMPT], settings, options)

    assert code == 0
    out = capsys.readouterr().out
    # Tabs and whatever `splitlines` takes for a line end (a form feed, U+2028...) become one space (issue 28).
    one_line = {name: as_one_line(answer) for name, answer in expected.items()}
    assert out == f"{images['blue']}\t{one_line['blue']}\n{images['red']}\t{one_line['red']}\n"


def test_each_folder_answers_its_images_sorted_and_skips_the_rest_with_a_line_each(
    settings, images, expected, tmp_path, capsys
):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, colour in [("b.png", "green"), ("a.PNG", "red"), ("sub/c.png", "blue"), (".hidden.png", "red")]:
        shutil.copy(images[colour], folder / name)
    (folder / "notes.txt").write_text("not a picture")
    one_line = {name: as_one_line(answer) for name, answer in expected.items()}

    assert run_batch([str(folder), PROMPT], settings, AskOptions(each=True, output_format="text", batch_size=2)) == 0
    out, err = capsys.readouterr()
    assert out == f"{folder / 'a.PNG'}\t{one_line['red']}\n{folder / 'b.png'}\t{one_line['green']}\n"
    assert llava_lines(err) == [
        f"llava: skipping {folder / 'notes.txt'}: not an image or a video ({', '.join(sorted(ANSWERABLE_SUFFIXES))})",
        f"llava: skipping {folder / 'sub'}: a folder (--recursive includes its images)",
    ]

    assert run_batch([str(folder), PROMPT], settings, AskOptions(each=True, output_format="text", recursive=True)) == 0
    out, err = capsys.readouterr()
    lines = out.split("\n")
    assert [line.split("\t")[0] for line in lines] == [
        str(folder / name) for name in ("a.PNG", "b.png", "sub/c.png")
    ] + [""]
    assert lines[2] == f"{folder / 'sub/c.png'}\t{one_line['blue']}"
    assert llava_lines(err) == [
        f"llava: skipping {folder / 'notes.txt'}: not an image or a video ({', '.join(sorted(ANSWERABLE_SUFFIXES))})"
    ]


def as_one_line(answer: str) -> str:
    """An answer as `--output-format text` writes it: every kind of line break (and tab) one space."""
    return re.sub(r"\s*[\r\n\t\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+\s*", " ", answer)


def llava_lines(stderr: str) -> list[str]:
    """llava's own lines on stderr (in-process, transformers' loading bar lands there too)."""
    return [line for line in stderr.splitlines() if line.startswith("llava:")]


def test_each_folder_without_images_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.png").write_bytes(b"")
    no_model = Settings(model=str(tmp_path / "no-such-model"))
    with pytest.raises(UsageError) as caught:
        run_batch([str(tmp_path / "empty"), PROMPT], no_model, AskOptions(each=True))
    assert (
        str(caught.value)
        == f"no images in the folder {tmp_path / 'empty'} (1 other entries; --recursive looks in its subfolders)"
    )
    with pytest.raises(UsageError, match="--recursive: only with --each"):
        AskOptions(recursive=True)


def test_ctrl_c_without_o_says_where_it_stopped_and_how_to_resume(settings, images, monkeypatch, capsys):
    def two_then_ctrl_c(names, *args):
        for name in names[:2]:
            yield make_record(name, PROMPT, settings.model, answer="a")
        raise KeyboardInterrupt

    monkeypatch.setattr("llava_cli.ask.each.record_source", two_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_batch([*map(str, images.values()), PROMPT], settings, AskOptions(each=True))
    assert capsys.readouterr().err == "llava: stopped at 2/3; rerun with -o FILE to resume\n"
