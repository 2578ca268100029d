"""What a rollout hands the trainer: `Episodes` (sampled, not yet scored) and `RolloutBatch`.

The trainer never knows which backend (single-turn, multi-turn with tools) produced a batch: it
sees prompt ids, the ids after the prompt, and a per-token `loss_mask` that says which of those
ids the model sampled (1) and which a tool or environment wrote (0, never trained on).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from grpo_ray.rewards import completion_text


@dataclass
class Group:
    """The `n` completions an engine sampled for one prompt (one model turn)."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    truncated: list[bool]
    texts: list[str]


class Generator(Protocol):
    """Token ids in, groups out: a `RolloutPool` (training) or one `RolloutEngine` (offline eval)."""

    def generate(self, prompt_ids: list[list[int]], sampling: Any, seed: int) -> list[Group]: ...


@dataclass
class Episodes:
    """`k` sampled episodes per prompt row, sample-major (row i's are i*k .. i*k+k-1), unscored."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # every id after the prompt: model turns and tool/env turns
    loss_mask: list[list[int]]  # 1 where the model sampled the id, 0 where a tool/env wrote it
    sampling_logprobs: list[list[float]] | None  # vLLM's logprob per id (0.0 where loss_mask is 0)
    truncated: list[bool]  # ran out of tokens (a model turn hit its limit, or the episode budget)
    texts: list[str]  # the model's last turn (what single-turn graders read)
    completions: list[Any]  # TRL-shaped: a string, or the assistant/tool messages after the prompt
    num_generations: int
    turns: list[int] = field(default_factory=list)  # model turns per episode (empty: single-turn)
    tool_calls: list[int] = field(default_factory=list)
    tool_errors: list[int] = field(default_factory=list)
    env_rewards: dict[str, list[float]] = field(default_factory=dict)  # environment-owned reward columns
    generate_s: float = 0.0

    def __len__(self) -> int:
        return len(self.completion_ids)

    def metrics(self) -> dict[str, float]:
        if not self.turns:
            return {}
        masked = sum(len(m) - sum(m) for m in self.loss_mask)
        n = max(len(self.turns), 1)
        return {
            "turns_mean": sum(self.turns) / n,
            "tool_calls_mean": sum(self.tool_calls) / n,
            "tool_errors": float(sum(self.tool_errors)),
            "env_tokens_masked": float(masked),
        }


@dataclass
class RolloutBatch:
    """One step's experience, sample-major (prompt i's group is rows i*G .. i*G+G-1)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampling_logprobs: list[list[float]] | None
    truncated: list[bool]
    prompts: list[Any]
    completions: list[Any]
    rewards: torch.Tensor  # (N,)
    rewards_per_func: torch.Tensor  # (N, F), NaN where a function returned None
    reward_names: list[str]
    advantages: torch.Tensor  # (N,)
    num_generations: int
    loss_mask: list[list[int]] | None = None  # None: every completion id is the model's
    generate_s: float = 0.0
    score_s: float = 0.0
    gen_tokens: int = 0
    engine_restarts: int = 0  # rollout engines restarted so far in this trainer process
    episode_metrics: dict[str, float] = field(default_factory=dict)  # multi-turn: turns, tool calls, ...

    def __len__(self) -> int:
        return len(self.completion_ids)

    def mask(self, i: int) -> list[int]:
        """Sample i's loss mask (all ones for a single-turn completion)."""
        return self.loss_mask[i] if self.loss_mask is not None else [1] * len(self.completion_ids[i])

    def trained_tokens(self, mask_truncated: bool) -> int:
        """Tokens the loss sees over the whole batch: the model's own, of samples not masked out
        (dapo's normaliser, counted the same on every rank)."""
        return sum(sum(self.mask(i)) for i in range(len(self)) if not (mask_truncated and self.truncated[i]))

    def shard(self, rank: int, world_size: int) -> "RolloutBatch":
        """Contiguous slice for one trainer worker (every worker gets the same count)."""
        per = len(self) // world_size
        sl = slice(rank * per, (rank + 1) * per)
        pick = lambda xs: None if xs is None else xs[sl]  # noqa: E731
        return RolloutBatch(
            prompt_ids=self.prompt_ids[sl],
            completion_ids=self.completion_ids[sl],
            sampling_logprobs=pick(self.sampling_logprobs),
            truncated=self.truncated[sl],
            prompts=self.prompts[sl],
            completions=self.completions[sl],
            rewards=self.rewards[sl],
            rewards_per_func=self.rewards_per_func[sl],
            reward_names=self.reward_names,
            advantages=self.advantages[sl],
            num_generations=self.num_generations,
            loss_mask=pick(self.loss_mask),
            generate_s=self.generate_s,
            score_s=self.score_s,
            gen_tokens=self.gen_tokens,
            engine_restarts=self.engine_restarts,
            episode_metrics=self.episode_metrics,
        )

    def groups(self) -> int:
        return len(self) // self.num_generations

    def informative_groups(self) -> list[int]:
        """Groups with a non-zero advantage somewhere: the ones that carry a policy gradient
        (a group whose rewards do not vary has every advantage 0, continuous rewards included)."""
        per_group = self.advantages.reshape(-1, self.num_generations)
        return [g for g in range(len(per_group)) if bool((per_group[g] != 0).any())]

    def select_groups(self, groups: list[int]) -> "RolloutBatch":
        """These groups, in this order (advantages as they are: the caller re-normalises if needed)."""
        k = self.num_generations
        idx = [g * k + j for g in groups for j in range(k)]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return dataclasses.replace(
            self,
            prompt_ids=pick(self.prompt_ids), completion_ids=pick(self.completion_ids),
            sampling_logprobs=pick(self.sampling_logprobs), truncated=pick(self.truncated),
            prompts=pick(self.prompts), completions=pick(self.completions),
            rewards=self.rewards[idx], rewards_per_func=self.rewards_per_func[idx], advantages=self.advantages[idx],
            loss_mask=pick(self.loss_mask),
        )  # fmt: skip

    def metrics(self) -> dict[str, float]:
        lengths = torch.tensor([len(c) for c in self.completion_ids], dtype=torch.float32)
        out = {
            "reward_mean": float(torch.nanmean(self.rewards)),
            "reward_std": float(self.rewards.std()) if len(self) > 1 else 0.0,
            "completion_length_mean": float(lengths.mean()),
            "truncated_ratio": float(sum(self.truncated)) / max(len(self), 1),
            "generate_s": self.generate_s,
            "score_s": self.score_s,
            "gen_tokens_per_s": self.gen_tokens / self.generate_s if self.generate_s > 0 else 0.0,
            "engine_restarts": self.engine_restarts,
            **self.episode_metrics,
        }
        for i, name in enumerate(self.reward_names):
            out[f"rewards/{name}"] = float(torch.nanmean(self.rewards_per_func[:, i]))
        return out

    def completion_rows(self) -> list[dict[str, Any]]:
        """`log_completions`' table: one row per completion (TRL's prompt/completion/rewards/advantage)."""
        def text(prompt: Any) -> str:
            return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""

        return [
            {
                "prompt": text(self.prompts[i]),
                "completion": completion_text(self.completions[i]),
                **{name: _json_float(self.rewards_per_func[i, f]) for f, name in enumerate(self.reward_names)},
                "reward": _json_float(self.rewards[i]),
                "advantage": float(self.advantages[i]),
            }
            for i in range(len(self))
        ]


def _json_float(x: torch.Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Several rounds' batches as one (sample-major order kept; times and token counts summed)."""
    first = batches[0]
    if len(batches) == 1:
        return first
    join = lambda name: None if getattr(first, name) is None else [x for b in batches for x in getattr(b, name)]  # noqa: E731
    metrics: dict[str, float] = {}
    for key in first.episode_metrics:  # means are averaged over the (equal-sized) rounds, counts summed
        values = [b.episode_metrics.get(key, 0.0) for b in batches]
        metrics[key] = sum(values) / len(values) if key.endswith("_mean") else sum(values)
    return dataclasses.replace(
        first,
        prompt_ids=join("prompt_ids"), completion_ids=join("completion_ids"), sampling_logprobs=join("sampling_logprobs"),
        truncated=join("truncated"), prompts=join("prompts"), completions=join("completions"), loss_mask=join("loss_mask"),
        rewards=torch.cat([b.rewards for b in batches]), rewards_per_func=torch.cat([b.rewards_per_func for b in batches]),
        advantages=torch.cat([b.advantages for b in batches]),
        generate_s=sum(b.generate_s for b in batches), score_s=sum(b.score_s for b in batches),
        gen_tokens=sum(b.gen_tokens for b in batches), engine_restarts=max(b.engine_restarts for b in batches),
        episode_metrics=metrics,
    )  # fmt: skip
