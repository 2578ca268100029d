"""Asynchronous generation: the rollout queue's ordering (unit, no Ray) and a short end-to-end run."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from grpo_ray.data import PromptSampler
from grpo_ray.rollout.queue import RolloutQueue


class FakeEngines:
    """Stands in for the vLLM pool: a weight version, and a log of what each generation saw."""

    def __init__(self, gen_seconds: float) -> None:
        self.version = 0
        self.gen_seconds = gen_seconds
        self.busy = threading.Lock()
        self.sampled: dict[int, tuple[int, int, list]] = {}  # step -> (version at start, at end, rows)

    def generate_and_score(self, rows: list[dict], step: int) -> dict:
        with self.busy:
            start = self.version
            time.sleep(self.gen_seconds)  # long enough for a racing push to land mid-generation
            self.sampled[step] = (start, self.version, rows)
            return {"step": step, "rows": rows}

    def push(self) -> None:
        assert not self.busy.locked(), "weights pushed while a generation was running"
        self.version += 1


def run_loop(staleness: int, steps: int, save_after: int | None = None) -> tuple[FakeEngines, list[int], dict | None]:
    """The trainer's loop with the engines faked: take, update, drain, push."""
    engines = FakeEngines(gen_seconds=0.02)
    sampler = PromptSampler([{"prompt": f"p{i}"} for i in range(10)], batch_size=2, seed=0)
    queue = RolloutQueue(engines, sampler, staleness=staleness, max_steps=steps)
    seen, saved = [], None
    try:
        for step in range(1, steps + 1):
            batch, stale = queue.take(step)
            assert batch["step"] == step
            seen.append(stale)
            time.sleep(0.005)  # the update
            queue.drain()
            engines.push()  # update `step` is now on the engines: version == step
            if step == save_after:
                saved = queue.sampler_state()
    finally:
        queue.close()
    return engines, seen, saved


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_batch_of_step_t_is_sampled_by_the_weights_of_step_t_minus_1_minus_staleness(staleness):
    engines, seen, _ = run_loop(staleness, steps=6)
    for step, (start, end, _) in sorted(engines.sampled.items()):
        assert start == end, f"step {step}: weights changed during its generation"
        assert start == max(0, step - 1 - staleness), (step, start)
        assert seen[step - 1] == (step - 1) - start  # the staleness the metrics report
    assert seen == [min(s, staleness) for s in range(6)]
    assert sorted(engines.sampled) == list(range(1, 7))  # nothing generated past max_steps


def test_checkpoint_sampler_state_replays_the_rows_of_rollouts_still_in_flight():
    engines, _, saved = run_loop(staleness=1, steps=5, save_after=3)
    resumed = PromptSampler([{"prompt": f"p{i}"} for i in range(10)], batch_size=2, seed=0)
    resumed.load_state_dict(saved)
    assert resumed.next_batch() == engines.sampled[4][2]  # step 4's rows, drawn before the save


def test_sync_queue_has_nothing_in_flight_after_take():
    engines = FakeEngines(gen_seconds=0.0)
    sampler = PromptSampler([{"prompt": "p"}] * 4, batch_size=2, seed=0)
    queue = RolloutQueue(engines, sampler, staleness=0, max_steps=3)
    queue.take(1)
    assert not queue.inflight and queue.drain() < 0.01
    queue.close()


@pytest.mark.slow
def test_async_quick_run_reports_staleness_and_mismatch(tmp_path, tiny_model_path):
    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics
    from tests.conftest import quick_config

    cfg = quick_config(tmp_path, max_steps=4, save_steps=4, async_generation=True)
    train(cfg)
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]
    assert rows[0]["logprob_mismatch"] < 1e-3  # step 1 was sampled by the very weights it trains
    # later batches were sampled one update back (lr 1e-3 moves the tiny model): measured, and IS-corrected
    assert max(r["logprob_mismatch"] for r in rows[1:]) > 1e-3
    for row in rows:
        assert math.isfinite(row["loss"])
        assert "sampling/importance_sampling_ratio/mean" in row
        assert {"logprobs_s", "backward_s", "optimizer_s", "overlap_wait_s"} <= set(row)
    # generation and update share the cores here: the engine and the trainer ran with passive OpenMP waits
    omp = json.loads((Path(cfg.output_dir) / "placement.json").read_text())["omp_wait"]
    assert omp["trainer"] and omp["rollout"]
    assert {env["OMP_WAIT_POLICY"] for env in omp["trainer"] + omp["rollout"]} == {"PASSIVE"}
