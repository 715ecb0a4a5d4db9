"""bench/gpu.py survives its one run on a lent GPU: `--smoke` runs every phase on the CPU and leaves
each phase's figures in $OUT/gpu.json, the cache-cropping chat answers like plain greedy `generate`
on both paths, and a phase that raises is reported while the phases after it still run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHASES = (
    "bandwidth",
    "plain",
    "default",
    "no_cuda_graph",
    "compile",
    "crop_chat",
    "buckets",
    "memory",
    "batch",
)

pytestmark = pytest.mark.slow


def smoke(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = os.environ | {"OUT": str(out), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, json.loads((out / "gpu.json").read_text())


def test_smoke_run_saves_every_phase_with_numeric_figures_and_crop_chat_answers_equal_plain_generate(tmp_path):
    done, report = smoke(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(report["phases"]) == list(PHASES)
    for name, entry in report["phases"].items():
        assert entry["status"] == "ok", (name, entry)
        assert entry["figures"], name
        for key, value in entry["figures"].items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, value)
        assert f"{name}: " in done.stdout  # printed as the phase ended, not only saved
    chat = report["phases"]["crop_chat"]["figures"]
    turns = chat["default_turns_equal"]
    assert turns >= 2
    for path in ("default", "no_cuda_graph", "compile"):
        assert chat[f"{path}_answers_equal"] is True
        assert chat[f"{path}_turns_equal"] == turns
        assert chat[f"{path}_crops"] == turns - 1  # every turn after the first reused only part of the history
    buckets = report["phases"]["buckets"]["figures"]
    sizes = [int(key.removeprefix("kv_gb_")) for key in buckets if key.startswith("kv_gb_")]
    assert sizes[-2:] == [2048, 4096] and sizes == sorted(sizes) and len(sizes) >= 3
    assert buckets["kv_gb_4096"] == 2 * buckets["kv_gb_2048"]
    assert report["phases"]["default"]["figures"]["graph_replayed"] is False  # a CPU: the step runs uncaptured
    batch = report["phases"]["batch"]["figures"]
    assert {f"b{rows}_{graph}_tokens_per_s" for rows in (1, 4) for graph in ("graph", "no_graph")} <= set(batch)
    assert batch["graph_replayed"] is False and batch["capture_failed"] is False  # the captured shapes ran eagerly
    compiled = report["phases"]["compile"]["figures"]
    assert compiled["graphs"] >= 1 and compiled["recompiles"] == 0 and compiled["graph_breaks"] == 0
    assert compiled["cudagraph_skips"] == 0
    assert report["smoke"] is True and "not judged (smoke run)" in done.stdout


def test_a_failing_phase_is_reported_in_one_line_and_the_next_phases_still_run(tmp_path):
    done, report = smoke(tmp_path, "--fail-phase", "plain")
    assert done.returncode == 1
    phases = report["phases"]
    assert phases["plain"]["status"] == "failed"
    assert phases["plain"]["error"] == "RuntimeError: failing on purpose (--fail-phase, the benchmark's self-test)"
    lines = [line for line in done.stdout.splitlines() if line.startswith("plain: ")]
    assert lines == [f"plain: FAILED after {phases['plain']['seconds']:.1f}s: {phases['plain']['error']}"]
    assert [name for name in PHASES if phases[name]["status"] == "ok"] == [name for name in PHASES if name != "plain"]
    assert "failed phases: plain" in done.stdout
    assert "pass mark default >= 1.5x plain: not judged (smoke run)" in done.stdout
