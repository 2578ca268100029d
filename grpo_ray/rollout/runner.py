"""Generate-and-score (TRL's first half): prompt rows in, a scored `RolloutBatch` out.

The one seam of the rollout package: a backend (`SingleTurn`, `MultiTurn`) turns rows into
`Episodes`; this module scores them and computes the group advantages. The trainer and held-out
evaluation both go through `make_backend`, so neither knows which backend ran.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import torch

from grpo_ray.algorithm import compute_advantages
from grpo_ray.config import GRPOConfig
from grpo_ray.rewards import RewardSpec
from grpo_ray.rollout.batch import Episodes, Generator, RolloutBatch
from grpo_ray.rollout.engine import SamplingSpec
from grpo_ray.rollout.scoring import check_some_rewards, reward_weights, score_episodes


class Backend(Protocol):
    def sample(self, generator: Generator, rows: list[dict], sampling: SamplingSpec, seed: int) -> Episodes: ...

    def close(self) -> None: ...


def make_backend(cfg: GRPOConfig, tokenizer: Any, tool_specs: Sequence[RewardSpec] | None = None, env_spec: RewardSpec | None = None) -> Backend:
    """Multi-turn when the run has tools or an environment (config keys, or the Python API's
    callables), single-turn otherwise."""
    tools = list(tool_specs) if tool_specs else list(cfg.tools)
    env = env_spec if env_spec is not None else cfg.environment_factory
    if tools or env:
        from grpo_ray.rollout.multi_turn import MultiTurn

        return MultiTurn(cfg, tokenizer, tools, env)
    from grpo_ray.rollout.single_turn import SingleTurn

    return SingleTurn(cfg, tokenizer)


class Rollout:
    """A backend on the run's engine pool, plus reward scoring and advantages."""

    def __init__(self, cfg: GRPOConfig, pool: Any, backend: Backend, reward_specs: Sequence[RewardSpec] | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.backend = backend
        self.sampling = SamplingSpec.from_config(cfg)
        # cfg.reward_funcs names them; the Python API's callables travel pickled by value (rewards.ByValue)
        self.reward_specs = list(reward_specs) if reward_specs else list(cfg.reward_funcs)

    def generate_and_score(self, rows: list[dict], step: int, attempt: int = 0) -> RolloutBatch:
        """`attempt` > 0: a further sampling round of the same step (dynamic sampling), its own seed."""
        cfg = self.cfg
        seed = cfg.seed * 1_000_003 + step * 10_007 + attempt * 101
        episodes = self.backend.sample(self.pool, rows, self.sampling, seed=seed)
        t1 = time.perf_counter()
        per_func, names, timeouts = score_episodes(cfg, self.reward_specs, rows, episodes)
        advantages, rewards = self.advantages(per_func, names, episodes.num_generations)
        check_some_rewards(rewards, cfg, step)
        score_s = time.perf_counter() - t1
        multi_turn = bool(episodes.turns)
        return RolloutBatch(
            prompt_ids=episodes.prompt_ids,
            completion_ids=episodes.completion_ids,
            sampling_logprobs=episodes.sampling_logprobs,
            truncated=episodes.truncated,
            prompts=[row["prompt"] for row in rows for _ in range(episodes.num_generations)],
            completions=episodes.completions,
            rewards=rewards,
            rewards_per_func=per_func,
            reward_names=names,
            advantages=advantages,
            num_generations=episodes.num_generations,
            loss_mask=episodes.loss_mask if multi_turn else None,
            generate_s=episodes.generate_s,
            score_s=score_s,
            gen_tokens=sum(sum(m) for m in episodes.loss_mask),
            engine_restarts=self.pool.restarts,
            episode_metrics={**episodes.metrics(), "reward_timeouts": float(timeouts)},
        )

    def advantages(self, per_func: torch.Tensor, names: list[str], num_generations: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, combined reward) of a batch's reward columns, with the run's weights and scaling."""
        cfg = self.cfg
        return compute_advantages(per_func, num_generations, reward_weights(cfg, names), cfg.scale_rewards, cfg.multi_objective_aggregation)

    def close(self) -> None:
        self.backend.close()
