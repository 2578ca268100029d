"""The machine's floor for one GRPO step: the step's matmul FLOPs over this machine's measured matmul rate.

    .venv/bin/python bench/flops.py [--model smollm2-135m]   # the rates, and one demo step's floor

A floor is the least time the arithmetic can take, not a prediction: it counts each matmul once
(the shared prompt of a group once, as packing and vLLM's prefix cache do), counts no memory
traffic (decoding a few sequences at a time is memory-bound on a CPU, so generation sits further
above its floor than training), and divides by the best rate torch reaches here on both cores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

# Matmul shapes of a small decoder's step (tokens x hidden @ hidden x {hidden, mlp, vocab}); the
# rate is the best of them, so the floor is the lowest time the machine can give the work.
SHAPES = ((2048, 576, 576), (2048, 576, 1536), (2048, 1536, 576), (1024, 576, 8192))


PROBE = ((256, 576, 576),)  # one small shape: enough to see that bf16 is emulated, in well under a second


def matmul_rate(dtype: torch.dtype, seconds: float = 1.0, shapes: tuple[tuple[int, int, int], ...] = SHAPES) -> float:
    """FLOP/s of torch matmuls on this machine (all of torch's threads): the best shape, each timed for `seconds`."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up (oneDNN picks its kernel)
        runs, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * m * k * n * runs / elapsed)
    return best


def machine_rates(seconds: float = 1.0) -> dict[str, float | bool]:
    """fp32 and bf16 matmul rates (FLOP/s); bf16 only probed where the CPU emulates it."""
    from grpo_ray.resources import native_bf16

    native = native_bf16(use_gpu=False)
    return {"fp32": matmul_rate(torch.float32, seconds), "bf16": matmul_rate(torch.bfloat16, seconds if native else 0.3, SHAPES if native else PROBE),
            "bf16_native": native}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What a token costs: matmul weights outside the LM head, the head, and attention's size."""

    body: int  # weights of the Linear layers a token passes through, LM head excluded
    head: int  # hidden x vocab: only positions whose logits are needed pay it
    layers: int
    hidden: int

    @classmethod
    def of(cls, model_path: str) -> "ModelShape":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
        text = config.get_text_config()
        return cls(body=body, head=head.weight.numel(), layers=text.num_hidden_layers, hidden=text.hidden_size)

    def forward_flops(self, tokens: float, logit_tokens: float, attended_pairs: float) -> float:
        """One forward: 2 FLOPs per weight per token, the head for `logit_tokens` only, and QK^T plus
        AV over `attended_pairs` (query, key) pairs in every layer."""
        return 2 * self.body * tokens + 2 * self.head * logit_tokens + 4 * self.layers * self.hidden * attended_pairs


def step_flops(shape: ModelShape, groups: int, group_size: int, prompt_tokens: float, completion_tokens: float,
               extra_forwards: int = 0) -> dict[str, float]:  # fmt: skip
    """FLOPs of one step of `groups` prompts x `group_size` completions (mean lengths in tokens).

    generation: prefill each prompt once, decode every completion token (logits at each);
    training: forward + backward (3x a forward) over the packed rows (one prompt per group), logits
    at completion positions; `extra_forwards`: no-grad passes (old policy, reference)."""
    P, C, G = prompt_tokens, completion_tokens, group_size
    prompt_pairs = P * (P + 1) / 2
    completion_pairs = G * (C * P + C * (C + 1) / 2)  # each completion token attends the prompt and its own past
    tokens, pairs = P + G * C, prompt_pairs + completion_pairs
    generate = groups * (shape.forward_flops(P, 0, prompt_pairs) + shape.forward_flops(G * C, G * C, completion_pairs))
    forward = groups * shape.forward_flops(tokens, G * C, pairs)
    return {"generate": generate, "train": 3 * forward, "extra_forwards": extra_forwards * forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=float, default=120.0)
    parser.add_argument("--completion-tokens", type=float, default=40.0)
    args = parser.parse_args()
    from grpo_ray.models import resolve_model_path

    shape = ModelShape.of(resolve_model_path(args.model))
    rates = machine_rates()
    flops = step_flops(shape, groups=4, group_size=8, prompt_tokens=args.prompt_tokens, completion_tokens=args.completion_tokens)
    print(f"{args.model}: body {shape.body / 1e6:.1f}M weights, head {shape.head / 1e6:.1f}M; bf16 native: {rates['bf16_native']}")
    for name in ("fp32", "bf16"):
        rate = rates[name]
        floor = {k: v / rate for k, v in flops.items()}
        print(f"{name}: {rate / 1e9:.1f} GFLOP/s; 4x8 step floor: generate {floor['generate']:.2f} s, train {floor['train']:.2f} s")


if __name__ == "__main__":
    main()
