"""Apple silicon: --device auto/mps, float16 and the exact-shapes step on MPS, 4/8-bit refused; MPS is faked here
(these tests run on Linux CPUs: nothing in them ran on a Mac)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cli_runner import invoke

from llava_cli.base.errors import UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine import scheduler
from llava_cli.engine.local import Engine
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.scheduler import DecodeBatch
from llava_cli.models import loader

torch = pytest.importorskip("torch")


@pytest.fixture
def fake_mps(monkeypatch):
    """available(cuda, mps): what torch reports."""

    def available(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return available


@pytest.mark.parametrize(("cuda", "mps", "picked"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu(fake_mps, cuda, mps, picked):
    fake_mps(cuda, mps)
    assert loader.pick_device("auto", torch) == picked


def test_mps_runs_in_float16_unless_asked_otherwise():
    assert loader.pick_dtype("auto", "mps", torch) is torch.float16
    assert loader.pick_dtype("bfloat16", "mps", torch) is torch.bfloat16


def test_device_mps_without_mps_is_one_line(fake_mps, images, tiny_model, monkeypatch):
    fake_mps(False, False)
    outcome = invoke(
        monkeypatch, "ask", images["red"], "what?", "--model", tiny_model, "--device", "mps", "--no-server"
    )
    assert (outcome.code, outcome.stdout) == (2, "")
    assert (
        outcome.stderr
        == "llava: error: --device mps was asked for but Apple silicon's MPS backend is not available here; use --device cpu\n"
    )


@pytest.mark.parametrize("flag", ["--load-4bit", "--load-8bit"])
def test_quantization_on_mps_is_refused_before_anything_loads(fake_mps, flag, images, tiny_model, monkeypatch):
    fake_mps(False, True)
    monkeypatch.setattr(loader, "load_weights", lambda *args: pytest.fail("the weights must not be loaded"))
    outcome = invoke(monkeypatch, "ask", images["red"], "what?", "--model", tiny_model, flag, "--no-server")
    assert outcome.code == 2
    assert (
        outcome.stderr
        == f"llava: error: {flag} needs bitsandbytes, which has no MPS backend; on Apple silicon drop it (float16 is used), or use --device cpu\n"
    )


def test_compile_on_mps_is_refused():
    with pytest.raises(UsageError, match="--compile is not supported on MPS"):
        loader.check_mps("mps", Settings(compile=True))
    loader.check_mps("cpu", Settings(compile=True, load_4bit=True))  # elsewhere these are other modules' business


def test_the_model_is_loaded_to_mps_in_float16(fake_mps, tiny_model, monkeypatch):
    fake_mps(False, True)
    asked = {}

    def record(settings, folder, family, device, dtype, torch_):
        asked.update(device=device, dtype=dtype)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loader, "load_weights", record)
    with pytest.raises(RuntimeError, match="stop here"):
        loader.load_model(Settings(model=str(tiny_model)))
    assert asked == {"device": "mps", "dtype": torch.float16}


def test_decoding_on_mps_steps_exact_shapes_without_graphs(tiny_loaded):
    engine = Engine(tiny_loaded)
    engine.model = SimpleNamespace(
        device=torch.device("mps"), config=tiny_loaded.model.config, dtype=tiny_loaded.model.dtype
    )
    batch = DecodeBatch(engine, PrefixPool(None))
    assert batch.captured_shapes is False and scheduler.replays_graphs(engine.model) is False
