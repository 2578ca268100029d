"""`GRPOConfig(**kwargs)` is the YAML path, the seed guide's snippets run verbatim, and every field of
`trl.GRPOConfig` 1.16 is implemented, accepted-as-meaningless (logged once) or refused in one line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from grpo_ray import trl_compat
from grpo_ray.config import ALIASES, ConfigError, GRPOConfig

SEED = Path("/work/shared/seed/000_60e5643c5d1f7659.txt")
if not SEED.is_file():  # a clone without the shared folder: the repo's copy of the guide's snippets
    SEED = Path(__file__).parent / "data" / "seed_guide.txt"


def seed_snippets() -> list[str]:
    blocks = re.findall(r'<syntaxhighlight lang="python">\n(.*?)</syntaxhighlight>', SEED.read_text(), re.DOTALL)
    assert len(blocks) == 4, "the seed guide has 4 Python snippets (basic, key hyperparameters, aggressive, conservative)"
    return blocks


def run_snippet(code: str) -> dict:
    """Exec a snippet with only `from trl import GRPOConfig` changed; the first snippet imports it."""
    code = code.replace("from trl import GRPOConfig", "from grpo_ray import GRPOConfig")
    scope: dict = {}
    exec(compile("from grpo_ray import GRPOConfig\n" + code, str(SEED), "exec"), scope)
    return scope


def _error(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


def test_seed_snippets_run_verbatim_with_the_import_changed():
    basic, hyper, aggressive, conservative = seed_snippets()
    assert "from trl import GRPOConfig" in basic  # the only line we change
    cfg = run_snippet(basic)["config"]
    assert (cfg.max_completion_length, cfg.loss_type, cfg.beta, cfg.optim, cfg.learning_rate) == (1024, "bnpo", 0.001, "adamw_8bit", 5e-6)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.num_generations) == (1, 4, 8)
    import torch

    assert (cfg.bf16, cfg.fp16) == (torch.cuda.is_bf16_supported(), not torch.cuda.is_bf16_supported())
    assert cfg.completions_per_step == 8 and cfg.optimizer_steps_per_round == 2  # whole groups of 8
    run_snippet(hyper)  # comments only
    agg = run_snippet(aggressive)["config"]
    assert (agg.num_generations, agg.beta, agg.learning_rate, agg.temperature, agg.completions_per_step) == (4, 0.0001, 1e-5, 0.8, 8)
    con = run_snippet(conservative)["config"]
    assert (con.num_generations, con.beta, con.learning_rate, con.temperature) == (16, 0.01, 2e-6, 0.6)
    assert (con.completions_per_step, con.resolved_steps_per_generation) == (16, 2)  # TRL itself refuses 8 % 16


def test_kwargs_equal_the_yaml_path(tmp_path):
    raw = {"max_new_tokens": 64, "learning_rate": "5e-6", "report_to": "none", "cluster": {"zero_stage": 2}, "num_iterations": 2.0}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    by_kwargs = GRPOConfig(**raw)
    assert by_kwargs == GRPOConfig.from_yaml(path) == GRPOConfig.from_dict(raw)
    assert (by_kwargs.max_completion_length, by_kwargs.learning_rate, by_kwargs.report_to) == (64, 5e-6, [])
    assert by_kwargs.cluster.zero_stage == 2 and isinstance(by_kwargs.num_iterations, int)
    assert dataclasses.replace(by_kwargs, beta=0.1).beta == 0.1  # dataclass tools still work


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_generation": 8}, "unknown config key 'num_generation': did you mean 'num_generations'?"),
        ({"max_new_token": 8}, "did you mean 'max_new_tokens'?"),
        ({"cluster": {"zero_stag": 2}}, "did you mean 'cluster.zero_stage'?"),
        ({"max_new_tokens": 8, "max_completion_length": 8}, "given twice"),
        ({"beta": -1}, "beta=-1"),
        ({"loss_type": "vespoo"}, "did you mean 'vespo'?"),
        ({"temperature": "hot"}, "temperature: expected a number"),
        ({"push_to_hub": True}, "push_to_hub=True is not supported: grpo-ray does not push to the Hub"),
        ({"steps_per_generation": 2, "generation_batch_size": 16}, "set only one"),
        ({"steps_per_generation": 3, "gradient_accumulation_steps": 2}, "not a multiple of gradient_accumulation_steps=2"),
        ({"loss_type": "vespo"}, "token_mask or token_truncate"),
        ({"eval_strategy": "epoch"}, "eval_strategy='epoch' is not supported"),
        ({"multi_objective_aggregation": "sum"}, "use one of sum_then_normalize, normalize_then_sum"),
    ],
)
def test_kwargs_mistakes_are_one_line_config_errors(kwargs, expected):
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig(**kwargs)
    assert expected in _error(exc_info)


@pytest.mark.parametrize(
    "per_device, accumulation, workers, generation_batch_size, steps_per_generation",
    [
        (4, 1, 1, 16, 4),  # unset, this batch would be one micro-batch a round (4 % 4 == 0)
        (3, 1, 1, 12, 4),
        (2, 2, 1, 8, 4),
        (4, 2, 2, 32, 4),  # the divisor counts every trainer worker (TRL: num_processes)
        (4, 2, 2, 16, 2),
    ],
)
def test_generation_batch_size_resolves_to_steps_per_generation(per_device, accumulation, workers, generation_batch_size, steps_per_generation):
    """TRL: steps_per_generation = generation_batch_size // (per_device_train_batch_size * num_processes);
    one round then samples exactly generation_batch_size completions, for spg / accumulation optimizer steps."""
    cfg = GRPOConfig(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, num_generations=4,
                     generation_batch_size=generation_batch_size, cluster={"num_trainer_workers": workers})  # fmt: skip
    assert cfg.resolved_steps_per_generation == steps_per_generation
    assert cfg.completions_per_step == generation_batch_size
    assert cfg.optimizer_steps_per_round == steps_per_generation // accumulation
    assert cfg.steps_per_generation is None  # what was set is what run_config.yaml keeps
    if workers == 1:  # TRL itself, on one process
        import trl

        theirs = trl.GRPOConfig(output_dir="unused", per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                                num_generations=4, generation_batch_size=generation_batch_size, use_cpu=True, bf16=False, fp16=False,
                                report_to="none")  # fmt: skip
        assert (theirs.steps_per_generation, theirs.generation_batch_size) == (steps_per_generation, generation_batch_size)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def test_every_trl_grpo_config_field_is_implemented_meaningless_or_refused():
    """A field a new TRL adds fails here until it is placed (config.py or trl_compat)."""
    import trl

    theirs = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    ours = {f.name for f in dataclasses.fields(GRPOConfig)}
    implemented = (set(theirs) & ours) | {k for k in ALIASES if k in theirs}
    meaningless, refused = set(trl_compat.MEANINGLESS), set(trl_compat.REFUSED)
    assert not (implemented & meaningless) and not (implemented & refused) and not (meaningless & refused)
    unplaced = set(theirs) - implemented - meaningless - refused
    assert not unplaced, f"TRL fields with no decision: {sorted(unplaced)}"
    assert not (meaningless | refused) - set(theirs), "trl_compat lists names TRL 1.16 does not have"
    # a refused key is accepted only at TRL's own default: check we recorded that default right
    wrong = {k: (d, _default(theirs[k])) for k, (d, _) in trl_compat.REFUSED.items() if d != _default(theirs[k])}
    assert not wrong, wrong


def _another(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    return ["x"] if isinstance(default, list) else "something-else"


@pytest.mark.parametrize("name", sorted(trl_compat.REFUSED))
def test_refused_key_takes_trl_default_and_refuses_anything_else_in_one_line(name):
    default, why = trl_compat.REFUSED[name]
    assert GRPOConfig(**{name: default}) == GRPOConfig()  # TRL's default is what grpo-ray does
    other = _another(default)
    with pytest.raises(ConfigError) as exc_info:
        GRPOConfig(**{name: other})
    assert _error(exc_info) == f"{name}={other!r} is not supported: {why}"


def test_meaningless_key_is_accepted_and_said_once_in_the_log(caplog):
    caplog.set_level("WARNING", logger="grpo_ray")
    trl_compat._noticed.discard("use_vllm")
    assert GRPOConfig(use_vllm=True, vllm_mode="server") == GRPOConfig()
    GRPOConfig(use_vllm=True)
    said = [r.getMessage() for r in caplog.records if "use_vllm" in r.getMessage()]
    assert said == ["grpo-ray ignores use_vllm=True: grpo-ray always generates with vLLM engines (Ray actors)"]


def test_trl_deprecated_cap_is_the_clip_max():
    assert GRPOConfig(vllm_importance_sampling_cap=2.0).vllm_importance_sampling_clip_max == 2.0


def test_eval_steps_resolve_like_trl():
    assert GRPOConfig().resolved_eval_steps is None
    assert GRPOConfig(eval_strategy="steps", logging_steps=5).resolved_eval_steps == 5  # None -> logging_steps
    assert GRPOConfig(eval_strategy="steps", eval_steps=0.25, max_steps=10).resolved_eval_steps == 3  # ceil(2.5)
    assert GRPOConfig(eval_strategy="steps", eval_steps=4).resolved_eval_steps == 4
    assert GRPOConfig(num_generations_eval=4).eval_k == 4 and GRPOConfig().eval_k == 8
