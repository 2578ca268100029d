"""Config: the seed guide's GRPOConfig as YAML, presets, TRL 1.16 default parity, round-trip, one-line errors."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from grpo_ray.config import PRESETS, ClusterConfig, ConfigError, DataConfig, GRPOConfig, merge, parse_override

# The seed guide's "Basic GRPO Config" (shared/seed/000_60e5643c5d1f7659.txt) as YAML, every key
# and value as written there. `bf16=torch.cuda.is_bf16_supported()` / `fp16=not ...` are computed
# per machine, so they become "auto". `5e-6` is deliberately left as written: YAML 1.1 reads it as
# a string, which the config must accept as the float 5e-6.
SEED_YAML = textwrap.dedent(
    """\
    # Output
    output_dir: grpo_outputs

    # Batch settings
    per_device_train_batch_size: 1
    gradient_accumulation_steps: 4

    # GRPO specific
    num_generations: 8          # Samples per prompt
    max_new_tokens: 1024        # Max generation length
    temperature: 0.7            # Sampling temperature

    # Policy optimization
    beta: 0.001                 # KL penalty
    loss_type: bnpo             # GRPO variant

    # Training
    learning_rate: 5e-6         # Lower than SFT
    max_steps: 500
    logging_steps: 1
    save_steps: 100

    # Optimizer
    optim: adamw_8bit
    warmup_ratio: 0.1

    # Precision
    bf16: auto
    fp16: auto
    """
)
# The seed's batch (1 x 4 = 4 completions per step) cannot hold one group of 8 on a single
# trainer worker, in TRL as here. The `balanced` preset adds exactly this to make it valid.
SEED_CLUSTER_FIX = "cluster:\n  num_trainer_workers: 2\n"

# The seed's presets: (num_generations, beta, learning_rate, temperature).
SEED_PRESETS = {
    "balanced": (8, 0.001, 5e-6, 0.7),
    "aggressive": (4, 0.0001, 1e-5, 0.8),
    "conservative": (16, 0.01, 2e-6, 0.6),
}

# Fields whose default deliberately differs from trl.GRPOConfig 1.16 (field default, not post-init):
DELIBERATE_DEVIATIONS = {
    "output_dir": ("grpo_outputs", None),  # TRL: None -> "trainer_output" in __post_init__
    "max_steps": (500, -1),  # TRL: -1 = train for num_train_epochs; grpo-ray has no epochs
    "report_to": (["tensorboard"], "none"),  # grpo-ray logs to TensorBoard out of the box
}
# grpo-ray's own fields, absent from trl.GRPOConfig 1.16 (a typo'd TRL name would land here).
NOT_IN_TRL = {
    "model_name_or_path",  # TRL: ModelConfig / the trainer's `model` argument
    "reward_funcs",  # TRL: GRPOTrainer(reward_funcs=...)
    "max_prompt_length",  # dropped from TRL's GRPOConfig in 1.x; grpo-ray still truncates prompts
    "warmup_ratio",  # transformers 5 folded it into a fractional `warmup_steps`
    "eval_at_start_and_end",  # held-out accuracy before/after, written to eval.json
    "eval_limit",
    "async_generation",  # overlap generation with the update (TRL 1.16 has no async GRPOConfig)
    "max_staleness",
    "max_logprob_mismatch",  # the engines sampled from other weights than the trainer's: stop
    "max_bad_steps",  # NaN/inf updates skipped; this many in a row stop the run
    "all_none_rewards",  # a step where every reward function returns None for every sample: error (default) or warn
    "dynamic_sampling", "dynamic_sampling_max_rounds",  # DAPO: drop zero-variance groups, sample more prompts
    "shared_prompt_packing",  # the update runs each prompt once for several completions (exact)
    "tools", "environment_factory",  # TRL: GRPOTrainer(tools=..., environment_factory=...)
    # TRL: ModelConfig (use_peft, lora_*, load_in_4bit; defaults checked in tests/test_lora.py), GRPOTrainer(peft_config=...)
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "peft_config", "lora_sync", "load_in_4bit",
    "data",
    "cluster",
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _error(exc_info: pytest.ExceptionInfo) -> str:
    """The ConfigError's message, checked to be the promised single line."""
    msg = str(exc_info.value)
    assert "\n" not in msg, f"multi-line ConfigError: {msg!r}"
    assert msg.strip(), "empty ConfigError"
    return msg


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _load(tmp_path: Path, text: str) -> GRPOConfig:
    return GRPOConfig.from_yaml(_write(tmp_path, text))


def _raises(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.from_dict(raw)
    return _error(exc_info)


# ---------------------------------------------------------------------- the seed guide
def test_seed_basic_config_exactly_as_written_rounds_the_generation_round_up_to_a_group(tmp_path, caplog):
    """1 x 4 x 1 worker = 4 completions < one group of 8: TRL 1.16 rejects this (generation_batch_size (4)
    must be divisible by num_generations (8)). grpo-ray runs it: with steps_per_generation unset, one
    generation round of 8 completions feeds two optimizer steps of 4, and the log says so once."""
    caplog.set_level("WARNING", logger="grpo_ray")
    cfg = _load(tmp_path, SEED_YAML)
    assert (cfg.resolved_steps_per_generation, cfg.completions_per_step, cfg.optimizer_steps_per_round) == (8, 8, 2)
    assert cfg.steps_per_generation is None and cfg.generation_batch_size is None  # run_config.yaml keeps what was set
    assert any("steps_per_generation=8" in r.getMessage() for r in caplog.records)
    # An explicit steps_per_generation that splits a group is refused, with the fix.
    with pytest.raises(ConfigError) as exc_info:
        _load(tmp_path, SEED_YAML + "steps_per_generation: 4\n")
    msg = _error(exc_info)
    assert "= 4 completions per generation round" in msg and "steps_per_generation=8" in msg


def test_seed_basic_config_loads_from_yaml_once_the_batch_holds_a_group(tmp_path):
    cfg = _load(tmp_path, SEED_YAML + SEED_CLUSTER_FIX)
    # TRL spelling max_new_tokens -> our max_completion_length
    assert cfg.max_completion_length == 1024
    assert "max_new_tokens" not in cfg.to_dict()
    # YAML 1.1 reads `5e-6` as the string "5e-6"; it must arrive as a float
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 5e-6
    assert (cfg.output_dir, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == ("grpo_outputs", 1, 4)
    assert (cfg.num_generations, cfg.temperature, cfg.beta, cfg.loss_type) == (8, 0.7, 0.001, "bnpo")
    assert (cfg.max_steps, cfg.logging_steps, cfg.save_steps, cfg.warmup_ratio) == (500, 1, 100, 0.1)
    assert (cfg.bf16, cfg.fp16) == ("auto", "auto")
    assert cfg.total_warmup_steps == 50
    assert (cfg.completions_per_step, cfg.prompts_per_step) == (8, 1)
    # The `balanced` preset is this file.
    assert cfg == GRPOConfig.preset("balanced")
    # The other fix the error suggests also loads.
    alt = _load(tmp_path, SEED_YAML.replace("gradient_accumulation_steps: 4", "gradient_accumulation_steps: 8"))
    assert (alt.completions_per_step, alt.prompts_per_step) == (8, 1)


def test_seed_optim_adamw_8bit_falls_back_on_cpu_only(tmp_path):
    cfg = _load(tmp_path, SEED_YAML + SEED_CLUSTER_FIX)
    assert cfg.optim == "adamw_8bit"
    optim, notice = cfg.resolved_optim(on_gpu=False)
    assert optim == "adamw_torch"
    assert notice is not None and "adamw_8bit" in notice and "\n" not in notice
    assert cfg.resolved_optim(on_gpu=True) == ("adamw_8bit", None)
    # An optimizer that runs anywhere gets no notice.
    plain = cfg.with_overrides({"optim": "adamw_torch"})
    assert plain.resolved_optim(on_gpu=False) == ("adamw_torch", None)
    fused = cfg.with_overrides({"optim": "adamw_torch_fused"})  # torch's fused AdamW has a CPU kernel
    assert fused.resolved_optim(on_gpu=False) == ("adamw_torch_fused", None)


def test_seed_precision_auto_follows_the_device(tmp_path):
    """Seed: bf16 = is_bf16_supported(), fp16 = not is_bf16_supported() (a CUDA machine)."""
    cpu = _load(tmp_path, SEED_YAML + SEED_CLUSTER_FIX)
    assert cpu.resolved_precision(device_supports_bf16=True) == "bf16"
    assert cpu.resolved_precision(device_supports_bf16=False) == "fp32"  # no fp16 on CPU
    gpu = cpu.with_overrides({"cluster": {"use_gpu": True}})
    assert gpu.resolved_precision(device_supports_bf16=True) == "bf16"
    assert gpu.resolved_precision(device_supports_bf16=False) == "fp16"  # e.g. a T4/V100


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(SEED_PRESETS))
def test_preset_has_the_seed_values(name):
    cfg = GRPOConfig.preset(name)
    assert (cfg.num_generations, cfg.beta, cfg.learning_rate, cfg.temperature) == SEED_PRESETS[name]
    # every preset is a valid, whole-group batch
    assert cfg.completions_per_step % cfg.num_generations == 0 and cfg.prompts_per_step >= 1
    # what the seed's snippets do not change comes from the basic config
    assert (cfg.loss_type, cfg.max_completion_length, cfg.optim) == ("bnpo", 1024, "adamw_8bit")


@pytest.mark.parametrize("name", sorted(SEED_PRESETS))
def test_preset_overrides_win(name):
    cfg = GRPOConfig.preset(name, beta=0.05, temperature=0.9, learning_rate="3e-6", cluster={"zero_stage": 2})
    assert (cfg.beta, cfg.temperature, cfg.learning_rate) == (0.05, 0.9, 3e-6)
    assert cfg.cluster.zero_stage == 2
    assert cfg.cluster.num_trainer_workers == 2  # nested override merges, not replaces
    assert cfg.num_generations == SEED_PRESETS[name][0]
    # overrides are validated like everything else
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.preset(name, beta=-1)
    assert "beta" in _error(exc_info)


def test_preset_does_not_mutate_the_table():
    before = {k: dict(v) for k, v in PRESETS.items()}
    GRPOConfig.preset("balanced", cluster={"num_trainer_workers": 4}, num_generations=4)
    assert {k: dict(v) for k, v in PRESETS.items()} == before


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.preset("turbo")
    msg = _error(exc_info)
    assert "turbo" in msg
    for name in SEED_PRESETS:
        assert name in msg


def test_preset_override_by_canonical_name_of_an_aliased_key():
    assert GRPOConfig.preset("balanced", max_completion_length=256).max_completion_length == 256


def test_preset_override_by_alias():
    assert GRPOConfig.preset("balanced", max_new_tokens=256).max_completion_length == 256


# ---------------------------------------------------------------------- TRL 1.16 parity
def test_defaults_match_trl_1_16_except_documented_deviations():
    import trl  # ~2-8 s, once

    assert trl.__version__.startswith("1.16."), f"config mirrors TRL 1.16, found {trl.__version__}"
    theirs = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    ours = {f.name: f for f in dataclasses.fields(GRPOConfig)}

    assert set(ours) - set(theirs) == NOT_IN_TRL

    differing = {}
    for name in sorted(set(ours) & set(theirs)):
        mine, trls = _default(ours[name]), _default(theirs[name])
        if mine != trls:
            differing[name] = (mine, trls)
    assert differing == DELIBERATE_DEVIATIONS
    # bf16 is *not* a deviation: None means "auto" in both.
    assert _default(ours["bf16"]) is None and _default(theirs["bf16"]) is None


def test_trl_rejects_the_seed_batch_on_one_process_too():
    """The seed as written is invalid for TRL itself on one process: the rejection above is parity, not a grpo-ray quirk."""
    import trl

    with pytest.raises(ValueError, match="divisible by num_generations"):
        trl.GRPOConfig(
            output_dir="unused",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            num_generations=8,
            max_completion_length=1024,
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to="none",
        )


def test_default_config_is_valid_and_consistent():
    cfg = GRPOConfig()
    assert cfg.data == DataConfig() and cfg.cluster == ClusterConfig()
    assert cfg.completions_per_step == 8 and cfg.prompts_per_step == 1
    assert GRPOConfig.from_dict({}) == cfg


# ---------------------------------------------------------------------- YAML round-trip
def test_to_yaml_from_yaml_round_trip(tmp_path):
    cfg = GRPOConfig.preset(
        "aggressive",
        model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct",
        reward_funcs=["accuracy", "format", "length"],
        reward_weights=[1.0, 0.5, 0.1],
        epsilon_high=0.28,
        min_p=0.05,
        max_prompt_length=None,
        report_to=["tensorboard", "mlflow"],
        data={
            "task": "reasoning_gym/basic_arithmetic",
            "config": {"min_terms": 2, "max_terms": 4, "operators": ["+", "-"]},
            "size": 64,
            "system_prompt": "Think step by step.\nAnswer in <answer></answer>.",
            "eval_split": "test",
        },
        cluster={"num_rollout_actors": 2, "zero_stage": 3, "use_gpu": True, "weight_sync": "nccl", "address": "auto"},
    )
    path = tmp_path / "out.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    back = GRPOConfig.from_yaml(path)
    assert back == cfg
    assert back.data == cfg.data and back.cluster == cfg.cluster
    assert back.data.config == {"min_terms": 2, "max_terms": 4, "operators": ["+", "-"]}
    assert isinstance(back.learning_rate, float) and back.learning_rate == 1e-5
    assert back.to_yaml() == text  # stable


def test_round_trip_of_defaults(tmp_path):
    cfg = GRPOConfig()
    path = tmp_path / "d.yaml"
    cfg.to_yaml(path)
    assert GRPOConfig.from_yaml(path) == cfg


# ---------------------------------------------------------------------- validation messages
def test_unknown_top_level_key_suggests_the_field():
    msg = _raises({"lerning_rate": 1e-5})
    assert "lerning_rate" in msg and "'learning_rate'" in msg and "did you mean" in msg


def test_unknown_nested_key_suggests_the_field():
    msg = _raises({"cluster": {"num_trainer_worker": 2}})
    assert "cluster.num_trainer_worker" in msg and "'cluster.num_trainer_workers'" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _raises({"data": {"zzzzzz": 1}})
    assert "data.zzzzzz" in msg and "valid keys" in msg and "task" in msg


@pytest.mark.parametrize(
    "raw, field, expected",
    [
        ({"learning_rate": "abc"}, "learning_rate", "expected a number"),
        ({"num_generations": 2.5}, "num_generations", "expected an integer"),
        ({"num_generations": "many"}, "num_generations", "expected an integer"),
        ({"num_generations": True}, "num_generations", "expected an integer"),
        ({"gradient_checkpointing": "yes please"}, "gradient_checkpointing", "expected true or false"),
        ({"bf16": "maybe"}, "bf16", '"auto"'),
        ({"fp16": "maybe"}, "fp16", '"auto"'),
        ({"reward_funcs": {"accuracy": 1}}, "reward_funcs", "expected a list"),
        ({"cluster": 4}, "cluster", "expected a section"),
        ({"data": {"config": [1, 2]}}, "data.config", "expected a mapping"),
        ({"reward_weights": [1.0, "x"]}, "reward_weights[1]", "expected a number"),
    ],
)
def test_wrong_type_names_field_and_expectation(raw, field, expected):
    msg = _raises(raw)
    assert msg.startswith(field), msg
    assert expected in msg


@pytest.mark.parametrize(
    "raw, field, hint",
    [
        ({"beta": -0.1}, "beta=-0.1", "0.001"),
        ({"temperature": 0}, "temperature=0", "0.7"),
        ({"temperature": -1.0}, "temperature=-1.0", "0.7"),
        ({"num_generations": 1, "per_device_train_batch_size": 1}, "num_generations=1", "num_generations >= 2"),
        ({"learning_rate": 0}, "learning_rate=0", "1e-6"),
        ({"warmup_ratio": 1.0}, "warmup_ratio=1.0", "0.1"),
        ({"max_steps": 0}, "max_steps=0", "max_steps: 100"),
        ({"top_p": 0}, "top_p=0", "1.0"),
        ({"epsilon_high": 0.1}, "epsilon_high=0.1", "epsilon (0.2)"),
        ({"bf16": True, "fp16": True}, "bf16 and fp16", "only one"),
        ({"reward_funcs": []}, "reward_funcs", "accuracy"),
        ({"cluster": {"zero_stage": 4}}, "cluster.zero_stage=4", "use one of 0, 1, 2, 3"),
        ({"cluster": {"num_trainer_workers": 0}}, "cluster.num_trainer_workers=0", ">= 1"),
        ({"data": {"size": 0}}, "data.size=0", ">= 1"),
    ],
)
def test_range_checks_name_field_and_fix(raw, field, hint):
    msg = _raises(raw)
    assert field in msg and hint in msg, msg


def test_batch_not_divisible_by_num_generations_names_every_factor_and_a_fix():
    raw = {"per_device_train_batch_size": 3, "steps_per_generation": 1, "num_generations": 4, "cluster": {"num_trainer_workers": 2}}
    msg = _raises(raw)
    for name in ("per_device_train_batch_size", "steps_per_generation", "cluster.num_trainer_workers", "num_generations=4"):
        assert name in msg
    assert "= 6 completions" in msg
    assert "steps_per_generation=2" in msg  # 3 x 2 x 2 = 12, the smallest multiple of 4
    fixed = GRPOConfig.from_dict(merge(raw, {"steps_per_generation": 2}))
    assert (fixed.completions_per_step, fixed.prompts_per_step) == (12, 3)
    # unset, the round is rounded up to the same fix
    auto = GRPOConfig.from_dict({k: v for k, v in raw.items() if k != "steps_per_generation"})
    assert (auto.resolved_steps_per_generation, auto.completions_per_step) == (2, 12)


def test_batch_divisibility_counts_trainer_workers():
    # 2 x 2 = 4 completions: not a group of 8 on one worker, exactly one on two
    raw = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "steps_per_generation": 2, "num_generations": 8}
    assert "= 4 completions" in _raises(raw)
    assert GRPOConfig.from_dict(merge(raw, {"cluster": {"num_trainer_workers": 2}})).prompts_per_step == 1


def test_unknown_loss_type_suggests_a_close_one():
    msg = _raises({"loss_type": "grpoo"})
    assert "loss_type='grpoo'" in msg and "did you mean 'grpo'" in msg and "dapo" in msg


@pytest.mark.parametrize("field", ["scale_rewards", "optim", "lr_scheduler_type", "importance_sampling_level"])
def test_other_enums_list_the_choices(field):
    msg = _raises({field: "nonsense"})
    assert msg.startswith(f"{field}='nonsense'") and "use one of" in msg


def test_reward_weights_length_mismatch():
    msg = _raises({"reward_funcs": ["accuracy", "format"], "reward_weights": [1.0]})
    assert "reward_weights" in msg and "1 values for 2 reward_funcs" in msg and "one weight per function" in msg
    ok = GRPOConfig.from_dict({"reward_funcs": ["accuracy", "format"], "reward_weights": [1, 0.5]})
    assert ok.reward_weights == [1.0, 0.5] and all(isinstance(w, float) for w in ok.reward_weights)


def test_weight_sync_nccl_needs_gpu():
    msg = _raises({"cluster": {"weight_sync": "nccl"}})
    assert "cluster.weight_sync='nccl'" in msg and "use_gpu: true" in msg and "gloo" in msg
    assert GRPOConfig.from_dict({"cluster": {"weight_sync": "nccl", "use_gpu": True}}).cluster.weight_sync == "nccl"


def test_unknown_weight_sync_suggests():
    msg = _raises({"cluster": {"weight_sync": "ncll"}})
    assert "cluster.weight_sync='ncll'" in msg and "did you mean 'nccl'" in msg


@pytest.mark.parametrize(
    ("cluster", "async_generation", "expected"),
    [
        ({}, False, {}),  # sync on CPU: one phase at a time, OpenMP's default spinning is fine
        ({}, True, {"OMP_WAIT_POLICY": "PASSIVE"}),  # async on CPU: generation and update share the cores
        ({"use_gpu": True}, True, {}),  # GPU: the CPU threads mostly wait on the device anyway
        ({"omp_wait": "passive"}, False, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"omp_wait": "short_spin"}, True, {"GOMP_SPINCOUNT": "10000"}),
        ({"omp_wait": "inherit"}, True, {}),
    ],
)
def test_omp_wait_sets_the_engine_and_trainer_environment(monkeypatch, cluster, async_generation, expected):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert GRPOConfig.from_dict({"async_generation": async_generation, "cluster": cluster}).process_env() == expected


def test_omp_wait_auto_leaves_an_explicit_environment_alone(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert GRPOConfig.from_dict({"async_generation": True}).process_env() == {}
    assert GRPOConfig.from_dict({"cluster": {"omp_wait": "short_spin"}}).process_env() == {"GOMP_SPINCOUNT": "10000"}


def test_unknown_omp_wait_suggests():
    msg = _raises({"cluster": {"omp_wait": "pasive"}})
    assert "cluster.omp_wait='pasive'" in msg and "did you mean 'passive'" in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "learning_rate: 1e-5\nbeta: 0.0\nloss_type: [dapo\nseed: 1\n", "bad.yaml")
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.from_yaml(path)
    msg = _error(exc_info)
    assert str(path) in msg and "malformed YAML" in msg
    assert "line 4" in msg  # PyYAML notices the unclosed flow sequence on the next line


def test_malformed_yaml_mapping_error_names_line(tmp_path):
    path = _write(tmp_path, "beta: 0.0\ntemperature: 0.7: 1\n", "bad2.yaml")
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.from_yaml(path)
    msg = _error(exc_info)
    assert "line 2" in msg and "bad2.yaml" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.from_yaml(_write(tmp_path, "- beta: 0.1\n"))
    assert "mapping" in _error(exc_info)


def test_empty_yaml_is_refused(tmp_path):
    """An empty file used to train the built-in defaults (not even the demo) for minutes, silently."""
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.from_yaml(_write(tmp_path, "# nothing\n"))
    assert "is empty" in _error(exc_info)


def test_override_through_an_alias_replaces_the_field():
    """`--set max_new_tokens=8` on a config that holds max_completion_length: one value, the new one."""
    cfg = GRPOConfig().with_overrides(parse_override("max_new_tokens=8"))
    assert cfg.max_completion_length == 8
    assert GRPOConfig.from_dict(merge(GRPOConfig().to_dict(), parse_override("model=tiny-arith"))).model_name_or_path == "tiny-arith"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "run.yaml"
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig.from_yaml(missing)
    msg = _error(exc_info)
    assert str(missing) in msg and "does not exist" in msg and "check the path" in msg


def test_alias_and_canonical_key_together_is_an_error():
    msg = _raises({"max_new_tokens": 256, "max_completion_length": 512})
    assert "given twice" in msg and "keep one" in msg


# ---------------------------------------------------------------------- YAML 1.1 number quirks
@pytest.mark.parametrize("text, value", [("5e-6", 5e-6), ("1e-5", 1e-5), ("5.0e-6", 5e-6), ("0.000005", 5e-6), ("1", 1.0)])
def test_learning_rate_accepts_yaml_1_1_exponents(tmp_path, text, value):
    cfg = _load(tmp_path, f"learning_rate: {text}\n")
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == value


def test_pyyaml_really_reads_5e_minus_6_as_a_string():
    """Guards the test above: if PyYAML ever parses it as float, the quirk test stops testing anything."""
    import yaml

    assert yaml.safe_load("x: 5e-6") == {"x": "5e-6"}


def test_integer_fields_accept_whole_floats_and_numeric_strings(tmp_path):
    cfg = _load(tmp_path, "max_steps: 1e3\nnum_generations: '4'\nsave_steps: 50.0\n")
    assert (cfg.max_steps, cfg.num_generations, cfg.save_steps) == (1000, 4, 50)
    assert all(type(v) is int for v in (cfg.max_steps, cfg.num_generations, cfg.save_steps))


# ---------------------------------------------------------------------- CLI overrides
def test_parse_override_nested():
    assert parse_override("cluster.zero_stage=3") == {"cluster": {"zero_stage": 3}}
    assert parse_override("learning_rate=5e-6") == {"learning_rate": "5e-6"}  # coerced on merge
    assert parse_override("data.config={min_terms: 2}") == {"data": {"config": {"min_terms": 2}}}
    assert parse_override("output_dir=a=b") == {"output_dir": "a=b"}
    assert parse_override("epsilon_high=") == {"epsilon_high": None}


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError) as exc_info:
        parse_override("cluster.zero_stage")
    msg = _error(exc_info)
    assert "cluster.zero_stage" in msg and "key=value" in msg


def test_with_overrides_merges_nested_sections():
    base = GRPOConfig.preset("balanced")
    cfg = base.with_overrides(parse_override("cluster.zero_stage=3"))
    assert cfg.cluster.zero_stage == 3
    assert cfg.cluster.num_trainer_workers == 2  # untouched sibling kept
    assert dataclasses.replace(cfg, cluster=base.cluster) == base  # nothing else changed
    assert base.cluster.zero_stage == 0  # original not mutated
    more = cfg.with_overrides(parse_override("learning_rate=2e-6")).with_overrides(parse_override("loss_type=grpo"))
    assert (more.learning_rate, more.loss_type, more.cluster.zero_stage) == (2e-6, "grpo", 3)


def test_with_overrides_validates():
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig().with_overrides(parse_override("cluster.zero_stage=5"))
    assert "cluster.zero_stage=5" in _error(exc_info)
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig().with_overrides(parse_override("cluster.num_trainer_worker=2"))
    assert "'cluster.num_trainer_workers'" in _error(exc_info)


def test_with_overrides_accepts_trl_aliases():
    assert GRPOConfig().with_overrides(parse_override("max_new_tokens=256")).max_completion_length == 256


def test_parse_override_malformed_value_is_a_config_error():
    with pytest.raises(ConfigError) as exc_info:
        parse_override("reward_funcs=[accuracy,")
    assert "reward_funcs" in _error(exc_info)


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    "bf16, fp16, use_gpu, supports, expected",
    [
        (None, False, False, True, "bf16"),  # the default: auto
        (None, False, False, False, "fp32"),
        ("auto", False, True, True, "bf16"),
        ("auto", False, True, False, "fp32"),  # fp16 explicitly off
        ("auto", "auto", True, False, "fp16"),
        ("auto", "auto", False, False, "fp32"),
        (True, False, False, False, "bf16"),  # explicit wins over the device flag
        (False, False, True, True, "fp32"),
        (False, True, True, True, "fp16"),
        (False, "auto", True, True, "fp16"),
        (False, "auto", False, True, "fp32"),
        (False, True, False, False, "fp32"),  # fp16 on CPU (the seed on a CPU machine): fp32, with a notice
        ("true", "false", False, False, "bf16"),  # YAML strings coerced to bools
    ],
)
def test_resolved_precision(bf16, fp16, use_gpu, supports, expected):
    cfg = GRPOConfig.from_dict({"bf16": bf16, "fp16": fp16, "cluster": {"use_gpu": use_gpu}})
    assert cfg.resolved_precision(device_supports_bf16=supports) == expected


def test_resolved_precision_auto_bf16_yields_to_explicit_fp16():
    cfg = GRPOConfig.from_dict({"bf16": "auto", "fp16": True, "cluster": {"use_gpu": True}})
    assert cfg.resolved_precision(device_supports_bf16=True) == "fp16"


# ---------------------------------------------------------------------- derived sizes
@pytest.mark.parametrize(
    "per_device, accum, workers, gens, completions, prompts",
    [(8, 1, 1, 8, 8, 1), (4, 4, 2, 8, 32, 4), (1, 4, 2, 8, 8, 1), (3, 2, 3, 6, 18, 3), (2, 1, 1, 2, 2, 1)],
)
def test_completions_and_prompts_per_step(per_device, accum, workers, gens, completions, prompts):
    cfg = GRPOConfig.from_dict(
        {
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accum,
            "num_generations": gens,
            "cluster": {"num_trainer_workers": workers},
        }
    )
    assert cfg.completions_per_step == completions
    assert cfg.prompts_per_step == prompts
    assert cfg.prompts_per_step * cfg.num_generations == cfg.completions_per_step


def test_total_warmup_steps():
    assert GRPOConfig.from_dict({"warmup_ratio": 0.1, "max_steps": 200}).total_warmup_steps == 20
    assert GRPOConfig.from_dict({"warmup_ratio": 0.1, "warmup_steps": 7}).total_warmup_steps == 7  # steps win
    assert GRPOConfig().total_warmup_steps == 0


# ---------------------------------------------------------------------- async generation
def test_staleness_follows_async_generation():
    assert GRPOConfig().staleness == 0
    assert GRPOConfig.from_dict({"async_generation": True}).staleness == 1
    assert GRPOConfig.from_dict({"async_generation": True, "max_staleness": 2}).staleness == 2
    assert GRPOConfig.from_dict({"async_generation": False, "max_staleness": 0}).staleness == 0


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"max_staleness": 1}, "max_staleness=1 requires async_generation: true"),
        ({"async_generation": True, "max_staleness": 0}, "set max_staleness >= 1"),
        ({"async_generation": True, "max_staleness": -1}, "max_staleness=-1: must be >= 0"),
        ({"async_generation": "sometimes"}, "async_generation: expected true or false"),
    ],
)
def test_async_generation_validation(raw, expected):
    with pytest.raises(ConfigError) as exc:
        GRPOConfig.from_dict(raw)
    assert expected in _error(exc)
