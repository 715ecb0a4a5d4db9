"""`llava ask --each ... --ray ADDRESS`: a Ray Data pipeline that writes exactly the lines of a local
`--each` (minus the `seconds` figure), survives an actor's death and a driver's, and says how to
install Ray when it is missing.

One Ray head serves the whole module (`ray start --head`, 2 CPUs, its own temp dir and port; its
processes are ended by their ids at the end); the real `llava` command joins it with
`--ray 127.0.0.1:PORT`. The reference is the real command's local `--each` on the same images.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import cli_env, copies, default_sigint, run_llava, slow_fixture

from llava_cli.ask.each import record_of
from llava_cli.ask.via_ray import (
    INSTALL_HINT,
    TASK_RETRIES,
    block_count,
    checked_result,
    in_input_order,
    wire,
)
from llava_cli.base.errors import ContextError, LlavaError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine.scheduler import BatchAnswer
from llava_cli.frontend.arguments import AskOptions
from llava_cli.frontend.records import RECORD_KEYS

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8
PROMPT = "describe the picture"
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is an optional extra: pip install -e '.[test]'")
ACTOR_TITLE = (
    b"ImageAnswerer"  # Ray names an actor's process after its class: ray::MapWorker(MapBatches(ImageAnswerer))
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_of_session(session: int) -> list[int]:
    """The live processes of `session`: the head's and everything it started (workers keep it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return found


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@slow_fixture(scope="module")  # a Ray head
def cluster():
    """A Ray head on this machine, for the module: (address, session id of its processes)."""
    temp = tempfile.mkdtemp(prefix="llava-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    # The workers import this checkout. Token authentication off: Ray turns it on when a token is in
    # ~/.ray, and a client must then be given the token.
    env = cli_env(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), RAY_AUTH_MODE="disabled"
    )
    start = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    head = subprocess.Popen(start, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    session = head.pid  # start_new_session: this pid is the session of all the head starts
    _, errors = head.communicate(timeout=120)
    assert head.returncode == 0, errors.decode(errors="replace")
    yield f"127.0.0.1:{port}", session
    for pid in processes_of_session(session):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def good_images(images, tmp_path_factory) -> list[str]:
    """Sixteen distinct files cycling through the test images, so a kill lands mid-run."""
    return list(map(str, copies(images, tmp_path_factory.mktemp("good"), 16)))


@pytest.fixture(scope="module")
def mixed_images(images, tmp_path_factory) -> list[str]:
    """Good images, stdin, a PNG cut short, a text file named .png, a missing file: in that mix."""
    folder = tmp_path_factory.mktemp("mixed")
    good = list(map(str, copies(images, folder, 5)))
    broken = folder / "broken.png"
    broken.write_bytes(images["red"].read_bytes()[:60])
    text = folder / "notes.png"
    text.write_text("not an image\n")
    return [good[0], "-", str(broken), good[1], str(text), good[2], str(folder / "missing.png"), good[3], good[4]]


def ask_each(model: Path, names: list[str], *options: object) -> list[str]:
    return ["ask", "--model", str(model), "-n", str(MAX_NEW), "--each", *names, "-p", PROMPT, *map(str, options)]


def llava_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "llava_cli", *args]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def records_of(data: bytes | str) -> list[dict]:
    text = data.decode() if isinstance(data, bytes) else data
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def local_mixed(tiny_model, mixed_images, images):
    """The real command's local --each over the mixed images: the lines --ray must write."""
    result = run_llava(*ask_each(tiny_model, mixed_images), stdin=images["red"].read_bytes())
    assert result.returncode == 1, result.stderr_text
    return result


@pytest.fixture(scope="module")
def local_good(tiny_model, good_images):
    result = run_llava(*ask_each(tiny_model, good_images), "--batch-size", "4")
    assert result.returncode == 0, result.stderr_text
    return records_of(result.stdout)


# The pipeline against a running head ------------------------------------------------------------


@needs_ray
def test_ray_each_with_two_actors_writes_the_lines_of_local_each(
    cluster, tiny_model, mixed_images, images, local_mixed
):
    address, _ = cluster
    result = run_llava(
        *ask_each(tiny_model, mixed_images, "--ray", address, "--actors", 2, "--batch-size", 2),
        stdin=images["red"].read_bytes(),
        timeout=300,
    )

    assert result.returncode == 1, result.stderr_text
    records = records_of(result.stdout)
    expected = records_of(local_mixed.stdout)
    assert without_seconds(records) == without_seconds(expected)
    assert all(list(record) == list(RECORD_KEYS) for record in records)
    assert [record["error"] is None for record in records] == [True, True, False, True, False, True, False, True, True]
    assert result.stderr_text == local_mixed.stderr_text  # the same error lines, and nothing of Ray's


@needs_ray
def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(cluster, tiny_model, good_images, local_good, tmp_path):
    address, session = cluster
    output = tmp_path / "answers.jsonl"
    # One image per block: sixteen blocks, so the kill lands mid-run however fast the answers come.
    run = subprocess.Popen(
        llava_process(
            *ask_each(tiny_model, good_images, "--ray", address, "--actors", 2, "--batch-size", 1, "-o", output)
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 240
    actors: list[int] = []
    while not actors and time.monotonic() < deadline:  # found before the first answer: the kill follows it at once
        actors = [pid for pid in processes_of_session(session) if ACTOR_TITLE in command_line(pid)]
        time.sleep(0.01)
    assert actors, "no actor process found"
    while not (output.exists() and output.read_bytes().count(b"\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(actors[0], signal.SIGKILL)
    written_before = output.read_bytes().count(b"\n")
    stdout, stderr = run.communicate(timeout=300)

    assert written_before < len(good_images)  # it died mid-run
    assert run.returncode == 0, stderr.decode(errors="replace")
    assert stdout == b"" and stderr == b""
    assert without_seconds(records_of(output.read_text())) == without_seconds(local_good)


@needs_ray
def test_a_killed_driver_is_resumed_by_running_it_again(cluster, tiny_model, good_images, local_good, tmp_path):
    address, _ = cluster
    output = tmp_path / "answers.jsonl"
    command = llava_process(*ask_each(tiny_model, good_images, "--ray", address, "--actors", 1, "-o", output))
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_sigint
    )
    deadline = time.monotonic() + 240
    while not (output.exists() and output.read_bytes().count(b"\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    run.kill()
    run.communicate(timeout=60)
    finished = records_of(output.read_bytes().rpartition(b"\n")[0] + b"\n")
    assert 1 <= len(finished) < len(good_images)

    rerun = subprocess.run(command, capture_output=True, env=cli_env(), timeout=300, preexec_fn=default_sigint)

    assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")
    assert rerun.stdout == b""
    assert (
        rerun.stderr.decode()
        == f"llava: skipping {len(finished)} of {len(good_images)} images, already answered in {output}\n"
    )
    assert without_seconds(records_of(output.read_text())) == without_seconds(local_good)


@needs_ray
def test_actors_that_cannot_start_stop_the_run_with_one_line(cluster, tiny_model, good_images):
    """One GPU per actor on a cluster without GPUs: a one-line error once the wait is over."""
    address, _ = cluster
    argv = ["llava", *ask_each(tiny_model, good_images[:2], "--ray", address, "--gpus-per-actor", 1)]
    script = f"import sys, llava_cli.ask.via_ray as b; b.ACTOR_START_TIMEOUT_S = 3; sys.argv = {argv!r}; from llava_cli.cli import main; main()"

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, env=cli_env(), timeout=120)

    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "llava: error: the Ray actors did not start within 3 s: the cluster lacks the CPUs, GPUs or memory they ask for; "
        "lower --actors or --gpus-per-actor, or add nodes\n"
    )


@needs_ray
def test_a_model_the_workers_cannot_load_stops_the_run_with_its_own_error(cluster, tmp_path, good_images):
    address, _ = cluster
    args = ["ask", "--model", str(tmp_path / "no-such-model"), "--each", good_images[0], "-p", PROMPT]
    local = run_llava(*args)

    result = run_llava(*args, "--ray", address, "--actors", 1, timeout=300)

    assert (local.returncode, result.returncode) == (2, 2)
    assert result.stdout == b""
    assert result.stderr_text == local.stderr_text.replace("llava: error: ", "llava: error: on the Ray workers: ", 1)
    assert len(result.stderr_text.splitlines()) == 1


@needs_ray
def test_ray_local_starts_an_instance_here(tiny_model, good_images, local_good, tmp_path):
    """HOME: a new local instance turns Ray's token authentication on, writing a token to ~/.ray."""
    args = ask_each(tiny_model, good_images[:3], "--ray", "local", "--actors", 1, "--batch-size", 3)
    result = run_llava(*args, env=cli_env(HOME=str(tmp_path)), timeout=300)

    assert result.returncode == 0, result.stderr_text
    assert result.stderr == b""
    assert without_seconds(records_of(result.stdout)) == without_seconds(local_good[:3])


# Without a cluster ------------------------------------------------------------------------------


@pytest.mark.slow  # starts a process
def test_without_ray_installed_the_error_says_how_to_install_it(images):
    argv = ["llava", "ask", "--each", str(images["red"]), "-p", PROMPT, "--ray", "local"]
    script = f"import sys; sys.modules['ray'] = None; sys.argv = {argv!r}; from llava_cli.cli import main; main()"

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, env=cli_env(), timeout=60)

    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == f"llava: error: {INSTALL_HINT}\n"
    assert "pip install 'llava-cli[ray]'" in INSTALL_HINT and "pip install -e '.[ray]'" in INSTALL_HINT


def test_records_are_written_once_each_in_input_order_and_a_lost_block_is_an_error_line():
    rows = [(0, "a"), (1, "b"), (0, "a again"), (4, "e"), (5, "f"), (4, "e again")]  # 2 and 3: a block that failed

    assert list(in_input_order(7, rows)) == [(0, "a"), (1, "b"), (2, None), (3, None), (4, "e"), (5, "f"), (6, None)]


def test_a_lost_image_gets_an_error_record_that_a_rerun_retries():
    settings = Settings(model="m")
    record = record_of("b.png", PROMPT, settings, checked_result("b.png", None))

    assert list(record) == list(RECORD_KEYS)
    assert (record["image"], record["prompt"], record["model"], record["answer"]) == ("b.png", PROMPT, "m", None)
    assert record["error"] == (
        f"b.png: no answer came back from the Ray cluster (its block failed {TASK_RETRIES + 1} times); run again to retry it"
    )


def test_an_actor_sends_the_schedulers_typed_results_and_the_driver_makes_the_records():
    answer = BatchAnswer("hi", 7, 2, "stop", 1.5, ({"name": "clip.mp4", "frames": 8, "tokens": 64},))
    failed = ContextError("a.png: the prompt with its image needs 900 tokens but the context window is 512")

    assert checked_result("a.png", wire(answer)) == answer
    returned = checked_result("a.png", wire(failed))
    assert type(returned) is LlavaError and str(returned) == str(failed)
    assert record_of("a.png", PROMPT, Settings(model="m"), checked_result("a.png", wire(answer))) == record_of(
        "a.png", PROMPT, Settings(model="m"), answer
    )


@pytest.mark.parametrize(
    "images, batch_size, actors, blocks", [(1, 1, 2, 1), (8, 1, 2, 4), (100, 1, 2, 25), (100, 8, 4, 8), (3, 4, 1, 2)]
)
def test_blocks_hold_a_few_batches_and_keep_every_actor_busy(images, batch_size, actors, blocks):
    assert block_count(images, batch_size, actors) == blocks


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ray="local"), "--ray local: only with --each or --from-file, which answer images one by one"),
        (dict(each=True, ray="localhost"), "--ray takes local, auto, ray://HOST:PORT or HOST:PORT (got 'localhost')"),
        (dict(each=True, ray="ray://head"), "--ray takes local, auto, ray://HOST:PORT or HOST:PORT (got 'ray://head')"),
        (dict(each=True, ray="auto", actors=0), "--actors must be between 1 and 256 (got 0)"),
        (dict(each=True, ray="auto", actors=257), "--actors must be between 1 and 256 (got 257)"),
        (dict(each=True, ray="auto", gpus_per_actor=-0.5), "--gpus-per-actor must be 0 or more (got -0.5)"),
        (dict(each=True, ray="auto", gpus_per_actor=float("nan")), "--gpus-per-actor must be 0 or more (got nan)"),
        (dict(each=True, actors=2), "--actors and --gpus-per-actor shape the Ray actor pool: only with --ray ADDRESS"),
    ],
)
def test_ray_options_are_checked_once(options, message):
    with pytest.raises(UsageError) as caught:
        AskOptions(**options)
    assert str(caught.value) == message


@pytest.mark.parametrize("address", ["local", "auto", "ray://head.example:10001", "10.0.0.5:6379", "[::1]:6379"])
def test_ray_addresses_ray_init_takes_are_accepted(address):
    assert AskOptions(from_file="-", ray=address, actors=4, gpus_per_actor=0.5).ray == address
