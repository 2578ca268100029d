"""The benches' result files are strict JSON (a number that was not measured is null, not NaN).
Only the pure helpers are imported: no bench runs here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # the benches import each other (lora_bench -> measure)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # a dataclass looks its module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_writes_unmeasured_numbers_as_null():
    strict_json = _load("measure").strict_json
    value = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (2, None), "e": "NaN"}
    text = strict_json(value, indent=1)
    assert _strict(text) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, None], "e": "NaN"}
    with pytest.raises(ValueError):
        _strict(json.dumps({"a": math.nan}))  # what json.dumps alone wrote


def test_lora_bench_reports_no_reward_for_an_arm_that_logs_none():
    summarize = _load("lora_bench").summarize
    run = {"steps": [{"step": i, "step_time_s": 1.0} for i in range(4)], "trainer_rss_gib": 1.0, "trainer_rss_median_gib": 1.0,
           "peak_rss_gib": 2.0, "checkpoint_bytes": 2**20}  # fmt: skip
    assert summarize("trl_lora", run, warmup=2, params=10)["reward_mean"] is None
    run["steps"] = [{**r, "reward_mean": r["step"] / 2} for r in run["steps"]]
    assert summarize("lora", run, warmup=2, params=10)["reward_mean"] == 0.75


@pytest.mark.parametrize("path", sorted(BENCH.glob("results/*.json")), ids=lambda p: p.name)
def test_committed_bench_results_are_strict_json(path):
    _strict(path.read_text())


def test_flop_floor_counts_each_weight_once_per_token(tiny_model_path):
    """bench/flops.py: the model's matmul weights from the module tree equal the count from its
    config (attention projections + gated MLP per layer), and a step's FLOPs are the documented sum."""
    from transformers import AutoConfig

    flops = _load("flops")
    shape = flops.ModelShape.of(tiny_model_path)
    c = AutoConfig.from_pretrained(tiny_model_path)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    assert shape.body == c.num_hidden_layers * per_layer
    assert shape.head == c.vocab_size * c.hidden_size
    toy = flops.ModelShape(body=10, head=5, layers=1, hidden=1)
    assert toy.forward_flops(tokens=3, logit_tokens=2, attended_pairs=6) == 2 * 10 * 3 + 2 * 5 * 2 + 4 * 6
    # one group of 2 completions of 1 token after a 2-token prompt: prompt pairs 3, completion pairs 2 x (2 + 1)
    step = flops.step_flops(toy, groups=1, group_size=2, prompt_tokens=2, completion_tokens=1, extra_forwards=1)
    forward = toy.forward_flops(4, 2, 3 + 6)
    assert step == {"generate": toy.forward_flops(2, 0, 3) + toy.forward_flops(2, 2, 6), "train": 3 * forward, "extra_forwards": forward}
