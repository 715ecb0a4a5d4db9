"""A random llava-1.5-shaped checkpoint for the CPU benchmarks, small enough for 2 cores.

Unlike the test suite's tiny model (16 image tokens), each image here gives llava-1.5's 576 image
tokens (a 336-pixel CLIP tower with 14-pixel patches), so prefill costs what it costs in proportion
on a real model; the towers are narrow so the whole benchmark runs in a minute or two. Built with
the test suite's tokenizer and checkpoint writer (tests/tiny_checkpoint.py); nothing is downloaded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_checkpoint lives with the tests

from tiny_checkpoint import LLAVA15_TEMPLATE, build_tokenizer, save_checkpoint


@dataclass(frozen=True)
class Shape:
    """The knobs of the benchmark model; the defaults give 576 image tokens per image."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 256
    text_layers: int = 4
    context: int = 4096

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_bench_checkpoint(folder: Path, shape: Shape = Shape(), seed: int = 0) -> Path:
    """Write the benchmark checkpoint (safetensors + processor) to `folder`; return it."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_hidden // 64),
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    text = LlamaConfig(
        hidden_size=shape.text_hidden,
        intermediate_size=int(2.6875 * shape.text_hidden),  # llama-7b's 11008 / 4096
        num_hidden_layers=shape.text_layers,
        num_attention_heads=max(1, shape.text_hidden // 64),
        vocab_size=len(tokenizer),
        max_position_embeddings=shape.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # peaked logits: answers of many lengths, no near-ties
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=shape.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": shape.image_size},
            crop_size={"height": shape.image_size, "width": shape.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE,
    )
    return save_checkpoint(folder, LlavaForConditionalGeneration(config), processor)


def write_test_images(folder: Path, count: int) -> list[Path]:
    """`count` distinct 400x300 PNG pictures (resized and cropped to 336 by the processor)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = Image.new("RGB", (400, 300), (40 * index % 256, 200, 255 - 30 * index % 256))
        ImageDraw.Draw(image).ellipse((50 + 20 * index, 40, 250, 240), fill=(255, 255, 255))
        paths.append(folder / f"picture-{index}.png")
        image.save(paths[-1])
    return paths


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
