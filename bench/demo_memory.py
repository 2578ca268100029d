"""Peak memory of the demo run per process role, with the engines' KV cache sized "auto" and fixed.

    .venv/bin/python bench/demo_memory.py [--steps 12] [--arms auto,2] [--out bench/results/demo_memory.json]

Each arm runs the `demo` preset (SmolLM2-135M, chain_sum) for `--steps` steps, without the
held-out evaluations, in its own process; the parent samples the process tree (bench/measure.py)
and reports the peak RSS of the whole tree and per role (driver, Ray, engine, trainer, ...), plus
the start-up phases (startup.json). An arm is `cluster.kv_cache_gib`: "auto" or a size in GiB.
vLLM's KV pages count once written, and prefix caching recycles free blocks in order, so a run
long enough to write more tokens than the cache holds shows its whole size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(arm: str, steps: int, record: str) -> None:
    from grpo_ray.cli import builtin_config
    from grpo_ray.config import GRPOConfig
    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics
    from grpo_ray.startup import read_startup

    kv = arm if arm == "auto" else float(arm)
    with tempfile.TemporaryDirectory(prefix=f"demo-memory-{arm}-") as out:
        demo = GRPOConfig.from_yaml(builtin_config("demo"))
        cfg = demo.with_overrides({"output_dir": out, "max_steps": steps, "save_steps": steps, "eval_at_start_and_end": False, "report_to": [], "cluster": {"kv_cache_gib": kv}})
        train(cfg, overwrite=True)
        rows = read_metrics(out)
        record_data = {"steps": len(rows), "step_s": [r["step_time_s"] for r in rows], "startup_phases": read_startup(out)}
    Path(record).write_text(json.dumps(record_data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--arms", default="auto,2", help='cluster.kv_cache_gib per arm: "auto" or GiB')
    parser.add_argument("--out", default="bench/results/demo_memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.record)
        return
    from measure import role_table, run_child, strict_json

    results = {}
    for arm in [a for a in args.arms.split(",") if a]:
        print(f"[demo_memory] kv_cache_gib={arm}", flush=True)
        results[arm] = run_child(__file__, ["--child", arm, "--steps", str(args.steps)], arm)
    print(f"\ndemo preset, {args.steps} steps; peak RSS GiB (at the tree's peak / the role's own peak), by kv_cache_gib")
    print("\n".join(role_table(results)))
    print("whole tree: " + ", ".join(f"{a} {r['peak_rss_gib']:.2f} GiB" for a, r in results.items()))
    print("to first step: " + ", ".join(f"{a} {r['startup_phases'].get('to_first_step_s', float('nan')):.1f} s" for a, r in results.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json({"steps": args.steps, "arms": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
