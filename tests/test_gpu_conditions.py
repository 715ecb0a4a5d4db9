"""Issue 17, findings 1 and 2: what only a GPU showed, reproduced on the CPU.

1. On CUDA, a `StaticCache`'s write position (`cumulative_length`) becomes an inference tensor in
   the first prefill (`.to("cuda")` inside `torch.inference_mode()`); cropping it outside inference
   mode then raised in the second turn. Here the same state is made by hand.
2. Flash-attention takes no mask, so over `--compile`'s static cache it would attend to empty and
   stale slots: the compiled path must run a masked attention (SDPA or eager), whatever is installed.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from helpers import chat

from llava_cli.base.errors import LlavaError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.engine.paths import CompiledPath
from llava_cli.models.loader import load_model, pick_attention
from llava_cli.prompt.conversation import Conversation

MAX_NEW = 8


def make_write_positions_inference_tensors(cache) -> int:
    """What CUDA's first prefill leaves behind: each layer's write position as an inference tensor."""
    for layer in cache.layers:
        with torch.inference_mode():
            layer.cumulative_length = layer.cumulative_length.clone()
    return sum(layer.cumulative_length.is_inference() for layer in cache.layers)


def test_a_static_cache_made_as_cuda_makes_it_is_cropped_in_the_next_turn(tiny_model, reference, images):
    settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, compile=True)
    loaded = load_model(settings)
    engine = Engine(loaded)
    engine.path = CompiledPath(loaded.model, loaded.context_window, compile_step=False)
    conversation = Conversation()
    chat(engine, settings, conversation, reference, [("What is in this picture?", [images["red"]])])
    assert make_write_positions_inference_tensors(engine.cache.kv) == len(engine.cache.kv.layers)
    # The next turn reuses the prefix and crops what follows it: the answer's last token is never cached.
    stats = chat(engine, settings, conversation, reference, [("And the colours?", [])])
    assert 0 < stats[0].cached_tokens < stats[0].prompt_tokens
    assert loaded.model.config._attn_implementation == "sdpa"  # the attention the compiled path ran


@pytest.fixture
def flash_installed(monkeypatch):
    """flash-attn 2 installed and usable, as Python (`find_spec`) and transformers (its availability
    check) see it."""
    import transformers.utils
    import transformers.utils.import_utils

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    )
    for module in (transformers.utils, transformers.utils.import_utils):
        monkeypatch.setattr(module, "is_flash_attn_2_available", lambda *args, **kwargs: True)


def test_auto_attention_loads_sdpa_even_with_flash_installed(flash_installed, tiny_model):
    # The default path and --compile both need an attention that masks a static cache: the model
    # loaded with `--attn auto` runs SDPA, whatever is installed.
    loaded = load_model(Settings(model=str(tiny_model), attn="auto"))
    assert loaded.model.config._attn_implementation == "sdpa"


def test_an_attention_asked_for_is_the_one_loaded():
    assert pick_attention("flash_attention_2") == "flash_attention_2"
    assert pick_attention("eager") == "eager"


def test_compile_with_flash_attention_asked_for_is_refused_before_loading():
    with pytest.raises(UsageError, match=r"^--compile needs --attn sdpa or eager: flash-attention 2 would attend"):
        Settings(compile=True, attn="flash_attention_2")
    assert Settings(compile=True, attn="eager").attn == "eager"


def test_the_compiled_path_refuses_a_model_running_flash_attention():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(LlavaError, match=r"^--compile needs --attn sdpa or eager"):
        CompiledPath(model, 64, compile_step=False)
