"""Build tiny random LLaVA checkpoints on the fly (no download, no committed weights).

The checkpoint is llava-1.5 shaped: a CLIP vision tower, a two-layer MLP projector, a Llama decoder,
a byte-level BPE tokenizer trained here with `<image>` as a special token, and a `LlavaProcessor`
with a chat template. Hidden sizes are multiples of 64 so bitsandbytes 4-bit runs on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is in this image? describe the picture in detail",
    "a red square, a green circle and a blue triangle on a white background",
    "how many objects are there? what colour is the cat?",
    "USER: ASSISTANT: hello world, this is a tiny model for tests",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ! ? : ; ' \" ( )",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_SIZE = 32
PATCH_SIZE = 8  # 16 patches -> 16 image tokens with the "default" (drop CLS) strategy
CONTEXT = 1024
LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_config(tokenizer, *, context: int = CONTEXT, seed_scale: float = 0.2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Large random weights give peaked logits, so greedy answers have no near-ties.
        initializer_range=seed_scale,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
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
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, context=context)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a rarer end-of-sequence gives answers of many lengths, not mostly empty ones
        model.lm_head.weight[tokenizer.eos_token_id] *= 0.5
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder


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
