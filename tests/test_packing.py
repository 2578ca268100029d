"""Shared-prompt packing gives the logprobs and gradients of running every (prompt, completion)
pair on its own, unpadded: checked on the tiny model against exactly that, pair by pair."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_ray.packing import attention_cost_per_pair, pack, plan_rows
from grpo_ray.trainer import MicroBatch, completion_logps

PAD = 0


def test_layout_of_one_packed_row():
    rows = pack([[5, 6, 7], [5, 6, 7]], [[8, 9, 10], [11, 12]], PAD, pair_cost=0.0)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    m = rows.attention_mask[0, 0].int().tolist()
    assert m[6] == [1, 1, 1, 0, 0, 0, 1, 0]  # completion 2's first token: the prompt and itself, not completion 1
    assert m[5] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert m[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    # logits kept from the prompt's last position; token 0 of both completions is predicted there
    assert list(range(8 - rows.logits_to_keep, 8)) == [2, 3, 4, 5, 6, 7]
    assert rows.logit_index.tolist() == [[0, 1, 2], [0, 4, 0]]  # (pad slot of the shorter row points anywhere)
    assert pack([[5, 6, 7], [5, 6, 7]], [[8, 9, 10], [11, 12]], PAD, pair_cost=0.0, per_row=1).input_ids.shape == (2, 6)


def test_infinite_pair_cost_keeps_one_completion_per_row_and_padding_rows_attend_somewhere():
    rows = pack([[1, 2], [1, 2], [3]], [[4], [5, 6, 7], []], PAD, pair_cost=math.inf)
    assert rows.input_ids.shape == (3, 5)
    assert rows.attention_mask.any(-1).all()  # no all-masked query (SDPA would return NaN there)


def test_plan_rows_trades_shared_prompts_against_quadratic_attention():
    groups = [list(range(8))]
    short = plan_rows([50] * 8, groups, [10] * 8, pair_cost=3e-4)
    assert len(short) == 1  # short answers: one row (50 + 80 tokens instead of 8 x 60)
    long = plan_rows([50] * 8, groups, [1000] * 8, pair_cost=3e-4)
    assert len(long) > 1  # long answers: a single 8050-token square of attention would cost more


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def _pairs(vocab: int):
    g = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(3, vocab, (n,), generator=g)] for n in (7, 12)]
    lens = [5, 1, 9, 0, 3, 3, 11, 2]
    comps = [[int(t) for t in torch.randint(3, vocab, (n,), generator=g)] for n in lens]
    return [prompts[i // 4] for i in range(8)], comps


def _micro_batch(prompts, comps, pair_cost):
    C = max(map(len, comps))
    ids = torch.full((len(comps), C), PAD)
    mask = torch.zeros((len(comps), C))
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return MicroBatch(pack(prompts, comps, PAD, pair_cost), ids, mask, torch.zeros(len(comps)), None)


def _reference(model, prompts, comps, temperature):
    """Each pair alone: no padding, no packing."""
    out = torch.zeros((len(comps), max(map(len, comps))))
    for i, (p, c) in enumerate(zip(prompts, comps)):
        if not c:
            continue
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / temperature
        out[i, : len(c)] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
    return out


@pytest.mark.parametrize("pair_cost", [0.0, 3e-4, math.inf], ids=["one-row-per-prompt", "planned", "unpacked"])
def test_packed_logprobs_and_gradients_equal_each_pair_run_alone(tiny, pair_cost):
    prompts, comps = _pairs(tiny.config.vocab_size)
    mb = _micro_batch(prompts, comps, pair_cost)
    tiny.zero_grad()
    ref = _reference(tiny, prompts, comps, 0.7)
    (ref * mb.completion_mask).sum().backward()
    ref_grads = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    logps, entropy = completion_logps(tiny, mb, 0.7, entropies=True)
    (logps * mb.completion_mask).sum().backward()
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(logps * mb.completion_mask, ref.detach(), atol=2e-5, rtol=1e-5)
    for got, want in zip((p.grad for p in tiny.parameters()), ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_packing_runs_fewer_tokens_for_the_demo_shape(tiny):
    prompts, comps = _pairs(tiny.config.vocab_size)
    packed = pack(prompts, comps, PAD, attention_cost_per_pair(tiny.config))
    unpacked = pack(prompts, comps, PAD, math.inf)
    assert packed.tokens < unpacked.tokens / 2


def test_packing_under_gradient_checkpointing_matches_each_pair_alone(tiny_model_path):
    """Gradient checkpointing re-runs each layer's forward in backward: the mask and positions must survive that."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()  # checkpointing is active in training mode only; the tiny model has no dropout
    prompts, comps = _pairs(model.config.vocab_size)
    mb = _micro_batch(prompts, comps, 0.0)
    ref = _reference(model, prompts, comps, 1.0)
    (ref * mb.completion_mask).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logps, _ = completion_logps(model, mb, 1.0)
    (logps * mb.completion_mask).sum().backward()
    torch.testing.assert_close(logps * mb.completion_mask, ref.detach(), atol=2e-5, rtol=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
