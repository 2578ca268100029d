"""Trainer: the GRPO policy update on Ray Train workers under DeepSpeed (ZeRO 0/2/3).

`train_loop_per_worker` is what `TorchTrainer` runs on every worker. Its loop calls
`grpo_step`, which reads top to bottom as one training step:

    batch   = rollout (rank 0: vLLM generate + reward scoring; others receive their shard)
    update  = per-token logprobs, reference logprobs, GRPO loss, backward, optimizer step
    sync    = new weights -> every vLLM engine
    report  = metrics (and, every `save_steps`, a Ray Train `Checkpoint`)

The maths lives in `grpo_ray.algorithm`; this module only moves tensors through it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from grpo_ray import sync
from grpo_ray.algorithm import entropy_from_logits, grpo_loss, selective_log_softmax
from grpo_ray.config import GRPOConfig
from grpo_ray.data import PromptSampler, load_datasets, render_prompts
from grpo_ray.metrics import MetricsLogger
from grpo_ray.rollout import Rollout, RolloutBatch, RolloutPool

TRAINER_STATE = "trainer_state.json"
DS_DIR = "deepspeed"
MODEL_DIR = "model"


@dataclass
class LoopConfig:
    """What the driver hands every trainer worker (crosses the process boundary)."""

    cfg: dict
    model_path: str
    pool: RolloutPool
    transport: str
    output_dir: str


# ----------------------------------------------------------------------------- tensors
@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, P + C): left-padded prompt, right-padded completion
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C)
    advantages: torch.Tensor  # (B,)
    sampling_logps: torch.Tensor | None  # (B, C) vLLM's logps of the sampled tokens
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def collate(batch: RolloutBatch, idx: list[int], pad_id: int, mask_truncated: bool, device: torch.device) -> MicroBatch:
    """Pad one micro-batch. Left-padding prompts shifts positions uniformly, which RoPE ignores."""
    P = max(len(batch.prompt_ids[i]) for i in idx)
    C = max(max(len(batch.completion_ids[i]) for i in idx), 1)
    ids = torch.full((len(idx), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp_mask = torch.zeros((len(idx), C), dtype=torch.float32)
    slogp = torch.zeros((len(idx), C)) if batch.sampling_logprobs is not None else None
    for row, i in enumerate(idx):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        ids[row, P - len(p): P] = torch.tensor(p)
        ids[row, P: P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[row, P - len(p): P + len(c)] = 1
        keep = not (mask_truncated and batch.truncated[i])
        comp_mask[row, : len(c)] = float(keep)
        if slogp is not None:
            slogp[row, : len(c)] = torch.tensor(batch.sampling_logprobs[i])
    return MicroBatch(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        completion_ids=ids[:, P:].to(device),
        completion_mask=comp_mask.to(device),
        advantages=batch.advantages[idx].to(device),
        sampling_logps=None if slogp is None else slogp.to(device),
    )


def completion_logps(model: Any, mb: MicroBatch, temperature: float, entropies: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p of the completion (and, if asked, the entropy), from logits kept only for
    the completion positions of one micro-batch; the log-softmax runs one row at a time."""
    C = mb.completion_ids.shape[1]
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, logits_to_keep=C + 1).logits[:, :-1]
    logps = selective_log_softmax(logits, mb.completion_ids, temperature).float()
    entropy = entropy_from_logits(logits.detach().float() / temperature) if entropies else None
    return logps, entropy


# ----------------------------------------------------------------------------- the policy
class Policy:
    """The trainable model under DeepSpeed, plus the frozen reference when beta > 0."""

    def __init__(self, cfg: GRPOConfig, model_path: str, device: torch.device, pad_id: int) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM, get_scheduler

        self.cfg = cfg
        self.device = device
        self.pad_id = pad_id
        self.precision = cfg.resolved_precision(device_supports_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported())
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        optim_name, notice = cfg.resolved_optim(on_gpu=device.type == "cuda")
        if notice and ray.train.get_context().get_world_rank() == 0:
            print(f"[grpo-ray] {notice}")
        optimizer = build_optimizer(optim_name, model, cfg)
        total = cfg.max_steps * cfg.num_iterations
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.total_warmup_steps, num_training_steps=total)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.precision)
        )
        self.ref = None
        if cfg.beta > 0:
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
            if cfg.cluster.zero_stage == 3:  # partition the frozen copy too
                ref = deepspeed.initialize(model=ref, config=deepspeed_config(cfg, self.precision, inference=True))[0]
            self.ref = ref.to(device) if cfg.cluster.zero_stage != 3 else ref
        self.sync_dtype = dtype

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def micro_batches(self, batch: RolloutBatch) -> list[list[int]]:
        size = self.cfg.per_device_train_batch_size
        return [list(range(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]

    @torch.no_grad()
    def frozen_logps(self, mbs: list[MicroBatch]) -> None:
        """Reference (beta > 0) and old-policy (num_iterations > 1) logps, before any update."""
        T = self.cfg.temperature
        for mb in mbs:
            if self.ref is not None:
                mb.ref_logps, _ = completion_logps(self.ref, mb, T)
            if self.cfg.num_iterations > 1:
                mb.old_logps, _ = completion_logps(self.engine, mb, T)

    def update(self, batch: RolloutBatch, tokens_in_step: float) -> dict[str, float]:
        """`num_iterations` optimizer steps over this worker's shard; metrics averaged."""
        cfg = self.cfg
        world = dist.get_world_size() if dist.is_initialized() else 1
        groups = self.micro_batches(batch)
        mbs = [collate(batch, idx, self.pad_id, cfg.mask_truncated_completions, self.device) for idx in groups]
        self.frozen_logps(mbs)
        # dapo-style losses normalise by the whole step's token count; DeepSpeed averages over
        # ranks and divides by the accumulation steps, so hand each micro-batch its share.
        num_items = tokens_in_step / (world * cfg.gradient_accumulation_steps)
        stats: list[dict[str, float]] = []
        mismatch: list[float] = []
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's update uses
        self.engine.train()
        for iteration in range(cfg.num_iterations):
            for mb in mbs:
                logps, entropies = completion_logps(self.engine, mb, cfg.temperature, entropies=cfg.top_entropy_quantile < 1)
                if iteration == 0 and mb.sampling_logps is not None:  # the policy vLLM sampled from
                    sampled_from = logps.detach() if mb.old_logps is None else mb.old_logps
                    mismatch.append(_masked_abs_diff(sampled_from, mb.sampling_logps, mb.completion_mask))
                loss, m = grpo_loss(
                    logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask,
                    loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                    delta=cfg.delta, importance_sampling_level=cfg.importance_sampling_level,
                    max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items,
                    entropies=entropies, top_entropy_quantile=cfg.top_entropy_quantile, sampling_per_token_logps=mb.sampling_logps,
                    vllm_importance_sampling_correction=cfg.vllm_importance_sampling_correction,
                    vllm_importance_sampling_mode=cfg.vllm_importance_sampling_mode,
                    vllm_importance_sampling_clip_min=cfg.vllm_importance_sampling_clip_min,
                    vllm_importance_sampling_clip_max=cfg.vllm_importance_sampling_clip_max,
                )  # fmt: skip
                self.engine.backward(loss)
                self.engine.step()
                stats.append({"loss": float(loss.detach()), **m})
        out = _mean_dicts(stats)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out["learning_rate"] = lr
        if mismatch:
            out["logprob_mismatch"] = float(np.mean(mismatch))
        return out

    def full_weights(self, named: list[tuple[str, torch.nn.Parameter]]) -> Iterator[torch.Tensor]:
        """Every parameter at full size, one at a time (ZeRO-3: gathered per tensor, collectively)."""
        import deepspeed

        zero3 = self.cfg.cluster.zero_stage == 3
        for _, param in named:
            ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=None) if zero3 else nullcontext()
            with ctx:
                yield param.data.to(self.sync_dtype)


def _masked_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).sum() / mask.sum().clamp(min=1))


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


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(policy: Policy, tokenizer: Any, step: int, state: dict, rank: int) -> str:
    """A Ray Train checkpoint dir: DeepSpeed state (all ranks) + HF model and trainer state (rank 0)."""
    root = tempfile.mkdtemp(prefix=f"grpo-ckpt-{step}-")
    policy.engine.save_checkpoint(os.path.join(root, DS_DIR), tag="state")
    zero3 = policy.cfg.cluster.zero_stage == 3
    weights = policy.engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if rank == 0:
        model_dir = os.path.join(root, MODEL_DIR)
        policy.module.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        Path(root, TRAINER_STATE).write_text(json.dumps({"step": step, **state}))
    return root


def load_checkpoint(policy: Policy, checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as root:
        policy.engine.load_checkpoint(os.path.join(root, DS_DIR), tag="state")
        return json.loads(Path(root, TRAINER_STATE).read_text())


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
    logger: MetricsLogger | None = None  # rank 0 only
    timings: dict = field(default_factory=dict)


def next_batch(w: Worker, step: int) -> RolloutBatch:
    """Rank 0 generates and scores; the other ranks receive the batch over the trainer group."""
    batch = None
    if w.rank == 0:
        rows = w.sampler.next_batch()
        batch = w.rollout.generate_and_score(rows, render_prompts(w.tokenizer, rows), step)
    if w.world > 1:
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        batch = box[0]
    return batch


def grpo_step(w: Worker, step: int) -> dict[str, float]:
    """One GRPO step, top to bottom: rollout, update, weight sync."""
    t0 = time.perf_counter()
    batch = next_batch(w, step)  # generate + score (TRL's first half)
    t1 = time.perf_counter()
    masked = w.cfg.mask_truncated_completions
    tokens = max(1.0, float(sum(len(c) for c, cut in zip(batch.completion_ids, batch.truncated) if not (masked and cut))))
    stats = w.policy.update(batch.shard(w.rank, w.world), tokens)  # loss, backward, optimizer step
    t2 = time.perf_counter()
    sync_s = w.pusher.push()  # new weights -> vLLM engines
    t3 = time.perf_counter()
    return {
        "step": step,
        **batch.metrics(),
        **stats,
        "rollout_s": t1 - t0,
        "train_s": t2 - t1,
        "sync_s": sync_s,
        "step_time_s": t3 - t0,
    }


def progress_bar(cfg: GRPOConfig, start: int):
    """A progress bar that Ray renders on the driver's terminal."""
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=cfg.max_steps, desc="GRPO", unit="step")
    if start:
        bar.update(start)
    return bar


def record_placement(lc: LoopConfig, world: int) -> None:
    """Write OUTPUT_DIR/placement.json: which Ray node runs each engine and trainer rank."""
    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    if ray.train.get_context().get_world_rank() == 0:
        engines = ray.get([e.node_id.remote() for e in lc.pool.engines])
        Path(lc.output_dir, "placement.json").write_text(json.dumps({"trainer_nodes": nodes, "rollout_nodes": engines}, indent=1))


def quiet_report_logs() -> None:
    """Ray Train V2 logs every report's full metrics dict at INFO; our progress bar says it better."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - a Ray without Train V2
        pass


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train entry point: build the worker, restore, loop over steps, report."""
    from transformers import AutoTokenizer

    quiet_report_logs()
    lc: LoopConfig = loop["loop"]
    cfg = GRPOConfig.from_dict(lc.cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.cluster.use_gpu else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(lc.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = Policy(cfg, lc.model_path, device, pad_id)
    pusher = sync.WeightSender(lc.pool.engines, policy.module, policy.sync_dtype, lc.transport, rank, policy.full_weights, policy.device)
    w = Worker(cfg, rank, world, policy, pusher, tokenizer)
    if rank == 0:
        train_rows, _ = load_datasets(cfg.data)
        w.sampler = PromptSampler(train_rows, cfg.prompts_per_step, seed=cfg.seed)
        w.rollout = Rollout(cfg, lc.pool, tokenizer)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(policy, checkpoint)
        start = state["step"]
        if rank == 0:
            w.sampler.load_state_dict(state["sampler"])
    record_placement(lc, world)
    if rank == 0:
        w.logger = MetricsLogger(lc.output_dir, cfg, resume_step=start)
    if start > 0:
        w.pusher.push()  # engines start from the base model: give them the restored policy
    bar = progress_bar(cfg, start) if rank == 0 else None
    for step in range(start + 1, cfg.max_steps + 1):
        metrics = grpo_step(w, step)
        if w.logger is not None:
            w.logger.log(metrics)
        if bar is not None:
            bar.update(1)
            bar.set_description(f"GRPO reward {metrics['reward_mean']:.3f} loss {metrics['loss']:+.4f}")
        save = step % cfg.save_steps == 0 or step == cfg.max_steps
        reported = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if save:
            state = {"sampler": w.sampler.state_dict() if w.sampler else None}
            root = save_checkpoint(policy, tokenizer, step, state, rank)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(root))
        else:
            ray.train.report(reported)
    if w.logger is not None:
        w.logger.close()
    if bar is not None:
        bar.close()
