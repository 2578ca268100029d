"""Single-turn rollouts: one completion per sample, the prompt rendered by the chat template."""

from __future__ import annotations

import time
from typing import Any

from grpo_ray.config import GRPOConfig
from grpo_ray.data import render_prompts
from grpo_ray.rollout.batch import Episodes, Generator


class SingleTurn:
    """The single-turn backend: prompt ids -> `n` sampled completions each, nothing else."""

    def __init__(self, cfg: GRPOConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        texts = render_prompts(self.tokenizer, rows, self.cfg.chat_template_kwargs)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        limit = self.cfg.max_prompt_length
        return [x[-limit:] if limit else x for x in ids]  # keep the end: it holds the question

    def sample(self, generator: Generator, rows: list[dict], sampling: Any, seed: int) -> Episodes:
        k = sampling.n
        prompt_ids = self.prompt_ids(rows)
        t0 = time.perf_counter()
        groups = generator.generate(prompt_ids, sampling, seed)
        generate_s = time.perf_counter() - t0
        completion_ids = [c for g in groups for c in g.completion_ids]
        texts = [t for g in groups for t in g.texts]
        conversational = bool(rows) and isinstance(rows[0].get("prompt"), list)
        return Episodes(
            prompt_ids=[p for p in prompt_ids for _ in range(k)],
            completion_ids=completion_ids,
            loss_mask=[[1] * len(c) for c in completion_ids],
            sampling_logprobs=[lp for g in groups for lp in g.logprobs] if groups and groups[0].logprobs is not None else None,
            truncated=[t for g in groups for t in g.truncated],
            texts=texts,
            completions=[[{"role": "assistant", "content": t}] for t in texts] if conversational else texts,
            num_generations=k,
            generate_s=generate_s,
        )

    def close(self) -> None:
        pass
