"""Rollouts: dataset rows in, a scored `RolloutBatch` out, whichever backend produced it.

Rooms (imports point down the list):
  batch        Group, Episodes, RolloutBatch: what crosses to the trainer
  engine       EngineSpec / SamplingSpec, RolloutEngine (vLLM in a Ray actor), RolloutPool
  scoring      reward functions in Ray tasks with a timeout; environment-owned reward columns
  tools        tools and environments (TRL's `tools` / `environment_factory`) in a ToolHost actor
  single_turn  one completion per sample
  multi_turn   episodes of model turns and tool / environment answers, loss-masked
  runner       Rollout: a backend + scoring + advantages; make_backend picks the backend
  queue        RolloutQueue: rank 0's rollouts ahead of the update (sync / async)
"""

from grpo_ray.rollout.batch import Episodes, Group, RolloutBatch
from grpo_ray.rollout.engine import EngineRestarted, EngineSpec, RolloutEngine, RolloutPool, SamplingSpec
from grpo_ray.rollout.runner import Rollout, make_backend
from grpo_ray.rollout.scoring import check_reward_functions, check_some_rewards, score_rewards, warm_reward_workers

__all__ = [
    "EngineRestarted", "EngineSpec", "Episodes", "Group", "Rollout", "RolloutBatch", "RolloutEngine", "RolloutPool",
    "SamplingSpec", "check_reward_functions", "check_some_rewards", "make_backend", "score_rewards", "warm_reward_workers",
]
