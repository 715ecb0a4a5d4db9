"""Videos on the CPU: time to first token and peak memory at 8, 16 and 32 frames; sampled-frame
decoding against decoding the whole clip.

    python bench/video.py                  # ~2 minutes on 2 quiet CPU cores
    python bench/video.py --repeats 5

1. A random llava-onevision-shaped checkpoint with the real per-frame geometry (SigLIP 384 px,
   14 px patches: 196 pooled tokens a frame) and narrow towers, so that the token counts are the
   real model's while 2 cores finish in minutes. Each configuration runs in a fresh process
   (`--one FRAMES`), so its peak RSS is its own: a text-only question (0 frames) is the baseline
   measured in the same run; `llava ask`'s path (`Engine.generate`, max_new_tokens=1) gives the
   time to first token, video sampling and pixel preprocessing included.
2. Decoding a 300-frame 640x360 MP4: llava-cli's `sample_frames` (8 sampled frames converted,
   decoding stopping after the last) against decoding every frame to RGB, as transformers'
   `read_video_pyav` does before it samples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

FRAME_COUNTS = (0, 8, 16, 32)
CONTEXT = 8192


def build_checkpoint(folder: Path) -> Path:
    import torch
    from tiny_checkpoint import (
        CHATML_TEMPLATE,
        HubLayoutProcessor,
        build_tokenizer,
        save_checkpoint,
        video_processor_config,
    )
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tokenizer = build_tokenizer(chatml=True, video=True)
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[384, 384]],
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384}, image_grid_pinpoints=[[384, 384]]
    )
    processor = HubLayoutProcessor(
        processor_class="LlavaOnevisionProcessor",
        tokenizer=tokenizer,
        image_processor=image_processor,
        video_processor=video_processor_config("LlavaOnevisionVideoProcessor", image_processor),
        settings=dict(num_image_tokens=(384 // 14) ** 2, vision_feature_select_strategy="full", video_token="<video>"),
        chat_template=CHATML_TEMPLATE,
    )
    return save_checkpoint(folder, LlavaOnevisionForConditionalGeneration(config).eval(), processor)


def write_clip(path: Path, frames: int = 300, width: int = 640, height: int = 360) -> Path:
    from videos import encode_video, frames_of

    path.write_bytes(encode_video(frames_of(frames, width, height), "mp4", fps=30))
    return path


def one(model: Path, clip: Path, frames: int, repeats: int) -> dict:
    """In this process: the median time to first token for a question about `frames` frames (0: text only), and peak RSS."""
    import resource

    from bench_model import median
    from fakes import answer_of

    from llava_cli.base.settings import Settings
    from llava_cli.engine.local import Engine
    from llava_cli.media.video import Sampling, load_video
    from llava_cli.models.loader import load_model
    from llava_cli.prompt.conversation import Conversation

    settings = Settings(model=str(model), max_new_tokens=1)
    engine = Engine(load_model(settings))
    warm_up = Conversation()
    warm_up.ask("Hello?")
    answer_of(engine.generate(warm_up, settings), warm_up)  # the first forward pays one-off set-up costs
    times, tokens = [], 0
    for _ in range(repeats):
        engine.reset()  # every run pays sampling, preprocessing and prefill
        conversation = Conversation()
        media = [load_video(str(clip), Sampling(frames=frames))] if frames else []
        conversation.ask("What happens in this clip?", media)
        started = time.perf_counter()
        _, stats = answer_of(engine.generate(conversation, settings), conversation)
        times.append(time.perf_counter() - started)
        tokens = stats.prompt_tokens
    return {
        "frames": frames,
        "ttft_s": median(times),
        "prompt_tokens": tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def decode_comparison(clip: Path, repeats: int) -> tuple[float, float]:
    import av
    from bench_model import median

    from llava_cli.media.video import load_video, sample_frames

    def sampled() -> None:
        sample_frames(load_video(str(clip)), 8)

    def whole() -> None:
        with av.open(str(clip)) as container:
            [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]

    def timed(work) -> float:
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            runs.append(time.perf_counter() - started)
        return median(runs)

    return timed(sampled), timed(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.model, args.clip, args.one, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_checkpoint(folder / "model")
        clip = write_clip(folder / "clip.mp4")
        rows = []
        for frames in FRAME_COUNTS:
            command = [
                sys.executable,
                __file__,
                "--one",
                str(frames),
                "--model",
                str(model),
                "--clip",
                str(clip),
                "--repeats",
                str(args.repeats),
            ]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
        sampled_s, whole_s = decode_comparison(clip, args.repeats)
    base = rows[0]
    print("frames  prompt tokens  ttft s  x text-only  peak RSS MB  x text-only")
    for row in rows:
        print(
            f"{row['frames']:>6}  {row['prompt_tokens']:>13}  {row['ttft_s']:>6.3f}  {row['ttft_s'] / base['ttft_s']:>11.2f}"
            f"  {row['peak_rss_mb']:>11.0f}  {row['peak_rss_mb'] / base['peak_rss_mb']:>11.2f}"
        )
    print(
        f"decode 300-frame 640x360 mp4: 8 sampled frames {sampled_s:.3f} s, whole clip to RGB {whole_s:.3f} s "
        f"({whole_s / sampled_s:.2f}x)"
    )


if __name__ == "__main__":
    main()
