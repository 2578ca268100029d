"""The product's promise, end to end: the default `grpo-ray train` (SmolLM2-135M-Instruct on
reasoning-gym chain_sum, fixed seed) raises greedy held-out accuracy by >= 15 points within its
default step budget and ~15 minutes on a 2-core CPU machine; its LoRA twin (`--config lora`) raises it too.
Each takes ~10 minutes: `make test-demo`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from grpo_ray.checkpoints import latest_complete_checkpoint
from grpo_ray.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.demo]


def test_demo_raises_held_out_accuracy(tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert main(["train", "--output-dir", str(out)]) == 0
    minutes = (time.perf_counter() - t0) / 60
    scores = json.loads((out / "eval.json").read_text())
    print(f"demo: held-out accuracy {scores['start']:.3f} -> {scores['end']:.3f} in {minutes:.1f} min")
    assert scores["end"] - scores["start"] >= 0.15, scores
    assert minutes < 20
    assert Path(out / "reward_curve.png").is_file()


def test_lora_demo_raises_held_out_accuracy(tmp_path):
    """The same run training a LoRA adapter (`--config lora`): held-out accuracy rises too."""
    out = tmp_path / "lora"
    t0 = time.perf_counter()
    assert main(["train", "--config", "lora", "--output-dir", str(out)]) == 0
    minutes = (time.perf_counter() - t0) / 60
    scores = json.loads((out / "eval.json").read_text())
    print(f"lora demo: held-out accuracy {scores['start']:.3f} -> {scores['end']:.3f} in {minutes:.1f} min")
    assert scores["end"] - scores["start"] >= 0.05, scores
    assert minutes < 20
    _, ckpt = latest_complete_checkpoint(out)
    assert (ckpt / "model" / "adapter_config.json").is_file()  # an adapter, not a merged model
