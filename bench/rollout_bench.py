"""Rollout benchmark: generation tokens/s of the grpo-ray actor pool vs HF `generate`, and
weight-sync seconds vs model size. Prints a table and writes JSON.

    .venv/bin/python bench/rollout_bench.py [--out bench/results/rollout.json]

Same model (a ~25M-parameter Qwen2 with the tiny-arith tokenizer, random weights), same
prompts, same sampling (temperature 1, up to `--new-tokens` tokens per completion; tokens/s
counts what each side generated). Each generation figure is the median of 3 timed rounds. Run one heavy job at a time: this uses both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

REPEATS = 3  # each generation figure is the median of this many timed rounds

SIZES = {  # name: (hidden, layers, intermediate)
    "1M": (128, 2, 256),
    "25M": (512, 8, 1408),
    "110M": (768, 14, 2048),
}


def build_model(size: str, tokenizer_dir: str, root: Path) -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = root / f"qwen2-{size}"
    if (out / "config.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, layers, inter = SIZES[size]
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def prompts(tokenizer, n: int) -> list[list[int]]:
    from grpo_ray.data import render_prompts
    from grpo_ray.tiny_model import arith_rows

    return tokenizer(render_prompts(tokenizer, arith_rows(n, seed=7)), add_special_tokens=False)["input_ids"]


def hf_generate_tps(model_path: str, prompt_ids: list[list[int]], n: int, new_tokens: int, threads: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):  # left padding, as generate expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.no_grad():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        rates = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            rates.append(out.shape[0] * new_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def pool_generate_tps(model_path: str, prompt_ids: list[list[int]], n: int, new_tokens: int, cpus: int, logprobs: bool) -> float:
    import ray

    from grpo_ray.rollout import EngineSpec, RolloutEngine, SamplingSpec

    engine = ray.remote(RolloutEngine).options(num_cpus=cpus).remote(EngineSpec(model_path=model_path, max_model_len=512, kv_cache_bytes=2 * 2**30))
    spec = SamplingSpec(n=n, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=new_tokens, logprobs=logprobs)
    try:
        ray.get(engine.generate.remote(prompt_ids[:2], spec, 0))  # warm-up
        rates = []
        for seed in range(1, REPEATS + 1):
            t0 = time.perf_counter()
            groups = ray.get(engine.generate.remote(prompt_ids, spec, seed))
            rates.append(sum(len(c) for g in groups for c in g.completion_ids) / (time.perf_counter() - t0))
    finally:
        ray.kill(engine)
    return statistics.median(rates)


def sync_seconds(model_path: str, transport: str, repeats: int = 3) -> tuple[float, int]:
    import ray
    from transformers import AutoModelForCausalLM

    from grpo_ray.rollout import EngineSpec, RolloutEngine
    from grpo_ray.sync import WeightSender

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    engine = ray.remote(RolloutEngine).options(num_cpus=1).remote(EngineSpec(model_path=model_path, max_model_len=256))
    try:
        ray.get(engine.ready.remote())
        sender = WeightSender([engine], model, torch.float32, transport)
        sender.push()  # connect + warm-up
        times = [sender.push() for _ in range(repeats)]
    finally:
        ray.kill(engine)
    return sorted(times)[len(times) // 2], sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/rollout.json")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import ray
    from transformers import AutoTokenizer

    from grpo_ray.models import cache_dir, resolve_model_path

    tiny = resolve_model_path("tiny-arith")
    root = cache_dir() / "bench"
    model_25m = build_model("25M", tiny, root)
    prompt_ids = prompts(AutoTokenizer.from_pretrained(model_25m), args.prompts)
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results: dict = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "generation": {}, "sync": []}
    gen = results["generation"]
    gen["hf_generate"] = hf_generate_tps(model_25m, prompt_ids, args.n, args.new_tokens, threads=2)
    gen["grpo_ray_pool_logprobs"] = pool_generate_tps(model_25m, prompt_ids, args.n, args.new_tokens, cpus=2, logprobs=True)
    gen["grpo_ray_pool_no_logprobs"] = pool_generate_tps(model_25m, prompt_ids, args.n, args.new_tokens, cpus=2, logprobs=False)
    for size in SIZES:
        path = build_model(size, tiny, root)
        for transport in ("gloo", "object_store"):
            seconds, params = sync_seconds(path, transport)
            results["sync"].append({"model": size, "params": params, "transport": transport, "seconds": seconds})
    ray.shutdown()

    print(f"\nGeneration, 25M Qwen2, {args.prompts} prompts x {args.n} samples x {args.new_tokens} tokens (fp32, CPU)")
    print(f"{'generator':32s} {'tokens/s':>10s} {'vs HF':>7s}")
    for name, tps in gen.items():
        print(f"{name:32s} {tps:10.0f} {tps / gen['hf_generate']:6.2f}x")
    print("\nWeight sync (trainer process -> 1 vLLM engine, fp32)")
    print(f"{'model':8s} {'params':>12s} {'transport':>13s} {'seconds':>9s}")
    for row in results["sync"]:
        print(f"{row['model']:8s} {row['params']:12,d} {row['transport']:>13s} {row['seconds']:9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
