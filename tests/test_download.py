"""The model download, for real: `llava` subprocesses fetch a sharded tiny checkpoint from a local
stand-in for the Hugging Face hub (tests/hub_standin.py, HF_ENDPOINT on 127.0.0.1, no network),
into a temporary HF_HOME: first download, Ctrl-C mid-file then the rest, unknown repo, a hub that
stops answering, an incomplete snapshot offline, `llava pull`, `llava models`, the progress bar."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHORT_ANSWER, cli_env, render_llava15, run_llava
from hub_standin import COMMIT, StandInHub
from rich.filesize import decimal
from tiny_checkpoint import copy_without_weights, lay_out_hub_cache

REPO = "llava-tests/sharded-llava"
SHARDS = [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]
INDEX = "model.safetensors.index.json"
# In the repo on the hub but never fetched: pickle weights, another format, the model card.
NOT_LOADED = {
    "pytorch_model.bin": b"pickle" * 100,
    "onnx/model.onnx": b"onnx" * 100,
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.bin lfs\n",
}
QUESTION = "what is in this image?"
CHUNKS_PER_REDRAW = 8  # hub_standin CHUNKs let through each time the progress bar is seen drawn
REDRAW_WAIT_S = 10  # no bar seen for this long (a loaded machine): let chunks through anyway
HUB_TIMEOUT_S = "1"  # huggingface_hub's HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT, so a stalled hub fails fast


@pytest.fixture(scope="module")
def sharded_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny checkpoint with its weights split into three shards and an index, as big models are."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sharded")
    tensors = copy_without_weights(tiny_model, folder)
    names = sorted(tensors)
    weight_map = {name: SHARDS[index * len(SHARDS) // len(names)] for index, name in enumerate(names)}
    for shard in SHARDS:
        save_file(
            {name: tensors[name] for name in names if weight_map[name] == shard},
            folder / shard,
            metadata={"format": "pt"},
        )
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def hub(sharded_model):
    files = {path.name: path.read_bytes() for path in sharded_model.iterdir()} | NOT_LOADED
    with StandInHub({REPO: files}) as standin:
        yield standin


@pytest.fixture
def env(hub, tmp_path) -> dict[str, str]:
    """A `llava` subprocess environment: the stand-in hub, an empty HF_HOME, online, short timeouts."""
    environment = cli_env(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_ETAG_TIMEOUT=HUB_TIMEOUT_S,
        HF_HUB_DOWNLOAD_TIMEOUT=HUB_TIMEOUT_S,
    )
    del environment["HF_HUB_OFFLINE"]
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_HUB_DISABLE_XET"):
        environment.pop(name, None)
    return environment


def snapshot(env: dict[str, str]) -> Path:
    return Path(env["HF_HOME"]) / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT


def wanted(sharded_model: Path) -> list[str]:
    return sorted(path.name for path in sharded_model.iterdir())


def expected_answer(reference, images) -> str:
    return reference.answer(render_llava15([(QUESTION, 1, None)]), [images["red"]], SHORT_ANSWER) + "\n"


def ask(images, env, *extra: str):
    return run_llava(
        "ask", images["red"], QUESTION, "--model", REPO, "-n", str(SHORT_ANSWER), "--no-save", *extra, env=env
    )


def test_first_run_downloads_only_the_loaded_files_and_answers_like_transformers(
    hub, env, sharded_model, images, reference
):
    result = ask(images, env)
    assert result.returncode == 0, result.stderr_text
    assert result.stdout_text == expected_answer(reference, images)
    assert result.stderr_text == ""  # no terminal: no progress output
    assert sorted(hub.file_requests("GET")) == wanted(sharded_model)  # no .bin, no onnx/, no README
    assert sorted(path.name for path in snapshot(env).iterdir()) == wanted(sharded_model)

    hub.requests.clear()
    again = ask(images, env)
    assert (again.returncode, again.stdout_text) == (0, result.stdout_text)
    assert hub.requests == []  # a complete cached model loads with no network at all


def test_a_download_interrupted_mid_file_is_finished_by_the_next_run(hub, env, sharded_model, images, reference):
    last = max(
        SHARDS, key=lambda shard: ((sharded_model / shard).stat().st_size, shard)
    )  # weights come last, largest last
    hub.slow_files.add(last)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llava_cli",
            "ask",
            str(images["red"]),
            QUESTION,
            "--model",
            REPO,
            "-n",
            str(SHORT_ANSWER),
            "--no-save",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even under a launcher that ignores SIGINT
    )
    try:
        assert hub.sending_event(last).wait(120), "the slow shard was never requested"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, stdout) == (130, b"")  # no half-written answer
    kept = [name for name in wanted(sharded_model) if name != last]
    size = decimal(sum((sharded_model / name).stat().st_size for name in kept))
    assert stderr.decode().strip() == (  # one line, no traceback
        f"llava: download of {REPO} stopped: {len(kept)} of {len(kept) + 1} files finished ({size}), kept in the cache; "
        "run the same command again to resume"
    )
    assert sorted(path.name for path in snapshot(env).iterdir()) == sorted(set(wanted(sharded_model)) - {last})
    assert not list(Path(env["HF_HOME"]).rglob("*.incomplete"))  # no partial file left behind

    hub.slow_files.clear()
    hub.requests.clear()
    result = ask(images, env)
    assert result.returncode == 0, result.stderr_text
    assert result.stdout_text == expected_answer(reference, images)
    assert hub.file_requests("GET") == [last]  # the finished files were kept


def test_a_connection_cut_mid_file_is_retried_and_the_answer_is_right(hub, env, images, reference):
    hub.cut_once.add(SHARDS[0])
    result = ask(images, env)
    assert result.returncode == 0, result.stderr_text
    assert result.stdout_text == expected_answer(reference, images)
    assert result.stderr_text == ""  # huggingface_hub's retry notes stay quiet
    assert hub.file_requests("GET").count(SHARDS[0]) == 2


def test_a_repo_that_does_not_exist_is_one_line_naming_it(hub, env, images):
    result = ask(images, env, "--model", "nobody/no-such-model")
    assert result.returncode == 2
    assert (
        result.stderr_text
        == f"llava: error: model 'nobody/no-such-model' was not found on the hub at {hub.url} nor in the local cache; check the id\n"
    )


@pytest.mark.parametrize("stall", ["file list", "file look-up", "file body"])
def test_a_hub_that_stops_answering_fails_with_one_line_not_a_hang(stall, hub, env, images):
    if stall == "file list":
        hub.stall_api = True
    elif stall == "file look-up":
        hub.stall_heads = True
    else:
        hub.stall_files.add(SHARDS[0])
    result = ask(images, env)  # run_llava's own timeout (120 s) fails the test on a hang
    assert result.returncode == 2
    kept = "" if stall == "file list" else ": the files already downloaded are kept"
    assert result.stderr_text == (
        f"llava: error: {REPO} could not be downloaded: the hub at {hub.url} did not answer within {HUB_TIMEOUT_S} s "
        f"(HF_HUB_DOWNLOAD_TIMEOUT, HF_HUB_ETAG_TIMEOUT); check the connection and run again{kept}\n"
    )


@pytest.fixture
def cut_off_cache(sharded_model, tmp_path) -> Path:
    """A Hugging Face home holding REPO without its second weight shard, as an interrupted download leaves it."""
    home = tmp_path / "cut-off-home"
    laid_out = lay_out_hub_cache(sharded_model, home, REPO)
    laid_out.rename(laid_out.with_name(COMMIT))  # the commit the stand-in hub serves
    (laid_out.parent.parent / "refs" / "main").write_text(COMMIT)
    (laid_out.with_name(COMMIT) / SHARDS[1]).unlink()
    return home


def test_an_incomplete_snapshot_offline_names_the_missing_shard_and_how_to_finish(cut_off_cache, images):
    result = ask(images, cli_env(HF_HOME=str(cut_off_cache)))
    assert result.returncode == 2
    assert result.stderr_text == (
        f"llava: error: the download of {REPO} is incomplete (1 of 3 weight shards missing: {SHARDS[1]}) and HF_HUB_OFFLINE is set; "
        f"unset HF_HUB_OFFLINE and run again to finish the download, or run `llava pull {REPO}` once online\n"
    )


def test_llava_models_names_the_missing_shard(cut_off_cache):
    env = cli_env(HF_HOME=str(cut_off_cache))
    listed = run_llava("models", "--json", env=env)
    assert listed.returncode == 0
    [row] = json.loads(listed.stdout_text)
    assert (row["model"], row["offline"], row["missing"]) == (
        REPO,
        False,
        [f"1 of 3 weight shards missing: {SHARDS[1]}"],
    )

    table = run_llava("models", env=env)
    assert table.returncode == 0
    assert table.stdout_text.splitlines()[1].endswith(f"  no: 1 of 3 weight shards missing: {SHARDS[1]}")


def test_pull_downloads_the_loaded_files_then_says_it_is_complete_without_the_network(hub, env, sharded_model):

    result = run_llava("pull", REPO, env=env)
    assert result.returncode == 0, result.stderr_text
    size = decimal(sum((sharded_model / name).stat().st_size for name in wanted(sharded_model)))
    files = len(wanted(sharded_model))
    assert re.fullmatch(
        rf"downloaded {REPO}: {files} of {files} files, {re.escape(size)} in \d+\.\d s, into {re.escape(str(snapshot(env)))}\n",
        result.stderr_text,
    )
    assert result.stdout_text == ""
    assert sorted(hub.file_requests("GET")) == wanted(sharded_model)

    hub.requests.clear()
    again = run_llava("pull", REPO, env=env)
    assert (again.returncode, again.stderr_text) == (
        0,
        f"{REPO} is already complete in the local cache: {snapshot(env)}\n",
    )
    assert hub.requests == []


def test_pull_finishes_an_interrupted_download(hub, env, sharded_model, cut_off_cache):
    env = env | {"HF_HOME": str(cut_off_cache)}
    result = run_llava("pull", REPO, env=env)
    assert result.returncode == 0, result.stderr_text
    assert result.stderr_text.startswith(f"downloaded {REPO}: 1 of {len(wanted(sharded_model))} files, ")
    assert hub.file_requests("GET") == [SHARDS[1]]


def on_a_terminal(env: dict[str, str]) -> dict[str, str]:
    """`env` as a person's terminal has it: whatever the test run inherited (CI, a dumb TERM, a fixed
    width, Rich's TTY_* switches) must not change how the bar is drawn in the pty."""
    quirks = (
        "CI",
        "COLUMNS",
        "LINES",
        "TTY_COMPATIBLE",
        "TTY_INTERACTIVE",
        "FORCE_COLOR",
        "NO_COLOR",
        "JUPYTER_COLUMNS",
        "JUPYTER_LINES",
    )
    return {name: value for name, value in env.items() if name not in quirks} | {"TERM": "xterm-256color"}


def watch_bars(child, bar: re.Pattern[str], hub) -> tuple[str, list[tuple[str, ...]]]:
    """Read `child` to its end: everything it drew, and the groups of each `bar` seen. Each bar seen
    lets the held shards' next chunks go out, so the bar must be redrawn for the download to go on."""
    import pexpect

    output, bars = "", []
    while (seen := child.expect([bar, pexpect.TIMEOUT, pexpect.EOF], timeout=REDRAW_WAIT_S)) != 2:
        if seen == 0:
            output += child.before + child.after
            bars.append(child.match.groups())
        hub.release(CHUNKS_PER_REDRAW)  # on a timeout too: a redraw the pattern missed must not stall the download
    child.close()
    return output + child.before, bars


def test_the_progress_bar_on_a_terminal_shows_the_whole_model_once(hub, env, sharded_model):
    import pexpect

    hub.held_files.update(SHARDS)  # each shard's bytes go out only as the test sees the bar redrawn
    env["HF_HUB_DOWNLOAD_TIMEOUT"] = "60"  # a held shard is silent until the test next reads the terminal
    bar = re.compile(r"Downloading " + re.escape(REPO) + r".*?(\d+\.\d)/(\d+\.\d) ([kMG]?B)")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llava_cli", "pull", REPO],
        env=on_a_terminal(env),
        timeout=120,
        dimensions=(24, 200),
        encoding="utf-8",
        codec_errors="replace",
    )
    output, bars = watch_bars(child, bar, hub)
    assert child.exitstatus == 0, output
    total = decimal(sum((sharded_model / name).stat().st_size for name in wanted(sharded_model)))
    number, unit = total.split()
    assert len(bars) >= 2, output  # drawn, then redrawn as the bytes come in
    assert {(shown_total, shown_unit) for _, shown_total, shown_unit in bars} == {
        (number, unit)
    }  # one bar: the model's total, never one file's
    assert float(bars[-1][0]) > float(bars[0][0])
    assert "downloaded " + REPO in output


@pytest.mark.slow  # starts a process
def test_pull_offline_says_it_cannot_download(tmp_path):
    result = run_llava("pull", REPO, env=cli_env(HF_HOME=str(tmp_path / "empty-home")))
    assert (result.returncode, result.stdout_text) == (2, "")
    assert (
        result.stderr_text
        == f"llava: error: cannot download {REPO}: HF_HUB_OFFLINE is set; unset it and run `llava pull {REPO}` again\n"
    )


def test_llava_tokens_downloads_the_processor_files_and_no_weights(hub, env, sharded_model, images):
    result = run_llava("tokens", images["red"], "--model", REPO, "--json", env=env)
    assert result.returncode == 0, result.stderr_text
    assert json.loads(result.stdout)[0]["image_tokens"] == 16  # the tiny checkpoint: (32 / 8) ** 2 patches
    fetched = sorted(path.name for path in snapshot(env).iterdir())
    assert fetched == [name for name in wanted(sharded_model) if not name.endswith(".safetensors")] and INDEX in fetched


def test_a_hub_without_sizes_still_gets_a_bar_of_files_and_bytes_and_the_real_total(hub, env, sharded_model):
    import pexpect

    hub.no_sizes = True
    hub.held_files.update(SHARDS)
    env["HF_HUB_DOWNLOAD_TIMEOUT"] = "60"  # a held shard is silent until the test next reads the terminal
    files = wanted(sharded_model)
    bar = re.compile(r"Downloading " + re.escape(REPO) + r": file (\d+) of (\d+).*?(\d+\.\d)/\? ([kMG]?B)")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llava_cli", "pull", REPO],
        env=on_a_terminal(env),
        timeout=120,
        dimensions=(24, 200),
        encoding="utf-8",
        codec_errors="replace",
    )
    output, bars = watch_bars(child, bar, hub)
    assert child.exitstatus == 0, output
    assert {total for _, total, _, _ in bars} == {str(len(files))}, output
    assert int(bars[-1][0]) == len(files) and float(bars[-1][2]) > float(bars[0][2])  # files, then bytes as they arrive
    total = decimal(sum((sharded_model / name).stat().st_size for name in files))
    assert f"downloaded {REPO}: {len(files)} of {len(files)} files, {total} in " in output  # the real bytes, not 0 B
