"""`tiny-arith`: a ~0.5M-parameter Qwen2 made here, deterministically, for fast end-to-end tests.

A byte-level BPE tokenizer is trained on the `arith` task's own text, a small Qwen2 with tied
embeddings (as SmolLM2 has, so the tied-weight sync path is exercised) is initialised from a
fixed seed, then briefly SFT-warm-started to answer `\\boxed{N}` so that GRPO rewards are not
all zero at step 0 and there is still room to improve. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from grpo_ray.data import load_datasets, render_prompts

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SFT_STEPS = 400
# The task the tiny model is warm-started on; tests train GRPO on the same one.
TASK_CONFIG = {"max_int": 5}
SEED = 1234


def arith_rows(size: int, seed: int) -> list[dict]:
    train, _ = load_datasets(SimpleNamespace(task="arith", config=dict(TASK_CONFIG), size=size, eval_size=0, seed=seed))
    return train


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def completion_text(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}.<|im_end|>"


def build_tiny_model(out_dir: Path) -> None:
    """Tokenizer + Qwen2 + a short SFT; saved as a plain HF folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    rows = arith_rows(size=4000, seed=SEED)
    corpus = [m["content"] for r in rows[:500] for m in r["prompt"]] + [completion_text(r["answer"]) for r in rows[:500]]
    tokenizer = train_tokenizer(corpus)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    sft(model, tokenizer, rows)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def sft(model: torch.nn.Module, tokenizer, rows: list[dict], steps: int = SFT_STEPS, batch_size: int = 32) -> None:
    """Teacher-forced training on (prompt, boxed answer); loss on the completion tokens only."""
    prompts = render_prompts(tokenizer, rows)
    examples = []
    for prompt, row in zip(prompts, rows):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion_text(row["answer"]), add_special_tokens=False)["input_ids"]
        examples.append((p, c))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        ids, labels = _pad([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:  # linear decay to zero
            group["lr"] = 3e-3 * (1 - (step + 1) / steps)
    model.eval()


def _pad(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p): len(seq)] = torch.tensor(c)
    return ids, labels
