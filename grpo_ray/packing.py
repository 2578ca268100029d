"""Shared-prompt packing: each prompt is run once per packed row, not once per completion.

A GRPO group is `num_generations` completions of one prompt. Padding every (prompt, completion)
pair into its own row runs the prompt's tokens through the model G times, and their gradients
are the sum of G identical paths. Here a row holds one prompt followed by k of its completions:

    [ p0 p1 p2 | a0 a1 a2 | b0 b1 | pad ]      positions 0 1 2 | 3 4 5 | 3 4 | 0

with a mask that lets every completion see the prompt and its own earlier tokens, never another
completion. Logits and gradients are those of the unpacked rows (the same attention, the same
RoPE positions), so training is unchanged; only the repeated prompt work goes. Attention is
dense over a packed row (a masked square), so packing every completion of a long-answer group
into one row can cost more than it saves: `plan_rows` picks k per micro-batch from a cost model
of the linear layers (per token) and attention (per token pair) of the model being trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class PackedRows:
    """Model inputs for one micro-batch of (prompt, completion) pairs, and where to read each pair's logits."""

    input_ids: torch.Tensor  # (R, L) packed rows, right-padded
    position_ids: torch.Tensor  # (R, L) each completion restarts right after its prompt
    attention_mask: torch.Tensor  # (R, 1, L, L) bool, True = may attend
    logits_to_keep: int  # logits are computed for the last K positions of every row (from the first completion on)
    logit_index: torch.Tensor  # (B, C) flat index into (R, K) of the logits predicting completion token j

    @property
    def tokens(self) -> int:
        """Tokens the model runs, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "PackedRows":
        move = lambda t: t.to(device)  # noqa: E731
        return PackedRows(move(self.input_ids), move(self.position_ids), move(self.attention_mask), self.logits_to_keep, move(self.logit_index))


def model_attention_mask(mask: torch.Tensor, config: Any) -> torch.Tensor:
    """The 4D mask as the model's attention takes it: bool for SDPA, additive float for eager."""
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)


def attention_cost_per_pair(config: Any) -> float:
    """Cost of one attended (query, key) pair relative to one token through the linear layers.

    Per layer and token the projections and MLP cost ~2 * params FLOPs; each attended pair costs
    ~4 * heads * head_dim (scores and the weighted sum)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    params = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * config.intermediate_size
    return 4 * heads * head_dim / (2 * params)


def plan_rows(
    prompt_lens: Sequence[int], groups: Sequence[Sequence[int]], completion_lens: Sequence[int], pair_cost: float, per_row: int | None = None
) -> list[list[int]]:
    """Split each prompt's completions into rows of at most k, with k (1, 2, 4, ... or all) chosen
    to minimise the modelled cost of the padded rows: R * L * (1 + pair_cost * L); `per_row` fixes k."""

    def split(k: int) -> list[list[int]]:
        return [list(g[i : i + k]) for g in groups for i in range(0, len(g), k)]

    if per_row is not None:
        return split(per_row)
    largest = max(len(g) for g in groups)
    best: tuple[float, list[list[int]]] | None = None
    k = 1
    while True:
        rows = split(k)
        length = max(prompt_lens[r[0]] + sum(completion_lens[i] for i in r) for r in rows)
        cost = len(rows) * length * (1 + pair_cost * length)
        if best is None or cost < best[0]:
            best = (cost, rows)
        if k >= largest:
            return best[1]
        k = min(2 * k, largest)


def pack(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int, pair_cost: float, per_row: int | None = None
) -> PackedRows:
    """Pack rows i = (prompt_ids[i], completion_ids[i]); rows with identical prompts share one.

    `pair_cost` = `attention_cost_per_pair(model.config)`; 0 packs each prompt's completions into a
    single row, `float("inf")` keeps one completion per row (plain padding, no sharing);
    `per_row` overrides the plan with a fixed number of completions per row (benchmarks)."""
    n = len(prompt_ids)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p), []).append(i)
    prompt_lens = [len(p) for p in prompt_ids]
    comp_lens = [len(c) for c in completion_ids]
    rows = plan_rows(prompt_lens, list(by_prompt.values()), comp_lens, pair_cost, per_row)
    R = len(rows)
    L = max(prompt_lens[r[0]] + sum(comp_lens[i] for i in r) for r in rows)
    C = max(max(comp_lens), 1)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    segment = torch.full((R, L), -1, dtype=torch.long)  # 0: prompt, j + 1: the row's j-th completion, -1: padding
    predictor = torch.zeros((n, C), dtype=torch.long)  # (row, position) of the logits predicting each token
    predictor_row = torch.zeros((n, 1), dtype=torch.long)
    for r, members in enumerate(rows):
        p = prompt_ids[members[0]]
        P = len(p)
        ids[r, :P] = torch.tensor(p, dtype=torch.long)
        pos[r, :P] = torch.arange(P)
        segment[r, :P] = 0
        start = P
        for j, i in enumerate(members):
            c = completion_ids[i]
            end = start + len(c)
            ids[r, start:end] = torch.tensor(c, dtype=torch.long)
            pos[r, start:end] = torch.arange(P, P + len(c))
            segment[r, start:end] = j + 1
            # token 0 is predicted by the prompt's last position, token t > 0 by the token before it
            predictor[i, : len(c)] = torch.tensor([P - 1] + list(range(start, end - 1)), dtype=torch.long)[: len(c)]
            predictor_row[i] = r
            start = end
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # (R, L, 1), (R, 1, L)
    mask = causal & ((q == k) | ((k == 0) & (q > 0)))  # padding attends to earlier padding, so no row is empty
    first = max(0, min(prompt_lens[r[0]] for r in rows) - 1)  # the earliest position any row needs
    logit_index = predictor_row * (L - first) + (predictor - first).clamp(min=0)
    return PackedRows(ids, pos, mask.unsqueeze(1), L - first, logit_index)
