"""Reward scoring: every reward function in Ray tasks with a timeout, never in an engine or trainer.

Both backends and held-out evaluation score through `score_episodes`: the TRL-shaped prompts,
completions and dataset columns of each sample go to the reward functions; an environment that
owns its reward (`get_reward`) adds its own column, as TRL's does.
"""

from __future__ import annotations

from typing import Any, Sequence

import ray
import torch

from grpo_ray.config import GRPOConfig
from grpo_ray.reward_tasks import check_task, import_task, score_task
from grpo_ray.rewards import RewardError, RewardSpec
from grpo_ray.rollout.batch import Episodes
from grpo_ray.rollout.engine import split


def score_episodes(cfg: GRPOConfig, specs: Sequence[RewardSpec], rows: list[dict], episodes: Episodes) -> tuple[torch.Tensor, list[str], int]:
    """(N, F) rewards of `specs` over the episodes (NaN where a function returned None or timed
    out), then one column per environment-owned reward; the column names; the timed-out scores."""
    k = episodes.num_generations
    prompts = [row["prompt"] for row in rows for _ in range(k)]
    columns = {key: [row[key] for row in rows for _ in range(k)] for key in rows[0] if key != "prompt"}
    table, timeouts = torch.zeros(len(episodes), 0), 0
    if specs:
        table, timeouts = score_rewards(
            list(specs), prompts, episodes.completions, columns, cfg.cluster.reward_timeout_s,
            num_cpus=cfg.cluster.reward_num_cpus, max_timeout_share=cfg.cluster.reward_timeout_max_share,
        )  # fmt: skip
    return (*with_env_columns(table, [str(s) for s in specs], episodes), timeouts)


def with_env_columns(table: torch.Tensor, names: list[str], episodes: Episodes) -> tuple[torch.Tensor, list[str]]:
    """The reward functions' (N, F) table and names, then one column per environment-owned reward."""
    columns = [torch.tensor(values, dtype=torch.float32).view(-1, 1) for values in episodes.env_rewards.values()]
    return torch.cat([table, *columns], dim=1), names + list(episodes.env_rewards)


def reward_weights(cfg: GRPOConfig, names: list[str]) -> list[float] | None:
    """`reward_weights` for the functions, 1.0 for each environment-owned column (TRL's weight)."""
    if cfg.reward_weights is None:
        return None
    return list(cfg.reward_weights) + [1.0] * (len(names) - len(cfg.reward_weights))


SCORE_CHUNKS = 2  # reward tasks per function and batch


def score_rewards(
    specs: list[RewardSpec],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    timeout_s: float,
    num_chunks: int = SCORE_CHUNKS,
    num_cpus: float = 0.0,
    max_timeout_share: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """(N, F) rewards and how many of them timed out: one Ray task per (function, chunk of the
    batch), all at once, with a timeout.

    NaN where a function returned None, or where its chunk outlived `timeout_s` (the task is
    killed; TRL's handling of a None reward applies). More than `max_timeout_share` of the scores
    timed out, or a function that raises or returns garbage, is a one-line `RewardError` naming it
    (and the sample, where known)."""
    n = len(completions)
    chunks = [c for c in split(list(range(n)), max(1, min(num_chunks, n))) if c]
    # "DEFAULT": never inherit the caller's placement group (a trainer worker's bundle is full).
    task = score_task.options(num_cpus=num_cpus, scheduling_strategy="DEFAULT")
    tasks = {
        (f, k): task.remote(
            spec,
            [prompts[i] for i in idx],
            [completions[i] for i in idx],
            {key: [v[i] for i in idx] for key, v in columns.items()},
            idx[0],
        )
        for f, spec in enumerate(specs)
        for k, idx in enumerate(chunks)
    }
    refs = list(tasks.values())
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    pending_set = set(pending)
    late = [key for key, ref in tasks.items() if ref in pending_set]
    for key in late:
        ray.cancel(tasks[key], force=True)
    timeouts = sum(len(chunks[k]) for _, k in late)
    if late and timeouts > max_timeout_share * n * len(specs):
        f, k = late[0]
        raise RewardError(
            f"reward function {specs[f]!r} did not finish within cluster.reward_timeout_s={timeout_s:g}s "
            f"(samples {chunks[k][0]}..{chunks[k][-1]}; {timeouts} of {n * len(specs)} scores late, more than "
            f"cluster.reward_timeout_max_share={max_timeout_share:g}): make it faster or raise the timeout"
        )
    values = {key: [float("nan")] * len(chunks[key[1]]) if key in late else _reward_result(ref) for key, ref in tasks.items()}
    columns_out = [[v for k in range(len(chunks)) for v in values[(f, k)]] for f in range(len(specs))]
    table = torch.tensor(columns_out, dtype=torch.float32).T.reshape(n, len(specs))
    return table, timeouts


def _reward_result(ref: ray.ObjectRef) -> Any:
    """`ray.get` of a reward task, a failure in it turned back into its one-line `RewardError`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        last = str(exc.as_instanceof_cause()).strip().splitlines()[-1]
        raise RewardError(last.split("RewardError: ", 1)[-1]) from None


def warm_reward_workers(specs: Sequence[RewardSpec]) -> list[ray.ObjectRef]:
    """Start the workers this process's reward tasks will run in (one per task a step runs at
    once) and import the functions there while the rest of the run starts up: otherwise the first
    step waits for both. Workers are kept per runtime environment, so a trainer's reward tasks do
    not reuse the driver's."""
    task = import_task.options(num_cpus=0, scheduling_strategy="DEFAULT")
    return [task.remote(list(specs)) for _ in range(SCORE_CHUNKS * len(specs))]


def check_reward_functions(specs: list[RewardSpec], timeout_s: float) -> None:
    """Import every reward function once, before a run writes anything: a typo or a module that
    does not import fails in seconds. The import runs user code, so it runs where scoring does
    (a Ray worker process, with the scoring timeout), never in the driver."""
    ref = check_task.options(num_cpus=0, scheduling_strategy="DEFAULT").remote(list(specs))
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise RewardError(
            f"importing reward_funcs {specs} did not finish within cluster.reward_timeout_s={timeout_s:g}s: "
            "move slow work out of the module's top level or raise the timeout"
        )
    _reward_result(ref)


def check_some_rewards(rewards: torch.Tensor, cfg: GRPOConfig, step: int) -> None:
    """A step where no completion got a reward (every function returned None for every sample)
    would train on nothing with reward_mean NaN, silently: an error, or a warning with
    all_none_rewards: warn."""
    if len(rewards) == 0 or not bool(torch.isnan(rewards).all()):
        return
    message = (
        f"step {step}: every reward function ({', '.join(map(str, cfg.reward_funcs))}) returned None for all "
        f"{len(rewards)} completions, so there is nothing to learn from; make one return a float "
        "(check the dataset has the columns it reads), or set all_none_rewards: warn to train on"
    )
    if cfg.all_none_rewards == "error":
        raise RewardError(message)
    print(f"[grpo-ray] warning: {message}")


