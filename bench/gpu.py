"""GPU benchmark: a llava-1.5-7b-shaped model with random fp16 weights, built on the GPU (no download).

    python bench/gpu.py                       # needs a CUDA GPU with ~20 GB free; ~5 minutes
    python bench/gpu.py --new-tokens 256 --turns 10
    python bench/gpu.py --smoke               # the same steps on a small model (CPU allowed): checks the script

Without a CUDA device (and without --smoke) it says so and exits 0.

The model is `LlavaForConditionalGeneration(config)` with llava-1.5-7b-hf's numbers: CLIP ViT-L/14 at
336 pixels (576 image tokens), a Llama decoder with 4096 hidden, 32 layers, 32 heads, 11008 MLP,
a 32064-token vocabulary, a 4096-token context. The tokenizer is a word-level one of that size
built here. It measures, for one image and a question:
  - decode tokens/s of plain `model.generate`, of llava-cli's default path (`Engine`), and of
    `--compile` (static cache + torch.compile with CUDA graphs); fixed-length answers (EOS ignored);
  - each as a fraction of the memory-bandwidth bound: bandwidth / bytes of weights read per token
    (the decoder and lm_head; the vision tower does not run while decoding), with the bandwidth
    measured here by a device-to-device copy and, where the card is known, its data-sheet figure;
  - time to first token for one image (fresh engine: vision tower + 600-token prefill);
  - a 10-turn chat: time to first token per turn with cache reuse, turn-10 / turn-1;
  - peak GPU memory (torch.cuda.max_memory_allocated) of each path.
Targets (issue 4): default path >= 1.5x plain generate; --compile >= 60% of the bandwidth bound;
peak memory <= 15 GB. 4-bit figures need bitsandbytes and are not measured by this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Data-sheet memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name().
DATASHEET_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,  # SXM
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "RTX 4090": 1.008e12,
}
VOCAB = 32064
IMAGE_TOKEN, PAD_TOKEN = 32000, 32001
WORDS = "USER: ASSISTANT: What is in this picture? Describe it in detail. Tell me more about the colours and shapes .".split()
QUESTIONS = [f"Question {n}: what else can you tell me about it?" for n in range(1, 100)]


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    mlp: int = 11008
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096


SMOKE = Shape(hidden=128, layers=2, heads=2, mlp=256, vision_hidden=64, vision_layers=2, vision_heads=1, vision_mlp=128)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="answer length for the decode figures")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="small model, any device: check that the script runs")
    return parser.parse_args()


def build_tokenizer():
    """A word-level tokenizer with llava-1.5's vocabulary size and special-token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = list(dict.fromkeys(["<unk>", "<s>", "</s>"] + WORDS))
    names += [f"w{i}" for i in range(len(names), IMAGE_TOKEN)] + ["<image>", "<pad>"]
    names += [f"x{i}" for i in range(len(names), VOCAB)]
    vocab = {name: index for index, name in enumerate(names)}
    assert len(vocab) == VOCAB and vocab["<image>"] == IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_loaded(shape: Shape, device: str, dtype):
    """llava-cli's `LoadedModel` around a random llava-1.5-7b-shaped model made directly on `device`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llava_cli.conversation import Llava15Format
    from llava_cli.families import family_for
    from llava_cli.loader import LoadedModel

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=336, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=VOCAB,
        max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=576,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    with torch.device(device):  # weights are created on the GPU: no CPU copy, no float32 detour
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return LoadedModel(
        name="random llava-1.5-7b-shaped", model=model, processor=processor, prompt_format=Llava15Format(),
        family=family_for({"model_type": "llava"}), device=device, dtype=str(dtype).removeprefix("torch."), load_seconds=time.perf_counter() - started,
    )


def picture():
    """A 640x480 picture (the processor resizes and crops it to 336x336)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (30, 120, 200))
    ImageDraw.Draw(image).ellipse((120, 80, 480, 400), fill=(250, 250, 250))
    return image


def image_ref(image):
    """An `ImageRef` for an in-memory picture, through llava-cli's own loader (PNG bytes)."""
    import io

    from llava_cli.images import image_from_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image_from_bytes(buffer.getvalue(), "picture.png", 50_000_000)


class Clock:
    """Wall-clock seconds of a call, with the GPU's queued work finished at both ends."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self, action) -> float:
        self.sync()
        started = time.perf_counter()
        action()
        self.sync()
        return time.perf_counter() - started


def plain_decode(loaded, image, clock: Clock, tokens: int) -> dict:
    """Plain `model.generate` on the same prompt: time to first token and decode tokens/s."""
    import torch

    prompt = "USER: <image>\nWhat is in this picture? Describe it in detail. ASSISTANT:"
    inputs = loaded.processor(text=prompt, images=image, return_tensors="pt").to(loaded.model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)

    def run(n: int) -> None:
        with torch.inference_mode():
            loaded.model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    run(4)  # warm-up
    first = min(clock(lambda: run(1)) for _ in range(3))
    total = clock(lambda: run(tokens))
    return {"ttft_s": first, "tokens_per_s": (tokens - 1) / (total - first)}


def engine_decode(engine, image, settings, runs: int) -> dict:
    """llava-cli's engine on a fresh one-image conversation; the figures of the last of `runs` answers."""
    from llava_cli.backend import Answer
    from llava_cli.conversation import Conversation

    for _ in range(runs):
        engine.reset()  # a fresh conversation every run: the image and prompt run again
        conversation = Conversation()
        conversation.ask("What is in this picture? Describe it in detail.", [image])
        answer = Answer(engine.generate(conversation, settings))
        "".join(answer)
    return answer.stats.as_dict()


def chat_growth(engine, image, settings, turns: int) -> list[float]:
    """Time to first token of each turn of one chat (one image in turn 1), reusing the cache."""
    from llava_cli.backend import Answer
    from llava_cli.conversation import Conversation

    engine.reset()
    conversation, ttfts = Conversation(), []
    for turn in range(turns):
        conversation.ask(QUESTIONS[turn], [image] if turn == 0 else [])
        answer = Answer(engine.generate(conversation, settings))
        "".join(answer)
        ttfts.append(answer.stats.ttft_s)
    return ttfts


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical bandwidth ceiling."""
    import torch

    source = torch.empty(2**29, dtype=torch.float32, device=device)  # 2 GiB
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = Clock(device)(lambda: [target.copy_(source) for _ in range(10)])
    return 2 * source.numel() * source.element_size() * 10 / seconds


def decode_bytes_per_token(model) -> int:
    """Bytes of weights each decoded token reads: the decoder and lm_head, not the vision tower nor
    the embedding table (one row of it per token)."""
    decoder = sum(p.numel() * p.element_size() for name, p in model.model.language_model.named_parameters() if "embed_tokens" not in name)
    return decoder + sum(p.numel() * p.element_size() for p in model.lm_head.parameters())


def peak_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def main() -> int:
    args = parse_args()
    import torch

    from llava_cli.engine import Engine
    from llava_cli.settings import Settings

    if not torch.cuda.is_available() and not args.smoke:
        print("bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine, or --smoke to check the script)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    shape = SMOKE if args.smoke else Shape()
    tokens = 16 if args.smoke else args.new_tokens
    clock = Clock(device)
    loaded = build_loaded(shape, device, dtype)
    image = picture()
    ref = image_ref(image)
    settings = Settings(model=loaded.name, max_new_tokens=tokens, device=device)
    figures = {"built_s": loaded.load_seconds}

    reset_peak(device)
    figures["plain"] = plain_decode(loaded, image, clock, tokens)
    figures["plain"]["peak_gb"] = peak_gb(device)

    reset_peak(device)
    default = fixed_length(Engine(loaded))
    figures["default"] = engine_decode(default, ref, settings, runs=2)
    figures["default"]["peak_gb"] = peak_gb(device)
    figures["chat"] = chat_growth(default, ref, dataclasses.replace(settings, max_new_tokens=32), args.turns)
    del default

    reset_peak(device)
    compiled = fixed_length(Engine(loaded))
    compile_settings = dataclasses.replace(settings, compile=True)
    started = time.perf_counter()
    engine_decode(compiled, ref, compile_settings, runs=1)  # compiles and records the CUDA graphs
    figures["compile_warmup_s"] = time.perf_counter() - started
    figures["compile"] = engine_decode(compiled, ref, compile_settings, runs=2)
    figures["compile"]["peak_gb"] = peak_gb(device)
    del compiled

    bandwidth = copy_bandwidth(device)
    report(figures, loaded, bandwidth, decode_bytes_per_token(loaded.model), args, tokens)
    return 0


def fixed_length(engine):
    """No end-of-sequence for the benchmark: every answer is exactly max_new_tokens long, so tokens/s
    compare like with like (random weights would stop at a random point)."""
    engine.eos_ids = set()
    return engine


def report(figures: dict, loaded, bandwidth: float, bytes_per_token: int, args, tokens: int) -> None:
    import torch

    card = torch.cuda.get_device_name() if loaded.device == "cuda" else "CPU (smoke run)"
    datasheet = next((value for key, value in DATASHEET_BANDWIDTH.items() if key in card), None)
    print(f"card: {card}; model: {loaded.name}{' (SMOKE: small shape)' if args.smoke else ''}, {loaded.dtype}; "
          f"built in {figures['built_s']:.1f}s; {bytes_per_token / 1e9:.2f} GB of weights read per decoded token")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> bound {bandwidth / bytes_per_token:.1f} tokens/s"
          + (f"; data sheet {datasheet / 1e9:.0f} GB/s -> bound {datasheet / bytes_per_token:.1f} tokens/s" if datasheet else ""))
    plain = figures["plain"]["tokens_per_s"]
    print(f"{'path':<22}{'decode tok/s':>13}{'x plain':>9}{'% copy bound':>14}{'% sheet bound':>15}{'ttft (1 image)':>16}{'peak GB':>9}")
    for name, key in (("plain generate", "plain"), ("llava-cli default", "default"), ("llava-cli --compile", "compile")):
        row = figures[key]
        rate = row["tokens_per_s"]
        sheet = f"{100 * rate * bytes_per_token / datasheet:>14.0f}%" if datasheet else f"{'n/a':>15}"
        print(f"{name:<22}{rate:>13.1f}{rate / plain:>9.2f}{100 * rate * bytes_per_token / bandwidth:>13.0f}%{sheet}"
              f"{row['ttft_s'] * 1000:>14.0f}ms{row['peak_gb']:>9.2f}")
    print(f"--compile warm-up (compiling + CUDA graphs): {figures['compile_warmup_s']:.1f}s; answers of {tokens} tokens")
    chat = figures["chat"]
    print("chat TTFT per turn (ms): " + ", ".join(f"{t * 1000:.0f}" for t in chat) + f"; turn-{len(chat)}/turn-1 {chat[-1] / chat[0]:.2f}")
    if args.smoke:
        print("smoke run: small model, targets not judged")
        return
    print("targets: default >= 1.5x plain: {}; --compile >= 60% of bound: {}; peak <= 15 GB: {}".format(
        verdict(figures["default"]["tokens_per_s"] / plain >= 1.5),
        verdict(figures["compile"]["tokens_per_s"] * bytes_per_token / (datasheet or bandwidth) >= 0.6),
        verdict(max(figures[key]["peak_gb"] for key in ("default", "compile")) <= 15),
    ))
    print("4-bit (--load-4bit) figures: not measured by this script (needs bitsandbytes)")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
