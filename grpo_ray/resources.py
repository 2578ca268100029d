"""Resources: the Ray bundles a run asks for, computed once for every place that requests or counts them.

`RolloutPool` places one `engine_bundle` per vLLM engine, `driver.make_trainer` asks Ray Train for
one `trainer_bundle` per worker, the embedded Ray is sized by `required_cpus`, and a Tune trial
is admitted for all of `run_bundles` at once (tuning/admission.py).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from grpo_ray.config import ClusterConfig, GRPOConfig
from grpo_ray.models import kv_bytes_per_token

ROLE_AMOUNT = 0.001  # of a node-role resource (cluster.rollout_resource / trainer_resource): "on such a node"
CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # a CPU whose bf16 matmuls run in hardware


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`): called after each training
    step and each weight load. glibc keeps the freed blocks of a step's activations in its heap,
    fragmented, and reuses them only in part, so a trainer's RSS otherwise climbs step after step
    above what it holds (README "Start-up and memory"). False where there is no glibc (macOS, musl)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def native_bf16(use_gpu: bool) -> bool:
    """Whether this node's devices compute bf16 natively, which is what `bf16: auto` asks.

    A CUDA GPU: torch says (Ampere and later; a process that sees no GPU assumes the engines'
    does). A CPU: only with AVX-512 bf16 or AMX tiles; elsewhere torch and vLLM emulate bf16,
    several times slower than fp32, so auto keeps fp32. Engines and trainers both ask here, on the
    node that builds them, so they agree on a cluster of one CPU type."""
    if use_gpu:
        import torch

        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    try:
        text = CPUINFO.read_text()
    except OSError:  # not Linux: no flags to read, keep fp32
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not CPU_BF16_FLAGS.isdisjoint(flags)


def engine_bundle(cl: ClusterConfig) -> dict[str, float]:
    """One vLLM engine: its CPUs, its tensor-parallel GPUs, and the node role it needs."""
    bundle = {"CPU": float(cl.rollout_num_cpus)}
    if cl.use_gpu:
        bundle["GPU"] = float(cl.tensor_parallel_size)
    if cl.rollout_resource:
        bundle[cl.rollout_resource] = ROLE_AMOUNT
    return bundle


def trainer_bundle(cl: ClusterConfig) -> dict[str, float]:
    """One Ray Train worker: its CPUs, one GPU, and the node role it needs."""
    bundle = {"CPU": float(cl.trainer_num_cpus)}
    if cl.use_gpu:
        bundle["GPU"] = 1.0
    if cl.trainer_resource:
        bundle[cl.trainer_resource] = ROLE_AMOUNT
    return bundle


KV_FALLBACK_GIB = 1.0  # kv_cache_gib "auto" where config.json does not give the KV shape
KV_GRANULE = 32 * 2**20  # auto sizes are rounded up to this


def kv_cache_bytes(cfg: GRPOConfig, model_path: str, dtype_bytes: int) -> int | None:
    """Each engine's KV cache: `cluster.kv_cache_gib`, or ("auto", on GPU) None: vLLM sizes it
    from `cluster.gpu_memory_utilization`, or ("auto", on CPU) what one generation round of
    the run can hold at once: its share of the round's sequences (prompts_per_step x
    num_generations over the engines) at their longest (context_length tokens each), plus
    one sequence of slack. The prompt length is an upper bound and a group's completions share
    their prompt's blocks (prefix caching), so this is headroom, not a squeeze; a bigger batch
    (held-out eval) queues inside vLLM rather than fail."""
    cl = cfg.cluster
    if cl.kv_cache_gib != "auto":
        return int(float(cl.kv_cache_gib) * 2**30)
    if cl.use_gpu:
        return None
    per_token = kv_bytes_per_token(model_path, dtype_bytes)
    if per_token is None:
        return int(KV_FALLBACK_GIB * 2**30)
    sequences = math.ceil(cfg.prompts_per_step / cl.num_rollout_actors) * cfg.num_generations + 1
    need = sequences * cfg.context_length * per_token
    return math.ceil(need / KV_GRANULE) * KV_GRANULE


def run_bundles(cfg: GRPOConfig, rewards: bool = True) -> list[dict[str, float]]:
    """Everything one run holds: a bundle per engine and per trainer worker, and (`rewards`) the
    headroom its reward-scoring tasks reserve (`cluster.reward_num_cpus`; none by default)."""
    cl = cfg.cluster
    bundles = [engine_bundle(cl) for _ in range(cl.num_rollout_actors)] + [trainer_bundle(cl) for _ in range(cl.num_trainer_workers)]
    if rewards and cl.reward_num_cpus > 0:
        bundles.append({"CPU": float(cl.reward_num_cpus)})
    return bundles


def total(bundles: list[dict[str, float]]) -> dict[str, float]:
    """The sum of each resource over `bundles`."""
    out: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            out[key] = out.get(key, 0.0) + value
    return out


def required_cpus(cfg: GRPOConfig) -> int:
    """Logical CPUs of an embedded Ray: the engines' and trainer workers' bundles, plus 1 for the driver."""
    return int(total(run_bundles(cfg, rewards=False)).get("CPU", 0.0)) + 1
