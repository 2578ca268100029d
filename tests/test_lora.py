"""LoRA / PEFT pieces on the tiny model with real peft (no Ray): config keys, target checks, the
merged tensors vLLM gets, the adapter-disabled reference, checkpoint files and export."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_ray import lora
from grpo_ray.checkpoints import trainable_state_dict
from grpo_ray.config import ConfigError, GRPOConfig
from tests.conftest import quick_config


def lora_cfg(tmp_path, **kw):
    return quick_config(tmp_path, use_peft=True, lora_dropout=0.0, **kw)


def tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def randomize_adapter(model, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_config_keys_and_validation(tmp_path):
    cfg = quick_config(tmp_path, peft_config={"use_rslora": True})
    assert cfg.use_peft  # TRL: passing a peft_config means LoRA
    assert GRPOConfig.from_dict(cfg.to_dict()).use_peft
    assert quick_config(tmp_path).use_peft is False
    for bad, field in [({"lora_sync": "merge"}, "lora_sync"), ({"lora_r": 0}, "lora_r"), ({"lora_dropout": 1.0}, "lora_dropout"),
                       ({"load_in_4bit": True}, "load_in_4bit")]:  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            quick_config(tmp_path, **bad)


def test_lora_config_from_trl_keys_and_peft_config(tmp_path):
    c = lora.lora_config(lora_cfg(tmp_path, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj"], peft_config={"use_rslora": True}))
    assert (c.r, c.lora_alpha, c.target_modules, c.use_rslora) == (4, 8, {"q_proj"}, True)
    assert lora.lora_config(lora_cfg(tmp_path)).target_modules == "all-linear"
    with pytest.raises(ConfigError, match=r"peft_config.use_rlsora: not a peft.LoraConfig field; did you mean 'use_rslora'"):
        lora.lora_config(lora_cfg(tmp_path, peft_config={"use_rlsora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        lora.lora_config(lora_cfg(tmp_path, peft_config={"use_dora": True}))


def test_missing_target_module_is_one_line_naming_it_and_the_linear_modules(tmp_path, tiny_model_path):
    with pytest.raises(ConfigError) as err:
        lora.check_model(lora_cfg(tmp_path, lora_target_modules=["q_proj", "qkv"]), tiny_model_path)
    msg = str(err.value)
    assert "'qkv'" in msg and "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in msg and "\n" not in msg
    lora.check_model(lora_cfg(tmp_path, lora_target_modules=["q_proj", "v_proj"]), tiny_model_path)  # fine
    with pytest.raises(ConfigError, match="ties its input and output embeddings"):
        lora.check_model(lora_cfg(tmp_path, lora_modules_to_save=["embed_tokens"]), tiny_model_path)


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"]])
def test_merged_sync_sends_merge_and_unload_weights_of_adapted_layers_only(tmp_path, tiny_model_path, targets):
    """What `lora_sync: merged` sends equals peft's own merge, under the base checkpoint's names;
    whole vLLM layers (q/k/v/o siblings, biases) and nothing of the untouched ones."""
    cfg = lora_cfg(tmp_path, lora_target_modules=targets)
    model = lora.wrap(tiny(tiny_model_path), cfg)
    randomize_adapter(model)
    plan = lora.MergedSync(model)
    sent = dict(zip([n for n, _ in plan.named], plan.weights(zero3=False, dtype=torch.float32)))
    merged = model.merge_and_unload().state_dict()
    base = tiny(tiny_model_path).state_dict()
    assert set(sent) <= set(base)
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6)
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    assert changed and changed <= set(sent)  # every changed tensor reaches vLLM
    attn = {f"model.layers.0.self_attn.{m}_proj.{p}" for m in "qkv" for p in ("weight", "bias")} | {"model.layers.0.self_attn.o_proj.weight"}
    assert attn <= set(sent)
    assert not any("embed_tokens" in n or "norm" in n for n in sent)
    assert any("mlp" in n for n in sent) == (targets is None)


def test_adapter_disabled_reference_is_the_base_model(tmp_path, tiny_model_path):
    model = lora.wrap(tiny(tiny_model_path), lora_cfg(tmp_path))
    randomize_adapter(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base = tiny(tiny_model_path)(ids).logits
        with lora.reference(model):
            ref = model(ids).logits
        adapted = model(ids).logits
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-6)
    assert (adapted - base).abs().max() > 1e-2  # the adapter does change the policy


def test_adapter_checkpoint_loads_in_peft_and_exports_merged(tmp_path, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lora.wrap(tiny(tiny_model_path), lora_cfg(tmp_path))
    randomize_adapter(model)
    out = tmp_path / "ckpt" / "model"
    model.save_pretrained(out, state_dict=trainable_state_dict(model, zero3=False), safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    assert sorted(p.name for p in out.glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_path
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = model(ids).logits
        loaded = PeftModel.from_pretrained(tiny(tiny_model_path), str(out))
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
        merged = lora.export_merged(tmp_path / "ckpt", tmp_path / "merged")
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(ids).logits, want, rtol=0, atol=1e-5)
    assert lora.is_checkpoint(tmp_path / "ckpt") and lora.is_checkpoint(out) and not lora.is_checkpoint(tiny_model_path)
    with pytest.raises(ConfigError, match="holds no adapter_config.json"):
        lora.export_merged(tiny_model_path, tmp_path / "x")


def test_lora_keys_default_as_in_trl_model_config():
    import dataclasses

    import trl

    theirs = {f.name: f.default for f in dataclasses.fields(trl.ModelConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name in ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "load_in_4bit"):
        assert ours[name] == theirs[name], name


def test_adapter_sync_sends_exactly_peft_saved_adapter_tensors(tmp_path, tiny_model_path):
    """`lora_sync: adapter` sends what `adapter_model.safetensors` holds, under the same names
    (the names vLLM's LoRA loader parses), and nothing of the base."""
    from peft import get_peft_model_state_dict

    cfg = lora_cfg(tmp_path, lora_sync="adapter")
    model = lora.wrap(tiny(tiny_model_path), cfg)
    randomize_adapter(model)
    plan = lora.sync_plan(model, cfg)
    sent = dict(zip([n for n, _ in plan.named], plan.weights(zero3=False, dtype=torch.float32)))
    saved = get_peft_model_state_dict(model)
    assert sent.keys() == saved.keys()
    assert all(torch.equal(sent[k], saved[k]) for k in saved)
    assert lora.engine_kwargs(lora.engine_adapter_config(cfg)) == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1}
    assert lora.engine_adapter_config(lora_cfg(tmp_path)) is None  # merged: vLLM serves plain weights
    with pytest.raises(ConfigError, match="lora_modules_to_save"):
        lora.check_model(lora_cfg(tmp_path, lora_sync="adapter", lora_modules_to_save=["o_proj"]), tiny_model_path)


def test_tune_space_searches_lora_rank_and_alpha(tmp_path):
    from pathlib import Path

    from grpo_ray.tuning.space import load_study, trial_config

    study = load_study(Path(__file__).parents[1] / "tune" / "lora.yaml", quick_config(tmp_path))
    trial = trial_config(study, {"lora_r": 8, "lora_alpha": 64, "learning_rate": 1e-4}, tmp_path / "t")
    assert (trial.use_peft, trial.lora_r, trial.lora_alpha) == (True, 8, 64)
    assert lora.lora_config(trial).r == 8


def test_a_peft_lora_config_object_becomes_the_peft_config_mapping(tmp_path):
    from peft import LoraConfig

    given = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, task_type="CAUSAL_LM")
    cfg = quick_config(tmp_path, peft_config=lora.peft_config_dict(given))
    built = lora.lora_config(cfg)
    assert cfg.use_peft and (built.r, built.lora_alpha, built.target_modules, built.use_rslora) == (4, 8, {"q_proj", "v_proj"}, True)
    assert GRPOConfig.from_yaml(cfg.to_yaml(tmp_path / "c.yaml") and tmp_path / "c.yaml").peft_config == cfg.peft_config


def test_builtin_lora_demo_config(tmp_path):
    import argparse

    from grpo_ray.cli import load_config

    cfg = load_config(argparse.Namespace(config="lora", set=None, output_dir=str(tmp_path)))
    demo = load_config(argparse.Namespace(config=None, set=None, output_dir=str(tmp_path)))
    assert cfg.use_peft and cfg.model_name_or_path == demo.model_name_or_path == "smollm2-135m"
    assert cfg.learning_rate == 10 * demo.learning_rate and cfg.data == demo.data and cfg.max_steps == demo.max_steps


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_reaches_the_adapters_dropout_as_in_trl(tmp_path, tiny_model_path, disable):
    """TRL wraps the model in peft first and then applies disable_dropout, so lora_dropout goes to 0
    too; without disable_dropout the adapter keeps its dropout (TRL's default)."""
    from grpo_ray.trainer import trainable_model

    cfg = quick_config(tmp_path, use_peft=True, lora_dropout=0.1, disable_dropout=disable)
    model = trainable_model(cfg, tiny_model_path)
    adapter_dropouts = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert adapter_dropouts  # the peft wrap made them
    assert {m.p for m in adapter_dropouts} == ({0.0} if disable else {0.1})
