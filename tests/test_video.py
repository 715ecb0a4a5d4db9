"""Videos end to end on tiny LLaVA-NeXT-Video and LLaVA-OneVision checkpoints, against plain transformers.

The reference never uses llava_cli to read a video: transformers' own `load_video` (PyAV backend)
picks and decodes the frames; with torchvision installed the checkpoint's own processor does the
rest (`processor(text=prompt, images=..., videos=[frames])`); without it (CPU installs, CI) the
pixel values come from `videopixels` - proven equal to the real video processor by
tests/test_video_pixels.py - and each `<video>` widens to as many tokens as the model's own
video tower gives features. Greedy answers must be equal on every turn of a chat that mixes a
video and an image, and a video asked about again is not encoded again (prefix reuse).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from fakes import answer_of
from helpers import slow_fixture
from tiny_checkpoint import build_family_checkpoint
from videos import frames_of, write_video

from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.media.video import Sampling, load_video
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

pytest.importorskip("av")

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
VIDEO_FAMILIES = ["llava-next-video", "llava-onevision"]
MAX_NEW = 8
DEFAULT_FRAMES = 8  # the tiny checkpoints' video processor configs name no num_frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "walk": write_video(folder / "walk.mp4", frames_of(20, 48, 36, seed=1)),
        "pan": write_video(folder / "pan.avi", frames_of(13, 40, 40, seed=2)),
    }


@slow_fixture(scope="module", params=VIDEO_FAMILIES)
def family(request, tmp_path_factory):
    folder = build_family_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    settings = Settings(model=str(folder), max_new_tokens=MAX_NEW)
    return request.param, folder, settings, load_model(settings)


class VideoReference:
    """Plain transformers for prompts with videos and images (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()

    @staticmethod
    def frames(path: Path, num_frames: int):
        from transformers.video_utils import load_video as transformers_load_video

        frames, _ = transformers_load_video(str(path), num_frames=num_frames, backend="pyav")
        return frames

    def inputs(self, messages: list[dict]) -> dict:
        videos = [
            self.frames(part["path"], part["frames"])
            for m in messages
            for part in m["content"]
            if part["type"] == "video"
        ]
        images = [part["image"] for m in messages for part in m["content"] if part["type"] == "image"]
        plain = [
            {"role": m["role"], "content": [{"type": p["type"], "text": p.get("text", "")} for p in m["content"]]}
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(
            plain, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        if HAS_TORCHVISION:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(self.folder)
            return dict(processor(text=text, images=images or None, videos=videos or None, return_tensors="pt"))
        return self.by_parts(text, images, videos)

    def by_parts(self, text: str, images: list, videos: list) -> dict:
        import torch
        import transformers

        from llava_cli.media.videopixels import VideoPreprocess, video_config

        config = video_config(self.folder)
        preprocess = VideoPreprocess.from_config(config, config["video_processor_type"])
        pixels: dict = {}
        if images:
            image_class = {
                "llava_next_video": "LlavaNextImageProcessorPil",
                "llava_onevision": "LlavaOnevisionImageProcessorPil",
            }[self.model.config.model_type]
            pixels.update(
                getattr(transformers, image_class).from_pretrained(self.folder)(images=[images], return_tensors="pt")
            )
            with torch.no_grad():
                widths = iter([len(f) for f in self.model.get_image_features(**pixels).pooler_output])
            text = re.sub("<image>", lambda _: "<image>" * next(widths), text)
        if videos:
            pixels["pixel_values_videos"] = torch.stack([preprocess.pixel_values(v) for v in videos])
            with torch.no_grad():
                features = self.model.model.get_video_features(
                    pixel_values_videos=pixels["pixel_values_videos"]
                ).pooler_output
            widths = iter([f.reshape(-1, f.shape[-1]).shape[0] for f in features])  # OneVision's include its newline
            text = re.sub("<video>", lambda _: "<video>" * next(widths), text)
        return dict(self.tokenizer(text, return_tensors="pt")) | pixels

    def answer(self, messages: list[dict]) -> str:
        inputs = self.inputs(messages)
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def user(text: str, videos: list[tuple[Path, int]] = (), images: list[Path] = ()) -> dict:
    from PIL import Image

    parts = [{"type": "video", "path": path, "frames": n} for path, n in videos]
    parts += [{"type": "image", "image": Image.open(path).convert("RGB")} for path in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_a_chat_mixing_a_video_and_an_image_equals_plain_transformers_and_encodes_the_video_once(family, clips, images):
    name, folder, settings, loaded = family
    reference = VideoReference(folder)
    engine = Engine(loaded)
    conversation, messages, stats = Conversation(), [], []
    script = [
        ("What happens in this clip?", [(clips["walk"], DEFAULT_FRAMES)], []),
        ("And then what?", [], []),
        ("Is this picture in it?", [], [images["red"]]),
    ]
    for text, videos, pictures in script:
        conversation.ask(text, [load_video(str(path)) for path, _ in videos] + [load_image(str(p)) for p in pictures])
        messages.append(user(text, videos, pictures))
        assert engine.encode(conversation).ids == reference.inputs(messages)["input_ids"][0].tolist(), text
        _, figures = answer_of(engine.generate(conversation, settings), conversation)
        assert conversation.turns[-1].answer == reference.answer(messages), text
        messages.append(assistant(conversation.turns[-1].answer))
        stats.append(figures)
    # The video's tokens are reused, never encoded again: each turn starts from the previous whole prompt.
    assert stats[1].cached_tokens >= stats[0].prompt_tokens
    assert stats[2].cached_tokens >= stats[1].prompt_tokens


@pytest.mark.parametrize("frames", [1, 4, 13])
def test_frames_n_equals_transformers_num_frames(family, clips, frames):
    name, folder, settings, loaded = family
    reference = VideoReference(folder)
    conversation = Conversation()
    conversation.ask("Describe it.", [load_video(str(clips["pan"]), Sampling(frames=frames))])
    answer_of(Engine(loaded).generate(conversation, settings), conversation)
    assert conversation.turns[-1].answer == reference.answer([user("Describe it.", [(clips["pan"], frames)])])
