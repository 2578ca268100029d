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

from grpo_ray import console
from grpo_ray.checkpoints import MODEL_DIR, RUN_FILE, RUN_NAME, latest_checkpoint, latest_complete_checkpoint
from grpo_ray.cluster import connect
from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.data import load_datasets
from grpo_ray.evaluate import EvalResult, evaluate
from grpo_ray.logs import quiet_ray_init, route_worker_output, set_log_dir
from grpo_ray.lora import check_model as check_peft
from grpo_ray.metrics import METRICS_FILE, check_trackers, flatten, plot_reward_curve, read_metrics
from grpo_ray.models import check_context_length, resolve_model_path
from grpo_ray.ray_compat import GRPOTorchTrainer, embedded_init_kwargs
from grpo_ray.resources import engine_bundle, required_cpus, trainer_bundle
from grpo_ray.rewards import check_reward_specs
from grpo_ray.rollout import EngineSpec, RolloutPool, check_reward_functions
from grpo_ray.rollout.tools import check_tool_keys, check_tools
from grpo_ray.startup import Timeline, process_start
from grpo_ray.sync import resolve_transport
from grpo_ray.trainer import FATAL_FILE, LoopConfig, run_worker


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


def init_ray(cfg: GRPOConfig) -> None:
    """Join `cluster.address` (or $RAY_ADDRESS), or start an embedded Ray with no dashboard.

    Ray 2.60 cannot keep a local cluster on loopback (it resolves 127.0.0.1 to the machine's
    address and its gRPC servers listen on every interface); what guards it is Ray's token
    authentication, on by default for a new local cluster (RAY_AUTH_MODE=disabled opts out).
    The token file is made readable by its owner only."""
    if ray.is_initialized():
        return
    quiet_ray_init()
    # Ray Train V2 hands each `ray.train.report` over through a queue of one, drained when the
    # controller polls (every 2 s by default): steps faster than that would be held to 2 s each.
    poll_s = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll_s}}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        connect(address, cfg.cluster.connect_timeout_s, runtime_env=env)
        route_worker_output()
        return
    # Ray Train's node-preemption watcher (an actor process of its own) is for clusters of
    # preemptible nodes; an embedded Ray is this one machine.
    env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        num_cpus=cfg.cluster.num_cpus or required_cpus(cfg),
        num_gpus=None if cfg.cluster.use_gpu else 0,
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=True,
        # Ray's private arguments (grpo_ray/ray_compat.py): loopback, and idle workers kept 5 min:
        # reward tasks run every step, and Ray's default kills idle workers above the soft limit
        # after 1 s, so each step started fresh workers beside the update (README "Performance").
        **embedded_init_kwargs(idle_worker_killing_ms=300_000),
    )
    route_worker_output()  # workers' lines to OUTPUT_DIR/logs, grpo-ray's to the terminal (grpo_ray/logs.py)
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.is_file():
        token.chmod(0o600)


# What a resumed run cannot change: the checkpoint's model and optimizer state, the data order
# and the batch layout it continues were built from these. Everything else may change, and is recorded.
# The LoRA keys decide what the checkpoint holds (an adapter of this shape on these modules, or the
# full model); lora_sync and lora_dropout do not: the engines start from the base and get the
# restored weights pushed before the first rollout, in whichever form lora_sync now names.
FIXED_ON_RESUME = (
    "model_name_or_path",
    "data",
    "seed",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cluster.num_trainer_workers",
    "cluster.zero_stage",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "lora_modules_to_save",
    "peft_config",
)
_NOT_COMPARED = ("output_dir", "cluster.address")  # where the run is, not what it is


def resume_changes(cfg: GRPOConfig, out: Path) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, now)} for what this resume changes; a change to FIXED_ON_RESUME is refused."""
    recorded = flatten(GRPOConfig.from_yaml(out / RUN_FILE).to_dict())
    now = flatten(cfg.to_dict())
    changes = {k: (recorded.get(k), now.get(k)) for k in sorted(recorded.keys() | now.keys()) if recorded.get(k) != now.get(k) and k not in _NOT_COMPARED}
    for key, (old, new) in changes.items():
        if any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME):
            raise RunDirError(f"--resume cannot change {key} ({old!r} -> {new!r}): the checkpoint was built with it; start a new run (another --output-dir) to change it")
    return changes


def check_output_dir(cfg: GRPOConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse to mix runs: a dir that holds trained steps needs --resume (same run) or --overwrite.
    A run that failed before its first logged step (only run_config.yaml) is simply replaced. Writes nothing."""
    out = Path(cfg.output_dir).resolve()
    started = (out / RUN_FILE).is_file() or (out / METRICS_FILE).is_file()
    trained = bool(read_metrics(out)) or latest_complete_checkpoint(out) is not None
    if trained and not (resume or overwrite):
        raise RunDirError(f"output_dir {str(out)!r} already holds a run: pass --resume to continue it or --overwrite to replace it")
    if resume and not started:
        raise RunDirError(f"--resume: {str(out)!r} holds no run to resume; drop --resume to start one")
    if resume and (out / RUN_FILE).is_file():
        resume_changes(cfg, out)
    return out


def prepare_output_dir(cfg: GRPOConfig, resume: bool, overwrite: bool) -> Path:
    out = check_output_dir(cfg, resume, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / FATAL_FILE).unlink(missing_ok=True)  # a resume after a fix gets its retries back
    if resume and (out / RUN_FILE).is_file():
        for key, (old, new) in resume_changes(cfg, out).items():
            print(f"[grpo-ray] --resume: {key} {old!r} -> {new!r} (recorded in {RUN_FILE})")
    cfg.to_yaml(out / RUN_FILE)  # what this run trains with: the next plain --resume reloads it
    return out


def make_trainer(cfg: GRPOConfig, loop: LoopConfig, out: Path, callbacks: list | None = None) -> TorchTrainer:
    """Ray Train resumes by itself from the newest checkpoint under the same name and storage path.

    `callbacks`: extra Ray Train `RunConfig` callbacks (grpo_ray/tuning/trial.py forwards reports to Tune)."""
    cl = cfg.cluster
    return GRPOTorchTrainer(
        run_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=cl.num_trainer_workers, use_gpu=cl.use_gpu, resources_per_worker=trainer_bundle(cl)),
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


def evaluate_remote(cfg: GRPOConfig, model_path: str, limit: int | None = None, **kwargs: Any) -> EvalResult:
    """`evaluate.evaluate` as a Ray task, so vLLM gets its own process and CPUs (kwargs: rows,
    num_generations, reward_specs).

    `max_calls=1`: the worker exits after it, or the idle process would keep its vLLM engine's
    memory and some CPU beside the training that follows (the embedded Ray keeps idle workers for
    minutes, for the reward tasks; README "Performance"). "DEFAULT": never inside the caller's
    placement group (a Tune trial's holds no CPU). It asks for what a rollout engine asks for
    (`resources.engine_bundle`)."""
    need = engine_bundle(cfg.cluster)
    cpus, gpus = need.pop("CPU"), need.pop("GPU", 0)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, resources=need or None, max_retries=0, max_calls=1)(evaluate)
    task = task.options(scheduling_strategy="DEFAULT")
    return ray.get(task.remote(cfg, model_path, limit, **kwargs))


def held_out_accuracy(cfg: GRPOConfig, model_path: str, rows: list[dict] | None = None, **user_code: Any) -> float:
    """Greedy eval-split accuracy (eval.json's start/end numbers); `user_code`: the Python API's
    tool_specs / env_spec."""
    return float(evaluate_remote(cfg, model_path, cfg.eval_limit, rows=rows, **user_code).accuracy)


def train(
    cfg: GRPOConfig,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    datasets: tuple[list[dict], list[dict]] | None = None,
    reward_specs: list | None = None,
    tool_specs: list | None = None,
    env_spec: Any = None,
) -> RunResult:
    """Run one GRPO training job to completion and return where its outputs are.

    `datasets` (train rows, eval rows), `reward_specs` (names or `rewards.ByValue` callables,
    aligned with cfg.reward_funcs), `tool_specs` and `env_spec` (the same for cfg.tools and
    cfg.environment_factory) are the Python API's: they travel to the workers through Ray."""
    startup = Timeline()
    if (started := process_start()) is not None:
        startup.mark("process_start", at=started)
    startup.mark("train_called")
    cfg = cfg.with_absolute_paths()
    check_output_dir(cfg, resume, overwrite)
    check_trackers(cfg)
    model_path = resolve_model_path(cfg.model_name_or_path)
    check_context_length(model_path, cfg.context_length)
    rows = datasets or load_datasets(cfg.data)  # a bad data file fails here, before OUTPUT_DIR holds anything
    if cfg.resolved_eval_steps and not rows[1]:
        raise ConfigError("eval_strategy='steps' needs held-out prompts: pass eval_dataset, or set data.eval_size > 0 / data.eval_split")
    if cfg.use_peft:
        check_peft(cfg, model_path)  # a LoRA target that does not exist fails here, before Ray starts
    if reward_specs is None:
        check_reward_specs(cfg.reward_funcs)  # names and files; importing them runs in a Ray worker
    check_tool_keys(cfg, tool_specs, env_spec)
    startup.mark("ray_called")
    init_ray(cfg)
    startup.mark("ray_ready")
    if reward_specs or cfg.reward_funcs:
        check_reward_functions(reward_specs or cfg.reward_funcs, cfg.cluster.reward_timeout_s)
    check_tools(cfg, tool_specs, env_spec)  # tools and environment import (in a Ray worker) before OUTPUT_DIR is written
    out = prepare_output_dir(cfg, resume, overwrite)
    # Only now: a check that failed above leaves nothing in OUTPUT_DIR, not even Ray's log lines
    # (its cause is in the error); from here on worker output goes to OUTPUT_DIR/logs.
    set_log_dir(out)
    scores: dict[str, float] = {}
    if cfg.eval_at_start_and_end and not resume:
        startup.mark("eval_called")
        scores["start"] = held_out_accuracy(cfg, model_path, datasets and datasets[1], tool_specs=tool_specs, env_spec=env_spec)
        print(f"[grpo-ray] held-out accuracy before training: {scores['start']:.3f}")
        startup.mark("eval_done")
    if console.in_driver():
        print(console.banner(cfg, model_path, (len(rows[0]), len(rows[1])), out, cfg.cluster.address or os.environ.get("RAY_ADDRESS")), flush=True)
    startup.mark("pool_called")
    pool = RolloutPool(cfg, EngineSpec.from_config(cfg, model_path))
    try:
        transport = resolve_transport(cfg.cluster.weight_sync, cfg.cluster.use_gpu)
        loop = LoopConfig(
            cfg=cfg.to_dict(), model_path=model_path, pool=pool, transport=transport, output_dir=str(out),
            datasets=datasets, reward_specs=reward_specs, tool_specs=tool_specs, env_spec=env_spec, startup=startup,
        )  # fmt: skip
        restart = latest_complete_checkpoint(out) if resume else None
        with console.Progress(out, cfg.max_steps, restart[0] if restart else 0):
            result = make_trainer(cfg, loop, out, callbacks).fit()
        if result.error is not None:
            raise pool.start_error() or result.error  # an engine that never started is the cause
    finally:
        pool.shutdown()
    rows = read_metrics(out)
    curve = plot_reward_curve(out)
    ckpt = latest_checkpoint(out)
    if cfg.eval_at_start_and_end and ckpt is not None:
        scores["end"] = held_out_accuracy(cfg, str(Path(ckpt.path) / MODEL_DIR), datasets and datasets[1], tool_specs=tool_specs, env_spec=env_spec)
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
