"""Dynamic sampling (DAPO): train each step on groups whose completions disagree.

A group whose rewards do not vary has every advantage 0: it adds no policy gradient, only
tokens to the loss's normaliser. With `dynamic_sampling: true` a step drops such groups and
samples further rounds of fresh prompts (at most `dynamic_sampling_max_rounds` rounds in all)
until it has a full batch of informative groups; surplus informative groups of the last round
are dropped. If the rounds run out, the batch is filled up with the uninformative groups sampled
first (so every step trains on the same number of completions, split evenly over the workers),
and the metrics say how many (`groups_padded`). Every prompt drawn counts as consumed, so the
data position after a resume is exact.
"""

from __future__ import annotations

from typing import Callable

import torch

from grpo_ray.rollout.batch import RolloutBatch, concat_batches
from grpo_ray.rollout.runner import Rollout


def sample_informative(rollout: Rollout, draw: Callable[[], list[dict]], step: int, max_rounds: int) -> RolloutBatch:
    """One step's batch of informative groups (see the module docstring), with its metrics."""
    rounds: list[RolloutBatch] = []
    kept: list[tuple[int, int]] = []  # (round, group) of informative groups, in sampling order
    spare: list[tuple[int, int]] = []  # uninformative ones: the fill if the rounds run out
    needed = 0
    while len(rounds) < max_rounds:
        batch = rollout.generate_and_score(draw(), step, attempt=len(rounds))
        needed = needed or batch.groups()
        informative = set(batch.informative_groups())
        for g in range(batch.groups()):
            (kept if g in informative else spare).append((len(rounds), g))
        rounds.append(batch)
        if len(kept) >= needed:
            break
    sampled = sum(b.groups() for b in rounds)
    filtered = sampled - len(kept)
    padded = max(0, needed - len(kept))
    picks = sorted(kept[:needed] + spare[:padded])  # sampling order: the batch reads as it was sampled
    parts = [rounds[r].select_groups([g for rr, g in picks if rr == r]) for r in range(len(rounds))]
    batch = concat_batches([p for p in parts if len(p)])
    # re-normalise over the batch actually trained on (matters for scale_rewards="batch" only)
    batch.advantages, batch.rewards = rollout.advantages(batch.rewards_per_func, batch.reward_names, batch.num_generations)
    every = torch.cat([b.rewards for b in rounds])
    batch.episode_metrics = {
        **batch.episode_metrics,
        "sampling_rounds": float(len(rounds)),
        "groups_filtered": float(filtered),
        "groups_padded": float(padded),
        "reward_sampled_mean": float(torch.nanmean(every)),
    }
    return batch
