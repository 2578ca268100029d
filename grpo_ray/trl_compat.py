"""What grpo-ray does with each `trl.GRPOConfig` 1.16 field that is not one of its own.

Every TRL field is exactly one of (tests/test_trl_compat.py introspects `trl.GRPOConfig`, so a
field a new TRL adds fails that test until it is placed here or implemented in config.py):

- implemented: a `GRPOConfig` field with TRL's name, meaning and default (config.py), or an
  alias of one (`config.ALIASES`);
- `MEANINGLESS`: accepted with any value, because it has no meaning in this architecture (the
  engines are always vLLM Ray actors, there is no DataLoader, no DDP, ...); a config that sets
  one is told so once in the log;
- `REFUSED`: accepted only at TRL's default, whose behaviour is what grpo-ray does; any other
  value is a one-line `ConfigError` that says why and what to use instead.

Bottom layer: imports nothing from grpo_ray.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("grpo_ray")

_NO_SERVER = "there is no vLLM server: the engines are Ray actors that get weights over cluster.weight_sync"
_DDP = "the trainer workers run DeepSpeed on Ray Train's torch process group (cluster.num_trainer_workers)"
_LOADER = "there is no DataLoader: prompts come from the rollout's epoch-shuffled sampler"
_EVAL_ENGINES = "evaluation generates on the rollout engines (all eval prompts at once, in the training dtype)"
_LOG_ONLY = "grpo-ray's logs are Ray's; metrics go to OUTPUT_DIR/metrics.jsonl and report_to"

MEANINGLESS: dict[str, str] = {
    "use_vllm": "grpo-ray always generates with vLLM engines (Ray actors)",
    "vllm_mode": "the engines are Ray actors placed by cluster.* (neither TRL's 'server' nor 'colocate')",
    "vllm_server_base_url": _NO_SERVER,
    "vllm_server_host": _NO_SERVER,
    "vllm_server_port": _NO_SERVER,
    "vllm_server_timeout": _NO_SERVER,
    "vllm_group_port": _NO_SERVER,
    "ds3_gather_for_generation": "under ZeRO-3 weights reach the engines gathered one tensor at a time, always",
    "pad_to_multiple_of": "the update packs prompts and completions itself (shared_prompt_packing); no fixed padding",
    "cache_implementation": "generation runs in vLLM, not transformers' generate",
    "use_cache": "the trainer's forward pass never uses a KV cache; generation runs in vLLM",
    "log_multimodal": "grpo-ray trains text-only models",
    "num_train_epochs": "grpo-ray counts max_steps (always > 0; TRL too ignores epochs when max_steps > 0)",
    "bf16_full_eval": _EVAL_ENGINES,
    "fp16_full_eval": _EVAL_ENGINES,
    "per_device_eval_batch_size": _EVAL_ENGINES,
    "eval_accumulation_steps": _EVAL_ENGINES,
    "eval_do_concat_batches": _EVAL_ENGINES,
    "eval_use_gather_object": _EVAL_ENGINES,
    "prediction_loss_only": "evaluation reports pass@k and rewards of sampled completions, not a loss",
    "logging_nan_inf_filter": "metrics.jsonl records values as computed; a NaN/inf update is counted in skipped_updates",
    "log_on_each_node": _LOG_ONLY,
    "log_level": _LOG_ONLY,
    "log_level_replica": _LOG_ONLY,
    "disable_tqdm": "the progress bar is Ray's (one line on the driver)",
    "save_on_each_node": "checkpoints are written once, by Ray Train, under OUTPUT_DIR/ray",
    "skip_memory_metrics": "no memory metrics are collected",
    "use_cpu": "cluster.use_gpu decides where engines and trainers run",
    "dataloader_drop_last": _LOADER,
    "dataloader_num_workers": _LOADER,
    "dataloader_pin_memory": _LOADER,
    "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER,
    "dataloader_multiprocessing_context": _LOADER,
    "dataloader_in_order": _LOADER,
    "label_names": "GRPO has no labels: rewards come from reward_funcs",
    "length_column_name": _LOADER,
    "ddp_find_unused_parameters": _DDP,
    "ddp_bucket_cap_mb": _DDP,
    "ddp_broadcast_buffers": _DDP,
    "ddp_static_graph": _DDP,
    "ddp_backend": _DDP,
    "ddp_timeout": _DDP,
    "local_rank": _DDP,
    "do_train": "GRPOTrainer.train() / grpo-ray train decide what runs",
    "do_eval": "eval_strategy decides whether evaluation runs",
    "do_predict": "GRPOTrainer.train() / grpo-ray train decide what runs",
}

_HUB = "grpo-ray does not push to the Hub: upload OUTPUT_DIR/ray/train/checkpoint_*/model yourself"
_TRACKIO = "trackio is not a supported tracker: use report_to tensorboard, mlflow or wandb"
_COMPILE = "torch.compile is not supported in the update; leave it off"
_REF_SYNC = "TR-DPO reference-model syncing is not implemented: the reference stays the start model (beta > 0)"
_ADAPTIVE = "the adaptive entropy coefficient is not implemented: use a static entropy_coef"
_TF_GEN = "generation always runs in vLLM engines"
_BEST = "grpo-ray keeps the last save_total_limit checkpoints, not a best one: pick it from metrics.jsonl"
_DEEPSPEED = "DeepSpeed is configured by grpo-ray: use cluster.zero_stage (0-3) and cluster.num_trainer_workers"

# name -> (TRL 1.16's default, why another value is refused and what to use)
REFUSED: dict[str, tuple[Any, str]] = {
    "model_init_kwargs": (None, "the trainer loads the model in fp32 with DeepSpeed mixed precision: use bf16/fp16"),
    "trust_remote_code": (False, "models load without remote code: use a model folder transformers can load natively"),
    "router_aux_loss_coef": (None, "the MoE router auxiliary loss is not implemented"),
    "cast_lm_head_to_fp32": (False, "the trainer computes log-probabilities in fp32 already; the engines use the training dtype"),
    "shuffle_dataset": (True, "the prompt sampler always shuffles each epoch (seeded by seed)"),
    "generation_kwargs": (None, "set the sampling fields instead: temperature, top_p, top_k, min_p, repetition_penalty"),
    "vllm_model_impl": ("vllm", "the engines always use vLLM's own model implementation"),
    "vllm_enable_sleep_mode": (False, "engines keep their memory between steps: give them their own nodes with cluster.rollout_resource"),
    "vllm_structured_outputs_regex": (None, "structured (regex-guided) generation is not implemented"),
    "vllm_gpu_memory_utilization": (0.3, "use cluster.gpu_memory_utilization"),
    "vllm_max_model_length": (None, "the engines' context is max_prompt_length + max_completion_length: set those"),
    "vllm_tensor_parallel_size": (1, "use cluster.tensor_parallel_size"),
    "sync_ref_model": (False, _REF_SYNC),
    "ref_model_mixup_alpha": (0.6, _REF_SYNC),
    "ref_model_sync_steps": (512, _REF_SYNC),
    "use_adaptive_entropy": (False, _ADAPTIVE),
    "entropy_coef_min": (0.0, _ADAPTIVE),
    "entropy_coef_max": (1.0, _ADAPTIVE),
    "entropy_coef_delta": (0.005, _ADAPTIVE),
    "entropy_target": (0.2, _ADAPTIVE),
    "num_completions_to_print": (None, "completions are not printed: log_completions writes OUTPUT_DIR/completions.jsonl"),
    "log_unique_prompts": (False, "log_completions logs every (prompt, completion) row"),
    "log_completions_hub_repo": (None, _HUB),
    "use_transformers_continuous_batching": (False, _TF_GEN),
    "transformers_continuous_batching_config": (None, _TF_GEN),
    "use_transformers_paged": (False, _TF_GEN),
    "lr_scheduler_kwargs": (None, "scheduler options are not configurable: pick lr_scheduler_type and warmup_steps/warmup_ratio"),
    "optim_args": (None, "optimizer options are the adam_* and weight_decay fields"),
    "optim_target_modules": (None, "every parameter is trained by the one optimizer"),
    "average_tokens_across_devices": (True, "token-normalised losses (dapo, cispo, vespo) always count the whole step's tokens across workers"),
    "label_smoothing_factor": (0.0, "GRPO has no labels to smooth"),
    "tf32": (None, "TF32 matmuls are not configured by grpo-ray (torch's default applies)"),
    "gradient_checkpointing_kwargs": (None, "gradient checkpointing uses transformers' defaults: set only gradient_checkpointing"),
    "torch_compile": (False, _COMPILE),
    "torch_compile_backend": (None, _COMPILE),
    "torch_compile_mode": (None, _COMPILE),
    "use_liger_kernel": (False, "Liger kernels are not supported in the update"),
    "liger_kernel_config": (None, "Liger kernels are not supported in the update"),
    "neftune_noise_alpha": (None, "NEFTune embedding noise is an SFT technique; not implemented"),
    "torch_empty_cache_steps": (None, "the CUDA cache is not emptied on a schedule"),
    "auto_find_batch_size": (False, "a shrunk batch would split prompt groups (TRL refuses it too): lower per_device_train_batch_size"),
    "logging_strategy": ("steps", "metrics are logged every logging_steps steps"),
    "logging_first_step": (False, "metrics are logged every logging_steps steps (and at the last step)"),
    "include_num_input_tokens_seen": ("no", "token counts are logged as gen_tokens_per_s and completion_length_mean"),
    "run_name": (None, "trackers name the run after output_dir"),
    "project": ("huggingface", _TRACKIO),
    "trackio_space_id": (None, _TRACKIO),
    "trackio_bucket_id": (None, _TRACKIO),
    "trackio_static_space_id": (None, _TRACKIO),
    "eval_delay": (0, "evaluation starts at the first eval_steps boundary (or at step 0 with eval_on_start)"),
    "include_for_metrics": ([], "evaluation metrics are fixed: eval/pass@1, eval/pass@k, eval/mean@k"),
    "batch_eval_metrics": (False, "evaluation metrics are computed over the whole eval set"),
    "save_only_model": (False, "checkpoints always hold the optimizer state (for --resume); the HF model is in checkpoint_*/model"),
    "save_strategy": ("steps", "checkpoints are saved every save_steps steps and at the end"),
    "enable_jit_checkpoint": (False, "checkpoints are saved every save_steps steps and at the end"),
    "push_to_hub": (False, _HUB),
    "hub_token": (None, _HUB),
    "hub_private_repo": (None, _HUB),
    "hub_model_id": (None, _HUB),
    "hub_strategy": ("every_save", _HUB),
    "hub_always_push": (False, _HUB),
    "hub_revision": (None, _HUB),
    "load_best_model_at_end": (False, _BEST),
    "metric_for_best_model": (None, _BEST),
    "greater_is_better": (None, _BEST),
    "ignore_data_skip": (False, "a resumed run replays the sampler to exactly where the checkpoint left it"),
    "restore_callback_states_from_checkpoint": (False, "callbacks carry no state across a resume"),
    "full_determinism": (False, "runs are seeded (seed) but vLLM sampling is not bit-deterministic across machines"),
    "data_seed": (None, "use data.seed (dataset generation) and seed (prompt order)"),
    "accelerator_config": (None, "accelerate is not used: placement is cluster.*"),
    "parallelism_config": (None, "sequence/context parallelism is not implemented: use cluster.zero_stage"),
    "remove_unused_columns": (False, "every dataset column reaches the reward functions (TRL's GRPO default)"),
    "train_sampling_strategy": ("random", "the prompt sampler shuffles each epoch"),
    "fsdp": (None, _DEEPSPEED),
    "fsdp_config": (None, _DEEPSPEED),
    "deepspeed": (None, _DEEPSPEED),
    "debug": ("", "use grpo-ray --debug for full tracebacks"),
    "resume_from_checkpoint": (None, "use grpo-ray train --resume OUTPUT_DIR, or GRPOTrainer(...).train(resume=True)"),
}

_noticed: set[str] = set()


def take_trl_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the TRL keys that have no field here: a meaningless one is noted once in the
    log, a refused one at a value other than TRL's default raises (as a ValueError the caller
    turns into a ConfigError)."""
    out = {}
    for key, value in raw.items():
        if key in MEANINGLESS:
            if key not in _noticed:
                _noticed.add(key)
                log.warning("grpo-ray ignores %s=%r: %s", key, value, MEANINGLESS[key])
        elif key in REFUSED:
            default, why = REFUSED[key]
            if value != default:
                raise ValueError(f"{key}={value!r} is not supported: {why}")
        else:
            out[key] = value
    return out
