"""Held-out evaluation: greedy accuracy of a model folder, and sampled pass@1 / pass@k / mean@k.

The sampled numbers come from one function, `sampled_metrics`, whether the completions were drawn
by the rollout engines during training (`evaluate_on_pool`, every `eval_steps`) or by a fresh
engine for any checkpoint (`grpo-ray eval --num-generations K`), so the two report the same thing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from grpo_ray.algorithm import combine_rewards
from grpo_ray.config import GRPOConfig
from grpo_ray.data import RG_PREFIXES, load_datasets
from grpo_ray.lora import servable
from grpo_ray.rewards import RewardSpec, resolve_reward_functions, score
from grpo_ray.rollout import EngineSpec, Episodes, RolloutEngine, SamplingSpec, make_backend, score_rewards
from grpo_ray.rollout.runner import Backend
from grpo_ray.rollout.scoring import reward_weights, with_env_columns

EVAL_SEED = 7_777  # every evaluation samples with the same seeds: curves move with the model, not the dice

# (specs, prompts, completions, columns) -> (N, F) rewards, NaN where a function returned None
ScoreFn = Callable[[list, list, list, dict], torch.Tensor]


@dataclass
class EvalResult:
    model: str
    task: str
    accuracy: float
    num_samples: int
    seconds: float
    examples: list[dict]
    sampled: dict[str, float] = field(default_factory=dict)  # eval/pass@1, eval/pass@k, eval/mean@k


def grader_for(task: str) -> str:
    """The task's own grader for reasoning-gym tasks, numeric answer match otherwise."""
    return "reasoning_gym" if task.startswith(RG_PREFIXES) else "accuracy"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_metrics(cfg: GRPOConfig, rows: list[dict], episodes: Episodes, specs: Sequence[RewardSpec], score_fn: ScoreFn) -> dict[str, float]:
    """pass@1 and pass@k (k = the samples per prompt) of the task's grader, and mean@k: the mean
    combined reward of `specs` (the training reward) over all samples. Without gold answers only mean@k."""
    k = episodes.num_generations
    completions = episodes.completions
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    columns = {c: [r[c] for r in rows for _ in range(k)] for c in rows[0] if c != "prompt"}
    grader = grader_for(cfg.data.task)
    graded = grader != "accuracy" or "answer" in rows[0]
    table = score_fn(([grader] if graded else []) + list(specs), prompts, completions, columns)
    # the training reward: the reward functions, and an environment's own reward where it has one
    training, names = with_env_columns(table[:, 1:] if graded else table, [str(s) for s in specs], episodes)
    rewards = combine_rewards(training, reward_weights(cfg, names))
    out = {f"eval/mean@{k}": float(torch.nanmean(rewards))}
    if graded:
        correct = (torch.nan_to_num(table[:, 0], nan=0.0) >= 1.0).view(len(rows), k).sum(dim=1).tolist()
        for j in sorted({1, k}):
            out[f"eval/pass@{j}"] = sum(pass_at_k(k, int(c), j) for c in correct) / len(rows)
    return out


def eval_sampling(cfg: GRPOConfig, k: int) -> SamplingSpec:
    """The training sampler's settings, k samples per prompt, no logprobs."""
    spec = SamplingSpec.from_config(cfg)
    return SamplingSpec(**{**spec.__dict__, "n": k, "logprobs": False})


def evaluate_on_pool(cfg: GRPOConfig, pool: Any, backend: Backend, rows: list[dict], specs: Sequence[RewardSpec]) -> dict[str, float]:
    """Evaluation during training, on the rollout engines between steps (no second model load):
    `num_generations_eval` samples (episodes, with tools) per held-out prompt, scored in Ray tasks
    like the rollout."""
    t0 = time.perf_counter()
    rows = rows[: cfg.eval_limit] if cfg.eval_limit else rows
    episodes = backend.sample(pool, rows, eval_sampling(cfg, cfg.eval_k), seed=EVAL_SEED)

    def score_fn(fns: list, prompts: list, completions: list, columns: dict) -> torch.Tensor:
        # strict: a held-out number with scores missing would be wrong, so any late reward is an error
        return score_rewards(fns, prompts, completions, columns, cfg.cluster.reward_timeout_s, num_cpus=cfg.cluster.reward_num_cpus)[0]

    return {**sampled_metrics(cfg, rows, episodes, specs, score_fn), "eval/seconds": time.perf_counter() - t0}


def _local_score(fns: list, prompts: list, completions: list, columns: dict) -> torch.Tensor:
    return torch.tensor(score(resolve_reward_functions(fns), None, prompts, completions, columns), dtype=torch.float32).T


def evaluate(
    cfg: GRPOConfig,
    model_path: str,
    limit: int | None = None,
    engine: RolloutEngine | None = None,
    num_generations: int | None = None,
    rows: list[dict] | None = None,
    reward_specs: Sequence[RewardSpec] | None = None,
    tool_specs: Sequence[RewardSpec] | None = None,
    env_spec: RewardSpec | None = None,
) -> EvalResult:
    """Greedy completions for the eval split, graded; with `num_generations` K also K sampled
    completions per prompt -> `sampled` (pass@1, pass@K, mean@K, as logged during training). vLLM runs in this process.
    `model_path` is an HF model folder, a LoRA adapter folder or a grpo-ray checkpoint (merged on the fly)."""
    if engine is not None:
        return _evaluate(cfg, model_path, limit, engine, num_generations, rows, reward_specs, (tool_specs, env_spec), shown=model_path)
    with servable(model_path) as folder:
        return _evaluate(cfg, folder, limit, None, num_generations, rows, reward_specs, (tool_specs, env_spec), shown=model_path)


def _evaluate(
    cfg: GRPOConfig,
    model_path: str,
    limit: int | None,
    engine: RolloutEngine | None,
    num_generations: int | None,
    rows: list[dict] | None,
    reward_specs: Sequence[RewardSpec] | None,
    user_tools: tuple[Sequence[RewardSpec] | None, RewardSpec | None],
    shown: str,
) -> EvalResult:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    rows = rows if rows is not None else load_datasets(cfg.data)[1]
    rows = rows[:limit] if limit else rows
    backend = make_backend(cfg, AutoTokenizer.from_pretrained(model_path), *user_tools)
    if engine is None:
        engine = RolloutEngine(EngineSpec.from_config(cfg, model_path))
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=cfg.max_completion_length, logprobs=False)
    episodes = backend.sample(engine, rows, greedy, seed=cfg.seed)
    texts = episodes.texts
    completions = [c if not isinstance(c, str) else [{"role": "assistant", "content": c}] for c in episodes.completions]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    grader = grader_for(cfg.data.task)
    (values,) = score(resolve_reward_functions([grader]), None, [r["prompt"] for r in rows], completions, columns)
    correct = [v == v and v >= 1.0 for v in values]  # NaN (ungradable) counts as wrong
    examples = [{"question": r["prompt"][-1]["content"], "answer": r.get("answer"), "completion": t, "correct": c} for r, t, c in zip(rows[:5], texts, correct)]
    sampled = {}
    if num_generations:
        sampled_eps = backend.sample(engine, rows, eval_sampling(cfg, num_generations), seed=EVAL_SEED)
        sampled = sampled_metrics(cfg, rows, sampled_eps, reward_specs or cfg.reward_funcs, _local_score)
    backend.close()
    return EvalResult(
        model=shown,
        task=cfg.data.task,
        accuracy=sum(correct) / max(len(correct), 1),
        num_samples=len(correct),
        seconds=time.perf_counter() - t0,
        examples=examples,
        sampled=sampled,
    )
