"""What runs in a reward worker: the Ray tasks that import and call reward functions.

It imports only Ray and `grpo_ray.rewards`, so a reward worker loads torch, transformers or vLLM
only if a reward function does (the worker imports this module to run a task; the rollout
package that submits them imports torch and the engines).
"""

from __future__ import annotations

import ray

from grpo_ray.rewards import RewardSpec, resolve_reward_functions, score


@ray.remote(max_retries=0)
def score_task(spec: RewardSpec, prompts: list, completions: list, columns: dict, offset: int) -> list[float]:
    """One reward function over one chunk; runs in a Ray worker, never in an engine or trainer."""
    (values,) = score(resolve_reward_functions([spec]), None, prompts, completions, columns, index_offset=offset)
    return values


def import_rewards(specs: list[RewardSpec]) -> bool:
    """Import the reward functions (a typo or a module that fails to import raises here)."""
    resolve_reward_functions(specs)
    return True


# The warm-up of a run's reward workers: the worker stays for the scoring tasks that follow.
import_task = ray.remote(max_retries=0)(import_rewards)
# The driver's start-up check: its worker exits after it (the run's reward tasks run under the
# trainers' runtime environment, so it would only sit idle).
check_task = ray.remote(max_retries=0, max_calls=1)(import_rewards)
