"""Build tiny random LLaVA checkpoints on the fly (no download, no committed weights).

`build_checkpoint` writes a llava-1.5 shaped one: a CLIP vision tower, a two-layer MLP projector, a
Llama decoder, a byte-level BPE tokenizer trained here with `<image>` as a special token, and a
`LlavaProcessor` with a chat template. `build_family_checkpoint(family, folder)` writes one of each
LLaVA family (`FAMILIES`: the labels of llava_cli/base/families.py's rows; `FAMILY_BUILDERS` has one
builder per label) the way the llava-hf checkpoints are laid out: llava-interleave (SigLIP + Qwen2,
ChatML tokens), LLaVA-NeXT and llava-next-video (CLIP + Llama with anyres tiling), LLaVA-OneVision
(SigLIP + Qwen2 with anyres tiling). OneVision and NeXT-Video processors are written file by file
as their hub repos hold them (`HubLayoutProcessor`), since transformers builds them only with
torchvision. Hidden sizes are multiples of 64 so bitsandbytes 4-bit runs on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.base import families

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is in this image? describe the picture in detail",
    "a red square, a green circle and a blue triangle on a white background",
    "how many objects are there? what colour is the cat?",
    "USER: ASSISTANT: hello world, this is a tiny model for tests",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ! ? : ; ' \" ( )",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
IMAGE_SIZE = 32
PATCH_SIZE = 8  # 16 patches -> 16 image tokens with the "default" (drop CLS) strategy
CONTEXT = 1024
LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGES_THEN_TEXT = (
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
)
# llava-interleave and llava-onevision: ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    + IMAGES_THEN_TEXT
    + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-v1.6-mistral: [INST] ... [/INST] answer</s>
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}\n"
    "{% elif message['role'] == 'user' %}[INST] " + IMAGES_THEN_TEXT + " [/INST]"
    "{% else %} {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
)
# Tiles of 32x32: 1x2, 2x1, 2x2, 1x3 and 3x1 grids, as llava-v1.6 uses 336-pixel tiles.
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
CROP_SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
FAMILIES = tuple(family.label for family in families.FAMILIES)


def build_tokenizer(*, chatml: bool = False, video: bool = False):
    """Llama-like (`<s>` first, `</s>` ends answers) or, with `chatml`, Qwen2-like (no BOS, `<|im_end|>`)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = (CHATML_SPECIAL_TOKENS if chatml else SPECIAL_TOKENS) + (["<video>"] if video else [])
    tok = Tokenizer(models.BPE(unk_token=None if chatml else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    extra = {"image_token": "<image>"} | ({"video_token": "<video>"} if video else {})
    if chatml:
        named = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra, **named)


TOWER_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)
DECODER_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**TOWER_SIZES, projection_dim=64)


def siglip_vision():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**TOWER_SIZES, vision_use_head=False)


def text_config(tokenizer, *, qwen2: bool = False, context: int = CONTEXT, seed_scale: float = 0.2):
    """A Llama (or Qwen2) decoder sized for `tokenizer`."""
    from transformers import LlamaConfig, Qwen2Config

    return (Qwen2Config if qwen2 else LlamaConfig)(
        **DECODER_SIZES,
        vocab_size=len(tokenizer),
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Large random weights give peaked logits, so greedy answers have no near-ties.
        initializer_range=seed_scale,
    )


def build_config(tokenizer, *, context: int = CONTEXT, seed_scale: float = 0.2):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=clip_vision(),
        text_config=text_config(tokenizer, context=context, seed_scale=seed_scale),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE,
    )


def build_checkpoint(folder: Path, *, seed: int = 0, context: int = CONTEXT) -> Path:
    """Write a tiny random llava-1.5 checkpoint (safetensors) to `folder` and return it."""
    return build_family_checkpoint("llava-1.5", folder, seed=seed, context=context)


def copy_without_weights(model: Path, folder: Path) -> dict[str, Any]:
    """`model`'s files but its safetensors weights, copied into `folder`; the weights, for a test to
    save another way (sharded, pickled...)."""
    from safetensors.torch import load_file

    for path in model.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
    return load_file(model / "model.safetensors")


def save_checkpoint(folder: Path, model, processor) -> Path:
    """Save `model` and `processor` to `folder` as a hub checkpoint is laid out; return the folder."""
    import torch
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    model.eval()
    with torch.no_grad():  # a rarer end-of-sequence gives answers of many lengths, not mostly empty ones
        model.lm_head.weight[tokenizer.eos_token_id] *= 0.5
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_family_checkpoint(family: str, folder: Path, *, seed: int = 0, context: int = CONTEXT) -> Path:
    """Write a tiny random checkpoint of `family` (one of `FAMILIES`) to `folder` and return it."""
    import torch

    torch.manual_seed(seed)
    model, processor = FAMILY_BUILDERS[family](context)
    return save_checkpoint(folder, model, processor)


def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


def llava15(context: int):
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    return LlavaForConditionalGeneration(build_config(tokenizer, context=context)), build_processor(tokenizer)


def llava_interleave(context: int):
    """llava-interleave-qwen: a plain `llava` model type whose decoder is Qwen2, prompted in ChatML."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = build_tokenizer(chatml=True)
    config = LlavaConfig(
        vision_config=siglip_vision(),
        text_config=text_config(tokenizer, qwen2=True, context=context),
        image_token_index=image_token_id(tokenizer),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHATML_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def next_parts(tokenizer, context: int) -> tuple[dict, dict]:
    """Config and processor arguments LLaVA-NeXT and LLaVA-NeXT-Video share: anyres CLIP tiles, a Llama decoder."""
    from transformers import LlavaNextImageProcessor

    config = dict(
        vision_config=clip_vision(),
        text_config=text_config(tokenizer, context=context),
        image_token_index=image_token_id(tokenizer),
        image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    processor = dict(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size=CROP_SIZE,
            image_grid_pinpoints=GRID_PINPOINTS,
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return config, processor


def llava_next(context: int):
    """llava-v1.6-mistral shaped: anyres tiles, a variable number of image tokens per image."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    config, processor = next_parts(build_tokenizer(), context)
    return (
        LlavaNextForConditionalGeneration(LlavaNextConfig(**config)),
        LlavaNextProcessor(**processor, chat_template=MISTRAL_TEMPLATE),
    )


def llava_next_video(context: int):
    """LLaVA-NeXT-Video-7B shaped: LLaVA-NeXT with a video path, vicuna-style prompts."""
    from transformers import (
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    tokenizer = build_tokenizer(video=True)
    config, parts = next_parts(tokenizer, context)
    image_processor = parts.pop("image_processor")
    processor = HubLayoutProcessor(
        processor_class="LlavaNextVideoProcessor",
        tokenizer=parts.pop("tokenizer"),
        image_processor=image_processor,
        video_processor=video_processor_config(
            "LlavaNextVideoVideoProcessor", image_processor, crop_size=CROP_SIZE, do_center_crop=True
        ),
        settings=parts | {"video_token": "<video>"},
        chat_template=LLAVA15_TEMPLATE,
    )
    model = LlavaNextVideoForConditionalGeneration(
        LlavaNextVideoConfig(**config, video_token_index=tokenizer.convert_tokens_to_ids("<video>"))
    )
    return model, processor


def llava_onevision(context: int):
    """llava-onevision-qwen2 shaped: SigLIP + Qwen2, anyres for one image, base tiles for several."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = build_tokenizer(chatml=True, video=True)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    config = LlavaOnevisionConfig(
        vision_config=siglip_vision(),
        text_config=text_config(tokenizer, qwen2=True, context=context),
        image_token_index=image_token_id(tokenizer),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    image_processor = LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=GRID_PINPOINTS)
    processor = HubLayoutProcessor(
        processor_class="LlavaOnevisionProcessor",
        tokenizer=tokenizer,
        image_processor=image_processor,
        video_processor=video_processor_config("LlavaOnevisionVideoProcessor", image_processor),
        settings=dict(
            num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
            vision_feature_select_strategy="full",
            video_token="<video>",
        ),
        chat_template=CHATML_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


@dataclass
class HubLayoutProcessor:
    """A processor written file by file as the llava-hf repos hold it: `preprocessor_config.json` (the
    image processor), `video_preprocessor_config.json`, `processor_config.json` naming the processor
    class, `chat_template.json` and the tokenizer files. OneVision and NeXT-Video processors are saved
    this way because transformers builds them only with a torchvision video processor, so their
    configs are written out by hand here."""

    processor_class: str
    tokenizer: Any
    image_processor: Any
    video_processor: dict
    settings: dict
    chat_template: str

    def save_pretrained(self, folder: Path) -> None:
        named = {"processor_class": self.processor_class}
        self.tokenizer.save_pretrained(folder)
        write_json(folder / "preprocessor_config.json", self.image_processor.to_dict() | named)
        write_json(folder / "video_preprocessor_config.json", self.video_processor | named)
        write_json(folder / "processor_config.json", {"image_token": "<image>"} | self.settings | named)
        write_json(folder / "chat_template.json", {"chat_template": self.chat_template})


def video_processor_config(video_processor_type: str, image_processor, **extra) -> dict:
    """A video processor's config as transformers saves it: the image processor's resizing and normalisation."""
    keys = (
        "size",
        "resample",
        "do_resize",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )
    settings = image_processor.to_dict()
    return {"video_processor_type": video_processor_type} | {key: settings[key] for key in keys} | extra


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


FAMILY_BUILDERS = {
    "llava-1.5": llava15,
    "llava-interleave": llava_interleave,
    "llava-next": llava_next,
    "llava-onevision": llava_onevision,
    "llava-next-video": llava_next_video,
}


def lay_out_hub_cache(checkpoint: Path, hf_home: Path, repo_id: str) -> Path:
    """Copy `checkpoint` into `hf_home` as the hub cache would hold `repo_id`; return the snapshot."""
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    sha = hashlib.sha1(json.dumps([p.name for p in files]).encode()).hexdigest()
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot
