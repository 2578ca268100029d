"""Trainer-process RSS across steps: glibc as it is, `malloc_trim` after each step (what grpo-ray's
trainers do), or a fixed mmap threshold. One process per arm and model, no Ray: SmolLM2-135M fp32
under DeepSpeed ZeRO 0, the demo (full) and lora built-in configs, one 440-token row per step.

    .venv/bin/python bench/trainer_memory.py [--steps 6] [--out bench/results/trainer_memory.json]

Prints a table (RSS between steps after the last step, the process's peak RSS, median step time
after the first) and writes JSON. Uses both cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"glibc": {}, "malloc_trim": {}, "mmap_128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
MODELS = ("demo", "lora")  # built-in configs: full fine-tune, LoRA r 16


def rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(config: str, arm: str, steps: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import torch

    from grpo_ray.cli import builtin_config
    from grpo_ray.config import GRPOConfig
    from grpo_ray.models import resolve_model_path
    from grpo_ray.resources import release_freed_memory
    from grpo_ray.trainer import build_optimizer, deepspeed_config, trainable_model

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cfg = GRPOConfig.from_yaml(builtin_config(config))
    model = trainable_model(cfg, resolve_model_path(cfg.model_name_or_path))
    optimizer = build_optimizer(cfg.resolved_optim(on_gpu=False)[0], model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, "fp32"))
    ids = torch.randint(3, 1000, (1, 440), generator=torch.Generator().manual_seed(0))
    rows = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = engine(input_ids=ids).logits[:, -384:].float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        if arm == "malloc_trim":
            release_freed_memory()
        rows.append({"step_s": time.perf_counter() - t0, "rss_gib": rss_gib()})
    return {"steps": rows, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="bench/results/trainer_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    results = {}
    for config in MODELS:
        for arm, env in ARMS.items():
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", config, arm],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True)  # fmt: skip
            run = json.loads(out.stdout.strip().splitlines()[-1])
            results[f"{config}/{arm}"] = {
                "rss_after_last_step_gib": run["steps"][-1]["rss_gib"],
                "peak_rss_gib": run["peak_rss_gib"],
                "median_step_s": statistics.median(r["step_s"] for r in run["steps"][1:]),
                "steps": run["steps"],
            }
            r = results[f"{config}/{arm}"]
            print(f"| {config:5s} | {arm:12s} | {r['rss_after_last_step_gib']:6.2f} | {r['peak_rss_gib']:6.2f} | {r['median_step_s']:6.2f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "cpus": os.cpu_count(), "arms": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
