"""grpo_ray.algorithm against TRL 1.16 itself.

The loss is checked against TRL's real `GRPOTrainer._compute_loss`, called on a bare trainer object
(`GRPOTrainer.__new__`) that carries only the attributes that method reads, with the model forward
replaced by prepared per-token logps (a leaf tensor, so gradients can be compared).

Advantages and the vLLM importance-sampling ratio live inside TRL's monolithic
`_generate_and_score_completions`, which cannot be called without a model, tokenizer and generator.
Rather than hand-transcribing them, the tests cut those exact source lines out of TRL's method with
`inspect.getsource` and exec them on stub inputs, so a TRL change breaks the test instead of silently
diverging. `_trl_snippet` fails loudly if the anchor lines are not found.
"""

from __future__ import annotations

import inspect
import math
import textwrap
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import GRPOTrainer
    from trl.trainer import utils as trl_utils

from grpo_ray import algorithm as alg
from grpo_ray.algorithm import (
    combine_rewards,
    compute_advantages,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    selective_log_softmax,
    token_logprobs,
    vllm_importance_sampling_ratio,
)

B, T = 6, 7
MAX_COMPLETION_LENGTH = 9


# --------------------------------------------------------------------------------------------
# TRL harness
# --------------------------------------------------------------------------------------------


class _OneProcessAccelerator:
    """What `_compute_loss` asks of accelerate, for a single process."""

    num_processes = 1
    process_index = 0
    sync_gradients = True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _trl_trainer(
    loss_type="dapo",
    beta=0.0,
    epsilon=0.2,
    epsilon_high=None,
    delta=None,
    importance_sampling_level="token",
    use_bias_correction_kl=True,
    off_policy_mask_threshold=None,
    top_entropy_quantile=1.0,
    entropy_coef=0.0,
    use_vllm=False,
    vllm_importance_sampling_mode="sequence_mask",
    vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_clip_max=3.0,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
):
    """A GRPOTrainer with no __init__ run: only what `_compute_loss` and the exec'd snippets read."""
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.args = SimpleNamespace(
        use_bias_correction_kl=use_bias_correction_kl,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        steps_per_generation=1,
        entropy_target=0.2,
    )
    t.loss_type = loss_type
    t.beta = beta
    t.epsilon_low = epsilon
    t.epsilon_high = epsilon if epsilon_high is None else epsilon_high
    t.importance_sampling_level = importance_sampling_level
    t.off_policy_mask_threshold = off_policy_mask_threshold
    t.top_entropy_quantile = top_entropy_quantile
    t.entropy_coef = entropy_coef
    t.use_adaptive_entropy = False
    t._entropy_bonus_enabled = entropy_coef != 0.0
    t.aux_loss_enabled = False
    t.use_vllm = use_vllm
    t.vllm_importance_sampling_correction = use_vllm
    t.vllm_importance_sampling_mode = vllm_importance_sampling_mode
    t.vllm_importance_sampling_clip_min = vllm_importance_sampling_clip_min
    t.vllm_importance_sampling_clip_max = vllm_importance_sampling_clip_max
    t.max_completion_length = MAX_COMPLETION_LENGTH
    t.current_gradient_accumulation_steps = 1
    t.model = torch.nn.Module()  # .training is True -> "train" mode
    t.accelerator = _OneProcessAccelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def _trl_loss(trainer, logps, mask, advantages, entropies=None, **extra_inputs):
    """Run TRL's `_compute_loss` with the forward pass replaced by `logps`; returns (loss, metrics)."""
    if entropies is None:
        entropies = torch.zeros_like(logps)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(logps.size(0), 1, dtype=torch.long),
        "prompt_mask": torch.ones(logps.size(0), 1, dtype=torch.long),
        "completion_ids": torch.zeros(logps.shape, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum(),
    }
    inputs.update({k: v for k, v in extra_inputs.items() if v is not None})
    loss = trainer._compute_loss(trainer.model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _trl_snippet(method, first: str, stop: str, after: str | None = None) -> str:
    """Source lines of a TRL method from the line starting with `first` (the first one after a line
    starting with `after`, if given) up to, excluding, the next line starting with `stop`; dedented."""
    lines = textwrap.dedent(inspect.getsource(method)).splitlines()
    begin = 0
    if after is not None:
        begin = next(i for i, line in enumerate(lines) if line.strip().startswith(after))
    start = next(i for i in range(begin, len(lines)) if lines[i].strip().startswith(first))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(stop))
    return textwrap.dedent("\n".join(lines[start:end]))


_GEN = GRPOTrainer._generate_and_score_completions
TRL_ADVANTAGES = _trl_snippet(
    _GEN, "unscorable_mask = torch.isnan(rewards_per_func)", "# Slice to keep only the local part of the data"
)
TRL_IS_RATIO = _trl_snippet(
    _GEN,
    "if self.use_vllm and self.vllm_importance_sampling_correction:",
    "# Compute the per-token log probabilities for the reference model",
    after="# Compute the importance sampling ratio when using vLLM",
)
TRL_IS_METRICS = _trl_snippet(
    _GEN,
    "if self.use_vllm and self.vllm_importance_sampling_correction:",
    "output = {",
    after="self._logs[\"images\"].extend",
)


def test_trl_snippets_are_the_expected_code():
    """Guard the source cutting: each snippet must contain the lines the tests rely on."""
    assert "advantages = torch.nan_to_num(advantages, nan=0.0)" in TRL_ADVANTAGES
    assert "nanstd(rewards.view(-1, num_generations), dim=1)" in TRL_ADVANTAGES
    assert "vllm_importance_sampling_ratio = torch.exp(logps_diff)" in TRL_IS_RATIO
    assert "sampling/importance_sampling_ratio/max" in TRL_IS_METRICS


def _trl_advantages(rewards_per_func, num_generations, weights, scale_rewards, aggregation):
    trainer = SimpleNamespace(
        multi_objective_aggregation=aggregation,
        reward_weights=torch.as_tensor(weights, dtype=torch.float32),
        scale_rewards=scale_rewards,
        reward_funcs=[None] * rewards_per_func.size(1),
    )
    scope = {
        "torch": torch,
        "nanstd": trl_utils.nanstd,
        "self": trainer,
        "device": "cpu",
        "rewards_per_func": rewards_per_func.clone(),
        "num_generations": num_generations,
    }
    exec(TRL_ADVANTAGES, scope)
    return scope["advantages"], scope["rewards"]


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    trainer = _trl_trainer(
        use_vllm=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )
    scope = {
        "torch": torch,
        "math": math,
        "self": trainer,
        "device": "cpu",
        "mode": "train",
        "completion_mask": mask,
        "tool_mask": None,
        "old_per_token_logps": old,
        "sampling_per_token_logps": sampling,
        "nanmin": trl_utils.nanmin,
        "nanmax": trl_utils.nanmax,
    }
    with torch.no_grad():
        exec(TRL_IS_RATIO, scope)
    exec(TRL_IS_METRICS, scope)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return scope["vllm_importance_sampling_ratio"], metrics


# --------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------


def _batch(seed: int, dtype=torch.float32):
    """Per-token logps far enough from old/ref that both clip regions and the KL are exercised.
    Row 0 is an empty completion (mask all zero); row 1 is full length."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)
    sampling = old + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    sampling[2, 1] = float("nan")  # a token vLLM could not score
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, T
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(B, generator=g, dtype=dtype)
    advantages[3] = 0.0
    entropies = torch.rand(B, T, generator=g, dtype=dtype) * 4
    return SimpleNamespace(
        logps=logps, old=old, ref=ref, sampling=sampling, mask=mask, advantages=advantages, entropies=entropies
    )


def _assert_metrics_match(trl_metrics: dict, ours: dict) -> None:
    for key, value in trl_metrics.items():
        assert key in ours, f"metric {key} missing"
        if math.isnan(value):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _compare(
    seed=0, trl_kw=None, our_kw=None, with_old=True, with_sampling=False, entropy_grad=False, dtype=torch.float32
):
    """Loss, d loss / d logps (and d/d entropies) and metrics: ours vs TRL on the same random batch."""
    trl_kw = dict(trl_kw or {})
    our_kw = dict(our_kw or {})
    x = _batch(seed, dtype)
    trainer = _trl_trainer(**trl_kw)
    beta = trl_kw.get("beta", 0.0)
    old = x.old if with_old else None
    ref = x.ref if beta != 0.0 else None

    trl_logps = x.logps.clone().requires_grad_(True)
    trl_ent = x.entropies.clone().requires_grad_(entropy_grad)
    is_ratio = None
    if with_sampling and trl_kw.get("use_vllm"):
        old_for_is = old if old is not None else x.logps
        is_ratio, is_metrics = _trl_is_ratio(
            old_for_is,
            x.sampling,
            x.mask,
            trainer.vllm_importance_sampling_mode,
            trainer.vllm_importance_sampling_clip_min,
            trainer.vllm_importance_sampling_clip_max,
        )
    trl_loss, trl_metrics = _trl_loss(
        trainer,
        trl_logps,
        x.mask,
        x.advantages,
        entropies=trl_ent,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        importance_sampling_ratio=is_ratio,
        sampling_per_token_logps=x.sampling if with_sampling else None,
    )
    if is_ratio is not None:
        trl_metrics.update(is_metrics)
    trl_loss.backward()

    our_logps = x.logps.clone().requires_grad_(True)
    our_ent = x.entropies.clone().requires_grad_(entropy_grad)
    names = ("epsilon", "epsilon_high", "delta", "importance_sampling_level", "use_bias_correction_kl",
             "off_policy_mask_threshold", "top_entropy_quantile", "entropy_coef", "sapo_temperature_pos",
             "sapo_temperature_neg", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
             "vllm_importance_sampling_clip_max", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
             "vespo_lambda_neg")  # fmt: skip
    kwargs = {k: v for k, v in trl_kw.items() if k in names}
    kwargs.update(our_kw)
    if with_sampling:
        kwargs["vllm_importance_sampling_correction"] = bool(trl_kw.get("use_vllm"))
    loss, metrics = grpo_loss(
        our_logps,
        old,
        ref,
        x.advantages,
        x.mask,
        loss_type=trl_kw.get("loss_type", "dapo"),
        beta=beta,
        max_completion_length=MAX_COMPLETION_LENGTH,
        entropies=our_ent,
        sampling_per_token_logps=x.sampling if with_sampling else None,
        **kwargs,
    )
    loss.backward()

    assert loss.dtype == trl_loss.dtype
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-5, atol=1e-6)
    if entropy_grad:
        torch.testing.assert_close(our_ent.grad, trl_ent.grad, rtol=1e-5, atol=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())
    _assert_metrics_match(trl_metrics, metrics)
    return metrics


# --------------------------------------------------------------------------------------------
# Loss vs TRL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", alg.LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("delta", [None, 1.5])
def test_loss_matches_trl(loss_type, level, beta, with_old, delta):
    trl_kw = dict(loss_type=loss_type, beta=beta, importance_sampling_level=level, delta=delta)
    seed = alg.LOSS_TYPES.index(loss_type) + 10 * (level == "sequence")
    metrics = _compare(seed=seed, trl_kw=trl_kw, with_old=with_old)
    assert "clip_ratio" in metrics and "entropy" in metrics
    assert ("kl" in metrics) == (beta != 0.0)


@pytest.mark.parametrize(
    "trl_kw",
    [
        dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),
        dict(loss_type="cispo", epsilon_high=5.0),
        dict(loss_type="cispo", epsilon_high=1.1),
        dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.3),
        # distinct non-default values: the defaults (2, 3, 3, 2) would hide k_pos and lambda_neg swapped
        dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=4.0, vespo_lambda_neg=1.2),
        dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False),
        dict(loss_type="grpo", beta=0.1, importance_sampling_level="sequence", use_bias_correction_kl=False),
        dict(loss_type="dapo", off_policy_mask_threshold=0.05),
        dict(loss_type="grpo", off_policy_mask_threshold=0.02, importance_sampling_level="sequence"),
        dict(loss_type="dapo", top_entropy_quantile=0.3),
        dict(loss_type="bnpo", top_entropy_quantile=0.5, beta=0.04),
    ],
)
def test_loss_options_match_trl(trl_kw):
    _compare(seed=3, trl_kw=trl_kw)


@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.4])
def test_entropy_bonus_matches_trl(top_entropy_quantile):
    trl_kw = dict(loss_type="grpo", entropy_coef=0.01, top_entropy_quantile=top_entropy_quantile)
    metrics = _compare(seed=5, trl_kw=trl_kw, entropy_grad=True)
    assert "policy_loss" in metrics


@pytest.mark.parametrize("mode", alg.IS_MODES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "vespo"])
@pytest.mark.parametrize("clip_min", [None, 0.9])
def test_vllm_importance_sampling_matches_trl(mode, loss_type, clip_min):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL rejects vespo with sequence-level vLLM IS (tested below)")
    trl_kw = dict(
        loss_type=loss_type,
        use_vllm=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=1.2,
    )
    metrics = _compare(seed=7, trl_kw=trl_kw, with_sampling=True)
    assert "sampling/importance_sampling_ratio/mean" in metrics


def test_vllm_is_on_policy_without_old_logps_matches_trl():
    """old=None: TRL always recomputes old logps under vLLM IS; with them equal to the current logps the
    result must match ours computed from the detached current logps."""
    trl_kw = dict(loss_type="dapo", use_vllm=True, vllm_importance_sampling_mode="token_truncate")
    _compare(seed=8, trl_kw=trl_kw, with_old=False, with_sampling=True)


def test_sampling_logps_without_correction_only_feed_the_off_policy_mask():
    trl_kw = dict(loss_type="dapo", use_vllm=False, off_policy_mask_threshold=0.01)
    _compare(seed=9, trl_kw=trl_kw, with_sampling=True)


@pytest.mark.parametrize("mode", alg.IS_MODES)
def test_vllm_is_ratio_helper_matches_trl(mode):
    x = _batch(11)
    ratio, _ = _trl_is_ratio(x.old, x.sampling, x.mask, mode, 0.8, 1.25)
    torch.testing.assert_close(vllm_importance_sampling_ratio(x.old, x.sampling, x.mask, mode, 0.8, 1.25), ratio)
    assert not torch.isnan(ratio).any()


def test_float64_matches_trl():
    _compare(seed=12, trl_kw=dict(loss_type="grpo", beta=0.04, delta=1.5), dtype=torch.float64)


def test_vllm_importance_sampling_cap_is_clip_max_alias():
    x = _batch(13)
    kw = dict(loss_type="dapo", beta=0.0, sampling_per_token_logps=x.sampling)
    kw["vllm_importance_sampling_mode"] = "token_truncate"
    a, _ = grpo_loss(x.logps, x.old, None, x.advantages, x.mask, vllm_importance_sampling_clip_max=1.1, **kw)
    b, _ = grpo_loss(x.logps, x.old, None, x.advantages, x.mask, vllm_importance_sampling_cap=1.1, **kw)
    assert torch.equal(a, b)


def test_on_policy_dapo_is_minus_mean_advantage():
    """Sanity beyond TRL: on-policy, ratio 1, no KL -> loss is -mean over tokens of the advantage."""
    x = _batch(14)
    loss, metrics = grpo_loss(x.logps, None, None, x.advantages, x.mask, loss_type="dapo", beta=0.0)
    expected = -(x.advantages.unsqueeze(1) * x.mask).sum() / x.mask.sum()
    torch.testing.assert_close(loss, expected)
    assert metrics["clip_ratio"] == 0.0


def test_num_items_in_batch_scales_dapo():
    x = _batch(15)
    base, _ = grpo_loss(x.logps, x.old, None, x.advantages, x.mask, loss_type="dapo", beta=0.0)
    doubled, _ = grpo_loss(
        x.logps, x.old, None, x.advantages, x.mask, loss_type="dapo", beta=0.0, num_items_in_batch=2 * int(x.mask.sum())
    )
    torch.testing.assert_close(doubled, base / 2)


# --------------------------------------------------------------------------------------------
# Loss input validation
# --------------------------------------------------------------------------------------------


def _loss_args():
    x = _batch(20)
    return x, dict(loss_type="grpo", beta=0.0)


def test_loss_rejects_bad_shapes():
    x, kw = _loss_args()
    with pytest.raises(ValueError, match=r"per_token_logps must be \(B, T\)"):
        grpo_loss(x.logps[0], None, None, x.advantages, x.mask[0], **kw)
    with pytest.raises(ValueError, match="completion_mask shape"):
        grpo_loss(x.logps, None, None, x.advantages, x.mask[:, :-1], **kw)
    with pytest.raises(ValueError, match="old_per_token_logps shape"):
        grpo_loss(x.logps, x.old[:-1], None, x.advantages, x.mask, **kw)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(x.logps, None, None, x.advantages[:-1], x.mask, **kw)
    with pytest.raises(ValueError, match="sampling_per_token_logps shape"):
        grpo_loss(x.logps, None, None, x.advantages, x.mask, sampling_per_token_logps=x.sampling.T, **kw)


def test_loss_rejects_bad_options():
    x, _ = _loss_args()
    args = (x.logps, None, None, x.advantages, x.mask)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(*args, loss_type="ppo", beta=0.0)
    with pytest.raises(ValueError, match="importance_sampling_level='sequence_token'"):
        grpo_loss(*args, loss_type="grpo", beta=0.0, importance_sampling_level="sequence_token")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*args, loss_type="dr_grpo", beta=0.0)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(*args, loss_type="grpo", beta=0.1)
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(*args, loss_type="grpo", beta=0.0, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        grpo_loss(
            *args, loss_type="grpo", beta=0.0, sampling_per_token_logps=x.sampling, vllm_importance_sampling_mode="x"
        )
    with pytest.raises(ValueError, match="vespo"):
        grpo_loss(*args, loss_type="vespo", beta=0.0, sampling_per_token_logps=x.sampling)


# --------------------------------------------------------------------------------------------
# Advantages vs TRL
# --------------------------------------------------------------------------------------------


def _rewards_per_func(seed: int, num_prompts=5, num_generations=4, num_funcs=2):
    """Dyadic rewards (exact in float) with a constant group, a group with one NaN sample, an
    unscorable sample (all functions None), a group of only NaN, and partial NaN in one function."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 4, (num_prompts * num_generations, num_funcs), generator=g).float() / 2
    r[0:num_generations] = r[0]  # group 0: all equal
    r[num_generations + 1] = float("nan")  # group 1: one unscorable sample
    r[2 * num_generations : 3 * num_generations] = float("nan")  # group 2: fully unscorable
    r[3 * num_generations, 1] = float("nan")  # group 3: one function returned None once
    return r


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_advantages_match_trl(scale_rewards, aggregation, seed):
    rpf = _rewards_per_func(seed)
    weights = [1.0, 0.5]
    trl_adv, trl_rewards = _trl_advantages(rpf, 4, weights, scale_rewards, aggregation)
    adv, rewards = compute_advantages(rpf, 4, weights, scale_rewards, aggregation)
    torch.testing.assert_close(adv, trl_adv, rtol=1e-5, atol=1e-6)
    if aggregation == "sum_then_normalize":
        torch.testing.assert_close(rewards, trl_rewards, equal_nan=True)
        torch.testing.assert_close(group_advantages(trl_rewards, 4, scale_rewards), trl_adv, rtol=1e-5, atol=1e-6)
    assert not torch.isnan(adv).any()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl_on_continuous_rewards(scale_rewards):
    rpf = torch.randn(24, 1, generator=torch.Generator().manual_seed(4))
    rpf[5] = float("nan")
    trl_adv, trl_rewards = _trl_advantages(rpf, 8, [1.0], scale_rewards, "sum_then_normalize")
    torch.testing.assert_close(group_advantages(trl_rewards, 8, scale_rewards), trl_adv, rtol=1e-5, atol=1e-6)


def test_combine_rewards_matches_trl():
    rpf = _rewards_per_func(2, num_funcs=3)
    scope_rewards = _trl_advantages(rpf, 4, [1.0, -2.0, 0.25], "group", "sum_then_normalize")[1]
    torch.testing.assert_close(combine_rewards(rpf, [1.0, -2.0, 0.25]), scope_rewards, equal_nan=True)
    torch.testing.assert_close(combine_rewards(rpf), combine_rewards(rpf, torch.ones(3)), equal_nan=True)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 7.3, -2.0])
def test_all_equal_group_gives_exact_zeros(scale_rewards, value):
    rewards = torch.cat([torch.full((8,), value), torch.arange(8.0)])
    adv = group_advantages(rewards, 8, scale_rewards)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().sum() > 0


def test_all_equal_group_deviation_from_trl_is_rounding_only():
    """Documents the one deliberate deviation: TRL can leave ~1e-5 on a constant group of non-dyadic
    rewards (float rounding of the mean, divided by std + 1e-4); we return exact zeros."""
    rewards = torch.full((8, 1), 0.1)
    trl_adv, _ = _trl_advantages(rewards, 8, [1.0], "group", "sum_then_normalize")
    assert trl_adv.abs().max() < 1e-3
    assert torch.equal(group_advantages(rewards[:, 0], 8), torch.zeros(8))


def test_nan_rewards():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0, float("nan"), float("nan"), float("nan"), float("nan")])
    adv = group_advantages(rewards, 4)
    assert not torch.isnan(adv).any()
    assert adv[1] == 0.0 and torch.equal(adv[4:], torch.zeros(4))  # unscorable -> 0, all-NaN group -> 0
    # NaN samples are excluded from the baseline: group 0 is {1, 0, 1}
    mean, std = 2 / 3, torch.tensor([1.0, 0.0, 1.0]).std().item()
    expected = torch.tensor([1 - mean, 0 - mean, 1 - mean]) / (std + 1e-4)
    torch.testing.assert_close(adv[[0, 2, 3]], expected)
    one_left = group_advantages(torch.tensor([2.0, float("nan")]), 2)  # a single scored sample: no signal
    assert torch.equal(one_left, torch.zeros(2))


def test_single_generation_gives_zero_advantages():
    assert torch.equal(group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1, "batch"), torch.zeros(3))


def test_advantage_input_validation():
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="must be 1-D"):
        group_advantages(torch.zeros(4, 2), 4)
    with pytest.raises(ValueError, match="floating point"):
        group_advantages(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="scale_rewards='std'"):
        group_advantages(torch.zeros(4), 4, "std")
    with pytest.raises(ValueError, match="num_generations=0"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="one entry per reward function"):
        combine_rewards(torch.zeros(4, 2), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"\(num_samples, num_reward_funcs\)"):
        combine_rewards(torch.zeros(4))
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        compute_advantages(torch.zeros(4, 1), 4, multi_objective_aggregation="mean")


# --------------------------------------------------------------------------------------------
# Log-probs and entropy vs TRL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_trl(dtype, temperature):
    g = torch.Generator().manual_seed(30)
    logits = (torch.randn(3, 5, 50, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 50, (3, 5), generator=g)
    expected = trl_utils.selective_log_softmax(logits, ids, temperature=temperature)
    ours = token_logprobs(logits, ids, temperature)
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected)
    naive = torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.float(), naive, rtol=0.02, atol=0.05)


def test_selective_log_softmax_topk_index_and_grad():
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(2, 4, 10, generator=g, requires_grad=True)
    index = torch.randint(0, 10, (2, 4, 3), generator=g)
    torch.testing.assert_close(selective_log_softmax(logits, index), trl_utils.selective_log_softmax(logits, index))
    selective_log_softmax(logits, index[..., 0]).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_logprob_validation():
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) and ids \(B, T\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


def test_entropy_matches_trl():
    logits = torch.randn(3, 300, 20, generator=torch.Generator().manual_seed(32))
    torch.testing.assert_close(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits))
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 8)), torch.full((2,), math.log(8)))


def test_loss_options_name_every_run_constant_grpo_loss_keyword_once():
    """`LossOptions` is the one list of loss options: each is a `grpo_loss` keyword and a GRPOConfig field
    (so the trainer passes `**LossOptions.from_config(cfg).kwargs()` and a new option is named once)."""
    import dataclasses
    import inspect

    from grpo_ray.algorithm import LossOptions
    from grpo_ray.config import GRPOConfig

    keywords = {p.name for p in inspect.signature(grpo_loss).parameters.values() if p.kind is p.KEYWORD_ONLY}
    options = {f.name for f in dataclasses.fields(LossOptions)}
    per_batch = {"num_items_in_batch", "entropies", "sampling_per_token_logps", "vllm_importance_sampling_cap"}
    assert keywords - options == per_batch and options <= keywords
    cfg = GRPOConfig(loss_type="sapo", sapo_temperature_neg=2.0, entropy_coef=0.1, use_bias_correction_kl=False, off_policy_mask_threshold=0.5)
    opts = LossOptions.from_config(cfg)
    assert (opts.loss_type, opts.sapo_temperature_neg, opts.entropy_coef, opts.use_bias_correction_kl, opts.off_policy_mask_threshold) == ("sapo", 2.0, 0.1, False, 0.5)
    assert opts.needs_entropies and not LossOptions.from_config(GRPOConfig()).needs_entropies
    with pytest.raises(TypeError):  # no second set of defaults: GRPOConfig's are the run's
        LossOptions()
