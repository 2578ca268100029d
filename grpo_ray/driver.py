"""Driver: start (or join) Ray, place the vLLM engines, run the trainer workers, collect results.

The driver holds no model. It resolves the model folder, checks the output dir, starts the
rollout pool, and hands everything to a `TorchTrainer`, whose workers run the step loop.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from grpo_ray.config import GRPOConfig
from grpo_ray.data import load_datasets
from grpo_ray.evaluate import evaluate
from grpo_ray.lora import check_model as check_peft
from grpo_ray.lora import engine_adapter_config
from grpo_ray.metrics import METRICS_FILE, check_trackers, plot_reward_curve, read_metrics
from grpo_ray.models import resolve_model_path
from grpo_ray.rollout import EngineSpec, RolloutPool, check_reward_functions
from grpo_ray.sync import resolve_transport
from grpo_ray.trainer import FATAL_FILE, MODEL_DIR, RUN_NAME, LoopConfig, latest_complete_checkpoint, run_worker

RUN_FILE = "run_config.yaml"


class RunDirError(ValueError):
    """The output dir holds something that this run must not silently mix with."""


@dataclass
class RunResult:
    output_dir: str
    steps: int
    final_metrics: dict[str, Any]
    checkpoint_dir: str | None  # the last checkpoint's HF model folder
    reward_curve: str | None
    eval: dict[str, float] | None = None  # held-out accuracy {"start": .., "end": ..}


def required_cpus(cfg: GRPOConfig) -> int:
    cl = cfg.cluster
    return int(cl.num_rollout_actors * cl.rollout_num_cpus + cl.num_trainer_workers * cl.trainer_num_cpus + 1)


def init_ray(cfg: GRPOConfig) -> None:
    """Join `cluster.address` (or $RAY_ADDRESS), or start an embedded Ray with no dashboard.

    Ray 2.60 cannot keep a local cluster on loopback (it resolves 127.0.0.1 to the machine's
    address and its gRPC servers listen on every interface); what guards it is Ray's token
    authentication, on by default for a new local cluster (RAY_AUTH_MODE=disabled opts out).
    The token file is made readable by its owner only."""
    if ray.is_initialized():
        return
    # Ray Train V2 hands each `ray.train.report` over through a queue of one, drained when the
    # controller polls (every 2 s by default): steps faster than that would be held to 2 s each.
    poll_s = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll_s}}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        return
    ray.init(
        num_cpus=cfg.cluster.num_cpus or required_cpus(cfg),
        num_gpus=None if cfg.cluster.use_gpu else 0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
        # Reward tasks run every step; Ray's default kills idle workers above the soft limit after
        # 1 s, so each step paid ~0.5 CPU-s per task to start fresh workers, beside the update.
        _system_config={"idle_worker_killing_time_threshold_ms": 300_000},
    )
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.is_file():
        token.chmod(0o600)


def check_output_dir(cfg: GRPOConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse to mix runs: an existing run dir needs --resume (same run) or --overwrite. Writes nothing."""
    out = Path(cfg.output_dir).resolve()
    has_run = (out / RUN_FILE).is_file() or (out / METRICS_FILE).is_file()
    if has_run and not (resume or overwrite):
        raise RunDirError(f"output_dir {str(out)!r} already holds a run: pass --resume to continue it or --overwrite to replace it")
    if resume and not has_run:
        raise RunDirError(f"--resume: {str(out)!r} holds no run to resume; drop --resume to start one")
    return out


def prepare_output_dir(cfg: GRPOConfig, resume: bool, overwrite: bool) -> Path:
    out = check_output_dir(cfg, resume, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / FATAL_FILE).unlink(missing_ok=True)  # a resume after a fix gets its retries back
    if not resume:
        cfg.to_yaml(out / RUN_FILE)
    return out


def latest_checkpoint(out: Path) -> ray.train.Checkpoint | None:
    """The newest complete checkpoint Ray Train wrote under this run dir (a dir that a crash left
    half-copied is skipped: see `trainer.write_manifest`)."""
    found = latest_complete_checkpoint(out)
    return ray.train.Checkpoint.from_directory(str(found[1])) if found else None


def engine_spec(cfg: GRPOConfig, model_path: str) -> EngineSpec:
    precision = cfg.resolved_precision(device_supports_bf16=cfg.cluster.use_gpu)
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    return EngineSpec(
        model_path=model_path,
        dtype=dtype,
        max_model_len=(cfg.max_prompt_length or 512) + cfg.max_completion_length,
        seed=cfg.seed,
        tensor_parallel_size=cfg.cluster.tensor_parallel_size,
        kv_cache_gib=cfg.cluster.kv_cache_gib,
        gpu_memory_utilization=cfg.cluster.gpu_memory_utilization,
        use_gpu=cfg.cluster.use_gpu,
        env_vars=cfg.process_env(),
        adapter_config=engine_adapter_config(cfg),
        partial_sync=cfg.use_peft and cfg.lora_sync == "merged",
    )


def dashboard_running() -> bool:
    try:
        return bool(ray._private.worker.get_dashboard_url())
    except Exception:  # noqa: BLE001 - not connected, or a Ray without it
        return False


class GRPOTorchTrainer(TorchTrainer):
    """`TorchTrainer` minus Ray Train's placement-group cleaner where Ray runs no dashboard (the
    embedded Ray): the cleaner asks the State API, which the dashboard serves, whether the
    controller lives, and without it warns on the driver's terminal every second of the run while
    never cleaning anything. Ray removes a finished run's placement group either way."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if dashboard_running():
            return callbacks
        return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]


def make_trainer(cfg: GRPOConfig, loop: LoopConfig, out: Path, callbacks: list | None = None) -> TorchTrainer:
    """Ray Train resumes by itself from the newest checkpoint under the same name and storage path.

    `callbacks`: extra Ray Train `RunConfig` callbacks (grpo_ray/tuning.py forwards reports to Tune)."""
    cl = cfg.cluster
    resources: dict[str, float] = {"CPU": cl.trainer_num_cpus}
    if cl.use_gpu:
        resources["GPU"] = 1
    if cl.trainer_resource:
        resources[cl.trainer_resource] = 0.001
    return GRPOTorchTrainer(
        run_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=cl.num_trainer_workers, use_gpu=cl.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cl.use_gpu else "gloo"),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit),
            failure_config=FailureConfig(max_failures=cl.max_failures),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": cfg.process_env()},
        ),
    )


def held_out_accuracy(cfg: GRPOConfig, model_path: str) -> float:
    """Greedy eval-split accuracy, run as a Ray task so vLLM gets its own process and CPUs.

    `max_calls=1`: the worker exits after it, or the idle process would keep its vLLM engine
    (4 GiB for SmolLM2) and spend a quarter of a core beside the training that follows (seen in
    the demo: the embedded Ray keeps idle workers for minutes, for the reward tasks)."""
    task = ray.remote(num_cpus=cfg.cluster.rollout_num_cpus, max_retries=0, max_calls=1)(evaluate)
    return ray.get(task.remote(cfg, model_path, cfg.eval_limit)).accuracy


def train(cfg: GRPOConfig, resume: bool = False, overwrite: bool = False, callbacks: list | None = None) -> RunResult:
    """Run one GRPO training job to completion and return where its outputs are."""
    cfg = cfg.with_absolute_paths()
    check_output_dir(cfg, resume, overwrite)
    check_trackers(cfg)
    model_path = resolve_model_path(cfg.model_name_or_path)
    if cfg.use_peft:
        check_peft(cfg, model_path)  # a LoRA target that does not exist fails here, before Ray starts
    load_datasets(cfg.data)  # a bad data file fails here, before OUTPUT_DIR holds anything
    init_ray(cfg)
    check_reward_functions(cfg.reward_funcs, cfg.cluster.reward_timeout_s)
    out = prepare_output_dir(cfg, resume, overwrite)
    scores: dict[str, float] = {}
    if cfg.eval_at_start_and_end and not resume:
        scores["start"] = held_out_accuracy(cfg, model_path)
        print(f"[grpo-ray] held-out accuracy before training: {scores['start']:.3f}")
    pool = RolloutPool(cfg, engine_spec(cfg, model_path))
    try:
        transport = resolve_transport(cfg.cluster.weight_sync, cfg.cluster.use_gpu)
        loop = LoopConfig(cfg=cfg.to_dict(), model_path=model_path, pool=pool, transport=transport, output_dir=str(out))
        result = make_trainer(cfg, loop, out, callbacks).fit()
    finally:
        pool.shutdown()
    if result.error is not None:
        raise result.error
    rows = read_metrics(out)
    curve = plot_reward_curve(out)
    ckpt = latest_checkpoint(out)
    if cfg.eval_at_start_and_end and ckpt is not None:
        scores["end"] = held_out_accuracy(cfg, str(Path(ckpt.path) / MODEL_DIR))
        previous = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
        scores = {**previous, **scores}
        (out / "eval.json").write_text(json.dumps(scores, indent=1))
        print(f"[grpo-ray] held-out accuracy: {json.dumps(scores)}")
    return RunResult(
        output_dir=str(out),
        steps=int(rows[-1]["step"]) if rows else 0,
        final_metrics=rows[-1] if rows else {},
        checkpoint_dir=str(Path(ckpt.path) / MODEL_DIR) if ckpt else None,
        reward_curve=str(curve) if curve else None,
        eval=scores or None,
    )
