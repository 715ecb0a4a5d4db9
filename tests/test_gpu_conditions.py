"""Issue 17, finding 2: what only a GPU showed, reproduced on the CPU. Flash-attention takes no mask,
so over a bucketed step's empty columns (CUDA's captured step, `--compile`'s) it would attend to
empty slots: the bucketed step must run a masked attention (SDPA or eager), whatever is installed.
(Finding 1, cropping a `StaticCache` made under inference mode, went with the static path: issue 21.)
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from llava_cli.base.errors import LlavaError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.scheduler import DecodeBatch
from llava_cli.models.loader import load_model, pick_attention

MAX_NEW = 8


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
    # The bucketed step (a GPU's default) and --compile both need an attention that masks empty columns: the model
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


def test_the_compiled_step_refuses_a_model_running_flash_attention():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(LlavaError, match=r"^--compile needs --attn sdpa or eager"):
        DecodeBatch(SimpleNamespace(model=model), PrefixPool(None), compile_step=True)
