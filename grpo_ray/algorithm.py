"""GRPO maths: rewards -> advantages -> clipped policy-gradient loss, in plain torch.

Every formula here is a transcription of TRL 1.16's `GRPOTrainer` (`_generate_and_score_completions`
for rewards, advantages and the vLLM importance-sampling ratio; `_compute_loss` for the loss and its
metrics), specialised to one process and one micro-batch per optimizer step, so a run here optimises
the same objective as the same config under TRL. `tests/test_algorithm.py` checks that claim against
TRL's own code. Deliberate departures are marked "Deviation from TRL" at the place they happen.

No Ray, no model, no trl import (only config's lists of choices): the trainer workers call these on
tensors they already hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_ray.config import IS_LEVELS, IS_MODES, LOSS_TYPES, MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS

STD_EPSILON = 1e-4  # TRL adds this to the reward std so a near-constant group cannot blow up

# Loss types whose per-token term is PPO's clipped surrogate (they differ only in how they average).
_CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# How each loss type reduces the (B, T) per-token loss to a scalar.
_AGGREGATION = {
    "grpo": "sequence_mean",  # mean over each sequence's tokens, then over sequences
    "sapo": "sequence_mean",
    "bnpo": "token_mean",  # mean over all tokens of this batch
    "dr_grpo": "constant",  # sum / (B * max_completion_length)
    "dapo": "num_items",  # sum / tokens of the whole generation batch
    "cispo": "num_items",
    "vespo": "num_items",
    "luspo": "sequence_sum_mean",  # sum over each sequence, mean over sequences
}


# --------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Bessel-corrected std ignoring NaN (TRL's `nanstd`); NaN where fewer than two values remain."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def _normalize_scale_rewards(scale_rewards: str | bool) -> str:
    """Accept TRL's legacy booleans (True -> "group", False -> "none") and reject unknown modes."""
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # type: ignore[arg-type]
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: must be one of {SCALE_REWARDS}")
    return scale_rewards


def _check_grouping(n: int, num_generations: int) -> None:
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations={num_generations!r}: must be a positive int")
    if n % num_generations != 0:
        raise ValueError(
            f"{n} rewards do not split into groups of num_generations={num_generations}: "
            "the batch must hold whole groups, each prompt's completions contiguous"
        )


def _check_rewards_per_func(rewards_per_func: Tensor, weights: Sequence[float] | Tensor | None) -> Tensor:
    """Validate (N, F) rewards and return the (F,) weights on the same device/dtype (ones if None)."""
    if rewards_per_func.dim() != 2:
        shape = tuple(rewards_per_func.shape)
        raise ValueError(f"rewards_per_func must be (num_samples, num_reward_funcs), got shape {shape}")
    if not rewards_per_func.is_floating_point():
        dtype = rewards_per_func.dtype
        raise ValueError(f"rewards_per_func must be floating point (NaN marks 'no reward'), got {dtype}")
    num_funcs = rewards_per_func.size(1)
    if weights is None:
        return torch.ones(num_funcs, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    w = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    if w.shape != (num_funcs,):
        raise ValueError(f"weights must have one entry per reward function ({num_funcs}), got shape {tuple(w.shape)}")
    return w


def combine_rewards(rewards_per_func: Tensor, weights: Sequence[float] | Tensor | None = None) -> Tensor:
    """Weighted sum over reward functions, skipping NaN (a function that returned None for a sample).

    A row where every function returned None is unscorable: TRL 1.16 marks its reward NaN (rather than the
    0 that `nansum` gives) so it is left out of the group baseline and gets a zero advantage.
    rewards_per_func: (N, F); weights: (F,) or None for all ones. Returns (N,).
    """
    w = _check_rewards_per_func(rewards_per_func, weights)
    rewards = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def _constant_groups(grouped: Tensor) -> Tensor:
    """(G, n) -> (G, 1) bool: True where a group's non-NaN values are all equal (or there are none)."""
    nan = torch.isnan(grouped)
    lo = torch.where(nan, torch.full_like(grouped, math.inf), grouped).amin(dim=1, keepdim=True)
    hi = torch.where(nan, torch.full_like(grouped, -math.inf), grouped).amax(dim=1, keepdim=True)
    return (lo == hi) | nan.all(dim=1, keepdim=True)


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group") -> Tensor:
    """GRPO advantages: reward minus its group's mean, divided by the group ("group") or batch ("batch") std.

    rewards: (num_prompts * num_generations,), each prompt's completions contiguous; NaN marks an
    unscorable completion, which is left out of the mean/std and gets advantage 0 (as TRL 1.16).
    "none" centres without scaling (Dr. GRPO). Returns a tensor shaped like `rewards`.

    Deviation from TRL: a group whose (non-NaN) rewards are all equal gets exactly 0. TRL computes
    (r - nanmean(r)) / (0 + 1e-4), where float rounding of the mean can leave ~1e-5 instead of 0.
    """
    scale_rewards = _normalize_scale_rewards(scale_rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_prompts * num_generations,), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be floating point (NaN marks an unscorable sample), got {rewards.dtype}")
    _check_grouping(rewards.numel(), num_generations)
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped)
        advantages = advantages / (std + STD_EPSILON)
    elif scale_rewards == "batch":
        std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards[:1])
        advantages = advantages / (std + STD_EPSILON)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages.masked_fill(_constant_groups(grouped), 0.0).view(-1)


def normalize_then_sum_advantages(
    rewards_per_func: Tensor, num_generations: int, weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """GDPO advantages (TRL's multi_objective_aggregation="normalize_then_sum").

    Each reward function is normalised within its group first, so one function with a large scale cannot
    drown the others; the weighted sum is then normalised over the whole batch. `scale_rewards` does not
    apply to this mode in TRL 1.16. Unscorable rows (all NaN) get advantage 0.
    """
    w = _check_rewards_per_func(rewards_per_func, weights)
    num_samples, num_funcs = rewards_per_func.shape
    _check_grouping(num_samples, num_generations)
    grouped = rewards_per_func.view(-1, num_generations, num_funcs)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + STD_EPSILON)).view(-1, num_funcs)
    rewards = (reward_k * w.unsqueeze(0)).nansum(dim=1)
    rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))
    std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + STD_EPSILON), nan=0.0)


def compute_advantages(
    rewards_per_func: Tensor,
    num_generations: int,
    weights: Sequence[float] | Tensor | None = None,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
) -> tuple[Tensor, Tensor]:
    """Rewards of every reward function -> (advantages (N,), combined reward (N,), NaN if unscorable).

    One entry point for both of TRL 1.16's aggregation modes; the combined reward is what TRL logs as
    `reward` (weighted nansum, whatever the aggregation mode).
    """
    rewards = combine_rewards(rewards_per_func, weights)
    if multi_objective_aggregation == "sum_then_normalize":
        return group_advantages(rewards, num_generations, scale_rewards), rewards
    if multi_objective_aggregation == "normalize_then_sum":
        return normalize_then_sum_advantages(rewards_per_func, num_generations, weights), rewards
    raise ValueError(
        f"multi_objective_aggregation={multi_objective_aggregation!r}: must be one of {MULTI_OBJECTIVE_AGGREGATIONS}"
    )


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# --------------------------------------------------------------------------------------------


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / temperature) gathered at `index`, without materialising the full log-softmax.

    Works one leading row at a time, so peak extra memory is one row of logits rather than a (B, T, V)
    copy. fp32/fp64 use logit - logsumexp; lower precision (bf16) uses log_softmax per row, which is
    more stable there (the same split TRL makes). index: (...) or (..., K); returns index's shape.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    squeeze = index.dim() == logits.dim() - 1
    if squeeze:
        index = index.unsqueeze(-1)
    if index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"index shape {tuple(index.shape)} does not match logits shape {tuple(logits.shape)} "
            "(expected logits (..., V) and index (...) or (..., K))"
        )
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        if temperature != 1.0:
            row_logits = row_logits / temperature
        if row_logits.dtype in (torch.float32, torch.float64):
            lse = torch.logsumexp(row_logits, dim=-1, keepdim=True)
            rows.append(torch.gather(row_logits, -1, row_index) - lse)
        else:
            rows.append(F.log_softmax(row_logits, dim=-1).gather(-1, row_index))
    logps = torch.stack(rows)
    return logps.squeeze(-1) if squeeze else logps


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token log-probabilities of `ids` under `logits` sampled at `temperature`.

    logits (B, T, V) must already be aligned with ids (B, T): logits[:, t] scores ids[:, t] (i.e. the
    caller has dropped the last position and the prompt). Use the rollout temperature, as TRL does, so
    these logps are comparable with the sampler's.
    """
    if logits.dim() != 3 or ids.dim() != 2 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"token_logprobs expects logits (B, T, V) and ids (B, T); got {tuple(logits.shape)} and {tuple(ids.shape)}"
        )
    return selective_log_softmax(logits, ids, temperature)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Shannon entropy (nats) over the last axis, computed `chunk_size` rows at a time to bound memory."""
    flat = logits.reshape(-1, logits.shape[-1])
    chunks = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        chunks.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(chunks).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------
# vLLM importance-sampling correction
# --------------------------------------------------------------------------------------------


def vllm_importance_sampling_ratio(
    old_per_token_logps: Tensor,
    sampling_per_token_logps: Tensor,
    mask: Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """pi_old / pi_sampler, truncated or masked, to correct for vLLM's numerics differing from the trainer's.

    Tokens vLLM could not score (NaN) count as ratio 1. "token_*" modes give (B, T) ratios, "sequence_*"
    modes one (B, 1) ratio from the summed log difference; "*_truncate" clamps to [clip_min, clip_max],
    "*_mask" zeroes ratios outside it. Computed without grad, like TRL.
    """
    if mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r}: must be one of {IS_MODES}")
    with torch.no_grad():
        diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("truncate"):
            no_bounds = clip_min is None and clip_max is None
            return ratio if no_bounds else torch.clamp(ratio, min=clip_min, max=clip_max)
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _is_metrics(old: Tensor, sampling: Tensor, mask: Tensor, ratio: Tensor, mode: str) -> dict[str, float]:
    """TRL's `sampling/*` metrics: how far vLLM's logps are from the trainer's, and the IS ratio range."""
    bool_mask = mask.bool()
    delta = torch.abs(old.detach() - sampling)
    delta = delta[bool_mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[bool_mask]

    def stat(x: Tensor, fn) -> float:
        return float(fn(x)) if x.numel() > 0 else 0.0

    return {
        "sampling/sampling_logp_difference/mean": stat(delta, torch.mean),
        "sampling/sampling_logp_difference/max": stat(delta, torch.max),
        "sampling/importance_sampling_ratio/min": stat(flat, torch.min),
        "sampling/importance_sampling_ratio/mean": stat(flat, torch.mean),
        "sampling/importance_sampling_ratio/max": stat(flat, torch.max),
    }


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _check_loss_inputs(
    per_token_logps: Tensor, advantages: Tensor, completion_mask: Tensor, **others: Tensor | None
) -> None:
    """Fail early, naming the tensor, instead of letting broadcasting silently produce a wrong loss."""
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must be (B, T), got shape {tuple(per_token_logps.shape)}")
    shape = tuple(per_token_logps.shape)
    if tuple(completion_mask.shape) != shape:
        raise ValueError(f"completion_mask shape {tuple(completion_mask.shape)} != per_token_logps shape {shape}")
    for name, t in others.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != per_token_logps shape {shape}")
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages must be (B,)=({shape[0]},) or (B, T)={shape}, got {tuple(advantages.shape)}")


def _check_options(loss_type: str, importance_sampling_level: str, max_completion_length: int | None) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: must be one of {LOSS_TYPES}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r}: must be one of {IS_LEVELS}"
        )
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length")


def _log_importance_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    """log(pi/pi_old): per token (B, T), or GSPO's length-normalised per-sequence value (B, 1)."""
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def off_policy_sequence_mask(
    advantages: Tensor, per_token_logps: Tensor, sampling_per_token_logps: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """DeepSeek-V3.2 off-policy sequence mask (B, 1): drop negative-advantage sequences that drifted too far.

    Mean per-token KL(pi_sampler || pi) > threshold and advantage < 0 -> 0 (drop), else 1 (keep).
    Unscorable (NaN) sampler tokens give no KL evidence and count as 0.
    """
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    avg_seq_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg_seq_kl <= threshold)).to(dtype=mask.dtype)


@torch.no_grad()
def vespo_gamma_weights(
    advantages: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    importance_sampling_ratio: Tensor | None,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> Tensor:
    """VESPO's detached sequence weight phi(w) = e^lambda * w^k * e^(-lambda w) (phi(1) = 1), in log space.

    w is the whole-sequence ratio pi/pi_old (times the token vLLM IS ratios if given); phi smoothly
    down-weights sequences far from on-policy instead of hard clipping. Returns (B, 1).
    """
    lower = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        seq_log_ratio += torch.sum(torch.clamp(torch.log(importance_sampling_ratio), lower, 20.0), dim=-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Tokens whose entropy is at or above the `threshold` quantile of the batch's completion tokens.

    TRL's `get_high_entropy_mask` for one process ("Beyond the 80/20 rule": learn only on forking tokens).
    """
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    cutoff = torch.quantile(local, threshold)
    return ((entropies * mask.float()) >= cutoff) & mask.bool()


def _policy_term(
    loss_type: str,
    coef_1: Tensor,
    advantages: Tensor,
    per_token_logps: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    phi_seq: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-token policy loss (B, T) or (B, 1), and coef_1 as TRL leaves it (delta-clamped) for the clip metrics."""
    if loss_type == "cispo":  # clip the (detached) IS weight, keep the REINFORCE gradient everywhere
        return -torch.clamp(coef_1, max=epsilon_high).detach() * advantages * per_token_logps, coef_1
    if loss_type == "sapo":  # smooth sigmoid gate instead of a hard clip
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        return -(torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures) * advantages, coef_1
    if loss_type == "vespo":
        return -phi_seq * advantages * per_token_logps, coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:  # INTELLECT-2 two-sided clipping: also bound the unclipped branch
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages), coef_1


def _aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: Tensor | float | None,
) -> Tensor:
    """Reduce the per-token loss to a scalar the way `loss_type` prescribes (see `_AGGREGATION`)."""
    how = _AGGREGATION[loss_type]
    masked = per_token_loss * mask
    if how == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if how == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if how == "constant":
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if how == "sequence_sum_mean":
        return masked.sum(-1).mean()
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    return masked.sum() / torch.as_tensor(num_items_in_batch, device=mask.device).clamp(min=1.0)


def _masked_seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


def _global_masked_mean(x: Tensor, mask: Tensor) -> float:
    """Mean over completion tokens; a (B, 1) sequence-level tensor is averaged over sequences (as TRL)."""
    if x.shape[1] == 1:
        total, count = x.sum(), torch.tensor(float(x.shape[0]))
    else:
        total, count = (x * mask).sum(), mask.sum().float()
    return float(total.float() / count.float().clamp(min=1.0))


def _nan_extreme(x: Tensor, fn) -> float:
    x = x[~torch.isnan(x)]
    return float(fn(x)) if x.numel() > 0 else float("nan")


def _clip_metrics(
    loss_type: str, coef_1: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> dict[str, float]:
    """Fraction of tokens where clipping removed the gradient, under TRL's metric names.

    `clip_ratio` is our summary key: TRL's `clip_ratio/region_mean`, `cispo_clip_ratio` for cispo,
    0.0 for the soft-gated losses (sapo, vespo) that never hard-clip.
    """
    if loss_type == "cispo":
        ratio = _global_masked_mean(((coef_1 > eps_high) & (advantages > 0)).float(), mask)
        return {"cispo_clip_ratio": ratio, "clip_ratio": ratio}
    if loss_type not in _CLIPPED_LOSSES:
        return {"clip_ratio": 0.0}
    low = ((coef_1 < 1 - eps_low) & (advantages < 0)).float()
    high = ((coef_1 > 1 + eps_high) & (advantages > 0)).float()
    region = torch.maximum(low, high)
    metrics = {
        "clip_ratio/low_mean": _global_masked_mean(low, mask),
        "clip_ratio/high_mean": _global_masked_mean(high, mask),
        "clip_ratio/region_mean": _global_masked_mean(region, mask),
        "clip_ratio/low_min": _nan_extreme(_masked_seq_mean(low, mask), torch.min),
        "clip_ratio/high_max": _nan_extreme(_masked_seq_mean(high, mask), torch.max),
    }
    metrics["clip_ratio"] = metrics["clip_ratio/region_mean"]
    return metrics


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Every run-constant option of `grpo_loss`, named once: a field here is a keyword of `grpo_loss`
    and a `GRPOConfig` field of the same name and meaning (tests/test_algorithm.py checks both).
    No defaults: the config's are the run's (build it with `from_config`)."""

    loss_type: str
    beta: float
    epsilon: float
    epsilon_high: float | None
    delta: float | None
    importance_sampling_level: str
    max_completion_length: int | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    use_bias_correction_kl: bool
    off_policy_mask_threshold: float | None
    top_entropy_quantile: float
    entropy_coef: float
    vllm_importance_sampling_correction: bool
    vllm_importance_sampling_mode: str
    vllm_importance_sampling_clip_min: float | None
    vllm_importance_sampling_clip_max: float | None

    @classmethod
    def from_config(cls, cfg: Any) -> "LossOptions":
        """The options a config (any object with these attributes, e.g. `GRPOConfig`) sets."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def needs_entropies(self) -> bool:
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    ref_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str,
    beta: float,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
    entropies: Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = True,
    off_policy_mask_threshold: float | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
    sampling_per_token_logps: Tensor | None = None,
    vllm_importance_sampling_correction: bool = True,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_min: float | None = None,
    vllm_importance_sampling_clip_max: float | None = 3.0,
    vllm_importance_sampling_cap: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16's GRPO-family loss for one micro-batch (= `GRPOTrainer._compute_loss`, one process, no
    gradient accumulation), returning (scalar loss, metrics as Python floats).

    Tensors are (B, T) over completion tokens; `advantages` is (B,) (or per-token (B, T)).
    `old_per_token_logps=None` means on-policy (ratio 1, gradient still flows); `ref_per_token_logps` is
    needed only when beta != 0 (k3 KL estimator, multiplied by the IS ratio when `use_bias_correction_kl`,
    TRL's default). `importance_sampling_level="sequence"` is GSPO. `num_items_in_batch` (dapo/cispo/vespo)
    is the completion-token count of the whole generation batch; it defaults to this batch's mask sum.
    For gradient accumulation over k micro-batches pass the full step's count for dapo/cispo/vespo and
    divide the loss by k for the other types, as TRL does.

    `sampling_per_token_logps` (vLLM's logps of the sampled tokens) turns on TRL's vLLM
    importance-sampling correction (unless `vllm_importance_sampling_correction=False`), with TRL's
    mode/clip names; `vllm_importance_sampling_cap` is TRL's deprecated alias of the clip max. It is
    also what the off-policy sequence mask measures drift against. `entropies` is needed for the
    entropy metric, `top_entropy_quantile < 1` and `entropy_coef != 0` (static coefficient only).
    """
    _check_options(loss_type, importance_sampling_level, max_completion_length)
    _check_loss_inputs(
        per_token_logps, advantages, completion_mask, old_per_token_logps=old_per_token_logps,
        ref_per_token_logps=ref_per_token_logps, entropies=entropies, sampling_per_token_logps=sampling_per_token_logps,
    )  # fmt: skip
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError(f"beta={beta} needs ref_per_token_logps for the KL term (or set beta=0.0)")
    if entropies is None and (top_entropy_quantile < 1.0 or entropy_coef != 0.0):
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need `entropies`")
    if vllm_importance_sampling_cap is not None:
        vllm_importance_sampling_clip_max = vllm_importance_sampling_cap
    use_is = sampling_per_token_logps is not None and vllm_importance_sampling_correction
    if use_is and loss_type == "vespo" and not vllm_importance_sampling_mode.startswith("token"):
        raise ValueError(
            "loss_type='vespo' needs a token-level vllm_importance_sampling_mode (token_truncate or token_mask)"
        )

    mask = completion_mask
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    metrics: dict[str, float] = {}

    is_ratio = None
    if use_is:
        is_ratio = vllm_importance_sampling_ratio(
            old, sampling_per_token_logps, mask, vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max,
        )  # fmt: skip
        metrics.update(_is_metrics(old, sampling_per_token_logps, mask, is_ratio, vllm_importance_sampling_mode))

    log_ratio = per_token_logps - old
    coef_1 = torch.exp(_log_importance_weights(log_ratio, mask, importance_sampling_level))

    per_token_kl = None
    if beta != 0.0:  # k3 estimator of KL(pi || pi_ref): unbiased, always >= 0
        ref_diff = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(ref_diff) - ref_diff - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    phi_seq = None
    if loss_type == "vespo":
        phi_seq = vespo_gamma_weights(
            advantages, log_ratio, mask, is_ratio, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
        )
    per_token_loss, coef_1 = _policy_term(
        loss_type, coef_1, advantages, per_token_logps, epsilon_low=epsilon, epsilon_high=epsilon_high, delta=delta,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg, phi_seq=phi_seq,
    )  # fmt: skip

    if off_policy_mask_threshold is not None:
        drift_ref = sampling_per_token_logps if sampling_per_token_logps is not None else old
        per_token_loss = per_token_loss * off_policy_sequence_mask(
            advantages, per_token_logps, drift_ref, mask, off_policy_mask_threshold
        )
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and loss_type != "vespo":  # vespo folds the IS ratio into phi instead
        per_token_loss = per_token_loss * is_ratio
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    loss = _aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)
    metrics["policy_loss"] = float(loss.detach())
    if entropy_coef != 0.0:  # bonus = mean entropy of the tokens the policy term acts on
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
        metrics["entropy_coef"] = float(entropy_coef)

    if per_token_kl is not None:
        metrics["kl"] = _global_masked_mean(per_token_kl.detach(), mask)
    if entropies is not None:
        metrics["entropy"] = _global_masked_mean(entropies.detach(), mask)
    metrics.update(_clip_metrics(loss_type, coef_1.detach(), advantages, mask, epsilon, epsilon_high))
    if phi_seq is not None:
        metrics["vespo/phi_seq_mean"] = _global_masked_mean(phi_seq, mask)
    return loss, metrics
