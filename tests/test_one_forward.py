"""One forward when on-policy: with one optimizer step per round the trainer passes no old-policy
logps, and the loss uses the detached logps of the training forward itself (the ratio, the vLLM
importance-sampling weights). Checked against the two-pass path it replaced (a no-grad forward for
the old logps first): the same loss, metrics and gradients, for every loss type and both
importance-sampling levels, on the tiny model with packed rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grpo_ray.algorithm import LossOptions, grpo_loss
from grpo_ray.config import IS_LEVELS, LOSS_TYPES, GRPOConfig
from grpo_ray.packing import pack
from grpo_ray.trainer import MicroBatch, completion_logps

PAD, T = 0, 0.9


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def _micro_batch(vocab: int) -> MicroBatch:
    g = torch.Generator().manual_seed(3)
    prompts = [[int(t) for t in torch.randint(3, vocab, (n,), generator=g)] for n in (6, 9)]
    comps = [[int(t) for t in torch.randint(3, vocab, (n,), generator=g)] for n in (4, 7, 2, 5, 6, 3, 8, 1)]
    C = max(map(len, comps))
    ids, mask = torch.full((8, C), PAD), torch.zeros((8, C))
    for i, c in enumerate(comps):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    advantages = torch.randn(8, generator=g)
    return MicroBatch(pack([prompts[i // 4] for i in range(8)], comps, PAD, 3e-4), ids, mask, advantages, None)


def _loss_and_grads(model, mb: MicroBatch, options: LossOptions, old: torch.Tensor | None):
    model.zero_grad()
    logps, _ = completion_logps(model, mb, T)
    loss, metrics = grpo_loss(logps, old, None, mb.advantages, mb.completion_mask, num_items_in_batch=mb.completion_mask.sum(),
                              sampling_per_token_logps=mb.sampling_logps, **options.kwargs())  # fmt: skip
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_forward_gives_the_two_pass_loss_and_gradients(tiny, loss_type, level):
    if loss_type == "vespo" and level == "sequence":
        pytest.skip("vespo is token-level only (the config refuses sequence)")
    vespo = {"vllm_importance_sampling_mode": "token_truncate"} if loss_type == "vespo" else {}  # TRL's requirement
    options = LossOptions.from_config(GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.0, epsilon_high=0.28, **vespo))
    mb = _micro_batch(tiny.config.vocab_size)
    with torch.no_grad():  # the two-pass path's first pass, and vLLM's logps a little off (importance sampling active)
        old, _ = completion_logps(tiny, mb, T)
    mb.sampling_logps = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4))
    one_loss, one_metrics, one_grads = _loss_and_grads(tiny, mb, options, old=None)
    two_loss, two_metrics, two_grads = _loss_and_grads(tiny, mb, options, old=old)
    assert torch.equal(one_loss, two_loss) and one_loss != 0
    assert one_metrics.keys() == two_metrics.keys()
    for key in one_metrics:
        torch.testing.assert_close(torch.tensor(one_metrics[key]), torch.tensor(two_metrics[key]), rtol=0, atol=0, equal_nan=True)
    assert any(g.abs().sum() > 0 for g in one_grads)
    for a, b in zip(one_grads, two_grads):
        assert torch.equal(a, b)
    # control: old logps that are not the training forward's (off-policy by ~0.05 nats a token) move the
    # gradients. (vespo with vLLM importance sampling weighs by pi/pi_old x pi_old/pi_vllm, where old
    # cancels until truncation: its control runs without that correction.)
    if loss_type == "vespo":
        options = dataclasses.replace(options, vllm_importance_sampling_correction=False)
        _, _, one_grads = _loss_and_grads(tiny, mb, options, old=None)
    _, _, off_grads = _loss_and_grads(tiny, mb, options, old=old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5)))
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(one_grads, off_grads))
