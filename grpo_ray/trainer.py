"""Trainer: the GRPO policy update on Ray Train workers under DeepSpeed (ZeRO 0/2/3).

`train_loop_per_worker` is what `TorchTrainer` runs on every worker. Its loop calls
`grpo_step`, which reads top to bottom as one training step:

    batch   = rollout (rank 0: vLLM generate + reward scoring; others receive their shard)
    update  = per-token logprobs, reference logprobs, GRPO loss, backward, optimizer step
    sync    = new weights -> every vLLM engine (async: once the next step's rollout has returned)
    report  = metrics (and, every `save_steps`, a Ray Train `Checkpoint`)

The maths lives in `grpo_ray.algorithm`; this module only moves tensors through it.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from grpo_ray import lora, sync
from grpo_ray.algorithm import LossOptions, entropy_from_logits, grpo_loss, selective_log_softmax
from grpo_ray.checkpoints import load_checkpoint, restore_point, save_checkpoint
from grpo_ray.config import GRPOConfig, omp_wait_env
from grpo_ray.data import DataError, PromptSampler, load_datasets
from grpo_ray.evaluate import evaluate_on_pool
from grpo_ray.metrics import MetricsLogger
from grpo_ray.packing import PackedRows, attention_cost_per_pair, model_attention_mask, pack
from grpo_ray.ray_compat import quiet_train_report_logs
from grpo_ray.resources import native_bf16, release_freed_memory
from grpo_ray.rewards import RewardError, RewardSpec
from grpo_ray.rollout import Rollout, RolloutBatch, RolloutPool, make_backend, warm_reward_workers
from grpo_ray.rollout.queue import RolloutQueue
from grpo_ray.startup import Timeline


@dataclass
class LoopConfig:
    """What the driver hands every trainer worker (crosses the process boundary)."""

    cfg: dict
    model_path: str
    pool: RolloutPool
    transport: str
    output_dir: str
    # The Python API's in-memory data (train rows, eval rows) and reward callables (rewards.ByValue),
    # carried to the workers by Ray; None: read data.* / reward_funcs from the config.
    datasets: tuple[list[dict], list[dict]] | None = None
    reward_specs: list[RewardSpec] | None = None
    tool_specs: list[RewardSpec] | None = None  # the Python API's tools= / environment_factory= (else cfg's)
    env_spec: RewardSpec | None = None
    startup: Timeline | None = None  # the driver's start-up marks; rank 0 adds its own and writes startup.json


# ----------------------------------------------------------------------------- tensors
@dataclass
class MicroBatch:
    rows: PackedRows  # the model's inputs: prompts shared by their completions (grpo_ray.packing)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C)
    advantages: torch.Tensor  # (B,)
    sampling_logps: torch.Tensor | None  # (B, C) vLLM's logps of the sampled tokens
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def collate(batch: RolloutBatch, idx: list[int], pad_id: int, mask_truncated: bool, device: torch.device, pair_cost: float) -> MicroBatch:
    """One micro-batch: packed model inputs, and (B, C) completion tensors in `idx` order."""
    C = max(max(len(batch.completion_ids[i]) for i in idx), 1)
    comp = torch.full((len(idx), C), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(idx), C), dtype=torch.float32)
    slogp = torch.zeros((len(idx), C)) if batch.sampling_logprobs is not None else None
    for row, i in enumerate(idx):
        c = batch.completion_ids[i]
        comp[row, : len(c)] = torch.tensor(c, dtype=torch.long)
        keep = not (mask_truncated and batch.truncated[i])
        comp_mask[row, : len(c)] = torch.tensor(batch.mask(i), dtype=torch.float32) * float(keep)  # multi-turn: tool ids 0
        if slogp is not None:
            slogp[row, : len(c)] = torch.tensor(batch.sampling_logprobs[i])
    rows = pack([batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx], pad_id, pair_cost)
    return MicroBatch(
        rows=rows.to(device),
        completion_ids=comp.to(device),
        completion_mask=comp_mask.to(device),
        advantages=batch.advantages[idx].to(device),
        sampling_logps=None if slogp is None else slogp.to(device),
    )


def completion_logps(
    model: Any, mb: MicroBatch, temperature: float, entropies: bool = False, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p of each completion (and, if asked, the entropy: with its gradient for
    the entropy bonus) from one packed forward pass; logits are computed only from the first
    completion position on, then gathered per pair."""
    rows = mb.rows
    config = getattr(model, "module", model).config
    out = model(
        input_ids=rows.input_ids,
        position_ids=rows.position_ids,
        attention_mask=model_attention_mask(rows.attention_mask, config),
        logits_to_keep=rows.logits_to_keep,
    )
    logits = out.logits.flatten(0, 1)[rows.logit_index]  # (B, C, V)
    logps = selective_log_softmax(logits, mb.completion_ids, temperature).float()
    entropy = None
    if entropies:
        entropy = entropy_from_logits((logits if entropy_grad else logits.detach()).float() / temperature)
    return logps, entropy


class StageTimer:
    """Wall seconds summed per named stage: the per-step profile written to metrics.jsonl."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


# ----------------------------------------------------------------------------- the policy
class Policy:
    """The trainable model under DeepSpeed, plus the frozen reference when beta > 0."""

    def __init__(self, cfg: GRPOConfig, model_path: str, device: torch.device, pad_id: int) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM, get_scheduler

        if device.type == "cpu":
            # DeepSpeed compiles its shared-memory all-reduce (a C++ op, ~1 min, again for each
            # environment path) when its comm starts; only its inference all-reduce uses it, never
            # training's collectives (torch.distributed). Its op table is writable by design.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg = cfg
        self.device = device
        self.pad_id = pad_id
        self.precision = cfg.resolved_precision(device_supports_bf16=native_bf16(device.type == "cuda"))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        model = trainable_model(cfg, model_path)
        optim_name, notice = cfg.resolved_optim(on_gpu=device.type == "cuda")
        if notice and ray.train.get_context().get_world_rank() == 0:
            print(f"[grpo-ray] {notice}")
        optimizer = build_optimizer(optim_name, model, cfg)
        total = cfg.max_steps * cfg.optimizer_steps_per_round
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.total_warmup_steps, num_training_steps=total)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.precision)
        )
        if cfg.cluster.zero_stage == 0 and (not dist.is_initialized() or dist.get_world_size() == 1):
            self.engine.enable_backward_allreduce = False  # averaging over one rank only copies gradients
        self.ref = None
        # LoRA: what vLLM gets after each update; the KL reference is the base with the adapter off
        self.lora_sync = lora.sync_plan(self.engine.module, cfg) if cfg.use_peft else None
        if cfg.beta > 0 and not cfg.use_peft:
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
            if cfg.cluster.zero_stage == 3:  # partition the frozen copy too
                ref = deepspeed.initialize(model=ref, config=deepspeed_config(cfg, self.precision, inference=True))[0]
            self.ref = ref.to(device) if cfg.cluster.zero_stage != 3 else ref
        self.sync_dtype = dtype
        # shared-prompt packing's cost model; inf = one padded row per completion
        self.pair_cost = attention_cost_per_pair(model.config) if cfg.shared_prompt_packing else float("inf")
        self.guard = StepGuard(optimizer, cfg.max_bad_steps, device)
        self.loss = LossOptions.from_config(cfg)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def micro_batches(self, batch: RolloutBatch) -> list[list[int]]:
        size = self.cfg.per_device_train_batch_size
        return [list(range(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]

    @torch.no_grad()
    def frozen_logps(self, mbs: list[MicroBatch]) -> None:
        """Reference (beta > 0) and old-policy logps, before any update. The old policy's are
        needed when one round makes several optimizer steps (num_iterations > 1, or
        steps_per_generation > gradient_accumulation_steps): all but the first are off-policy."""
        T = self.cfg.temperature
        for mb in mbs:
            if self.ref is not None:
                mb.ref_logps, _ = completion_logps(self.ref, mb, T)
            elif self.cfg.beta > 0:  # LoRA: the reference is the base with the adapter off
                with lora.reference(self.module):
                    mb.ref_logps, _ = completion_logps(self.engine, mb, T)
            if self.cfg.optimizer_steps_per_round > 1:
                mb.old_logps, _ = completion_logps(self.engine, mb, T)

    def update(self, batch: RolloutBatch, tokens_in_step: float) -> dict[str, float]:
        """`optimizer_steps_per_round` optimizer steps over this worker's shard (num_iterations passes
        over its steps_per_generation micro-batches); metrics averaged."""
        cfg = self.cfg
        world = dist.get_world_size() if dist.is_initialized() else 1
        groups = self.micro_batches(batch)
        mbs = [collate(batch, idx, self.pad_id, cfg.mask_truncated_completions, self.device, self.pair_cost) for idx in groups]
        timer = StageTimer()
        with timer("logprobs_s"):
            self.frozen_logps(mbs)
        # dapo-style losses normalise by one optimizer step's share of the round's tokens (TRL:
        # num_items_in_batch / processes * accumulation / steps_per_generation); DeepSpeed averages
        # over ranks and divides by the accumulation steps, so hand each micro-batch its share.
        num_items = tokens_in_step / (world * cfg.resolved_steps_per_generation)
        stats: list[dict[str, float]] = []
        mismatch: list[float] = []
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's update uses
        skipped_before = self.guard.skipped + self.engine.skipped_steps
        self.engine.train()
        for iteration in range(cfg.num_iterations):
            for mb in mbs:
                with timer("logprobs_s"):
                    logps, entropies = completion_logps(
                        self.engine, mb, cfg.temperature, entropies=self.loss.needs_entropies, entropy_grad=self.loss.entropy_coef != 0
                    )
                if iteration == 0 and mb.sampling_logps is not None:  # the policy vLLM sampled from
                    sampled_from = logps.detach() if mb.old_logps is None else mb.old_logps
                    mismatch.append(_masked_abs_diff(sampled_from, mb.sampling_logps, mb.completion_mask))
                loss, m = grpo_loss(
                    logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask, num_items_in_batch=num_items,
                    entropies=entropies, sampling_per_token_logps=mb.sampling_logps, **self.loss.kwargs(),
                )  # fmt: skip
                with timer("backward_s"):
                    self.engine.backward(loss)
                with timer("optimizer_s"):
                    self.engine.step()
                stats.append({"loss": float(loss.detach()), **m})
        out = _mean_dicts(stats)
        if mismatch:
            out["logprob_mismatch"] = float(np.mean(mismatch))
        out = mean_over_ranks(out)  # the whole batch's metrics, not rank 0's shard (TRL: gather, nanmean)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out["learning_rate"] = lr
        out.update(timer.seconds)
        # ZeRO 1/2 skip a non-finite gradient norm themselves (engine.skipped_steps); the guard
        # catches what reaches the torch optimizer (ZeRO 0, 3).
        out["skipped_updates"] = float(self.guard.skipped + self.engine.skipped_steps - skipped_before)
        self.guard.end_step(bad=out["skipped_updates"] > 0, lr=lr)
        return out

    def full_weights(self, named: list[tuple[str, torch.nn.Parameter]]) -> Iterator[torch.Tensor]:
        """Every parameter at full size, one at a time (ZeRO-3: gathered per tensor, collectively)."""
        import deepspeed

        zero3 = self.cfg.cluster.zero_stage == 3
        if self.lora_sync is not None:
            yield from self.lora_sync.weights(zero3, self.sync_dtype)
            return
        for _, param in named:
            ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=None) if zero3 else nullcontext()
            with ctx:
                yield param.data.to(self.sync_dtype)


class TrainingDivergedError(RuntimeError):
    """`max_bad_steps` steps in a row had a NaN/inf loss or gradient: the run cannot recover by itself."""


class StepGuard:
    """Skips an optimizer step whose gradients hold a NaN/inf on any rank, and counts them.

    It wraps the *inner* torch optimizer's `step`, which DeepSpeed calls once per update after its
    own reduction and gradient clipping, on every rank at the same time: so one check sees exactly
    the gradients about to be applied (a NaN/inf loss yields NaN gradients), and one `all_reduce`
    makes all ranks skip together. ZeRO 1/2 skip a non-finite norm before calling it (counted in
    `engine.skipped_steps`). DeepSpeed zeroes the gradients after a skip."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_bad_steps: int, device: torch.device) -> None:
        self.optimizer = optimizer
        self.device = device
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # optimizer steps skipped in this process's lifetime
        self.bad_in_a_row = 0  # training steps in a row with at least one skipped update
        self._step = optimizer.step
        optimizer.step = self.step  # type: ignore[method-assign]

    def finite(self) -> bool:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # a NaN/inf anywhere makes its tensor's norm NaN/inf: one fused pass, much cheaper than an
        # isfinite() per tensor (bench/trainer_bench.py)
        ok = not grads or bool(torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().all())
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        return ok

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self.finite():
            return self._step(*args, **kwargs)
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def end_step(self, bad: bool, lr: float) -> None:
        """Count a training step; raise once `max_bad_steps` in a row were bad."""
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        if not bad:
            return
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[grpo-ray] NaN/inf loss or gradient: update skipped ({self.bad_in_a_row} of max_bad_steps={self.max_bad_steps} in a row)")
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingDivergedError(
                f"the loss or gradient was NaN/inf for {self.bad_in_a_row} steps in a row (max_bad_steps={self.max_bad_steps}), "
                f"so the run stopped: the model diverged; lower learning_rate (now {lr:g}) or max_grad_norm, "
                "check the reward scale, then --resume from the last checkpoint"
            )


def trainable_model(cfg: GRPOConfig, model_path: str) -> torch.nn.Module:
    """The policy as the config shapes it, before DeepSpeed: fp32 master weights, TRL's
    disable_dropout, gradient checkpointing, and the LoRA adapter (use_peft)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **lora.load_kwargs(cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.use_peft:
        model = lora.wrap(model, cfg)
    if cfg.disable_dropout:  # after the wrap, as TRL does: the adapter's lora_dropout too
        disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """TRL's `disable_dropout_in_model`: every `nn.Dropout` to p=0 (the engines never drop out)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _masked_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).sum() / mask.sum().clamp(min=1))


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over the trainer ranks that have it (NaN ignored), on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, sorted(stats))  # a key one rank lacks must not shift the others
    keys = sorted({k for ks in everyone for k in ks})
    values = torch.tensor([stats.get(k, float("nan")) for k in keys], dtype=torch.float64)
    present = ~torch.isnan(values)
    both = torch.stack([torch.where(present, values, 0.0), present.double()])
    dist.all_reduce(both)
    return {k: float(both[0, i] / both[1, i]) if both[1, i] > 0 else float("nan") for i, k in enumerate(keys)}


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}


def build_optimizer(name: str, model: torch.nn.Module, cfg: GRPOConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if name == "adamw_8bit" or name.endswith("bnb_8bit") or name == "paged_adamw_8bit":  # pragma: no cover - GPU
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=name == "adamw_torch_fused" or None,
    )


def deepspeed_config(cfg: GRPOConfig, precision: str, inference: bool = False) -> dict:
    zero: dict[str, Any] = {"stage": 3 if inference else cfg.cluster.zero_stage}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm if not inference else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


# ----------------------------------------------------------------------------- the step
@dataclass
class Worker:
    """Everything one trainer worker holds across steps."""

    cfg: GRPOConfig
    rank: int
    world: int
    policy: Policy
    pusher: sync.WeightSender
    tokenizer: Any
    rollout: Rollout | None = None  # rank 0 only
    sampler: PromptSampler | None = None  # rank 0 only
    queue: RolloutQueue | None = None  # rank 0 only
    logger: MetricsLogger | None = None  # rank 0 only
    eval_rows: list[dict] | None = None  # rank 0 only
    last_batch: RolloutBatch | None = None  # rank 0: the step's whole batch (log_completions)


def next_batch(w: Worker, step: int) -> tuple[RolloutBatch, int]:
    """Rank 0 takes the step's scored rollout from its queue (async: and starts the next one);
    the other ranks receive the batch over the trainer group. Returns (batch, staleness)."""
    batch, staleness = None, 0
    if w.rank == 0:
        batch, staleness = w.queue.take(step)
    if w.world > 1:
        box = [batch, staleness]  # staleness too: every rank decides on it (the mismatch check)
        dist.broadcast_object_list(box, src=0)
        batch, staleness = box
    return batch, staleness


def grpo_step(w: Worker, step: int) -> dict[str, float]:
    """One GRPO step, top to bottom: rollout, update, weight sync."""
    t0 = time.perf_counter()
    batch, staleness = next_batch(w, step)  # generate + score (TRL's first half); async: already done
    w.last_batch = batch if w.rank == 0 else None
    t1 = time.perf_counter()
    tokens = max(1.0, float(batch.trained_tokens(w.cfg.mask_truncated_completions)))
    with w.queue.weights_lock if w.queue is not None else nullcontext():
        stats = w.policy.update(batch.shard(w.rank, w.world), tokens)  # loss, backward, optimizer step
    release_freed_memory()  # the step's freed activations back to the OS: RSS follows what the trainer holds
    if staleness == 0:  # async batches were sampled a step back: their mismatch includes that update
        sync.check_logprob_mismatch(stats.get("logprob_mismatch"), w.cfg.max_logprob_mismatch, step)  # same value on every rank
    t2 = time.perf_counter()
    overlap_wait_s = w.queue.drain() if w.queue is not None else 0.0  # async: the next rollout returns first
    sync_s = w.pusher.push()  # new weights -> vLLM engines
    t3 = time.perf_counter()
    return {
        "step": step,
        **batch.metrics(),
        **stats,
        "staleness": staleness,
        "rollout_s": t1 - t0,
        "train_s": t2 - t1,
        "overlap_wait_s": overlap_wait_s,
        "sync_s": sync_s,
        "weight_resends": float(w.pusher.resends),  # pushes an engine did not verify at first (so far)
        "step_time_s": t3 - t0,
    }


def record_placement(lc: LoopConfig, world: int) -> None:
    """Write OUTPUT_DIR/placement.json: which Ray node runs each engine and trainer rank, and
    with which OpenMP wait settings (`cluster.omp_wait`)."""
    here = (ray.get_runtime_context().get_node_id(), omp_wait_env())
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, here)
    else:
        ranks = [here]
    if ray.train.get_context().get_world_rank() == 0:
        engines = lc.pool.engines
        record = {
            "trainer_nodes": [node for node, _ in ranks],
            "rollout_nodes": ray.get([e.node_id.remote() for e in engines]),
            "omp_wait": {"trainer": [env for _, env in ranks], "rollout": ray.get([e.omp_wait_env.remote() for e in engines])},
        }
        Path(lc.output_dir, "placement.json").write_text(json.dumps(record, indent=1))


FATAL_FILE = "fatal_error.txt"
# Errors that a restart from the last checkpoint would only repeat (same data, same seeds).
FATAL_ERRORS = (RewardError, DataError, TrainingDivergedError, sync.WeightSyncError)


def run_worker(loop: dict) -> None:
    """What `TorchTrainer` runs: `train_loop_per_worker`, with deterministic errors made final.

    Ray Train retries every worker error up to `cluster.max_failures` times, each retry loading the
    model and replaying steps to fail the same way. A fatal error is written to
    OUTPUT_DIR/fatal_error.txt first; a retry that finds it re-raises at once (the driver deletes
    it when a run starts or resumes)."""
    lc: LoopConfig = loop["loop"]
    fatal = Path(lc.output_dir, FATAL_FILE)
    if fatal.is_file():
        raise FatalRunError(f"not retried: {fatal.read_text()}")
    try:
        train_loop_per_worker(loop)
    except FATAL_ERRORS as exc:
        if ray.train.get_context().get_world_rank() == 0:
            fatal.write_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise


class FatalRunError(RuntimeError):
    """A retry of a run that already failed with a fatal error (its message names the error)."""


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train entry point: build the worker, restore, loop over steps, report."""
    from transformers import AutoTokenizer

    quiet_train_report_logs()
    lc: LoopConfig = loop["loop"]
    startup = lc.startup or Timeline()
    startup.mark("worker_started")
    cfg = GRPOConfig.from_dict(lc.cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.cluster.use_gpu else torch.device("cpu")
    if rank == 0:  # reward workers start beside DeepSpeed, not in step 1 (the tasks' results are not needed)
        warm_reward_workers(lc.reward_specs or cfg.reward_funcs)
    tokenizer = AutoTokenizer.from_pretrained(lc.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = Policy(cfg, lc.model_path, device, pad_id)
    startup.mark("policy_ready")
    pusher = sync.WeightSender(lc.pool.engines, policy.module, policy.sync_dtype, lc.transport, rank, policy.full_weights, policy.device, named=policy.lora_sync and policy.lora_sync.named)
    w = Worker(cfg, rank, world, policy, pusher, tokenizer)
    if rank == 0:
        train_rows, w.eval_rows = lc.datasets or load_datasets(cfg.data)
        w.sampler = PromptSampler(train_rows, cfg.prompts_per_step, seed=cfg.seed)
        w.rollout = Rollout(cfg, lc.pool, make_backend(cfg, tokenizer, lc.tool_specs, lc.env_spec), lc.reward_specs)
    start = 0
    checkpoint = restore_point(ray.train.get_checkpoint(), lc.output_dir)
    if checkpoint is not None:
        state = load_checkpoint(policy, checkpoint)
        start = state["step"]
        if rank == 0:
            w.sampler.load_state_dict(state["sampler"])
    record_placement(lc, world)
    if rank == 0:
        w.logger = MetricsLogger(lc.output_dir, cfg, resume_step=start)
    # Engines outlive trainer restarts: after a worker died they hold a later step's weights,
    # whatever checkpoint (or none) this attempt starts from. Give them this attempt's policy.
    w.pusher.push()
    startup.mark("first_sync_done")
    if rank == 0:
        startup.mark("engines_ready", at=max(ray.get([e.ready_at.remote() for e in lc.pool.engines])))
        rounds = cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 0
        w.queue = RolloutQueue(w.rollout, w.sampler, cfg.staleness, cfg.max_steps, start, dynamic_rounds=rounds)
        lc.pool.on_restart = w.queue.guarded(pusher.resync)  # a restarted engine gets the current weights
    eval_every = cfg.resolved_eval_steps
    if rank == 0 and eval_every and cfg.eval_on_start and start == 0:
        w.logger.log({"step": 0, **evaluate_on_pool(cfg, lc.pool, w.rollout.backend, w.eval_rows, w.rollout.reward_specs)})
    for step in range(start + 1, cfg.max_steps + 1):
        metrics = grpo_step(w, step)
        if rank == 0 and "first_step_done" not in startup.marks:
            startup.mark("first_step_done")
            startup.write(lc.output_dir)
        if rank == 0 and eval_every and step % eval_every == 0:  # engines hold this step's weights, idle
            metrics.update(evaluate_on_pool(cfg, lc.pool, w.rollout.backend, w.eval_rows, w.rollout.reward_specs))
        if w.logger is not None:
            w.logger.log(metrics)
            if cfg.log_completions:
                w.logger.log_completions(w.last_batch.completion_rows(), step)
        save = step % cfg.save_steps == 0 or step == cfg.max_steps
        reported = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if save:
            state = {"sampler": w.queue.sampler_state() if w.queue else None}
            root = save_checkpoint(policy, tokenizer, step, state, rank)
            # the staging dir in /tmp is removed once Ray Train has copied it to the run's storage
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(root), delete_local_checkpoint_after_upload=True)
        else:
            ray.train.report(reported)
    if w.queue is not None:
        w.queue.close()
        w.rollout.close()
    if w.logger is not None:
        w.logger.close()
