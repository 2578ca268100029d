"""pass@k: the unbiased estimator both the in-training evaluation and `grpo-ray eval` use."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_ray.config import GRPOConfig
from grpo_ray.evaluate import pass_at_k, sampled_metrics
from grpo_ray.rollout import Episodes


def test_pass_at_k_matches_hand_values():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_sampled_metrics_per_prompt():
    """Prompt 0: 1 of 4 correct, prompt 1: 0 of 4 -> pass@1 = (1/4 + 0)/2, pass@4 = (1 + 0)/2;
    mean@4 is the training reward's mean over all 8 samples."""
    cfg = GRPOConfig(data={"task": "arith"}, reward_funcs=["format"])
    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"}, {"prompt": [{"role": "user", "content": "2+2"}], "answer": "4"}]
    texts = [["\\boxed{2}", "3", "5", "\\boxed{7}"], ["1", "\\boxed{2}", "3", "5"]]
    flat = [t for group in texts for t in group]
    groups = Episodes(
        prompt_ids=[[0]] * 8, completion_ids=[[0]] * 8, loss_mask=[[1]] * 8, sampling_logprobs=None, truncated=[False] * 8,
        texts=flat, completions=[[{"role": "assistant", "content": t}] for t in flat], num_generations=4,
    )
    from grpo_ray.evaluate import _local_score

    m = sampled_metrics(cfg, rows, groups, cfg.reward_funcs, _local_score)
    assert m == {"eval/pass@1": 0.125, "eval/pass@4": 0.5, "eval/mean@4": 3 / 8}
    assert m["eval/pass@4"] >= m["eval/pass@1"]
    no_answers = [{k: v for k, v in r.items() if k != "answer"} for r in rows]
    assert sampled_metrics(cfg, no_answers, groups, cfg.reward_funcs, _local_score) == {"eval/mean@4": 3 / 8}
    torch.testing.assert_close(_local_score(["format"], ["p"] * 2, ["\\boxed{1}", "x"], {}), torch.tensor([[1.0], [0.0]]))
