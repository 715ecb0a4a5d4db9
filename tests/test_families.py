"""Every LLaVA family end to end: loaded through its own transformers class, prompted in its own
format, and answering a multi-turn, multi-image greedy chat exactly as plain `transformers` does
when the checkpoint's processor renders and tokenizes the whole history (`apply_chat_template`).

Tiny checkpoints of each family are built once per session. Where torchvision is not installed,
transformers cannot build the LLaVA-OneVision and LLaVA-NeXT-Video processors (it builds them only
with a video processor), so their reference is plain transformers without a processor
(`ImagePartsReference`): the same answers, from transformers' PIL image processor and the model itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runner import BytesStdout, invoke
from fakes import answer_of, answer_text, with_notes
from tiny_checkpoint import (
    CHATML_TEMPLATE,
    FAMILIES,
    MISTRAL_TEMPLATE,
    build_family_checkpoint,
    lay_out_hub_cache,
)

from llava_cli.base.families import FAMILIES as ROWS
from llava_cli.base.families import family_for
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.engine.scheduler import answers_in_order
from llava_cli.media.images import load_image
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import ChatTemplateFormat, Conversation, Llava15Format

MAX_NEW = 10
README = Path(__file__).resolve().parent.parent / "README.md"
ROW = {family.label: family for family in ROWS}
# The hub id README's example uses for each family.
README_IDS = {family.label: family.example for family in ROWS}
# The families whose processor transformers builds only with torchvision ...
IMAGE_PARTS_FAMILIES = [family.label for family in ROWS if family.processor_needs_torchvision]
# ... and the PIL image processor of each, for their reference.
PIL_IMAGE_PROCESSORS = {
    "llava-onevision": "LlavaOnevisionImageProcessorPil",
    "llava-next-video": "LlavaNextImageProcessorPil",
}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SCRIPT = [
    ("What is in this picture?", ["red"]),
    ("Compare these two.", ["green", "blue"]),
    ("Which one is brightest?", []),
    ("Look at the first one again.", ["red"]),
]


class FamilyReference:
    """Plain transformers: the checkpoint's processor renders and tokenizes the whole history, greedy `generate`."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()

    def inputs(self, messages: list[dict], template: str | None = None) -> dict:
        return self.processor.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )

    def ids(self, messages: list[dict], template: str | None = None) -> list[int]:
        return self.inputs(messages, template)["input_ids"][0].tolist()

    def answer(self, messages: list[dict]) -> str:
        inputs = self.inputs(messages)
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


class ImagePartsReference(FamilyReference):
    """Plain transformers for a checkpoint whose processor it cannot build, with no processor and no
    llava_cli code: the tokenizer renders the history with the checkpoint's chat_template.json,
    transformers' PIL image processor prepares the prompt's images, each <image> widens to as many
    tokens as the model's own vision tower gives that image features, and greedy `generate` runs."""

    def __init__(self, folder: Path, image_processor_class: str) -> None:
        import transformers
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = getattr(transformers, image_processor_class).from_pretrained(folder)
        self.template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()

    def pixels(self, messages: list[dict]) -> dict:
        """The image processor's output for the prompt's images, all at once as the processor hands them over."""
        pictures = [part["image"] for message in messages for part in message["content"] if part["type"] == "image"]
        return dict(self.image_processor(images=[pictures], return_tensors="pt")) if pictures else {}

    def token_counts(self, pixels: dict) -> list[int]:
        import torch

        if not pixels:
            return []
        with torch.no_grad():
            return [len(features) for features in self.model.get_image_features(**pixels).pooler_output]

    def inputs(self, messages: list[dict], template: str | None = None) -> dict:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template or self.template, add_generation_prompt=True, tokenize=False
        )
        pixels = self.pixels(messages)
        widths = iter(self.token_counts(pixels))
        text = re.sub("<image>", lambda _: "<image>" * next(widths), text)
        return dict(self.tokenizer(text, return_tensors="pt")) | pixels


def make_reference(family: str, folder: Path) -> FamilyReference:
    if family in IMAGE_PARTS_FAMILIES and not HAS_TORCHVISION:
        return ImagePartsReference(folder, PIL_IMAGE_PROCESSORS[family])
    return FamilyReference(folder)


def user(text: str, paths: list[Path]) -> dict:
    from PIL import Image

    pictures = [{"type": "image", "image": Image.open(path).convert("RGB")} for path in paths]
    return {"role": "user", "content": pictures + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def history(conversation: Conversation) -> list[dict]:
    """The conversation's turns as chat messages, written out independently of llava_cli."""
    messages = []
    for turn in conversation.turns:
        messages.append(user(turn.text, [Path(image.name) for image in turn.images]))
        if turn.answer is not None:
            messages.append(assistant(turn.answer))
    return messages


@pytest.fixture(scope="session")
def checkpoints(tiny_model, tmp_path_factory):
    """family -> its tiny checkpoint folder, built on first use (llava-1.5 is the shared `tiny_model`)."""
    built = {"llava-1.5": tiny_model}

    def checkpoint(family: str) -> Path:
        if family not in built:
            built[family] = build_family_checkpoint(family, tmp_path_factory.mktemp(family))
        return built[family]

    return checkpoint


@pytest.fixture(scope="session")
def references(checkpoints):
    """family -> its `FamilyReference`, made on first use."""
    made: dict[str, FamilyReference] = {}

    def reference(family: str) -> FamilyReference:
        if family not in made:
            made[family] = make_reference(family, checkpoints(family))
        return made[family]

    return reference


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints, references):
    settings = Settings(model=str(checkpoints(request.param)), max_new_tokens=MAX_NEW)
    return SimpleNamespace(
        name=request.param, settings=settings, loaded=load_model(settings), reference=references(request.param)
    )


def test_each_family_loads_through_its_own_class_and_prompt_format(family):
    assert type(family.loaded.model).__name__ == ROW[family.name].model_class
    assert type(family.loaded.prompt_format) is (Llava15Format if family.name == "llava-1.5" else ChatTemplateFormat)


def test_multi_turn_multi_image_chat_equals_plain_transformers_on_the_full_prompt(family, images):
    engine = Engine(family.loaded)
    conversation, messages, prompts, stats = Conversation(), [], [], []
    for turn, (text, names) in enumerate(SCRIPT, start=1):
        paths = [images[name] for name in names]
        conversation.ask(text, [load_image(str(path)) for path in paths])
        messages.append(user(text, paths))
        prompts.append(engine.encode(conversation))
        # The same tokens, image tokens included (LLaVA-NeXT's count depends on each image's size).
        assert prompts[-1].ids == family.reference.ids(messages), f"turn {turn}"
        streamed, figures = answer_of(engine.generate(conversation, family.settings), conversation)
        answer = conversation.turns[-1].answer
        assert answer == family.reference.answer(messages), f"turn {turn}"
        assert streamed == answer
        messages.append(assistant(answer))
        stats.append(figures)
    assert stats[0].cached_tokens == 0
    for turn, (previous, current) in enumerate(itertools.pairwise(stats), start=2):
        if family.name == "llava-onevision" and turn == 2:
            # With three images in the prompt the first is encoded untiled: only the text before it is reused.
            assert current.cached_tokens == prompts[1].image_spans[0][0]
        else:  # everything up to the previous answer is reused
            assert current.cached_tokens >= previous.prompt_tokens, f"turn {turn}"


def test_oldest_turns_are_dropped_to_fit_the_context_window(family, images):
    questions = [("first question", "red"), ("second question", "green"), ("third question", "blue")]
    # Room for the largest single turn and its answer, not for all three.
    largest = max(len(family.reference.ids([user(text, [images[name]])])) for text, name in questions)
    settings = dataclasses.replace(family.settings, max_context=largest + MAX_NEW + 8)
    notes: list[str] = []
    engine = with_notes(Engine(family.loaded), notes)
    conversation = Conversation()
    for text, name in questions:
        conversation.ask(text, [load_image(str(images[name]))])
        _, figures = answer_of(engine.generate(conversation, settings), conversation)
        assert figures.prompt_tokens + MAX_NEW <= settings.max_context
    assert notes and "dropped" in notes[0]
    assert [turn.text for turn in conversation.turns][-1] == "third question" and len(conversation.turns) < 3
    asked = history(conversation)[:-1]
    assert conversation.turns[-1].answer == family.reference.answer(asked)


@pytest.mark.parametrize("captured_shapes", [False, True], ids=["exact-shapes", "captured-shapes"])
def test_a_batch_answers_each_prompt_as_plain_transformers_does_alone(family, images, captured_shapes):
    """Every family, images of different sizes (anyres tiles) in one batch; `captured_shapes`: the step
    a GPU replays as a CUDA graph (whole row and column buckets), run eagerly here."""
    engine = Engine(family.loaded)
    prompts, expected = [], []
    for text, names in [
        ("What is in this picture?", ["red"]),
        ("Compare these two.", ["green", "blue"]),
        ("And this?", ["blue"]),
    ]:
        paths = [images[name] for name in names]
        conversation = Conversation()
        conversation.ask(text, [load_image(str(path)) for path in paths])
        prompts.append(engine.encode(conversation))
        expected.append(family.reference.answer([user(text, paths)]))
    makers = [lambda prompt=prompt: prompt for prompt in prompts]
    answers = answers_in_order(engine, makers, family.settings, rows=len(prompts), captured_shapes=captured_shapes)
    assert [answer.text for answer in answers] == expected


@pytest.fixture(scope="module")
def untemplated(checkpoints, tmp_path_factory) -> Path:
    """The llava-interleave checkpoint without its chat template: a `llava` model of no known format."""
    folder = tmp_path_factory.mktemp("untemplated")
    for path in checkpoints("llava-interleave").iterdir():
        if path.name != "chat_template.jinja":
            shutil.copy2(path, folder / path.name)
    return folder


def test_a_checkpoint_without_template_of_unknown_family_is_refused_naming_chat_template(
    untemplated, images, monkeypatch
):
    outcome = invoke(monkeypatch, "ask", "--model", untemplated, images["red"], "What is it?")
    assert outcome.code == 2
    assert outcome.first_error_line.startswith("llava: error: ")
    assert "has no chat template" in outcome.first_error_line and "--chat-template FILE" in outcome.first_error_line


def test_chat_template_file_prompts_an_untemplated_checkpoint(untemplated, images, tmp_path, references):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    settings = Settings(model=str(untemplated), max_new_tokens=MAX_NEW, chat_template=str(template))
    conversation = Conversation()
    conversation.ask("What is in this picture?", [load_image(str(images["red"]))])
    answer = answer_text(Engine(load_model(settings)).generate(conversation, settings), conversation)
    # The same weights with that template shipped: the llava-interleave checkpoint.
    assert answer == references("llava-interleave").answer([user("What is in this picture?", [images["red"]])])


def test_chat_template_json_overrides_the_llava15_format(tiny_model, tmp_path):
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    loaded = load_model(Settings(model=str(tiny_model), chat_template=str(tmp_path / "chat_template.json")))
    conversation = Conversation()
    conversation.ask("hi")
    assert loaded.prompt_format.render(conversation) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(checkpoints, references, images, tmp_path):
    template = "{{ bos_token }}" + MISTRAL_TEMPLATE
    (tmp_path / "bos.jinja").write_text(template)
    settings = Settings(model=str(checkpoints("llava-next")), chat_template=str(tmp_path / "bos.jinja"))
    loaded = load_model(settings)
    conversation = Conversation()
    conversation.ask("What is in this picture?", [load_image(str(images["red"]))])
    ids = Engine(loaded).encode(conversation).ids
    assert ids == references("llava-next").ids([user("What is in this picture?", [images["red"]])], template)
    assert ids.count(loaded.processor.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}", "does not place images"),
        ("{{ raise_exception('no conversations today') }}", "no conversations today"),
        ("  \n", "is empty"),
        ('{"template": "x"}', 'JSON without a "chat_template" string'),
        (None, "cannot be read"),
    ],
)
def test_unusable_chat_templates_are_refused_at_start_up(tiny_model, images, tmp_path, monkeypatch, content, message):
    path = tmp_path / ("template.json" if content and content.startswith('{"') else "template.jinja")
    if content is not None:
        path.write_text(content)
    outcome = invoke(monkeypatch, "ask", "--model", tiny_model, "--chat-template", path, images["red"], "What is it?")
    assert outcome.code == 2
    assert outcome.first_error_line.startswith("llava: error: ") and message in outcome.first_error_line


@pytest.fixture(scope="module")
def family_hub(checkpoints, tmp_path_factory) -> Path:
    """A Hugging Face home whose cache holds each family under README's id, a download cut
    off before its weights, and a model that is not LLaVA."""
    home = tmp_path_factory.mktemp("families-home")
    for family, repo_id in README_IDS.items():
        lay_out_hub_cache(checkpoints(family), home, repo_id)
    snapshot = lay_out_hub_cache(checkpoints("llava-next"), home, "llava-tests/cut-off")
    (snapshot / "model.safetensors").unlink()
    other = home / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "model.safetensors").write_bytes(b"\0" * 64)
    lay_out_hub_cache(other, home, "someone/not-llava")
    return home


@pytest.fixture
def hub_cache(family_hub, monkeypatch) -> Path:
    """Point this process's huggingface_hub at `family_hub`, offline (as HF_HOME=... HF_HUB_OFFLINE=1 would)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(family_hub / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return family_hub / "hub"


def snapshot_size(hub: Path, repo_id: str) -> int:
    snapshots = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return sum(path.stat().st_size for path in snapshots.rglob("*") if path.is_file())


def test_llava_models_lists_the_llava_checkpoints_in_the_cache(hub_cache, monkeypatch):
    expected = sorted(
        [
            {
                "model": repo_id,
                "family": family,
                "size_bytes": snapshot_size(hub_cache, repo_id),
                "missing": [],
                "offline": True,
            }
            for family, repo_id in README_IDS.items()
        ]
        + [
            {
                "model": "llava-tests/cut-off",
                "family": "llava-next",
                "size_bytes": snapshot_size(hub_cache, "llava-tests/cut-off"),
                "missing": ["no weights (*.safetensors)"],
                "offline": False,
            }
        ],
        key=lambda row: row["model"].lower(),
    )
    as_json = invoke(monkeypatch, "models", "--json")
    assert as_json.code == 0
    assert json.loads(as_json.stdout) == expected

    table = invoke(monkeypatch, "models")
    assert table.code == 0 and table.stderr == ""
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "FAMILY", "SIZE", "OFFLINE"]
    assert [line.split() for line in lines[1:]] == [
        [row["model"], row["family"], f"{row['size_bytes'] / 1000:.1f}", "kB"]
        + (["yes"] if row["offline"] else ["no:", "no", "weights", "(*.safetensors)"])
        for row in expected
    ]  # the tiny checkpoints are all under 1 MB


def test_llava_models_with_an_empty_cache_says_so_on_stderr(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "nothing-here"))
    outcome = invoke(monkeypatch, "models")
    assert (outcome.code, outcome.stdout) == (0, "")
    assert outcome.stderr == f"no LLaVA-family checkpoints in the Hugging Face cache ({tmp_path / 'nothing-here'})\n"


def readme_example(repo_id: str) -> list[str]:
    """The arguments of README's family-table example that uses `repo_id` (exactly one must)."""
    commands = re.findall(r"^\| [^|]+ \| [^|]+ \| `(llava [^`]+)` \|$", README.read_text(encoding="utf-8"), re.M)
    matching = [command for command in commands if f"--model {repo_id} " in command]
    assert len(matching) == 1, f"README's family table has no single example for {repo_id}"
    return shlex.split(matching[0])[1:]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_readme_family_example_runs_offline_from_the_hub_cache(family_name, hub_cache, images, references, monkeypatch):
    args = readme_example(README_IDS[family_name])
    # README's image names stand for the test pictures, in order; the last argument is the question.
    pictures = iter([images["red"], images["green"], images["blue"]])
    args = [str(next(pictures)) if arg.endswith(".jpg") else arg for arg in args]
    paths = [Path(arg) for arg in args if arg.endswith(".png")]
    outcome = invoke(monkeypatch, *args, "--max-new-tokens", str(MAX_NEW))
    assert outcome.code == 0, outcome.stderr
    assert outcome.stdout == references(family_name).answer([user(args[-1], paths)]) + "\n"


# LLaVA-OneVision and LLaVA-NeXT-Video from their image parts (the way they load without torchvision) --


@pytest.mark.parametrize("family_name", IMAGE_PARTS_FAMILIES)
def test_video_family_checkpoints_are_laid_out_as_the_hub_repos(checkpoints, family_name):
    processor_class = ROW[family_name].processor_class  # e.g. LlavaOnevisionProcessor
    video_processor_type = processor_class.removesuffix("Processor") + "VideoProcessor"  # LlavaOnevisionVideoProcessor
    folder = checkpoints(family_name)
    config = {
        name: json.loads((folder / name).read_text())
        for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
    }
    assert config["processor_config.json"]["processor_class"] == processor_class
    assert config["preprocessor_config.json"]["processor_class"] == processor_class
    assert config["video_preprocessor_config.json"]["video_processor_type"] == video_processor_type
    assert "chat_template" in json.loads((folder / "chat_template.json").read_text())


@pytest.fixture
def without_torchvision(monkeypatch):
    """llava_cli as it runs where torchvision is not installed, whether or not it is here."""
    import llava_cli.models.loader
    import llava_cli.models.processors

    monkeypatch.setattr(llava_cli.models.loader, "torchvision_installed", lambda: False)
    monkeypatch.setattr(llava_cli.models.processors, "torchvision_installed", lambda: False)


@pytest.mark.parametrize("family_name", IMAGE_PARTS_FAMILIES)
def test_image_parts_give_the_pixels_of_transformers_pil_image_processor_and_the_models_token_counts(
    family_name, checkpoints, images, tmp_path, without_torchvision
):
    from PIL import Image

    from llava_cli.models.loader import load_processor
    from llava_cli.models.vision import VisionInputs

    folder = checkpoints(family_name)
    row = family_for(json.loads((folder / "config.json").read_text()))
    processor = load_processor(Settings(model=str(folder)), folder, row)
    assert processor.video_processor is None
    Image.new("RGB", (20, 90), (250, 200, 0)).save(tmp_path / "tall.png")  # a 1x3 grid: fewer tiles than the others
    reference = ImagePartsReference(folder, PIL_IMAGE_PROCESSORS[family_name])
    for names in (["red"], ["tall"], ["red", "tall", "blue"]):
        paths = [tmp_path / "tall.png" if name == "tall" else images[name] for name in names]
        expected = reference.pixels([user("?", paths)])
        vision = VisionInputs(processor, row.tiling)
        refs = [load_image(str(path)) for path in paths]
        tiles = [image.pixel_values.reshape(-1, *image.pixel_values.shape[-3:]) for image in vision.prepare(refs)]
        for index, image_tiles in enumerate(tiles):  # the processor pads every image to the most tiles
            assert torch_equal(image_tiles, expected["pixel_values"][index][: len(image_tiles)]), names
            assert not expected["pixel_values"][index][len(image_tiles) :].any(), names
        assert vision.model_inputs(refs, 0)["image_sizes"].tolist() == expected["image_sizes"].tolist()
        assert vision.token_counts(refs) == reference.token_counts(expected), names


def torch_equal(left, right) -> bool:
    import torch

    return torch.equal(left, right)


@pytest.mark.parametrize("family_name", IMAGE_PARTS_FAMILIES)
def test_ask_each_with_batches_of_two_answers_each_image_as_plain_transformers(
    family_name, checkpoints, references, images, monkeypatch
):
    question = "What is in this picture?"
    paths = [images["red"], images["green"], images["blue"]]
    args = [
        "ask",
        "--model",
        checkpoints(family_name),
        "--each",
        *paths,
        "-p",
        question,
        "--batch-size",
        "2",
        "-n",
        str(MAX_NEW),
    ]
    outcome = invoke(monkeypatch, *args, stdout=BytesStdout())
    assert (outcome.code, outcome.stderr) == (0, "")
    answers = [json.loads(line)["answer"] for line in outcome.stdout.splitlines()]
    assert answers == [references(family_name).answer([user(question, [path])]) for path in paths]
