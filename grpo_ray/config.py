"""Run configuration: one validated `GRPOConfig`, keyed like TRL 1.16 so a TRL config carries over.

The flat fields mirror `trl.GRPOConfig` (same names, same defaults) for everything grpo-ray
implements. Three sections are grpo-ray's own: `data` (what to train on), `cluster` (how many
vLLM actors and trainer workers, DeepSpeed ZeRO stage, weight-sync transport) and the reward
function list. Every error is a one-line `ConfigError` that names the field and the fix.

This module sits at the bottom of the import graph: it imports only grpo_ray.text (did-you-mean)
and grpo_ray.trl_compat (the TRL fields without a field here).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from grpo_ray.text import suggest
from grpo_ray.trl_compat import take_trl_keys

log = logging.getLogger("grpo_ray")

# The one list of each choice (algorithm.py and sync.py check against these too).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # what algorithm.grpo_loss computes
EVAL_STRATEGIES = ("no", "steps")
SCALE_REWARDS = ("group", "batch", "none")
ALL_NONE_REWARDS = ("error", "warn")
IS_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
TRANSPORTS = ("gloo", "nccl", "object_store")  # weight-sync transports (sync.py)
WEIGHT_SYNC = ("auto", *TRANSPORTS)
LORA_SYNC = ("merged", "adapter")  # what a LoRA run sends to vLLM (lora.py)
# How the OpenMP threads of the engines and trainer workers wait between parallel regions
# (libgomp, which torch's CPU wheels use). Its default spins on a core that another process could
# use: when generation and the update run at once on the same cores (async_generation on CPU) that
# spinning makes each slow the other, so "auto" waits passively there; sync runs one phase at a
# time and keeps the default (README "Performance", OpenMP waits: bench/vs_trl.py's A/B).
OMP_WAIT = {
    "inherit": {},  # whatever the processes' environment says
    "short_spin": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
OMP_WAIT_CHOICES = ("auto", *OMP_WAIT)
OMP_WAIT_VARS = tuple(dict.fromkeys(k for env in OMP_WAIT.values() for k in env))
TRACKERS = ("tensorboard", "mlflow", "wandb")  # report_to names (metrics.jsonl is always written)
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# Optimizers grpo-ray builds natively, and what each TRL/transformers name falls back to on
# a device where the original is unavailable (bitsandbytes 8-bit needs CUDA; torch's fused AdamW
# runs on CPU too, and is faster there than the default per-tensor loop: bench/trainer_bench.py).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adam", "sgd")
_CPU_FALLBACK = {
    "adamw_8bit": "adamw_torch",
    "adamw_bnb_8bit": "adamw_torch",
    "paged_adamw_8bit": "adamw_torch",
}
# TRL / transformers spellings that mean one of our fields.
ALIASES = {
    "max_new_tokens": "max_completion_length",
    "model": "model_name_or_path",
    "vllm_importance_sampling_cap": "vllm_importance_sampling_clip_max",  # TRL's deprecated name
}


class ConfigError(ValueError):
    """A config problem, phrased as one line: the field, what is wrong, how to fix it."""


@dataclass
class DataConfig:
    """Where prompts come from: a reasoning-gym task, the built-in `arith`, or a local file."""

    task: str = "reasoning_gym/chain_sum"
    config: dict = field(default_factory=dict)
    size: int = 512
    eval_size: int = 100
    seed: int = 0
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    system_prompt: str | None = None
    eval_split: str | None = None


def omp_wait_env() -> dict[str, str | None]:
    """This process's OpenMP wait settings (what placement.json records per engine and rank)."""
    return {k: os.environ.get(k) for k in OMP_WAIT_VARS}


@dataclass
class ClusterConfig:
    """Placement and parallelism: the part of a run TRL leaves to `accelerate launch`."""

    address: str | None = None  # None: start an embedded local Ray on this machine
    connect_timeout_s: float = 30.0  # joining `address`: give up (one line, exit 2) after this long
    num_cpus: int | None = None  # logical CPUs of the embedded Ray (None: sized from the run)
    num_rollout_actors: int = 1
    rollout_num_cpus: int = 1
    tensor_parallel_size: int = 1
    # vLLM KV cache per engine, GiB; "auto": on CPU sized from the run (grpo_ray/resources.kv_cache_bytes),
    # on GPU from gpu_memory_utilization
    kv_cache_gib: Union[float, str] = "auto"
    gpu_memory_utilization: float = 0.5
    num_trainer_workers: int = 1
    trainer_num_cpus: int = 1
    use_gpu: bool = False
    zero_stage: int = 0
    weight_sync: str = "auto"  # auto -> nccl on GPU, gloo on CPU
    # OpenMP waiting in engines and trainers (see OMP_WAIT); auto: passive with async_generation
    # on CPU (generation and update share the cores), else inherit.
    omp_wait: str = "auto"
    reward_num_cpus: float = 0.0  # CPUs reserved per reward task (0: never wait for a free CPU)
    reward_timeout_s: float = 60.0
    # a reward chunk past the timeout scores NaN (counted: reward_timeouts); more than this share
    # of a step's scores late stops the run
    reward_timeout_max_share: float = 0.5
    tool_timeout_s: float = 30.0  # one tool / environment call (multi-turn); a late one answers the model with an error
    max_failures: int = 0
    max_engine_restarts: int = 3  # a dead rollout engine is restarted (and re-synced) this often
    # Node roles: resources a node must offer to host rollout engines / trainer workers.
    rollout_resource: str | None = None
    trainer_resource: str | None = None


@dataclass
class GRPOConfig:
    """Everything one GRPO run needs. Flat fields follow `trl.GRPOConfig` 1.16 names and defaults."""

    # --- model and output (TRL: ModelConfig.model_name_or_path, TrainingArguments.output_dir)
    model_name_or_path: str = "smollm2-135m"
    output_dir: str = "grpo_outputs"
    # --- generation
    num_generations: int = 8
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    # TRL: one generation round of `generation_batch_size` completions feeds `steps_per_generation`
    # micro-batches (default: gradient_accumulation_steps, i.e. one optimizer step per round)
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    chat_template_kwargs: dict | None = None  # extra apply_chat_template arguments (e.g. enable_thinking)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    # --- objective
    beta: float = 0.0
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: list[float] | None = None
    multi_objective_aggregation: str = "sum_then_normalize"  # or "normalize_then_sum" (GDPO)
    # grpo-ray: a step where every reward function returned None for every completion has nothing
    # to learn from (TRL warns per sample and trains on NaN); "error" stops the run, "warn" goes on
    all_none_rewards: str = "error"
    # grpo-ray (DAPO's dynamic sampling; not in TRL): drop groups whose rewards do not vary and
    # sample more prompts, up to this many rounds per step (grpo_ray.rollout.dynamic)
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    # --- multi-turn (TRL: GRPOTrainer(tools=, environment_factory=), GRPOConfig.max_tool_calling_iterations)
    tools: list[str] = field(default_factory=list)  # "path/file.py:fn" / "pkg.mod:fn" (grpo_ray.rollout.tools)
    environment_factory: str | None = None  # "path/file.py:Class": one environment per episode
    max_tool_calling_iterations: int | None = None  # tool / environment answers per episode; None: until the token budget
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0  # static entropy bonus (TRL's use_adaptive_entropy is refused)
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = True
    disable_dropout: bool = False
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    # --- optimisation
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 500
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    optim: str = "adamw_torch_fused"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # grpo-ray: an update whose loss or gradient is NaN/inf is skipped; this many in a row stop the run
    max_bad_steps: int = 3
    # grpo-ray: a step whose batch vLLM sampled this far (mean nats/token) from the trainer's own
    # log-probabilities stops the run (weights that did not reach the engines); None: never
    max_logprob_mismatch: float | None = 0.5
    gradient_checkpointing: bool = True
    # grpo-ray: the update runs each prompt once for several of its completions (exact; README
    # "Performance"); false pads one row per (prompt, completion) pair, as TRL does
    shared_prompt_packing: bool = True
    bf16: Union[bool, str, None] = None  # True / False / "auto" (None == "auto"): bf16 where native (resources.native_bf16)
    fp16: Union[bool, str] = False
    seed: int = 42
    # --- logging and checkpoints
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    log_completions: bool = False  # OUTPUT_DIR/completions.jsonl (+ trackers) every logged step
    # --- evaluation during training (on the rollout engines, between steps): pass@1, pass@k, mean@k
    eval_strategy: str = "no"  # "steps": every eval_steps (TRL: None -> logging_steps; < 1: a ratio of max_steps)
    eval_steps: float | None = None
    eval_on_start: bool = False
    num_generations_eval: int | None = None  # samples per eval prompt (k); None: num_generations
    # grpo-ray: greedy held-out accuracy of the start and final models -> OUTPUT_DIR/eval.json
    eval_at_start_and_end: bool = False
    eval_limit: int | None = None
    # grpo-ray: generate step t+1's batch while step t's update runs (README "Asynchronous
    # generation"); the batch trained at step t was then sampled by weights `staleness` updates old.
    async_generation: bool = False
    max_staleness: int | None = None  # None: 1 with async_generation, else 0
    # --- LoRA / PEFT (TRL ModelConfig names and defaults; README "LoRA"). Only the adapter trains;
    # the KL reference is the base with the adapter disabled.
    use_peft: bool = False  # also switched on by a non-empty peft_config (TRL: passing peft_config)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: every linear layer but the output head ("all-linear")
    lora_modules_to_save: list[str] | None = None
    peft_config: dict | None = None  # any other peft.LoraConfig field (e.g. use_rslora: true); wins over lora_*
    # grpo-ray: how vLLM gets the adapter. merged: base + s·B·A of the adapted layers;
    # adapter: vLLM serves the base with enable_lora and takes only the adapter tensors
    lora_sync: str = "merged"
    load_in_4bit: bool = False  # QLoRA (bitsandbytes, CUDA only)
    # --- grpo-ray's own sections
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        self.report_to = normalize_report_to(self.report_to)
        if self.peft_config and not self.use_peft:  # TRL: a peft_config given means LoRA
            self.use_peft = True
        _validate(self)

    # ------------------------------------------------------------------ derived sizes
    @property
    def resolved_steps_per_generation(self) -> int:
        """Micro-batches per worker that one generation round feeds (TRL's `steps_per_generation`).

        Unset, TRL uses gradient_accumulation_steps; where that round would not hold whole groups
        of num_generations (the seed guide's configs), it is rounded up to the next multiple of
        gradient_accumulation_steps that does (noted in the log)."""
        per = self.per_device_train_batch_size * self.cluster.num_trainer_workers
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        if self.generation_batch_size is not None:
            return self.generation_batch_size // per
        spg = self.gradient_accumulation_steps
        while (per * spg) % self.num_generations:
            spg += self.gradient_accumulation_steps
        return spg

    @property
    def optimizer_steps_per_round(self) -> int:
        """Optimizer steps one generation round makes: num_iterations x steps_per_generation / accumulation."""
        return self.num_iterations * self.resolved_steps_per_generation // self.gradient_accumulation_steps

    @property
    def completions_per_step(self) -> int:
        """Completions one step (one generation round) samples across all trainer workers."""
        return self.per_device_train_batch_size * self.resolved_steps_per_generation * self.cluster.num_trainer_workers

    @property
    def resolved_eval_steps(self) -> int | None:
        """Steps between evaluations (None: no evaluation during training), as TRL resolves them."""
        if self.eval_strategy == "no":
            return None
        steps = self.eval_steps if self.eval_steps is not None else self.logging_steps
        return max(1, math.ceil(self.max_steps * steps)) if steps < 1 else int(steps)

    @property
    def context_length(self) -> int:
        """Tokens an engine holds per sequence: the prompt (512 when max_prompt_length is unset) and the completion."""
        return (self.max_prompt_length or 512) + self.max_completion_length

    @property
    def eval_k(self) -> int:
        return self.num_generations_eval or self.num_generations

    @property
    def prompts_per_step(self) -> int:
        return self.completions_per_step // self.num_generations

    @property
    def staleness(self) -> int:
        """Updates between the weights that sampled a step's batch and the weights it trains (0: sync)."""
        if self.max_staleness is not None:
            return self.max_staleness
        return 1 if self.async_generation else 0

    @property
    def total_warmup_steps(self) -> int:
        return self.warmup_steps or int(round(self.warmup_ratio * self.max_steps))

    def resolved_precision(self, device_supports_bf16: bool) -> str:
        """'bf16', 'fp16' or 'fp32' after resolving "auto" against the device."""
        bf16 = (device_supports_bf16 and self.fp16 is not True) if self.bf16 in (None, "auto") else bool(self.bf16)
        fp16 = (not bf16 and self.cluster.use_gpu) if self.fp16 == "auto" else bool(self.fp16)
        if fp16 and not bf16 and not self.cluster.use_gpu:  # e.g. the seed's fp16=not is_bf16_supported() on CPU
            _notice("fp16=True needs a CUDA device (loss-scaled fp16 training has no CPU path); training in fp32 on CPU")
            return "fp32"
        return "bf16" if bf16 else ("fp16" if fp16 else "fp32")

    def resolved_omp_wait(self) -> str:
        """`cluster.omp_wait` after "auto"; a driver environment that sets OMP_WAIT_POLICY or
        GOMP_SPINCOUNT itself wins over "auto" (the local Ray's processes inherit it)."""
        if self.cluster.omp_wait != "auto":
            return self.cluster.omp_wait
        if self.async_generation and not self.cluster.use_gpu and not any(k in os.environ for k in OMP_WAIT_VARS):
            return "passive"
        return "inherit"

    def process_env(self) -> dict[str, str]:
        """Environment variables the engine and trainer processes start with."""
        return dict(OMP_WAIT[self.resolved_omp_wait()])

    def resolved_optim(self, on_gpu: bool) -> tuple[str, str | None]:
        """The optimizer to build on this device and, when it differs, a one-line notice why."""
        if on_gpu or self.optim not in _CPU_FALLBACK:
            return self.optim, None
        fallback = _CPU_FALLBACK[self.optim]
        return fallback, f"optim={self.optim!r} needs a CUDA device; using {fallback!r} on CPU"

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GRPOConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a mapping of keys to values, got {type(raw).__name__}")
        return cls(**{str(k): v for k, v in raw.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GRPOConfig":
        raw = read_yaml(path, f"config file {str(path)!r} does not exist: check the path")
        if not raw:  # an empty file would silently train the built-in defaults for minutes
            raise ConfigError(f"config file {str(path)!r} is empty: add keys (e.g. copy grpo_ray/configs/quick.yaml), or drop --config to run the demo")
        return cls.from_dict(raw)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GRPOConfig":
        """A config from one of the seed guide's presets, with keyword overrides on top."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict(merge(_canonical(PRESETS[name]), _canonical(overrides)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_absolute_paths(self, cwd: str | Path | None = None) -> "GRPOConfig":
        """Relative paths that exist under `cwd` made absolute: Ray workers run in other directories."""
        root = Path(cwd or Path.cwd())

        def fix(value: Any) -> Any:
            if isinstance(value, str) and value and not Path(value).is_absolute() and (root / value).exists():
                return str((root / value).resolve())
            return value

        def fix_spec(spec: Any) -> Any:
            path = reward_file(spec)
            return f"{fix(path)}:{str(spec).strip().rsplit(':', 1)[1]}" if path else spec

        return self.with_overrides({
            "model_name_or_path": fix(self.model_name_or_path),
            "reward_funcs": [fix_spec(s) for s in self.reward_funcs],
            "tools": [fix_spec(s) for s in self.tools],
            "environment_factory": fix_spec(self.environment_factory) if self.environment_factory else None,
            "data": {"task": fix(self.data.task), "eval_split": fix(self.data.eval_split)},
        })  # fmt: skip

    def with_overrides(self, overrides: dict[str, Any]) -> "GRPOConfig":
        return GRPOConfig.from_dict(merge(self.to_dict(), _canonical(overrides)))


_fields_init = GRPOConfig.__init__


def _config_init(self: GRPOConfig, **kwargs: Any) -> None:
    """`GRPOConfig(**kwargs)` is the YAML path: TRL aliases, TRL-only keys (trl_compat), a
    did-you-mean for a typo, YAML's lossless conversions, then validation."""
    try:
        kwargs = take_trl_keys(kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _fields_init(self, **_prepare(GRPOConfig, kwargs, prefix=""))


GRPOConfig.__init__ = _config_init  # type: ignore[method-assign]


# The seed guide's presets (../shared/seed): `balanced` is its basic config as written; the other
# two change only what the guide's snippets change.
_BALANCED = {
    "output_dir": "grpo_outputs",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 4,
    "num_generations": 8,
    "max_new_tokens": 1024,
    "temperature": 0.7,
    "beta": 0.001,
    "loss_type": "bnpo",
    "learning_rate": 5e-6,
    "max_steps": 500,
    "logging_steps": 1,
    "save_steps": 100,
    "optim": "adamw_8bit",
    "warmup_ratio": 0.1,
    "bf16": "auto",
    "fp16": "auto",
    "cluster": {"num_trainer_workers": 2},
}
PRESETS: dict[str, dict[str, Any]] = {
    "balanced": _BALANCED,
    "aggressive": {**_BALANCED, "num_generations": 4, "beta": 0.0001, "learning_rate": 1e-5, "temperature": 0.8},
    "conservative": {
        **_BALANCED,
        "num_generations": 16,
        "beta": 0.01,
        "learning_rate": 2e-6,
        "temperature": 0.6,
        "gradient_accumulation_steps": 8,
    },
}


def _canonical(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level TRL spellings renamed to our field names, so a merge never holds both."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise ConfigError(f"{name}: given twice (as {name!r} and its alias {key!r}): keep one")
        out[name] = value
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base` (nested sections merge key by key)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("config",):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=value` (CLI --set) -> {"a": {"b": value}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set learning_rate=1e-5")
    key, value = text.split("=", 1)
    try:
        node: Any = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem}); quote it or fix the brackets") from None
    parts = key.strip().split(".")
    parts[0] = ALIASES.get(parts[0], parts[0])  # an alias replaces the field's value, never adds a twin
    for part in reversed(parts):
        node = {part: node}
    return node


# ---------------------------------------------------------------------- building and checking
def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    try:
        return cls(**_prepare(cls, raw, prefix))
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _prepare(cls: type, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`raw`'s keys checked against `cls`'s fields (aliases renamed at the top level), values coerced."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key) if not prefix else key
        if name not in names:
            raise ConfigError(_unknown_key(prefix + str(key), names, prefix))
        if name in kwargs:
            raise ConfigError(f"{prefix}{key}: given twice (as {key!r} and its alias): keep one")
        kwargs[name] = _coerce(prefix + name, value, hints[name])
    return kwargs


def _unknown_key(key: str, names: list[str], prefix: str) -> str:
    leaf = key[len(prefix):]
    hint = suggest(leaf, names + ([] if prefix else list(ALIASES)), prefix=prefix) or f"valid keys: {', '.join(sorted(names))}"
    return f"unknown config key {key!r}: {hint}"


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting the lossless cases YAML gets wrong."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: must be set")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a section (mapping), got {value!r}")
        return _build(tp, value, prefix=name + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:  # YAML 1.1 reads `5e-6` as a string: accept it
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    if origin is Literal:  # pragma: no cover - not used in the schema today
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover


def read_yaml(path: str | Path, missing: str) -> Any:
    """A YAML file's content ({} when empty); a missing file raises `missing`, bad YAML its line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None


def one_of(name: str, value: Any, allowed: tuple, where: str = "") -> None:
    """`value` is one of `allowed`, or a one-line error naming the closest (`where`: a prefix, e.g. a file)."""
    if value not in allowed:
        hint = suggest(value, allowed, end=" ")
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{name}={value!r} is not supported: {hint}use one of {', '.join(map(str, allowed))}")


def reward_file(spec: Any) -> str | None:
    """The file of a `path/to/file.py:function` reward spec; None for a built-in name or a
    `package.module:function` (the one rule rewards, jobs and with_absolute_paths all use)."""
    module, sep, attr = str(spec).strip().rpartition(":")
    if not sep or not module or not attr:
        return None
    return module if module.endswith(".py") or "/" in module or os.sep in module else None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def normalize_report_to(value: Any) -> list[str]:
    """TRL accepts a name, a list, "none" or "all"; we keep a list of known tracker names."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], ["None"]):
        return []
    if names == ["all"]:
        return list(TRACKERS)
    for name in names:
        one_of("report_to", name, TRACKERS)
    return names


def _validate(c: GRPOConfig) -> None:
    one_of("loss_type", c.loss_type, LOSS_TYPES)
    one_of("scale_rewards", c.scale_rewards, SCALE_REWARDS)
    one_of("all_none_rewards", c.all_none_rewards, ALL_NONE_REWARDS)
    one_of("importance_sampling_level", c.importance_sampling_level, IS_LEVELS)
    one_of("vllm_importance_sampling_mode", c.vllm_importance_sampling_mode, IS_MODES)
    one_of("lr_scheduler_type", c.lr_scheduler_type, LR_SCHEDULERS)
    one_of("optim", c.optim, OPTIMIZERS)
    one_of("cluster.weight_sync", c.cluster.weight_sync, WEIGHT_SYNC)
    one_of("cluster.omp_wait", c.cluster.omp_wait, OMP_WAIT_CHOICES)
    one_of("cluster.zero_stage", c.cluster.zero_stage, (0, 1, 2, 3))
    for name in ("bf16", "fp16"):
        value = getattr(c, name)
        _require(value in (True, False, None, "auto"), f"{name}={value!r}: use true, false or \"auto\"")
    _require(not (c.bf16 is True and c.fp16 is True), "bf16 and fp16 are both true: set only one of them")
    _require(
        c.dynamic_sampling_max_rounds >= 1,
        f"dynamic_sampling_max_rounds={c.dynamic_sampling_max_rounds}: sampling rounds per step, at least 1 (1 samples once and keeps every group); try 3",
    )
    _require(
        c.max_logprob_mismatch is None or c.max_logprob_mismatch > 0,
        f"max_logprob_mismatch={c.max_logprob_mismatch}: a positive number of nats per token (fp32 runs sit near 1e-6), or null to never stop",
    )
    _require(c.num_generations >= 2, f"num_generations={c.num_generations}: GRPO needs at least 2 completions per prompt to compare; set num_generations >= 2")
    _require(c.beta >= 0, f"beta={c.beta}: the KL coefficient cannot be negative; use 0 (no KL) or a positive value such as 0.001")
    _require(c.temperature > 0, f"temperature={c.temperature}: must be > 0 (GRPO needs sampling); try 0.7")
    _require(0 < c.top_p <= 1, f"top_p={c.top_p}: must be in (0, 1]; use 1.0 to disable")
    _require(c.top_k >= -1, f"top_k={c.top_k}: use 0 (or -1) to disable, or a positive integer")
    _require(c.min_p is None or 0 <= c.min_p <= 1, f"min_p={c.min_p}: must be in [0, 1]")
    _require(c.repetition_penalty > 0, f"repetition_penalty={c.repetition_penalty}: must be > 0; 1.0 disables it")
    _require(c.epsilon > 0, f"epsilon={c.epsilon}: the clip range must be > 0; TRL's default is 0.2")
    _require(c.epsilon_high is None or c.epsilon_high >= c.epsilon, f"epsilon_high={c.epsilon_high}: must be >= epsilon ({c.epsilon})")
    _require(c.delta is None or c.delta > 1, f"delta={c.delta}: the two-sided clip bound must be > 1, e.g. 2.0")
    _require(0 < c.top_entropy_quantile <= 1, f"top_entropy_quantile={c.top_entropy_quantile}: must be in (0, 1]")
    _require(c.learning_rate > 0, f"learning_rate={c.learning_rate}: must be > 0, e.g. 1e-6")
    _require(0 <= c.warmup_ratio < 1, f"warmup_ratio={c.warmup_ratio}: must be in [0, 1), e.g. 0.1")
    _require(c.max_steps > 0, f"max_steps={c.max_steps}: set the number of optimizer steps, e.g. max_steps: 100")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations", "logging_steps", "save_steps", "max_completion_length"):
        _require(getattr(c, name) >= 1, f"{name}={getattr(c, name)}: must be >= 1")
    _require(c.max_prompt_length is None or c.max_prompt_length >= 1, f"max_prompt_length={c.max_prompt_length}: must be >= 1 or null")
    _require(c.max_staleness is None or c.max_staleness >= 0, f"max_staleness={c.max_staleness}: must be >= 0 (or null)")
    _require(
        c.async_generation or not c.max_staleness,
        f"max_staleness={c.max_staleness} requires async_generation: true (sync generation always trains on fresh samples)",
    )
    _require(
        not (c.async_generation and c.max_staleness == 0),
        "async_generation: true with max_staleness=0 is sync mode: set max_staleness >= 1 (e.g. 1) or async_generation: false",
    )
    _require(c.max_grad_norm >= 0, f"max_grad_norm={c.max_grad_norm}: must be >= 0 (0 disables clipping)")
    _require(c.max_bad_steps >= 1, f"max_bad_steps={c.max_bad_steps}: must be >= 1 (steps in a row with a NaN/inf loss or gradient before the run stops)")
    if c.reward_weights is not None:
        _require(
            len(c.reward_weights) == len(c.reward_funcs),
            f"reward_weights has {len(c.reward_weights)} values for {len(c.reward_funcs)} reward_funcs: give one weight per function",
        )
    _require(
        len(c.reward_funcs) > 0 or bool(c.environment_factory),
        "reward_funcs is empty: name at least one reward function, e.g. [accuracy] (or an environment_factory whose environment has get_reward)",
    )
    _require(
        c.max_tool_calling_iterations is None or c.max_tool_calling_iterations >= 0,
        f"max_tool_calling_iterations={c.max_tool_calling_iterations}: must be >= 0 (or null: until max_completion_length)",
    )
    cl = c.cluster
    for name in ("num_rollout_actors", "num_trainer_workers", "tensor_parallel_size", "rollout_num_cpus", "trainer_num_cpus"):
        _require(getattr(cl, name) >= 1, f"cluster.{name}={getattr(cl, name)}: must be >= 1")
    _require(
        cl.kv_cache_gib == "auto" or (isinstance(cl.kv_cache_gib, (int, float)) and not isinstance(cl.kv_cache_gib, bool) and cl.kv_cache_gib > 0),
        f"cluster.kv_cache_gib={cl.kv_cache_gib!r}: use \"auto\" (sized from the batch) or a size in GiB > 0, e.g. 1",
    )
    _require(cl.max_engine_restarts >= 0, f"cluster.max_engine_restarts={cl.max_engine_restarts}: must be >= 0 (0: a dead engine ends the run)")
    _require(cl.connect_timeout_s > 0, f"cluster.connect_timeout_s={cl.connect_timeout_s}: must be > 0 seconds, e.g. 30")
    _require(cl.reward_timeout_s > 0, f"cluster.reward_timeout_s={cl.reward_timeout_s}: must be > 0 seconds")
    _require(
        0 <= cl.reward_timeout_max_share <= 1,
        f"cluster.reward_timeout_max_share={cl.reward_timeout_max_share}: a share in [0, 1] (0: any late reward stops the run)",
    )
    _require(cl.tool_timeout_s > 0, f"cluster.tool_timeout_s={cl.tool_timeout_s}: must be > 0 seconds")
    _require(
        not (cl.weight_sync == "nccl" and not cl.use_gpu),
        "cluster.weight_sync='nccl' needs GPUs: set cluster.use_gpu: true or weight_sync: gloo",
    )
    _validate_generation_batch(c)
    _validate_trl_extras(c)
    one_of("lora_sync", c.lora_sync, LORA_SYNC)
    _require(c.lora_r >= 1, f"lora_r={c.lora_r}: the LoRA rank must be >= 1, e.g. 16")
    _require(c.lora_alpha > 0, f"lora_alpha={c.lora_alpha}: must be > 0, e.g. 32 (the update is scaled by lora_alpha / lora_r)")
    _require(0 <= c.lora_dropout < 1, f"lora_dropout={c.lora_dropout}: must be in [0, 1), e.g. 0.05")
    _require(c.use_peft or not c.load_in_4bit, "load_in_4bit=true trains a LoRA on a 4-bit base (QLoRA): set use_peft: true too")
    if not c.use_peft:  # a LoRA setting on a full fine-tune would do nothing: say so (TRL ignores it)
        defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "lora_sync"):
            value, default = getattr(c, key), defaults[key]
            _require(value == default, f"{key}={value!r} has no effect without use_peft: true (a full fine-tune); set use_peft: true or drop {key}")
    _require(
        not (c.load_in_4bit and c.cluster.zero_stage == 3),
        "load_in_4bit=true with cluster.zero_stage=3: DeepSpeed cannot partition 4-bit weights; use zero_stage 0 or 2",
    )
    d = c.data
    _require(d.size >= 1, f"data.size={d.size}: must be >= 1")
    _require(d.eval_size >= 0, f"data.eval_size={d.eval_size}: must be >= 0")


def _validate_generation_batch(c: GRPOConfig) -> None:
    """TRL's generation-batch rules, plus: a round makes whole optimizer steps."""
    per = c.per_device_train_batch_size * c.cluster.num_trainer_workers
    gbs, spg, accum = c.generation_batch_size, c.steps_per_generation, c.gradient_accumulation_steps
    _require(gbs is None or spg is None, "generation_batch_size and steps_per_generation are both set: set only one (TRL refuses both too)")
    _require(gbs is None or (gbs >= 1 and gbs % per == 0), f"generation_batch_size={gbs} must be a multiple of per_device_train_batch_size * cluster.num_trainer_workers = {per}")
    _require(spg is None or spg >= 1, f"steps_per_generation={spg}: must be >= 1")
    spg = c.resolved_steps_per_generation
    _require(
        spg % accum == 0,
        f"steps_per_generation={spg} is not a multiple of gradient_accumulation_steps={accum}: a generation round "
        f"must feed whole optimizer steps (e.g. steps_per_generation={accum * max(1, round(spg / accum))})",
    )
    total = c.completions_per_step
    _require(
        total % c.num_generations == 0,
        f"per_device_train_batch_size * steps_per_generation * cluster.num_trainer_workers = {total} completions "
        f"per generation round is not divisible by num_generations={c.num_generations}: make it a multiple "
        f"(e.g. steps_per_generation={_fix_spg(c)})",
    )
    if c.generation_batch_size is None and c.steps_per_generation is None and spg != accum:
        _notice(
            f"one generation round of {total} completions (steps_per_generation={spg}, {spg // accum} optimizer steps "
            f"per round): per_device_train_batch_size * gradient_accumulation_steps * cluster.num_trainer_workers = "
            f"{per * accum} holds no whole group of num_generations={c.num_generations}; set generation_batch_size to choose"
        )


def _fix_spg(c: GRPOConfig) -> int:
    per = c.per_device_train_batch_size * c.cluster.num_trainer_workers
    spg = c.gradient_accumulation_steps
    while (per * spg) % c.num_generations:
        spg += c.gradient_accumulation_steps
    return spg


def _validate_trl_extras(c: GRPOConfig) -> None:
    one_of("multi_objective_aggregation", c.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
    one_of("eval_strategy", c.eval_strategy, EVAL_STRATEGIES)
    _require(c.eval_steps is None or c.eval_steps > 0, f"eval_steps={c.eval_steps}: must be > 0 (a step count, or < 1 for a fraction of max_steps)")
    _require(c.num_generations_eval is None or c.num_generations_eval >= 1, f"num_generations_eval={c.num_generations_eval}: must be >= 1")
    _require(c.off_policy_mask_threshold is None or c.off_policy_mask_threshold >= 0, f"off_policy_mask_threshold={c.off_policy_mask_threshold}: a KL threshold must be >= 0")
    for name in ("sapo_temperature_neg", "sapo_temperature_pos", "vespo_lambda_pos", "vespo_lambda_neg"):
        _require(getattr(c, name) > 0, f"{name}={getattr(c, name)}: must be > 0")
    lo, hi = c.vllm_importance_sampling_clip_min, c.vllm_importance_sampling_clip_max
    _require(lo is None or hi is None or lo < hi, f"vllm_importance_sampling_clip_min ({lo}) must be less than vllm_importance_sampling_clip_max ({hi})")
    _require(
        not (c.vllm_importance_sampling_correction and c.vllm_importance_sampling_mode.endswith("truncate") and lo is None and hi is None),
        f"vllm_importance_sampling_mode={c.vllm_importance_sampling_mode!r} needs vllm_importance_sampling_clip_min or _clip_max (TRL's rule)",
    )
    _require(
        not (c.loss_type == "vespo" and c.vllm_importance_sampling_correction and c.vllm_importance_sampling_mode.startswith("sequence")),
        "loss_type='vespo' folds token-level vLLM importance ratios into its weight: set vllm_importance_sampling_mode "
        "to token_mask or token_truncate (as TRL requires), or vllm_importance_sampling_correction: false",
    )


_noticed: set[str] = set()


def _notice(message: str) -> None:
    """Say a config decision once per process (the driver and each worker rebuild the config)."""
    if message not in _noticed:
        _noticed.add(message)
        log.warning("grpo-ray: %s", message)
