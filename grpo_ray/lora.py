"""LoRA / PEFT: the adapter's whole life in one place.

- `lora_config` / `check_model`: TRL's keys (`lora_r`, `lora_alpha`, ...) plus a `peft_config`
  mapping -> one `peft.LoraConfig`, checked against the model's modules before Ray starts.
- `wrap`: the trainer's model as a `PeftModel` (only the adapter trains; DeepSpeed sees the rest
  frozen). The KL reference is the same model with `disable_adapter()`: no second copy.
- `MergedSync`: what `lora_sync: merged` sends to vLLM: base + s·B·A of the adapted layers, under
  vLLM's (= the HF checkpoint's) names, one layer gathered at a time under ZeRO-3. vLLM reloads a
  layer as a whole (q/k/v fused into one qkv_proj, gate/up into gate_up_proj): a layer that gets
  only part of its tensors is rebuilt from uninitialised memory, so every Linear sibling of an
  adapted module travels with it.
- `export_merged`, `servable`: checkpoints hold the adapter in PEFT's own
  format; export merges it into a plain HF folder that transformers and vLLM load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from grpo_ray.checkpoints import MODEL_DIR
from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.text import suggest

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the HF module names
ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"
# peft.LoraConfig fields that grpo-ray's merged sync cannot express as W + s·B·A: refused
UNSUPPORTED = {
    "use_dora": "DoRA rescales each weight column by a learned magnitude",
    "lora_bias": "a LoRA bias changes the layer's bias too",
}


# ----------------------------------------------------------------------------- configuration
def lora_config(cfg: GRPOConfig) -> Any:
    """The run's `peft.LoraConfig`: the lora_* keys, with `peft_config` entries on top."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    kwargs: dict[str, Any] = {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": ALL_LINEAR if not targets or targets == [ALL_LINEAR] else list(targets),
        "modules_to_save": cfg.lora_modules_to_save,
        "task_type": "CAUSAL_LM",
    }
    extra = dict(cfg.peft_config or {})
    peft_type = str(extra.pop("peft_type", "LORA")).upper().removeprefix("PEFTTYPE.")
    if peft_type != "LORA":
        raise ConfigError(f"peft_config.peft_type={peft_type!r}: grpo-ray trains LoRA adapters only; drop peft_type or set it to LORA")
    fields = [f.name for f in dataclasses.fields(LoraConfig)]
    for key in extra:
        if key not in fields:
            hint = suggest(key, fields) or "see peft.LoraConfig for the fields"
            raise ConfigError(f"peft_config.{key}: not a peft.LoraConfig field; {hint}")
    kwargs.update(extra)
    for key, why in UNSUPPORTED.items():
        if kwargs.get(key):
            raise ConfigError(f"peft_config.{key}=true is not supported: {why}, which the weight sync to vLLM does not send; set it to false")
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"peft_config: peft.LoraConfig refused it: {str(exc).splitlines()[0]}") from None


def peft_config_dict(config: Any) -> dict[str, Any]:
    """A `peft.LoraConfig` (what TRL's `GRPOTrainer(peft_config=...)` takes) as the `peft_config`
    mapping of GRPOConfig: rank, alpha, dropout, targets and whatever else differs from
    LoraConfig's defaults, JSON-able."""
    from peft import LoraConfig

    if isinstance(config, dict):
        return dict(config)
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"peft_config: expected a peft.LoraConfig or a mapping of its fields, got {type(config).__name__}")
    default = LoraConfig().to_dict()
    plain = lambda v: sorted(v) if isinstance(v, set) else (str(v) if hasattr(v, "value") else v)  # noqa: E731 - sets, enums
    core = ("r", "lora_alpha", "lora_dropout", "target_modules")  # always: grpo-ray's own defaults (TRL's) differ from peft's
    return {k: plain(v) for k, v in config.to_dict().items() if k != "peft_type" and (k in core or plain(v) != plain(default.get(k)))}


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The leaf names of the model's Linear layers (what target_modules usually names)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(model: torch.nn.Module, config: Any, where: str = "lora_target_modules") -> None:
    """Every named target exists, and no LoRA or trained copy touches a tied embedding."""
    names = [n for n, _ in model.named_modules() if n]
    targets = config.target_modules
    listing = ", ".join(linear_module_names(model))
    if isinstance(targets, str) and targets != ALL_LINEAR:
        if not any(re.fullmatch(targets, n) for n in names):
            raise ConfigError(f"{where}={targets!r} matches no module of the model; its linear modules are: {listing}")
    elif isinstance(targets, (list, set, tuple)):
        for target in targets:
            if not any(_matches(target, n) for n in names):
                raise ConfigError(f"{where}: {target!r} is not a module of the model; its linear modules are: {listing}")
    for target in config.modules_to_save or []:
        if not any(_matches(target, n) for n in names):
            raise ConfigError(f"lora_modules_to_save: {target!r} is not a module of the model; its modules include: {listing}")
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {n for n, m in model.named_modules() if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
        chosen = list(targets) if isinstance(targets, (list, set, tuple)) else []
        for target in chosen + list(config.modules_to_save or []):
            if any(_matches(target, n) for n in tied):
                raise ConfigError(
                    f"LoRA on {target!r}: this model ties its input and output embeddings, and vLLM serves both from one "
                    "tensor, so training one of them alone would leave the other stale; adapt the other linear layers instead"
                )


def check_model(cfg: GRPOConfig, model_path: str) -> None:
    """Build the LoraConfig and check it against the model's modules (on the meta device: no
    weights are read), so a typo fails in a second, before Ray starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = lora_config(cfg)
    if cfg.lora_sync == "adapter":
        check_adapter_sync(cfg, config)
    if cfg.load_in_4bit and not cfg.cluster.use_gpu:
        raise ConfigError("load_in_4bit=true (QLoRA) needs bitsandbytes on a CUDA GPU: set cluster.use_gpu: true, or load_in_4bit: false on CPU")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    check_targets(model, config)


def check_adapter_sync(cfg: GRPOConfig, config: Any) -> None:
    """What vLLM's LoRA serving cannot take: refused in one line (lora_sync: merged takes them)."""
    if config.modules_to_save:
        raise ConfigError("lora_sync='adapter' with lora_modules_to_save: vLLM serves LoRA adapters without trained full modules; use lora_sync: merged")
    if max([config.r, *(config.rank_pattern or {}).values()]) > VLLM_LORA_RANKS[-1]:
        raise ConfigError(f"lora_sync='adapter': vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; lower lora_r or use lora_sync: merged")


# ----------------------------------------------------------------------------- the model
def wrap(model: torch.nn.Module, cfg: GRPOConfig) -> torch.nn.Module:
    """The model as a PeftModel: only the adapter (and `lora_modules_to_save`) trains."""
    from peft import get_peft_model

    config = lora_config(cfg)
    check_targets(model, config)
    if cfg.load_in_4bit:  # pragma: no cover - QLoRA, GPU only
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:  # frozen embeddings: checkpointed blocks still need an input that requires grad
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def hf_name(peft_name: str) -> str:
    """PeftModel's parameter name -> the base model's checkpoint name (what vLLM loads)."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER_NAME}.", ".")


def reference(model: torch.nn.Module) -> Any:
    """The KL reference: the same model with the adapter switched off (peft's context manager)."""
    return model.disable_adapter()


@dataclass
class SyncTensor:
    name: str  # the HF / vLLM checkpoint name
    param: torch.nn.Parameter  # the tensor sent (for an adapted weight: the frozen base)
    module: torch.nn.Module  # the module holding `param` (QLoRA: dequantises it)
    layer: Any = None  # the peft LoRA layer whose s·B·A is added to `param`

    @property
    def shape_source(self) -> torch.Tensor:
        """A tensor of the full, unquantised shape (a 4-bit weight is stored packed)."""
        state = getattr(self.param, "quant_state", None)
        return self.param if state is None else torch.empty(tuple(state.shape), device="meta")

    def base(self) -> torch.Tensor:
        if getattr(self.param, "quant_state", None) is not None:  # pragma: no cover - QLoRA, GPU only
            from peft.utils.integrations import dequantize_module_weight

            return dequantize_module_weight(self.module)
        return self.param.data


def sync_plan(model: torch.nn.Module, cfg: GRPOConfig) -> "MergedSync | AdapterSync":
    return AdapterSync(model) if cfg.lora_sync == "adapter" else MergedSync(model)


class MergedSync:
    """`lora_sync: merged`: what the trainer sends vLLM after each update.

    For each adapted Linear (or Embedding): W + s·B·A; every other tensor of the modules that vLLM
    reloads with it (their Linear siblings, biases included) as it is; trained copies
    (`modules_to_save`) as they are. Nothing else: the engines started from the same base."""

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        modules = dict(model.named_modules())
        adapted = {name for name, m in modules.items() if isinstance(m, LoraLayer)}
        parents = {name.rpartition(".")[0] for name in adapted}
        send: list[str] = []  # module names, in model order
        for name, module in modules.items():
            parent = name.rpartition(".")[0]
            if name in adapted or (parent in parents and isinstance(module, torch.nn.Linear) and not _inside(name, adapted)):
                send.append(name)
            elif isinstance(module, ModulesToSaveWrapper):
                send.append(name)
        self.tensors: list[SyncTensor] = []
        for name in send:
            module = modules[name]
            if isinstance(module, LoraLayer):
                base = module.base_layer
                for pname, p in base.named_parameters():
                    self.tensors.append(SyncTensor(hf_name(f"{name}.{pname}"), p, base, module if pname == "weight" else None))
            elif isinstance(module, ModulesToSaveWrapper):
                trained = module.modules_to_save[ADAPTER_NAME]
                for pname, p in trained.named_parameters():
                    self.tensors.append(SyncTensor(hf_name(f"{name}.{pname}"), p, trained))
            else:
                for pname, p in module.named_parameters(recurse=False):
                    self.tensors.append(SyncTensor(hf_name(f"{name}.{pname}"), p, module))

    @property
    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, tensor) pairs as `sync.WeightSender` takes them (shapes, ZeRO-3 partitioning)."""
        return [(t.name, t.shape_source) for t in self.tensors]

    def weights(self, zero3: bool, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The merged tensors in `named` order, one materialised at a time (ZeRO-3: one layer
        gathered at a time, collectively: every rank must iterate)."""
        import deepspeed

        for t in self.tensors:
            params = [t.param] + ([] if t.layer is None else lora_params(t.layer))
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
            with ctx, torch.no_grad():
                w = t.base()
                if t.layer is not None:
                    w = w.float() + t.layer.get_delta_weight(ADAPTER_NAME).float()
                yield w.to(dtype)


class AdapterSync:
    """`lora_sync: adapter`: only the adapter's A and B matrices, under PEFT's saved names
    (`base_model.model.<module>.lora_A.weight`), which vLLM loads as a new adapter version."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = [(n.replace(f".{ADAPTER_NAME}.", "."), p) for n, p in model.named_parameters() if "lora_" in n]

    @property
    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.tensors

    def weights(self, zero3: bool, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        import deepspeed

        for _, p in self.tensors:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None) if zero3 else nullcontext():
                yield p.data.to(dtype)


# ----------------------------------------------------------------------------- vLLM side (lora_sync: adapter)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's allowed max_lora_rank values


def engine_adapter_config(cfg: GRPOConfig) -> dict | None:
    """The peft config an engine serves the adapter with (JSON-able), or None: no LoRA in vLLM."""
    if not (cfg.use_peft and cfg.lora_sync == "adapter"):
        return None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config(cfg).to_dict().items()}


def engine_kwargs(adapter_config: dict | None) -> dict[str, Any]:
    """vLLM `LLM(...)` options for serving one LoRA adapter on the frozen base."""
    if adapter_config is None:
        return {}
    rank = max([adapter_config["r"], *(adapter_config.get("rank_pattern") or {}).values()])
    return {"enable_lora": True, "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= rank), "max_loras": 1}


def quiet_partial_reloads() -> None:
    """Merged sync loads only the adapted layers on purpose: drop vLLM's per-load warning that
    lists every other tensor as "not loaded" (the sync tests check what actually arrived)."""
    import logging

    class _Partial(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Following weights were not loaded")

    logging.getLogger("vllm.model_executor.model_loader.reload.inplace").addFilter(_Partial())


def load_adapter_in_worker(worker: Any, lora_id: int, tensors: dict[str, torch.Tensor], adapter_config: dict) -> int:
    """Runs inside vLLM's worker (`collective_rpc`): the tensors become adapter `lora_id`, straight
    from memory (vLLM's own loader only reads adapter folders from disk); older versions are dropped."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(adapter_config)
    helper.validate_legal(manager.lora_config)
    adapter = LoRAModel.from_lora_tensors(
        lora_id, tensors, helper, device="cpu", dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size
    )
    models = manager._adapter_manager
    for old in list(models.list_adapters()):
        models.remove_adapter(old)
    models.add_adapter(adapter)
    return lora_id


def _inside(name: str, adapted: set[str]) -> bool:
    """`name` is a module inside an adapted one (its base_layer or lora_A/B)."""
    return any(name.startswith(a + ".") for a in adapted)


def lora_params(layer: Any) -> list[torch.nn.Parameter]:
    return [p for n, p in layer.named_parameters() if "lora_" in n]


# ----------------------------------------------------------------------------- checkpoints
def is_adapter_dir(path: str | Path) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A LoRA adapter folder or a grpo-ray checkpoint dir (what `grpo-ray eval --model` also takes)."""
    return Path(path).is_dir() and (is_adapter_dir(path) or find_model_dir(path) != Path(path))


def find_model_dir(path: str | Path) -> Path:
    """A checkpoint dir (holding model/) or the model folder itself."""
    path = Path(path)
    return path / MODEL_DIR if (path / MODEL_DIR).is_dir() and not (path / "config.json").is_file() and not is_adapter_dir(path) else path


def export_merged(src: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Base + adapter -> one plain HF folder (weights, config, tokenizer) at `out`. `src` is a
    grpo-ray checkpoint, its model/ folder or any PEFT adapter folder. The merged weights are
    saved in the adapter's dtype (the precision the run trained and served in) unless `dtype`."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = find_model_dir(src)
    if not is_adapter_dir(adapter):
        raise ConfigError(f"{src}: holds no {ADAPTER_CONFIG}; a full fine-tune's checkpoint model/ folder is already a merged HF model")
    base_path = json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    if not Path(base_path).is_dir():
        raise ConfigError(f"{adapter / ADAPTER_CONFIG}: base_model_name_or_path {base_path!r} is not a local folder; point it at the base model")
    if dtype is None:
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            dtype = str(f.get_slice(next(iter(f.keys()))).get_dtype()).lower()
        dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(dtype, "float32")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.to(getattr(torch, dtype))
    merged.config.dtype = getattr(torch, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out)
    return out


@contextmanager
def servable(path: str | Path) -> Iterator[str]:
    """A folder vLLM can serve for `path`: itself, or (a LoRA checkpoint) a merged copy in a temp dir."""
    model_dir = find_model_dir(path)
    if not is_adapter_dir(model_dir):
        yield str(model_dir)
        return
    tmp = tempfile.mkdtemp(prefix="grpo-merged-")
    try:
        yield str(export_merged(model_dir, os.path.join(tmp, "model")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_kwargs(cfg: GRPOConfig) -> dict[str, Any]:
    """`from_pretrained` options: QLoRA loads the frozen base in 4 bits (bitsandbytes, CUDA only)."""
    if not cfg.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig  # pragma: no cover - GPU only

    return {  # pragma: no cover - GPU only
        "device_map": {"": torch.cuda.current_device()},  # bitsandbytes quantises while loading, on the GPU
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
        )
    }
