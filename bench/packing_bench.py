"""Shared-prompt packing: forward + backward time of one micro-batch by completions per row.

    .venv/bin/python bench/packing_bench.py [--dtype bf16|fp32]

One micro-batch of 16 completions (2 prompts x 8), random tokens, on bench/rollout_bench.py's 25M
Qwen2, for three shapes: the vs_trl bench (52-token prompts, ~12-token answers), full-length
answers (52 / 64) and the SmolLM2 demo's (150 / 48). k = completions packed per row (k = 1 is
plain padding, as TRL does); "planned" is what grpo-ray's cost model picks. Medians of 3 after a
warm-up. Prints a table, writes bench/results/packing.json. Uses both cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"vs_trl bench": (52, 12), "full-length answers": (52, 64), "demo": (150, 48)}
GROUPS, N = 2, 8


def micro_batch(prompt_len: int, completion_len: int, vocab: int, pair_cost: float, per_row: int | None):
    from grpo_ray.packing import pack
    from grpo_ray.trainer import MicroBatch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(GROUPS)]
    comps = [torch.randint(3, vocab, (completion_len,), generator=g).tolist() for _ in range(GROUPS * N)]
    rows = pack([prompts[i // N] for i in range(GROUPS * N)], comps, 0, pair_cost, per_row)
    ids = torch.tensor(comps)
    return MicroBatch(rows, ids, torch.ones(ids.shape), torch.zeros(len(comps)), None)


def seconds(model, mb, repeats: int = 3) -> tuple[float, float]:
    from grpo_ray.trainer import completion_logps

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        logps, _ = completion_logps(model, mb, 1.0)
        t1 = time.perf_counter()
        logps.sum().backward()
        times.append((t1 - t0, time.perf_counter() - t1))
    fwd = statistics.median(f for f, _ in times[1:])
    bwd = statistics.median(b for _, b in times[1:])
    return fwd, bwd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", default="bench/results/packing.json")
    args = parser.parse_args()
    from rollout_bench import build_model
    from transformers import AutoModelForCausalLM

    from grpo_ray.models import cache_dir, resolve_model_path
    from grpo_ray.packing import attention_cost_per_pair

    path = build_model("25M", resolve_model_path("tiny-arith"), cache_dir() / "bench")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    planned_cost = attention_cost_per_pair(model.config)
    results = []
    print(f"{'shape':30s} {'rows':>10s} {'tokens':>7s} {'forward s':>10s} {'backward s':>11s} {'vs k=1':>7s}")
    for name, (P, C) in SHAPES.items():
        rows = []
        for label, k in (("k=1", 1), ("k=2", 2), ("k=4", 4), ("k=8", 8), ("planned", None)):
            mb = micro_batch(P, C, model.config.vocab_size, planned_cost, k)
            fwd, bwd = seconds(model, mb)
            rows.append({"shape": name, "prompt": P, "completion": C, "rows": label, "shape_rl": list(mb.rows.input_ids.shape),
                         "tokens": mb.rows.tokens, "forward_s": fwd, "backward_s": bwd})  # fmt: skip
        base = rows[0]["forward_s"] + rows[0]["backward_s"]
        for r in rows:
            r["speedup"] = base / (r["forward_s"] + r["backward_s"])
            print(f"{name + f' ({P}/{C})':30s} {r['rows']:>10s} {r['tokens']:7d} {r['forward_s']:10.3f} {r['backward_s']:11.3f} {r['speedup']:6.2f}x")
        results += rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dtype": args.dtype, "torch": torch.__version__, "rows": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
