"""One owner per concept (issue 20): the shared helpers every caller now uses, checked on the
values the callers used to compute themselves. No Ray, no vLLM (a GPU config is only a dataclass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_ray import algorithm, sync
from grpo_ray.config import IS_MODES, LOSS_TYPES, TRANSPORTS, WEIGHT_SYNC, ConfigError, GRPOConfig, reward_file
from grpo_ray.jobs import local_references
from grpo_ray.resources import engine_bundle, required_cpus, run_bundles, total, trainer_bundle
from grpo_ray.rewards import RewardError, check_reward_specs
from grpo_ray.rollout import EngineSpec
from grpo_ray.text import suggest, text_table
from tests.conftest import quick_config


def test_suggest_phrases_the_closest_choices_or_nothing():
    assert suggest("lerning_rate", ["learning_rate", "beta"]) == "did you mean 'learning_rate'?"
    assert suggest("zero_stag", ["zero_stage"], prefix="cluster.") == "did you mean 'cluster.zero_stage'?"
    assert suggest("chain_su", ["chain_sum", "chain_sub", "basic"], n=3, cutoff=0.5, prefix="rg/") == "did you mean 'rg/chain_sum', 'rg/chain_sub'?"
    assert suggest(3, (0, 1, 2, 3), end=" ") == "did you mean '3'? "
    assert suggest("xyz", ["learning_rate"], end=" ") == ""


def test_text_table_markdown_and_plain():
    rows = [["a", 0.123456, True, None], ["bb", 2.0, False, "x"]]
    assert text_table(["trial", "lr", "done", "note"], rows).splitlines() == [
        "| trial | lr     | done | note |",
        "|-------|--------|------|------|",
        "| a     | 0.1235 | yes  |      |",
        "| bb    | 2      | no   | x    |",
    ]
    assert text_table(["ID", "STATUS", "COMMAND"], [["job-1", "RUNNING", "train --quick"]], markdown=False).splitlines() == [
        "ID     STATUS   COMMAND",
        "job-1  RUNNING  train --quick",
    ]
    assert text_table(["only"], []) == "| only |\n|------|"


@pytest.mark.parametrize(
    "spec, file, precheck",
    [
        ("accuracy", None, None),
        ("my_pkg.rewards:fn", None, None),  # a module: imported later, not checked before Ray starts
        ("rewards.py:fn", "rewards.py", "not found"),
        ("dir/rewards:fn", "dir/rewards", "not found"),
        ("/abs/r.py:fn", "/abs/r.py", "not found"),
        ("r.py:", None, "must look like"),  # no function: not a file spec, and refused as malformed
        (":fn", None, "must look like"),
    ],
)
def test_reward_file_is_one_rule(spec, file, precheck, tmp_path, monkeypatch):
    """`check_reward_specs` (the driver's check before Ray starts) asks the same rule: a spec it
    calls a file is looked for on disk, and passes once the file is there."""
    assert reward_file(spec) == file
    monkeypatch.chdir(tmp_path)
    if precheck is None:
        check_reward_specs([spec])
        return
    with pytest.raises(RewardError, match=precheck):
        check_reward_specs([spec])
    if file is not None and not file.startswith("/"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text("def fn(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
        check_reward_specs([spec])


def test_reward_file_rule_is_what_absolute_paths_and_job_staging_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "rewards").write_text("def fn(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "r.py").write_text("def fn(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    cfg = quick_config(tmp_path, reward_funcs=["accuracy", "dir/rewards:fn", "r.py:fn"])
    assert cfg.with_absolute_paths().reward_funcs == ["accuracy", f"{tmp_path}/dir/rewards:fn", f"{tmp_path}/r.py:fn"]
    assert local_references(cfg) == [("reward_funcs", "dir/rewards"), ("reward_funcs", "r.py")]


def test_bundles_are_computed_once_for_engines_trainers_and_the_embedded_ray(tmp_path):
    cfg = quick_config(tmp_path, cluster={"num_rollout_actors": 2, "rollout_num_cpus": 2, "trainer_num_cpus": 1, "rollout_resource": "rollout", "reward_num_cpus": 0.5})
    cl = cfg.cluster
    assert engine_bundle(cl) == {"CPU": 2.0, "rollout": 0.001} and trainer_bundle(cl) == {"CPU": 1.0}
    assert run_bundles(cfg) == [engine_bundle(cl)] * 2 + [trainer_bundle(cl), {"CPU": 0.5}]
    assert total(run_bundles(cfg)) == {"CPU": 5.5, "rollout": 0.002}
    assert required_cpus(cfg) == 2 * 2 + 1 + 1  # engines + trainer + the driver; reward headroom is not counted
    gpu = cfg.with_overrides({"cluster": {"use_gpu": True, "tensor_parallel_size": 2, "rollout_resource": None}})
    assert engine_bundle(gpu.cluster) == {"CPU": 2.0, "GPU": 2.0} and trainer_bundle(gpu.cluster) == {"CPU": 1.0, "GPU": 1.0}


def test_engine_spec_carries_dtype_gpu_and_tensor_parallelism_for_training_and_eval(tmp_path):
    cfg = quick_config(tmp_path, bf16=True, max_prompt_length=100, max_completion_length=28, cluster={"use_gpu": True, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.7, "kv_cache_gib": 3})
    spec = EngineSpec.from_config(cfg, "/m")
    assert (spec.model_path, spec.dtype, spec.max_model_len, spec.seed) == ("/m", "bfloat16", 128, cfg.seed)
    assert (spec.tensor_parallel_size, spec.use_gpu, spec.gpu_memory_utilization, spec.kv_cache_bytes) == (2, True, 0.7, 3 * 2**30)
    cpu = EngineSpec.from_config(quick_config(tmp_path, async_generation=True), "/m")
    assert cpu.dtype == "float32" and not cpu.use_gpu and cpu.env_vars == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_each_choice_list_has_one_owner():
    assert algorithm.LOSS_TYPES is LOSS_TYPES and sync.TRANSPORTS is TRANSPORTS and algorithm.IS_MODES is IS_MODES
    for loss in LOSS_TYPES:  # every loss algorithm computes is selectable, and nothing else is
        assert GRPOConfig(loss_type=loss, vllm_importance_sampling_mode="token_truncate").loss_type == loss
    with pytest.raises(ConfigError, match=r"loss_type='nope' is not supported"):
        GRPOConfig(loss_type="nope")


def test_every_weight_sync_choice_resolves_to_a_transport():
    """sync.resolve_transport reads config.WEIGHT_SYNC: each choice the config accepts becomes a transport."""
    for choice in WEIGHT_SYNC:
        for use_gpu in (False, True):
            assert sync.resolve_transport(choice, use_gpu) in TRANSPORTS
    assert [sync.resolve_transport("auto", gpu) for gpu in (False, True)] == ["gloo", "nccl"]
    with pytest.raises(ValueError, match=f"use one of {', '.join(WEIGHT_SYNC)}$"):
        sync.resolve_transport("tcp", False)


def test_kv_cache_auto_is_sized_from_the_batch_and_the_model(tmp_path):
    """`cluster.kv_cache_gib: auto`: (prompts per engine x num_generations + 1) sequences of
    context_length tokens at the model's KV bytes per token, rounded up to 32 MiB (the e2e check
    that vLLM agrees on the bytes per token is tests/test_rollout.py)."""
    import json
    import math

    from grpo_ray.models import kv_bytes_per_token
    from grpo_ray.resources import KV_GRANULE, kv_cache_bytes

    model = tmp_path / "m"
    model.mkdir()
    # SmolLM2-135M's shape: 30 layers, 9 query / 3 KV heads of 64
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    assert kv_bytes_per_token(str(model), 4) == 2 * 30 * 3 * 64 * 4 and kv_bytes_per_token(str(model), 2) == 2 * 30 * 3 * 64 * 2
    cfg = quick_config(tmp_path, num_generations=8, max_prompt_length=256, max_completion_length=256, per_device_train_batch_size=64, gradient_accumulation_steps=1)
    assert cfg.cluster.kv_cache_gib == "auto" and cfg.prompts_per_step == 8
    need = (8 * 8 + 1) * 512 * 46080
    assert kv_cache_bytes(cfg, str(model), 4) == math.ceil(need / KV_GRANULE) * KV_GRANULE == 1472 * 2**20
    two = cfg.with_overrides({"cluster": {"num_rollout_actors": 2}})  # each engine holds its share
    assert kv_cache_bytes(two, str(model), 4) == math.ceil((4 * 8 + 1) * 512 * 46080 / KV_GRANULE) * KV_GRANULE
    assert kv_cache_bytes(cfg, str(model), 2) == 736 * 2**20  # bf16: half the bytes (rounded up to 32 MiB)
    # explicit sizes are taken as given; a model without a readable config gets the fallback
    assert kv_cache_bytes(cfg.with_overrides({"cluster": {"kv_cache_gib": 1.5}}), str(model), 4) == int(1.5 * 2**30)
    assert kv_cache_bytes(cfg, "org/hub-id", 4) == 2**30
    gpu = cfg.with_overrides({"cluster": {"use_gpu": True}})  # on GPU: vLLM's gpu_memory_utilization, unless a size is given
    assert kv_cache_bytes(gpu, str(model), 2) is None
    assert kv_cache_bytes(gpu.with_overrides({"cluster": {"kv_cache_gib": 3}}), str(model), 2) == 3 * 2**30
    for bad in (0, -1, "big", True):
        with pytest.raises(ConfigError, match="cluster.kv_cache_gib"):
            quick_config(tmp_path, cluster={"kv_cache_gib": bad})


@pytest.mark.parametrize(
    "flags, expected",
    [("fpu sse avx2 fma", "float32"), ("fpu avx2 avx512f avx512_bf16", "bfloat16"), ("fpu avx2 amx_bf16 amx_tile", "bfloat16"), (None, "float32")],
    ids=["avx2", "avx512-bf16", "amx", "no-cpuinfo"],
)
def test_bf16_auto_is_native_bf16_from_the_cpu_flags(flags, expected, tmp_path, monkeypatch):
    """`bf16: auto` on CPU: bf16 only where the CPU has bf16 instructions (emulated bf16 is several
    times slower than fp32); the engines and the trainer ask the same function."""
    from grpo_ray import resources, trainer

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(resources, "CPUINFO", cpuinfo)
    cfg = quick_config(tmp_path, bf16="auto")
    assert EngineSpec.from_config(cfg, str(tmp_path)).dtype == expected
    assert trainer.native_bf16 is resources.native_bf16  # the trainer's precision comes from the same answer
    assert quick_config(tmp_path, bf16=False).resolved_precision(resources.native_bf16(False)) == "fp32"  # explicit wins


def test_release_freed_memory_hands_a_fragmented_heap_back_to_the_os(tmp_path):
    """What trainers (after each step) and engines (after each weight load) call: freed blocks in
    the middle of glibc's heap go back to the OS. Control: the same heap without the call keeps them."""
    import subprocess
    import sys

    probe = tmp_path / "frag.py"
    probe.write_text(
        "import sys, torch\n"
        "from grpo_ray.resources import release_freed_memory\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "first = torch.ones(256 * 1024); del first  # a freed 1 MiB mapping: glibc now keeps blocks this size in its heap\n"
        "blocks = [torch.ones(256 * 1024) for _ in range(400)]\n"
        "del blocks[::2]  # every other block freed: holes that trimming the heap's top cannot return\n"
        "before = rss()\n"
        "if sys.argv[1] == 'trim':\n"
        "    assert release_freed_memory()\n"
        "print(before - rss())\n"
    )
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux's /proc")
    freed = {arm: float(subprocess.run([sys.executable, str(probe), arm], capture_output=True, text=True, check=True).stdout) for arm in ("trim", "none")}
    assert freed["trim"] > 150 and freed["none"] < 20, freed  # MiB: 200 freed in holes
