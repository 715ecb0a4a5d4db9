"""Model loading: from `--model` (a hub id or a folder) to a ready model, processor and prompt format.

`load_model(settings)` returns a `LoadedModel` or raises `ModelError` with one line naming what was
asked and what to do. `resolve_model` turns `--model` into a folder: a local folder as is, a hub id
through models/download.py (a complete cached snapshot with no network at all; else the missing files are
downloaded, with short timeouts and a progress bar on a terminal's stderr). The checkpoint is checked
before any weights are read (config, model type, weights, processor files), safetensors are
loaded straight to the target device and dtype, and `trust_remote_code` is off unless asked for.
config.json picks the family's row (base/families.py): the transformers class, the processor (transformers'
AutoProcessor or, for a family whose processor needs torchvision when it is missing, the checkpoint's
image parts: models/processors.py) and the prompt format (`--chat-template`, else the family's:
`prompt_format_for`), checked to render a message with an image before any weights are read.
`--max-image-tokens` restricts an anyres family's grid pinpoints on the processor and the model's
config alike (models/imagetokens.py).
This module never prints (models/download.py draws its progress bar).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.base.errors import LlavaError, ModelError, UsageError, one_line
from llava_cli.base.families import FAMILIES, MODEL_TYPES, Family, family_for
from llava_cli.base.safeio import kind_of, read_regular
from llava_cli.base.settings import Settings
from llava_cli.media.images import ImageRef
from llava_cli.media.videopixels import video_frames_for
from llava_cli.models.download import MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, TOKENIZER_FILES
from llava_cli.models.imagetokens import restrict_model, restrict_pinpoints
from llava_cli.models.processors import image_parts_processor, torchvision_installed
from llava_cli.prompt.conversation import ChatTemplateFormat, Conversation, PromptFormat, prompt_format_for

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth")


@dataclass
class LoadedModel:
    """A model ready to generate, and the facts about how it was loaded."""

    name: str
    model: Any
    processor: Any
    prompt_format: PromptFormat
    family: Family
    device: str
    dtype: str
    load_seconds: float
    video_frames: Any = None  # videopixels: sampled frames -> pixel_values_videos; None for a family without videos

    @property
    def context_window(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def load_model(settings: Settings, folder: Path | None = None) -> LoadedModel:
    """`settings.model` loaded; from `folder` when the caller already resolved it (`resolve_model`)."""
    started = time.perf_counter()
    folder = folder or resolve_model(settings.model)
    config = read_config(settings.model, folder)
    family = family_for(config)
    check_weights(settings.model, folder, settings.allow_pickle)
    import torch

    device = pick_device(settings.device, torch)
    check_mps(device, settings)
    dtype = pick_dtype(settings.dtype, device, torch)
    processor = load_processor(settings, folder, family)
    check_image_token(settings.model, config, processor)
    prompt_format = choose_prompt_format(settings, family, processor)
    pinpoints = (
        restrict_pinpoints(processor, family, settings.max_image_tokens, settings.model)
        if settings.max_image_tokens
        else None
    )
    model = load_weights(settings, folder, family, device, dtype, torch)
    if pinpoints is not None:
        restrict_model(model, pinpoints)
    return LoadedModel(
        name=settings.model,
        model=model,
        processor=processor,
        prompt_format=prompt_format,
        family=family,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started,
        video_frames=video_frames_for(processor, folder) if family.takes_videos else None,
    )


def resolve_model(name: str) -> Path:
    """A local folder as is; a hub id from the local cache first, else downloaded."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {name} is a file; point it at the checkpoint's folder")
        return path
    if looks_like_path(name):
        raise ModelError(f"model folder not found: {name}")
    from llava_cli.models.download import snapshot_for

    return snapshot_for(name)


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def read_config(name: str, folder: Path) -> dict[str, Any]:
    """config.json, after every small file of the checkpoint passed `check_file_sizes`."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{name} has no config.json: it is not a Hugging Face model folder")
    check_file_sizes(name, folder)
    try:
        config = json.loads(read_regular(config_file, MAX_CONFIG_BYTES))
    except (OSError, ValueError, RecursionError) as err:
        raise ModelError(f"{name}/config.json cannot be read ({one_line(err)}); re-download the model") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"{name} is a {model_type!r} model, not a LLaVA checkpoint "
            f"(model_type {', '.join(MODEL_TYPES)}); choose a LLaVA model such as {FAMILIES[0].example}"
        )
    return config


def choose_prompt_format(settings: Settings, family: Family, processor: Any) -> PromptFormat:
    """--chat-template when given, else the family's format; checked to render and to place images."""
    if settings.chat_template:
        processor.chat_template = read_chat_template(settings.chat_template)
        prompt_format: PromptFormat | None = ChatTemplateFormat(processor)
        source = f"the chat template in {settings.chat_template}"
    else:
        prompt_format = prompt_format_for(family.prompt_style, processor)
        source = f"{settings.model}'s chat template"
    if prompt_format is None:
        raise ModelError(
            f"{settings.model} has no chat template and is not llava-1.5, so its prompt format is unknown; "
            "give one with --chat-template FILE"
        )
    check_places_images(prompt_format, processor.image_token, source)
    return prompt_format


def read_chat_template(path: str) -> str:
    """A Jinja chat template from a template file, or from a JSON file (chat_template.json) holding one."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--chat-template {path} cannot be read ({one_line(err)})") from None
    if path.endswith(".json"):
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f'--chat-template {path} is JSON without a "chat_template" string') from None
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"--chat-template {path} is empty; it must hold a Jinja chat template")
    return text


def check_places_images(prompt_format: PromptFormat, image_token: str, source: str) -> None:
    """Render a one-image message, so a broken template fails at start-up, not mid-chat."""
    probe = Conversation()
    probe.ask("?", [ImageRef(name="probe", digest="probe", image=None)])  # type: ignore[arg-type]  # only its placeholder is rendered
    try:
        text = prompt_format.render(probe)
    except LlavaError as err:
        raise ModelError(
            f"{source} does not render a simple message ({err}); fix it or pass --chat-template FILE"
        ) from None
    if text.count(image_token) != 1:
        raise ModelError(
            f"{source} does not place images (no {image_token} for an image); pass one that does with --chat-template FILE"
        )


def has_files(folder: Path, patterns: tuple[str, ...]) -> bool:
    # A glob is a generator, truthy even when empty: look for a first match instead.
    return any(next(folder.glob(pattern), None) is not None for pattern in patterns)


def check_file_sizes(name: str, folder: Path) -> None:
    """Every JSON and template file of the checkpoint (transformers reads them whole) is a regular
    file within its cap: a 600 MB config.json cost 14 s and 1.6 GB, a FIFO would block forever."""
    for path in sorted([*folder.glob("*.json"), *folder.glob("*.jinja")]):
        cap = MAX_TOKENIZER_BYTES if path.name in TOKENIZER_FILES else MAX_CONFIG_BYTES
        try:
            status = path.stat()
        except OSError:
            continue  # a broken link: the file is missing, as the checks that need it say
        if not stat.S_ISREG(status.st_mode):
            raise ModelError(f"{name}/{path.name} is {kind_of(status.st_mode)}, not a file; re-download the model")
        if status.st_size > cap:
            raise ModelError(
                f"{name}/{path.name} is larger than {cap:,} bytes, too large for a checkpoint's {path.suffix} file; re-download the model"
            )


def check_weights(name: str, folder: Path, allow_pickle: bool = False) -> None:
    """Safetensors weights pass; pickle weights pass only when the user allowed them."""
    if has_files(folder, WEIGHT_PATTERNS):
        return
    if has_files(folder, PICKLE_PATTERNS):
        if allow_pickle:
            return
        raise ModelError(
            f"{name} only has pickle (.bin) weights, which can run arbitrary code when loaded; "
            "use a safetensors checkpoint, or pass --allow-pickle if you trust where it came from"
        )
    raise ModelError(f"{name} has no weights (*.safetensors); the download is incomplete or the folder is wrong")


def check_device(settings: Settings) -> None:
    """Refuse --device cuda/mps on a machine without one, and what MPS cannot do, before anything slow (a download, the weights)."""
    if settings.device != "cpu":
        import torch

        check_mps(pick_device(settings.device, torch), settings)


def pick_device(requested: str, torch: Any) -> str:
    """auto: CUDA, else Apple silicon's MPS, else the CPU; an explicit GPU that is not there is refused."""
    has_cuda = torch.cuda.is_available()
    has_mps = mps_available(torch)
    if requested == "cuda" and not has_cuda:
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if requested == "mps" and not has_mps:
        raise UsageError(
            "--device mps was asked for but Apple silicon's MPS backend is not available here; use --device cpu"
        )
    if requested == "auto":
        return "cuda" if has_cuda else "mps" if has_mps else "cpu"
    return requested


def mps_available(torch: Any) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_mps(device: str, settings: Settings) -> None:
    """bitsandbytes has no MPS backend, and --compile's CUDA-graph path is not for MPS: one line each."""
    if device != "mps":
        return
    if settings.load_4bit or settings.load_8bit:
        flag = "--load-4bit" if settings.load_4bit else "--load-8bit"
        raise UsageError(
            f"{flag} needs bitsandbytes, which has no MPS backend; on Apple silicon drop it (float16 is used), or use --device cpu"
        )
    if settings.compile:
        raise UsageError(
            "--compile is not supported on MPS; drop it (Apple silicon decodes with the exact-shapes step)"
        )


def pick_dtype(requested: str, device: str, torch: Any) -> Any:
    if requested == "auto":
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    return getattr(torch, requested)


def pick_attention(requested: str) -> str:
    """auto: SDPA. The decode step a GPU captures and --compile's run over whole buckets whose empty
    columns only an attention mask hides; flash-attention takes none, so it runs only when asked for
    (and then the step runs over exact shapes, without a CUDA graph)."""
    return "sdpa" if requested == "auto" else requested


def load_processor(settings: Settings, folder: Path, family: Family) -> Any:
    """transformers' AutoProcessor, or the same processor from its image parts where that needs torchvision."""
    from transformers import AutoProcessor

    try:
        if family.processor_needs_torchvision and not torchvision_installed():
            processor = image_parts_processor(folder, family.processor_class, settings.trust_remote_code)
        else:
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    except Exception as err:
        raise ModelError(
            f"{settings.model}: its processor/tokenizer files cannot be loaded ({one_line(err)})"
        ) from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ModelError(f"{settings.model} has no image processor or tokenizer; it is not a complete LLaVA checkpoint")
    image_token = getattr(processor, "image_token", "<image>")
    if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
        raise ModelError(f"{settings.model}: its tokenizer has no {image_token} token, so images cannot be placed")
    return processor


def check_image_token(name: str, config: dict[str, Any], processor: Any) -> None:
    """The tokenizer's image token must be the one the weights expect, or images land nowhere."""
    expected = config.get("image_token_id", config.get("image_token_index"))
    image_token = getattr(processor, "image_token", "<image>")
    actual = processor.tokenizer.convert_tokens_to_ids(image_token)
    if expected is not None and actual != expected:
        raise ModelError(
            f"{name}: its tokenizer gives {image_token} the id {actual} but the model expects {expected}; "
            "the tokenizer files do not belong to these weights"
        )


# bitsandbytes' CPU backend, on a CPU with AVX512-BF16, fetches kernel code from the hub at import
# (`kernels.get_kernel`) and logs a warning when it cannot; it has no switch for that.
HUB_KERNELS_MODULE = "kernels"
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def import_bitsandbytes() -> None:
    """Import bitsandbytes on its bundled kernels: never code from the network, nothing printed."""
    try:
        with without_module(HUB_KERNELS_MODULE), quiet_logger(BITSANDBYTES_CPU_LOGGER):
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("--load-4bit/--load-8bit need bitsandbytes: pip install 'llava-cli[quant]'") from None


@contextmanager
def without_module(name: str) -> Iterator[None]:
    """`import name` fails inside the block (a None entry in sys.modules); the previous entry comes back after."""
    missing = object()
    previous = sys.modules.get(name, missing)
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if previous is missing:
            del sys.modules[name]
        else:
            sys.modules[name] = previous  # type: ignore[assignment]


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Only errors from the logger `name` inside the block (its fallback warnings are expected)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantization_config(settings: Settings, dtype: Any) -> Any:
    if not (settings.load_4bit or settings.load_8bit):
        return None
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if settings.load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_weights(settings: Settings, folder: Path, family: Family, device: str, dtype: Any, torch: Any) -> Any:
    import transformers
    from safetensors import SafetensorError

    model_class = getattr(transformers, family.model_class)
    try:
        model = model_class.from_pretrained(
            folder,
            dtype=dtype,
            device_map=device,  # straight to the target device, no CPU float32 detour
            attn_implementation=pick_attention(settings.attn),
            quantization_config=quantization_config(settings, dtype),
            use_safetensors=None if settings.allow_pickle else True,  # None: safetensors first, else .bin
            trust_remote_code=settings.trust_remote_code,
        )
    except LlavaError:
        raise
    except torch.OutOfMemoryError:
        raise LlavaError(
            f"out of memory loading {settings.model}; try --load-4bit, --device cpu or a smaller model"
        ) from None
    except SafetensorError as err:
        raise ModelError(
            f"{settings.model}: its weights are corrupt or incomplete ({one_line(err)}); re-download the model"
        ) from None
    except Exception as err:
        raise ModelError(f"{settings.model} could not be loaded: {one_line(err)}") from None
    return model.eval()
