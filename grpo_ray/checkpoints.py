"""Checkpoints: the one owner of a run dir's checkpoint format and its life cycle.

A run dir (`output_dir`) holds `run_config.yaml` and, under `ray/train/checkpoint_*/`, one dir per
Ray Train checkpoint:

    model/               HF safetensors + tokenizer (loads in transformers and vLLM as is);
                         a LoRA run: PEFT's adapter_model.safetensors + adapter_config.json
    deepspeed/           DeepSpeed optimizer, scheduler and ZeRO shards (tag "state"; LoRA: no frozen base)
    trainer_state.json   {"step", "world_size", "sampler"} (rank 0)
    complete_rank<r>.json  rank r's files and sizes, written last (see `write_manifest`)

Life cycle: `save_checkpoint` (every rank) -> `checkpoint_is_complete` -> `latest_checkpoint` ->
`restore_point` + `load_checkpoint` (which applies the config's learning rate to the restored
schedule) -> for Tune's PBT, `export_for_tune` and `seed_run_from_checkpoint`.

Checkpoint files are written once and never edited: what a restore changes (the learning rate that
PBT perturbed) it changes on the live optimizer and scheduler, after DeepSpeed loaded them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train

from grpo_ray.config import GRPOConfig
from grpo_ray.metrics import METRICS_FILE, read_metrics

RUN_FILE = "run_config.yaml"  # the run's resolved config, in output_dir
RUN_NAME = "train"  # Ray Train run name: checkpoints go to OUTPUT_DIR/ray/<RUN_NAME>/checkpoint_*
TRAINER_STATE = "trainer_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"
MODEL_DIR = "model"
LINEAGE_FILE = "grpo_tune_metrics.jsonl"  # metrics up to a checkpoint's step, for PBT clones


def checkpoints_dir(output_dir: str | Path) -> Path:
    """Where Ray Train writes this run's checkpoints (its `storage_path/name`)."""
    return Path(output_dir, "ray", RUN_NAME)


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint dir was saved at."""
    return int(json.loads(Path(path, TRAINER_STATE).read_text())["step"])


# ----------------------------------------------------------------------------- write
def save_checkpoint(policy: Any, tokenizer: Any, step: int, state: dict, rank: int) -> str:
    """A Ray Train checkpoint dir: DeepSpeed state (all ranks) + HF model and trainer state (rank 0).

    `policy` is a `trainer.Policy` (its DeepSpeed `engine`, `module` and `cfg`)."""
    import torch.distributed as dist

    root = tempfile.mkdtemp(prefix=f"grpo-ckpt-{step}-")
    policy.engine.save_checkpoint(os.path.join(root, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=policy.cfg.use_peft)
    zero3 = policy.cfg.cluster.zero_stage == 3
    weights = None  # ZeRO-3: gathered in full (collectively); LoRA: the adapter only, as PEFT writes it
    if zero3:
        weights = trainable_state_dict(policy.module, zero3) if policy.cfg.use_peft else policy.engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        model_dir = os.path.join(root, MODEL_DIR)
        policy.module.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        world = dist.get_world_size() if dist.is_initialized() else 1
        Path(root, TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": world, **state}))
    write_manifest(root, rank)
    return root


def trainable_state_dict(model: Any, zero3: bool) -> dict[str, Any]:
    """The trainable tensors at full size (ZeRO-3: gathered, collectively), never the frozen
    base: a LoRA checkpoint under ZeRO-3 gathers megabytes, not the model."""
    import deepspeed

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ctx = deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None) if zero3 else nullcontext()
    with ctx:
        return {n: p.data.detach().clone().cpu() for n, p in trainable}


def manifest_name(rank: int | str) -> str:
    return f"complete_rank{rank}.json"


def write_manifest(root: str, rank: int) -> None:
    """List this rank's files with their sizes, last. Ray Train copies every rank's dir into one
    `checkpoint_*` dir in no set order, so a copy cut short can hold trainer_state.json without
    the weights; `checkpoint_is_complete` trusts only a dir whose every manifest checks out."""
    files = {str(f.relative_to(root)): f.stat().st_size for f in Path(root).rglob("*") if f.is_file()}
    Path(root, manifest_name(rank)).write_text(json.dumps(files))


# ----------------------------------------------------------------------------- verify, find
def checkpoint_is_complete(path: str | Path) -> bool:
    """Every rank's manifest is there and every file it lists has its size (see `write_manifest`)."""
    path = Path(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        if "world_size" not in state:  # written before manifests existed: trust it as before
            return True
        for rank in range(int(state["world_size"])):
            files = json.loads((path / manifest_name(rank)).read_text())
            if any(not (path / name).is_file() or (path / name).stat().st_size != size for name, size in files.items()):
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def latest_complete_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    """(step, dir) of the newest complete checkpoint under OUTPUT_DIR/ray/train, if any."""
    found = sorted((checkpoint_step(p), p) for p in checkpoints_dir(output_dir).glob("checkpoint_*") if checkpoint_is_complete(p))
    return found[-1] if found else None


def latest_checkpoint(output_dir: str | Path) -> ray.train.Checkpoint | None:
    """The newest complete checkpoint under this run dir, as a Ray Train `Checkpoint` (a dir that a
    crash left half-copied is skipped: see `write_manifest`)."""
    found = latest_complete_checkpoint(output_dir)
    return ray.train.Checkpoint.from_directory(str(found[1])) if found else None


# ----------------------------------------------------------------------------- restore
def restore_point(given: ray.train.Checkpoint | None, output_dir: str) -> ray.train.Checkpoint | None:
    """The checkpoint to start from: Ray Train's, or a newer complete one on disk. A worker killed
    right after `ray.train.report` can die before the controller collected that report, so Ray
    restarts from an older checkpoint (or none) although a newer one was fully written. A run that
    `seed_run_from_checkpoint` prepared is found here too (Ray Train itself starts it fresh)."""
    on_disk = latest_complete_checkpoint(output_dir)
    if on_disk is None:
        return given
    if given is not None:
        with given.as_directory() as root:
            if checkpoint_step(root) >= on_disk[0]:
                return given
    return latest_checkpoint(output_dir)


def load_checkpoint(policy: Any, checkpoint: ray.train.Checkpoint) -> dict:
    """Load DeepSpeed's state into `policy` (a `trainer.Policy`) and return the trainer state.

    The restored schedule then runs at `policy.cfg.learning_rate` (a no-op unless the config's
    rate differs from the checkpoint's, as after a PBT perturbation)."""
    with checkpoint.as_directory() as root:
        policy.engine.load_checkpoint(os.path.join(root, DS_DIR), tag=DS_TAG, load_module_strict=not policy.cfg.use_peft)
        state = json.loads(Path(root, TRAINER_STATE).read_text())
    set_learning_rate(policy.engine.basic_optimizer, policy.scheduler, policy.cfg.learning_rate)
    return state


def set_learning_rate(optimizer: Any, scheduler: Any, learning_rate: float) -> float | None:
    """Make a restored LR schedule run at peak `learning_rate`, at the position it was saved at.

    transformers' schedulers are `LambdaLR`: lr = base_lr * f(step). Setting `base_lrs` (and the
    optimizer's `initial_lr`) rescales the whole schedule; the current rate is the saved one times
    the same ratio. `optimizer` is the torch optimizer that steps (DeepSpeed's `basic_optimizer`).
    Returns the checkpoint's peak rate (None: the scheduler has none)."""
    base = list(getattr(scheduler, "base_lrs", None) or [])
    if not base:
        return None
    old = float(base[0])
    if math.isclose(old, learning_rate, rel_tol=1e-12):
        return old
    ratio = learning_rate / old
    scheduler.base_lrs = [b * ratio for b in base]
    current = [lr * ratio for lr in scheduler.get_last_lr()]
    scheduler._last_lr = current  # what get_last_lr() reports (torch keeps it there)
    for group, lr, peak in zip(optimizer.param_groups, current, scheduler.base_lrs):
        group["lr"] = lr
        group["initial_lr"] = peak
    return old


# ----------------------------------------------------------------------------- Tune's PBT
def export_for_tune(source: str | Path, dest: str | Path, run_dir: str | Path) -> int:
    """Copy checkpoint `source` to Tune's `dest`, with the run's metrics up to its step (a trial that
    clones it keeps the curve). Returns the step."""
    step = checkpoint_step(source)
    shutil.copytree(source, dest, dirs_exist_ok=True)
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    Path(dest, LINEAGE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return step


def seed_run_from_checkpoint(cfg: GRPOConfig, ckpt_dir: Path, out: Path) -> int:
    """Make `out` a run that resumes from `ckpt_dir` (an `export_for_tune` copy) with `cfg`.

    The checkpoint is copied, unchanged, to where this run's checkpoints go: `restore_point` picks
    it up as the newest complete one on disk. The metrics up to its step come along, and
    `load_checkpoint` applies cfg.learning_rate (PBT may have changed it). Returns the step."""
    step = checkpoint_step(ckpt_dir)
    if out.exists():
        shutil.rmtree(out)
    dest = checkpoints_dir(out) / f"checkpoint_seed_step{step:06d}"
    shutil.copytree(ckpt_dir, dest, ignore=shutil.ignore_patterns(LINEAGE_FILE))
    lineage = Path(ckpt_dir, LINEAGE_FILE)
    rows = [json.loads(line) for line in lineage.read_text().splitlines() if line.strip()] if lineage.is_file() else []
    (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))
    cfg.to_yaml(out / RUN_FILE)
    return step
