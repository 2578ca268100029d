"""Trainer micro-benchmarks behind two defaults: torch's fused AdamW on CPU, and the NaN/inf
guard's one fused norm pass (grpo_ray.trainer.StepGuard). Prints a table and writes JSON.

    .venv/bin/python bench/trainer_bench.py [--out bench/results/trainer.json]

On bench/rollout_bench.py's 25M Qwen2 (random weights, random gradients), fp32, CPU. Each figure
is the median of `--repeats` timed calls after one warm-up. Uses both cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/trainer.json")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from rollout_bench import build_model
    from transformers import AutoModelForCausalLM

    from grpo_ray.models import cache_dir, resolve_model_path
    from grpo_ray.text import text_table

    model = AutoModelForCausalLM.from_pretrained(build_model("25M", resolve_model_path("tiny-arith"), cache_dir() / "bench"))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    count = sum(p.numel() for p in params)
    rows = []
    for name, fused in (("AdamW step, per-tensor loop (torch's CPU default)", None), ("AdamW step, fused (adamw_torch_fused)", True)):
        opt = torch.optim.AdamW(params, lr=1e-6, fused=fused)
        rows.append((name, median_ms(opt.step, args.repeats)))
    grads = [p.grad for p in params]
    per_tensor = lambda: all(bool(torch.isfinite(g).all()) for g in grads)  # noqa: E731
    fused_norm = lambda: bool(torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().all())  # noqa: E731
    rows.append(("NaN/inf check, isfinite() per tensor", median_ms(per_tensor, args.repeats)))
    rows.append(("NaN/inf check, one fused norm pass (StepGuard)", median_ms(fused_norm, args.repeats)))
    print(f"\n25M Qwen2 ({count / 1e6:.1f}M parameters), fp32, {os.cpu_count()} CPUs, torch {torch.__version__}, median of {args.repeats}")
    print(text_table(["what", "ms"], [(n, round(ms, 1)) for n, ms in rows]))
    result = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "parameters": count, "ms": dict(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
