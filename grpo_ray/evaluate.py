"""Held-out accuracy of a model folder on a task's eval split, generated greedily with vLLM."""

from __future__ import annotations

import time
from dataclasses import dataclass

from grpo_ray.config import GRPOConfig
from grpo_ray.data import RG_PREFIXES, load_datasets, render_prompts
from grpo_ray.lora import servable
from grpo_ray.rewards import resolve_reward_functions, score
from grpo_ray.rollout import EngineSpec, RolloutEngine, SamplingSpec


@dataclass
class EvalResult:
    model: str
    task: str
    accuracy: float
    num_samples: int
    seconds: float
    examples: list[dict]


def grader_for(task: str) -> str:
    """The task's own grader for reasoning-gym tasks, numeric answer match otherwise."""
    return "reasoning_gym" if task.startswith(RG_PREFIXES) else "accuracy"


def evaluate(cfg: GRPOConfig, model_path: str, limit: int | None = None, engine: RolloutEngine | None = None) -> EvalResult:
    """Greedy completions for the eval split, graded; runs vLLM in this process. `model_path` is
    an HF model folder, a LoRA adapter folder or a grpo-ray checkpoint (merged on the fly)."""
    if engine is None:
        with servable(model_path) as folder:
            return _evaluate(cfg, folder, limit, None, shown=model_path)
    return _evaluate(cfg, model_path, limit, engine, shown=model_path)


def _evaluate(cfg: GRPOConfig, model_path: str, limit: int | None, engine: RolloutEngine | None, shown: str) -> EvalResult:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    _, rows = load_datasets(cfg.data)
    rows = rows[:limit] if limit else rows
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = tokenizer(render_prompts(tokenizer, rows), add_special_tokens=False)["input_ids"]
    if engine is None:
        spec = EngineSpec(model_path=model_path, max_model_len=(cfg.max_prompt_length or 512) + cfg.max_completion_length, seed=cfg.seed, kv_cache_gib=cfg.cluster.kv_cache_gib)
        engine = RolloutEngine(spec)
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=cfg.max_completion_length, logprobs=False)
    groups = engine.generate(prompt_ids, greedy, seed=cfg.seed)
    texts = [g.texts[0] for g in groups]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    grader = grader_for(cfg.data.task)
    (values,) = score(resolve_reward_functions([grader]), None, [r["prompt"] for r in rows], completions, columns)
    correct = [v == v and v >= 1.0 for v in values]  # NaN (ungradable) counts as wrong
    examples = [{"question": r["prompt"][-1]["content"], "answer": r.get("answer"), "completion": t, "correct": c} for r, t, c in zip(rows[:5], texts, correct)]
    return EvalResult(
        model=shown,
        task=cfg.data.task,
        accuracy=sum(correct) / max(len(correct), 1),
        num_samples=len(correct),
        seconds=time.perf_counter() - t0,
        examples=examples,
    )
