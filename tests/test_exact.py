"""Exact over workers: one SGD step of 2 trainer workers x gradient accumulation 2, through real
Ray Train + DeepSpeed ZeRO 0, 2 and 3, lands on the weights one process gets from TRL's rules.

Why SGD and weights: Adam ignores a uniform scale of the loss, and a logged loss says nothing
about the gradient; after one plain SGD step (no momentum, no clipping) the weights move by
exactly lr x gradient, so any normalisation error over workers or accumulation (a factor of the
world size, of the accumulation steps, a shard's token count used for the batch's) moves them
elsewhere. The batch has completions of different lengths, so per-micro-batch and per-batch
token normalisers differ, and vLLM sampling logprobs that differ from the trainer's, so the
importance-sampling correction is in play.

The reference is written here from TRL 1.16's `_compute_loss` (one process, accumulation over the
same 4 micro-batches): grpo/bnpo/dr_grpo/sapo/luspo divide each micro-batch's loss by the
accumulation steps; cispo/dapo/vespo divide the micro-batch's token sum by the step's token count
(`num_items_in_batch / processes * accumulation / steps_per_generation`) and not by the
accumulation steps. Only the per-micro-batch loss (`grpo_loss`, TRL-parity-tested in
test_algorithm.py) is shared with the code under test.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from grpo_ray.algorithm import LossOptions, grpo_loss
from grpo_ray.config import GRPOConfig
from grpo_ray.rollout import RolloutBatch
from tests.conftest import quick_config

pytestmark = pytest.mark.slow

N, G, MICRO = 8, 4, 2  # samples, group size, samples per micro-batch (4 micro-batches in all)
LR = 0.5
CASES = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo"},
    "cispo": {"loss_type": "cispo"},
    "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo"},
    "vespo": {"loss_type": "vespo", "vllm_importance_sampling_mode": "token_truncate"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "dapo-seq": {"loss_type": "dapo", "importance_sampling_level": "sequence"},
    "dapo-mask-truncated": {"loss_type": "dapo", "mask_truncated_completions": True},
}
TRL_TOKEN_NORMALISED = {"cispo", "dapo", "vespo"}  # TRL: num_items_in_batch, no division by the accumulation steps


def make_batch(model_path: str) -> RolloutBatch:
    """8 samples in 2 groups: random prompts and completions of different lengths, advantages of
    both signs, vLLM logprobs = the model's own + noise (so the IS ratios are not 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ray.trainer import collate, completion_logps

    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(model_path)
    vocab = min(len(tok), 200)
    group_prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(4, 9))] for _ in range(N // G)]
    prompts = [p for p in group_prompts for _ in range(G)]
    completions = [[rng.randrange(5, vocab) for _ in range(rng.randint(2, 12))] for _ in range(N)]
    gen = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=prompts, completion_ids=completions, sampling_logprobs=None, truncated=[i % 3 == 0 for i in range(N)],
        prompts=[""] * N, completions=[""] * N, rewards=torch.zeros(N), rewards_per_func=torch.zeros(N, 1), reward_names=["r"],
        advantages=torch.randn(N, generator=gen), num_generations=G,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        mb = collate(batch, list(range(N)), tok.pad_token_id, False, torch.device("cpu"), pair_cost=float("inf"))
        logps, _ = completion_logps(model, mb, 1.0)
    batch.sampling_logprobs = [
        [float(x) + 0.05 * float(torch.randn(1, generator=gen)) for x in logps[i, : len(completions[i])]] for i in range(N)
    ]
    return batch


def case_config(base: GRPOConfig, case: dict, workers: int, zero_stage: int) -> GRPOConfig:
    return base.with_overrides({
        **case, "cluster": {"num_trainer_workers": workers, "zero_stage": zero_stage},
        "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": N // (MICRO * workers),
    })  # fmt: skip


def sgd_step_on_workers(loop: dict) -> None:
    """On each trainer worker: per case, a fresh Policy (DeepSpeed), one update on this rank's
    shard, then the full weights (ZeRO-3: gathered); rank 0 saves them."""
    import ray.train
    from transformers import AutoTokenizer

    from grpo_ray.trainer import Policy

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tok = AutoTokenizer.from_pretrained(loop["model"])
    batch: RolloutBatch = loop["batch"]
    out = {}
    for name, cfg_dict in loop["cases"].items():
        cfg = GRPOConfig.from_dict(cfg_dict)
        torch.manual_seed(0)
        policy = Policy(cfg, loop["model"], torch.device("cpu"), tok.pad_token_id)
        policy.update(batch.shard(rank, world), float(batch.trained_tokens(cfg.mask_truncated_completions)))
        named = list(policy.module.named_parameters())
        weights = {n: w.clone() for (n, _), w in zip(named, policy.full_weights(named))}
        if rank == 0:
            out[name] = weights
        del policy
    from grpo_ray.trainer import mean_over_ranks

    # the metrics reduction: a mean per key over the ranks that have it, NaN ignored
    mixed = mean_over_ranks({"a": float(rank), "b": float("nan") if rank == 0 else 4.0, f"only{rank}": 1.0 + rank})
    if rank == 0:
        torch.save({**out, "_mean_over_ranks": mixed}, loop["out"])


def run_workers(tmp_path, model_path: str, batch: RolloutBatch, cases: dict[str, GRPOConfig], workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / f"weights-{workers}.pt"
    trainer = TorchTrainer(
        sgd_step_on_workers,
        train_loop_config={"model": model_path, "batch": batch, "cases": {k: c.to_dict() for k, c in cases.items()}, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=f"exact-{workers}"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return torch.load(out)


def reference_step(model_path: str, batch: RolloutBatch, cfg: GRPOConfig, accumulation_factor: float | None = None) -> dict:
    """One process, TRL's rules, accumulation over the same 4 micro-batches in order, one SGD step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ray.trainer import collate, completion_logps

    pad = AutoTokenizer.from_pretrained(model_path).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = copy.deepcopy(model).eval() if cfg.beta > 0 else None
    steps = N // MICRO  # accumulation steps = steps_per_generation, one process
    tokens = float(batch.trained_tokens(cfg.mask_truncated_completions))
    options = LossOptions.from_config(cfg).kwargs()
    for start in range(0, N, MICRO):
        mb = collate(batch, list(range(start, start + MICRO)), pad, cfg.mask_truncated_completions, torch.device("cpu"), pair_cost=float("inf"))
        logps, _ = completion_logps(model, mb, cfg.temperature)
        ref_logps = completion_logps(ref, mb, cfg.temperature)[0].detach() if ref is not None else None
        loss, _ = grpo_loss(
            logps, None, ref_logps, mb.advantages, mb.completion_mask, num_items_in_batch=tokens if cfg.loss_type in TRL_TOKEN_NORMALISED else None,
            sampling_per_token_logps=mb.sampling_logps, **options,
        )  # fmt: skip
        if cfg.loss_type not in TRL_TOKEN_NORMALISED:
            loss = loss / (accumulation_factor or steps)
        loss.backward()
    with torch.no_grad():
        return {n: p - LR * p.grad for n, p in model.named_parameters()}


def max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    "zero_stage, workers",
    [(0, 2), (2, 2), (3, 2), (0, 1)],  # one worker under ZeRO 0 skips DeepSpeed's all-reduce (trainer.Policy)
    ids=["zero0-x2", "zero2-x2", "zero3-x2", "zero0-x1"],
)
def test_workers_with_accumulation_equal_one_process(tmp_path, tiny_model_path, ray_local, zero_stage, workers):
    base = quick_config(tmp_path, optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, beta=0.04, num_generations=G, max_completion_length=12, shared_prompt_packing=False)  # packing: tests/test_packing.py
    batch = make_batch(tiny_model_path)
    names = list(CASES) if workers > 1 else ["grpo", "bnpo", "dapo"]
    cases = {name: case_config(base, CASES[name], workers=workers, zero_stage=zero_stage) for name in names}
    got = run_workers(tmp_path, tiny_model_path, batch, cases, workers=workers)
    from transformers import AutoModelForCausalLM

    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).named_parameters())
    report = {}
    for name, cfg in cases.items():
        want = reference_step(tiny_model_path, batch, cfg)
        moved = max_gap({k: v.detach() for k, v in start.items()}, want)
        gap = max_gap(got[name], want)
        report[name] = (moved, gap)
        assert moved > 1e-3, (name, moved)  # the step moved the weights far beyond float error
        assert gap < 1e-5, (name, report)
    print(f"[exact zero{zero_stage} x{workers}] (moved, gap) per case: {report}")
    # Negative control: the reference with its accumulation factor wrong (2 instead of 4, what
    # dividing by one worker's accumulation steps without averaging over 2 workers would give)
    # is caught by the same check.
    if workers == 2:
        assert got["_mean_over_ranks"] == {"a": 0.5, "b": 4.0, "only0": 1.0, "only1": 2.0}
    wrong = reference_step(tiny_model_path, batch, cases["grpo"], accumulation_factor=2)
    assert max_gap(got["grpo"], wrong) > 1e-4
