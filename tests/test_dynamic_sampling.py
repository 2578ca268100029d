"""Dynamic sampling (grpo_ray.rollout.dynamic): which groups a step trains on.

The rollout here is scripted (each round's rewards are given), so the selection, the refill
rounds, the fill when rounds run out and the re-normalisation are checked exactly without an
engine; `test_dynamic_sampling_run` below runs it for real (Ray, vLLM, DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo_ray.algorithm import compute_advantages
from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.data import PromptSampler
from grpo_ray.rollout.batch import RolloutBatch
from grpo_ray.rollout.dynamic import sample_informative
from grpo_ray.rollout.runner import Rollout

G = 4  # completions per group


class ScriptedRollout(Rollout):
    """A Rollout whose rounds return batches with the given rewards (one list of G per group)."""

    def __init__(self, cfg: GRPOConfig, rounds: list[list[list[float]]]) -> None:
        super().__init__(cfg, pool=None, backend=None, reward_specs=["r"])
        self.rounds = rounds
        self.calls: list[tuple[list[dict], int, int]] = []

    def generate_and_score(self, rows, step, attempt=0):
        self.calls.append((rows, step, attempt))
        per_func = torch.tensor([r for group in self.rounds[attempt] for r in group], dtype=torch.float32)[:, None]
        adv, rewards = self.advantages(per_func, ["r"], G)
        n = len(per_func)
        return RolloutBatch(
            prompt_ids=[[attempt, i // G] for i in range(n)], completion_ids=[[attempt, i] for i in range(n)], sampling_logprobs=None,
            truncated=[False] * n, prompts=[row["prompt"] for row in rows for _ in range(G)], completions=[f"{attempt}/{i}" for i in range(n)],
            rewards=rewards, rewards_per_func=per_func, reward_names=["r"], advantages=adv, num_generations=G, gen_tokens=2 * n,
        )  # fmt: skip


def cfg_for(**kw) -> GRPOConfig:
    return GRPOConfig(num_generations=G, dynamic_sampling=True, **kw)


def draw_from(sampler: PromptSampler):
    return sampler.next_batch


FLAT, MIXED = [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]


def test_refills_with_informative_groups_in_sampling_order():
    rounds = [[FLAT, MIXED, [0.0] * 4, [0.0, 1.0, 0.0, 0.0]], [[0.5, 0.2, 0.5, 0.5], FLAT, MIXED, [0.1, 0.9, 0.3, 0.3]]]
    rollout = ScriptedRollout(cfg_for(), rounds)
    sampler = PromptSampler([{"prompt": f"p{i}"} for i in range(100)], batch_size=4, seed=0)
    batch = sample_informative(rollout, draw_from(sampler), step=7, max_rounds=3)
    # round 0 groups 1, 3; round 1 groups 0, 2 (round 1's group 3 is surplus and dropped)
    assert [c for c in batch.completions[::G]] == ["0/4", "0/12", "1/0", "1/8"]
    assert [a for _, _, a in rollout.calls] == [0, 1] and {s for _, s, _ in rollout.calls} == {7}
    assert sampler.position == 8  # both rounds' prompts are consumed
    assert batch.prompts[::G] == [rollout.calls[0][0][1]["prompt"], rollout.calls[0][0][3]["prompt"], rollout.calls[1][0][0]["prompt"], rollout.calls[1][0][2]["prompt"]]
    assert len(batch) == 4 * G and batch.informative_groups() == [0, 1, 2, 3]
    m = batch.metrics()
    assert (m["sampling_rounds"], m["groups_filtered"], m["groups_padded"]) == (2.0, 3.0, 0.0)
    assert m["reward_sampled_mean"] == pytest.approx(float(torch.tensor(rounds).mean()))
    assert batch.gen_tokens == 2 * 4 * G * 2  # both rounds' tokens were generated


def test_continuous_rewards_filtered_by_variance_not_by_range():
    # 0.3 everywhere has zero variance; a tiny spread is informative (OpenRLHF #1270 filtered by mean range)
    rounds = [[[0.3] * 4, [0.3, 0.3, 0.3, 0.3001]]]
    batch = sample_informative(ScriptedRollout(cfg_for(), rounds), lambda: [{"prompt": "a"}, {"prompt": "b"}], step=1, max_rounds=1)
    m = batch.metrics()
    assert (m["groups_filtered"], m["groups_padded"]) == (1.0, 1.0)
    assert batch.completions[::G] == ["0/0", "0/4"]  # the fill kept in sampling order


def test_rounds_run_out_fill_with_first_uninformative_groups():
    rounds = [[FLAT, MIXED, [0.0] * 4], [[0.0] * 4, FLAT, FLAT]]
    rollout = ScriptedRollout(cfg_for(), rounds)
    batch = sample_informative(rollout, lambda: [{"prompt": str(i)} for i in range(3)], step=2, max_rounds=2)
    assert batch.completions[::G] == ["0/0", "0/4", "0/8"]  # round 0 whole: MIXED + the first two uninformative
    m = batch.metrics()
    assert (m["sampling_rounds"], m["groups_filtered"], m["groups_padded"]) == (2.0, 5.0, 2.0)
    assert len(batch) == 3 * G


def test_batch_scaling_renormalised_over_the_trained_groups():
    rounds = [[FLAT, [0.0, 10.0, 0.0, 10.0]], [[0.0, 1.0, 0.0, 0.0], FLAT]]
    cfg = cfg_for(scale_rewards="batch")
    batch = sample_informative(ScriptedRollout(cfg, rounds), lambda: [{"prompt": "a"}, {"prompt": "b"}], step=1, max_rounds=2)
    expected, _ = compute_advantages(batch.rewards_per_func, G, None, "batch")
    assert torch.equal(batch.advantages, expected)
    first_round_adv = ScriptedRollout(cfg, rounds).generate_and_score([{"prompt": "a"}, {"prompt": "b"}], 1).advantages
    assert not torch.allclose(batch.advantages[:G], first_round_adv[G:])  # the batch's std differs from round 0's


def test_one_round_keeps_the_batch_as_sampled():
    rounds = [[FLAT, MIXED]]
    rollout = ScriptedRollout(cfg_for(), rounds)
    plain = rollout.generate_and_score([{"prompt": "a"}, {"prompt": "b"}], 1)
    batch = sample_informative(rollout, lambda: [{"prompt": "a"}, {"prompt": "b"}], step=1, max_rounds=1)
    assert torch.equal(torch.sort(batch.advantages).values, torch.sort(plain.advantages).values)
    assert batch.metrics()["groups_padded"] == 1.0


def test_max_rounds_validated():
    with pytest.raises(ConfigError, match="dynamic_sampling_max_rounds=0"):
        GRPOConfig(dynamic_sampling=True, dynamic_sampling_max_rounds=0)


def _completions(out) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for line in (out / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row)
    return by_step


def _sampler_state(out: Path, step: int) -> dict:
    """The data position a checkpoint saved (trainer_state.json's sampler)."""
    (state,) = [s for p in (out / "ray" / "train").glob("checkpoint_*/trainer_state.json") if (s := json.loads(p.read_text()))["step"] == step]
    return state["sampler"]


@pytest.mark.slow
def test_dynamic_sampling_run_trains_on_informative_groups_and_resumes_exactly(tmp_path, tiny_model_path):
    """Real Ray + vLLM + DeepSpeed, 2 trainer workers, async generation: every trained group
    carries a gradient, the refill rounds happen, and a checkpoint saves the data position of the
    prompts actually consumed (extra rounds counted, a rollout in flight replayed)."""
    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics
    from tests.conftest import quick_config

    common = dict(
        dynamic_sampling=True, dynamic_sampling_max_rounds=4, log_completions=True, async_generation=True,
        reward_funcs=["accuracy"], per_device_train_batch_size=16, gradient_accumulation_steps=2,
        cluster={"num_trainer_workers": 2}, save_steps=2,
    )  # fmt: skip
    straight = quick_config(tmp_path / "a", max_steps=4, **common)
    train(straight)
    out = Path(straight.output_dir)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the control: uninformative groups were sampled (the filter had work) and refills happened
    assert sum(r["groups_filtered"] for r in rows) > 0 and max(r["sampling_rounds"] for r in rows) > 1, rows
    # a step trained on a batch sampled from the trainer's current weights (staleness 0) shows it
    fresh = [r["logprob_mismatch"] for r in rows if r["staleness"] == 0]
    assert fresh and all(m < 1e-3 for m in fresh), rows
    completions = _completions(out)
    for r in rows:
        step_rows = completions[r["step"]]
        assert len(step_rows) == 64
        informative = sum(any(x["advantage"] != 0 for x in step_rows[g : g + 8]) for g in range(0, 64, 8))
        assert informative == 8 - r["groups_padded"], (r, informative)

    # Resume: a run stopped after step 2 (nothing in flight) and the straight run's step-2
    # checkpoint (step 3's rollout in flight, its extra rounds included) saved the same data
    # position: the prompts consumed by steps 1-2 and no more.
    stopped = quick_config(tmp_path / "b", max_steps=2, **common)
    train(stopped)
    assert _sampler_state(out, step=2) == _sampler_state(Path(stopped.output_dir), step=2)
    resumed = stopped.with_overrides({"max_steps": 4})
    resumed.to_yaml(Path(resumed.output_dir) / "run_config.yaml")
    train(resumed, resume=True)
    again = read_metrics(Path(resumed.output_dir))
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    # Async after a resume: step 3 is sampled from the restored weights (the straight run sampled
    # it from step 1's, which no checkpoint holds), so its batch is fresh, and shows it.
    assert again[2]["staleness"] == 0 and again[2]["logprob_mismatch"] < 1e-3, again[2]
    assert _sampler_state(Path(resumed.output_dir), step=4) != _sampler_state(Path(resumed.output_dir), step=2)  # it moved on
