"""`llava show`, `llava rm`, `llava tokens`, `/show`'s image lines and `--max-image-tokens`, on tiny
checkpoints laid out as a hub cache (offline: nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import invoke
from fakes import answer_text
from helpers import slow_fixture
from tiny_checkpoint import build_family_checkpoint, lay_out_hub_cache

from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

NEXT_ID, L15_ID = "tests/tiny-next", "tests/tiny-l15"
MAX_NEW = 8


@slow_fixture(scope="module")
def next_model(tmp_path_factory) -> Path:
    return build_family_checkpoint("llava-next", tmp_path_factory.mktemp("next"))


@pytest.fixture
def hub(tiny_model, next_model, tmp_path, monkeypatch) -> Path:
    """A fresh hub cache holding both tiny checkpoints; huggingface_hub pointed at it, offline."""
    import huggingface_hub.constants

    lay_out_hub_cache(tiny_model, tmp_path, L15_ID)
    lay_out_hub_cache(next_model, tmp_path, NEXT_ID)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("square") / "square.png"
    image = Image.new("RGB", (90, 90), "navy")
    ImageDraw.Draw(image).rectangle((10, 20, 70, 50), fill="orange")
    image.save(path)
    return path


def repo_folder(hub: Path, repo_id: str) -> Path:
    return hub / ("models--" + repo_id.replace("/", "--"))


def test_show_reports_the_checkpoint_from_its_files(hub, tiny_model, monkeypatch):
    from safetensors import safe_open

    with safe_open(str(tiny_model / "model.safetensors"), "pt") as weights:
        parameters = sum(numel(weights.get_slice(name).get_shape()) for name in weights.keys())
    config = json.loads((tiny_model / "config.json").read_text())
    outcome = invoke(monkeypatch, "show", L15_ID, "--json")
    assert outcome.code == 0, outcome.stderr
    facts = json.loads(outcome.stdout)
    snapshot = next((repo_folder(hub, L15_ID) / "snapshots").iterdir())
    assert facts == {
        "model": L15_ID,
        "family": "llava-1.5",
        "decoder": "llama",
        "context_window": config["text_config"]["max_position_embeddings"],
        "parameters": parameters,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "weight_dtypes": ["F32"],
        "size_bytes": sum(p.stat().st_size for p in snapshot.iterdir()),
        "image_tokens": {"min": 16, "max": 16},  # (32 / 8) ** 2 patches, the CLS dropped
        "chat_template": "llava-1.5 format (built in, as the model card documents)",
        "revision": snapshot.name,
    }
    table = invoke(monkeypatch, "show", NEXT_ID)
    assert table.code == 0
    rows = dict(
        line.split(None, 1) if not line.startswith("image tokens") else ("image tokens", line[13:])
        for line in table.stdout.splitlines()
    )
    assert rows["family"] == "llava-next" and rows["template"] == "chat_template.jinja"
    assert rows["image tokens"].endswith("(anyres: by image size)")


def numel(shape: list[int]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total


def test_show_of_a_model_not_in_the_cache_is_one_line(hub, monkeypatch):
    outcome = invoke(monkeypatch, "show", "nobody/nothing")
    assert outcome.code == 2 and outcome.stdout == ""
    assert (
        outcome.stderr
        == "llava: error: nobody/nothing is not in the local Hugging Face cache; `llava models` lists what is, `llava pull nobody/nothing` downloads it\n"
    )


def test_rm_deletes_through_the_cache_api_and_never_follows_links_out(hub, tmp_path, monkeypatch):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    snapshot = next((repo_folder(hub, L15_ID) / "snapshots").iterdir())
    (snapshot / "extra.json").symlink_to(outside)

    # Both tiny repos hold the same revision (a snapshot copied between repos): only this one may go.
    assert snapshot.name == next((repo_folder(hub, NEXT_ID) / "snapshots").iterdir()).name

    refused = invoke(monkeypatch, "rm", L15_ID)  # no terminal, no --yes
    assert refused.code == 2 and "pass --yes" in refused.stderr
    assert snapshot.is_dir()

    done = invoke(monkeypatch, "rm", L15_ID, "--yes")
    assert done.code == 0, done.stderr
    assert not repo_folder(hub, L15_ID).exists()
    assert repo_folder(hub, NEXT_ID).is_dir()
    assert outside.read_text() == "keep me"
    listed = json.loads(invoke(monkeypatch, "models", "--json").stdout)
    assert [row["model"] for row in listed] == [NEXT_ID]


def test_rm_refuses_a_local_folder_and_unknown_models(hub, tiny_model, monkeypatch):
    for name in (str(tiny_model), "nobody/nothing"):
        outcome = invoke(monkeypatch, "rm", name, "--yes")
        assert outcome.code == 2 and "is not in the Hugging Face cache" in outcome.stderr
    assert (tiny_model / "model.safetensors").is_file()


def test_tokens_needs_no_weights_and_matches_the_processor(hub, next_model, square, images, monkeypatch):
    from transformers import AutoProcessor

    (next((repo_folder(hub, NEXT_ID) / "snapshots").iterdir()) / "model.safetensors").unlink()  # processor files only
    outcome = invoke(monkeypatch, "tokens", str(square), str(images["red"]), "--model", NEXT_ID, "--json")
    assert outcome.code == 0, outcome.stderr
    rows = json.loads(outcome.stdout)
    processor = AutoProcessor.from_pretrained(next_model)
    for row, path in zip(rows, (square, images["red"])):
        from PIL import Image

        picture = Image.open(path).convert("RGB")
        ids = processor(text="<image>", images=[picture], return_tensors="pt")["input_ids"][0].tolist()
        assert row["image_tokens"] == ids.count(processor.tokenizer.convert_tokens_to_ids("<image>"))
        assert row["original_size"] == list(picture.size)
        assert row["context_share"] == row["image_tokens"] / 1024
    assert rows[0]["resized_size"] == [64, 64] and rows[0]["grid"] == [2, 2]  # a square image: the 2x2 grid

    capped = json.loads(
        invoke(monkeypatch, "tokens", str(square), "--model", NEXT_ID, "--max-image-tokens", "60", "--json").stdout
    )
    assert capped[0]["grid"] in ([1, 2], [2, 1]) and capped[0]["image_tokens"] < rows[0]["image_tokens"]

    text = invoke(monkeypatch, "tokens", str(square), "--model", NEXT_ID)
    assert (
        text.stdout
        == f"{square}: 90x90 -> 64x64 (grid 2x2 + base tile), {rows[0]['image_tokens']} tokens ({100 * rows[0]['context_share']:.1f}% of context)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--model", NEXT_ID, "--max-image-tokens", "5"),
            "--max-image-tokens 5 is below tests/tiny-next's smallest anyres grid",
        ),
        (("--model", L15_ID, "--max-image-tokens", "500"), "--max-image-tokens applies to anyres families"),
    ],
)
def test_max_image_tokens_refusals_are_one_line(hub, square, args, message, monkeypatch):
    outcome = invoke(monkeypatch, "tokens", str(square), *args)
    assert (
        outcome.code == 2 and outcome.stderr.startswith(f"llava: error: {message}") and outcome.stderr.count("\n") == 1
    )


def test_max_image_tokens_answers_equal_transformers_with_the_same_pinpoints(next_model, square):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    loaded = load_model(Settings(model=str(next_model), max_image_tokens=60, max_new_tokens=MAX_NEW))
    kept = loaded.processor.image_processor.image_grid_pinpoints
    assert kept == [[32, 64], [64, 32]]  # the tiny grid's 1x2 tilings; 2x2 and 1x3 take more than 60 tokens
    conversation = Conversation()
    conversation.ask("What is in this picture?", [load_image(str(square))])
    engine = Engine(loaded)
    prompt = engine.encode(conversation).ids
    answer = answer_text(
        engine.generate(conversation, Settings(model=str(next_model), max_new_tokens=MAX_NEW)), conversation
    )

    processor = AutoProcessor.from_pretrained(next_model)
    processor.image_processor.image_grid_pinpoints = kept
    model = LlavaNextForConditionalGeneration.from_pretrained(next_model).eval()
    model.config.image_grid_pinpoints = kept
    from PIL import Image

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(square).convert("RGB")},
                {"type": "text", "text": "What is in this picture?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert (
        answer
        == processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    )
    assert prompt == inputs["input_ids"][0].tolist()


@pytest.mark.slow
def test_rm_asks_at_a_terminal_and_only_yes_deletes(tiny_model, tmp_path):
    import sys

    import pexpect
    from helpers import cli_env, default_sigint

    lay_out_hub_cache(tiny_model, tmp_path, L15_ID)
    env = cli_env(HF_HUB_CACHE=str(tmp_path / "hub"), TERM="dumb")
    for reply, code, exists in (("n", 1, True), ("", 1, True), ("y", 0, False)):
        child = pexpect.spawn(
            sys.executable,
            ["-m", "llava_cli", "rm", L15_ID],
            env=env,
            timeout=60,
            encoding="utf-8",
            preexec_fn=default_sigint,
        )
        child.expect_exact(f"delete {L15_ID} (")
        child.expect_exact("[y/N] ")
        child.sendline(reply)
        child.expect(pexpect.EOF)
        child.close()
        assert (child.exitstatus, repo_folder(tmp_path / "hub", L15_ID).exists()) == (code, exists), reply
