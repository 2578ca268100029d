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
