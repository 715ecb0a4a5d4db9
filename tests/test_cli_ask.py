"""`llava ask` through the real command line: exact answers on stdout, hub ids offline, 4-bit, bad input.

Every answer is compared with plain transformers greedy `generate` on the same prompt. Runs that load
the model cost seconds each, so each one checks several things at once.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from helpers import HUB_ID, cli_env, render_llava15, run_llava

MAX_NEW = 12
QUESTION = "What is in this picture?"
# Any connection attempt in the child process is recorded on stderr and refused.
NO_NETWORK_SITECUSTOMIZE = """
import socket, sys

def refuse(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        sys.stderr.write(f"NETWORK ATTEMPT to {address}\\n")
        raise OSError("network disabled by the test")
    return real_connect(self, address, *args)

real_connect = socket.socket.connect
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
"""


def single(reference, prompt: str, image_paths: list[Path]) -> str:
    """The reference answer to one question about `image_paths`."""
    return reference.answer(render_llava15([(prompt, len(image_paths), None)]), image_paths, MAX_NEW)


def assert_only_answer(result, answer: str) -> None:
    """Exit 0, stdout is exactly the answer and a newline, and nothing (no loading chatter) on stderr."""
    assert result.returncode == 0, result.stderr_text
    assert result.stdout == (answer + "\n").encode()
    assert result.stderr_text == ""


def test_one_image_prompt_as_argument(tiny_model, images, reference):
    result = run_llava("ask", images["red"], QUESTION, "--model", tiny_model, "-n", MAX_NEW)
    assert_only_answer(result, single(reference, QUESTION, [images["red"]]))


def test_two_images_with_the_prompt_from_stdin(tiny_model, images, reference):
    paths = [images["red"], images["green"]]
    result = run_llava("ask", *paths, "--model", tiny_model, "-n", MAX_NEW, stdin="Compare these two.\n")
    assert_only_answer(result, single(reference, "Compare these two.", paths))


@pytest.fixture(scope="module")
def no_network(tmp_path_factory) -> Path:
    """A folder for PYTHONPATH whose sitecustomize makes every network connection fail loudly."""
    folder = tmp_path_factory.mktemp("no-network")
    (folder / "sitecustomize.py").write_text(NO_NETWORK_SITECUSTOMIZE)
    return folder


def hub_env(hf_home: Path, no_network: Path, offline: bool) -> dict[str, str]:
    env = cli_env(HF_HOME=str(hf_home), PYTHONPATH=str(no_network))
    if not offline:
        del env["HF_HUB_OFFLINE"]
    return env


def test_json_from_a_cached_hub_id_offline_with_dash_for_the_prompt(hf_home, no_network, images, reference):
    env = hub_env(hf_home, no_network, offline=True)
    result = run_llava(
        "ask", images["green"], "-", "--json", "--model", HUB_ID, "-n", MAX_NEW, stdin="Describe it.", env=env
    )
    assert result.returncode == 0, result.stderr_text
    assert result.stderr_text == ""
    assert result.stdout.endswith(b"}\n") and result.stdout.count(b"\n") == 1
    record = json.loads(result.stdout)
    assert record["answer"] == single(reference, "Describe it.", [images["green"]])
    assert record["model"] == HUB_ID
    assert 0 < record["completion_tokens"] <= MAX_NEW
    assert record["prompt_tokens"] > 16  # 16 image tokens, plus the text around them
    assert isinstance(record["seconds"], float) and record["seconds"] > 0


def test_image_from_stdin_with_a_cached_hub_id_needs_no_network_even_online(hf_home, no_network, images, reference):
    # HF_HUB_OFFLINE is not set: the cache must still be tried first, so no connection is ever made.
    env = hub_env(hf_home, no_network, offline=False)
    result = run_llava(
        "ask", "-", QUESTION, "--model", HUB_ID, "-n", MAX_NEW, stdin=images["blue"].read_bytes(), env=env
    )
    assert "NETWORK ATTEMPT" not in result.stderr_text
    assert_only_answer(result, single(reference, QUESTION, [images["blue"]]))


def test_an_unknown_hub_id_is_one_line_naming_it(hf_home, no_network, images):
    result = run_llava(
        "ask", images["red"], QUESTION, "--model", "llava-tests/no-such-model", env=hub_env(hf_home, no_network, True)
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr_text.count("\n") == 1
    assert result.stderr_text.startswith(
        "llava: error: llava-tests/no-such-model is not in the local Hugging Face cache"
    )


def test_an_unknown_hub_id_with_the_hub_unreachable_fails_fast_in_one_line(hf_home, no_network, images):
    env = hub_env(hf_home, no_network, False)
    result = run_llava("ask", images["red"], QUESTION, "--model", "llava-tests/no-such-model", env=env, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr_text.splitlines()
    assert line.startswith(
        "llava: error: llava-tests/no-such-model could not be downloaded: the Hugging Face hub could not be reached ("
    )
    assert line.endswith("); check the connection and run again")
    assert "Traceback" not in result.stderr_text


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # bitsandbytes' import
def test_load_4bit_answers_like_transformers_with_the_same_quantization(tiny_model, images, reference):
    import torch
    from PIL import Image
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    result = run_llava("ask", images["red"], QUESTION, "--load-4bit", "--model", tiny_model, "-n", MAX_NEW)

    # What models/loader.py asks for on a CPU: NF4 weights, computing in the model dtype (float32).
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_model, dtype=torch.float32, device_map="cpu", quantization_config=quantization
    ).eval()
    assert type(model.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    inputs = reference.processor(
        text=render_llava15([(QUESTION, 1, None)]),
        images=[Image.open(images["red"]).convert("RGB")],
        return_tensors="pt",
    )
    output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    expected = reference.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert expected != single(reference, QUESTION, [images["red"]])  # so the 4-bit weights were really used
    assert_only_answer(result, expected)  # bitsandbytes' warnings silenced too


# A stand-in for the hub kernel loader, imported before bitsandbytes (as transformers may do): a call
# to it is recorded on stderr, then fails as it does offline.
RECORDING_KERNELS = """
import sys, types
kernels = types.ModuleType("kernels")
def get_kernel(repo_id, *args, **kwargs):
    sys.stderr.write(f"HUB KERNEL FETCHED: {repo_id}\\n")
    raise OSError("offline")
kernels.get_kernel = get_kernel
sys.modules["kernels"] = kernels
"""


@pytest.mark.slow  # starts a process
def test_bitsandbytes_is_imported_on_its_bundled_kernels_silently(tmp_path):
    """No hub kernel loader call, no network attempt, no warning; `kernels` is importable again after."""
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK_SITECUSTOMIZE)
    script = RECORDING_KERNELS + (
        "from llava_cli.models.loader import import_bitsandbytes\n"
        "import_bitsandbytes()\n"
        "import bitsandbytes.functional as functional\n"
        "print(bool(functional.has_avx512bf16()), sys.modules['kernels'] is kernels)\n"
    )
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env.pop("HF_HUB_OFFLINE", None)  # online, bitsandbytes would fetch the kernel
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    has_avx512bf16, restored = result.stdout.split()
    assert restored == "True"
    if has_avx512bf16 != "True":
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never looks for hub kernels here")


# --- bad input: exit code 2, one exact line on stderr, no traceback -------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model) -> Path:
    """A decompression bomb and a model folder with a config but nothing else."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "bomb.png").write_bytes(png_claiming(30000, 30000))
    (folder / "no-weights").mkdir()
    shutil.copy(tiny_model / "config.json", folder / "no-weights" / "config.json")
    return folder


# tests/test_bad_input.py runs the whole catalogue in-process; these few go through a real process
# (real stdio, interpreter exit) with one case of each kind, and add a bomb at the default limit.
BAD_INPUT = {
    "decompression bomb": (
        ["ask", "{bad}/bomb.png", "q"],
        "{bad}/bomb.png is too large to be a safe image (raise --max-image-pixels if you trust it)",
    ),
    "missing file": (["ask", "{bad}/missing.png", "q"], "image not found: {bad}/missing.png"),
    "config but no weights": (
        ["ask", "{red}", "q", "--model", "{bad}/no-weights"],
        "{bad}/no-weights has no weights (*.safetensors); the download is incomplete or the folder is wrong",
    ),
    "dtype float64": (
        ["ask", "{red}", "q", "--dtype", "float64"],
        "--dtype must be one of auto, float16, bfloat16, float32 (got 'float64')",
    ),
    "empty stdin prompt": (
        ["ask", "{red}", "--model", "{tiny}"],
        'the prompt read from stdin is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"',
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_code_2(case, bad, images, tiny_model):
    args, message = BAD_INPUT[case]
    values = {"bad": bad, "red": images["red"], "tiny": tiny_model}
    stdin = " \n" if "stdin" in case else b""
    result = run_llava(*[arg.format(**values) for arg in args], stdin=stdin, timeout=60)
    assert result.returncode == 2, result.stderr_text
    assert result.stdout == b""
    assert result.stderr_text == f"llava: error: {message.format(**values)}\n"


def test_an_unreadable_file_is_refused(tmp_path, tiny_model):
    picture = tmp_path / "secret.png"
    picture.write_bytes(png_claiming(4, 4))
    picture.chmod(0)
    if os.access(picture, os.R_OK):
        pytest.skip("running as root: every file is readable, so 'permission denied' cannot be provoked")
    result = run_llava("ask", picture, "q", "--model", tiny_model)
    assert result.returncode == 2
    assert result.stderr_text == f"llava: error: cannot read {picture}: permission denied\n"
