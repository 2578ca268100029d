"""The Python API, shaped like TRL's: `GRPOTrainer(model, reward_funcs, args, train_dataset).train()`.

    from grpo_ray import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(model="tiny-arith", reward_funcs=[my_reward, "format"],
                          args=GRPOConfig(output_dir="out", max_steps=10), train_dataset=ds)
    result = trainer.train()

`.train()` runs the same driver as `grpo-ray train` on the embedded Ray, or on the cluster that
`args.cluster.address` / $RAY_ADDRESS names (`ray://` too). Reward callables travel to the Ray
workers pickled by value; in-memory datasets travel as rows, and are also written to OUTPUT_DIR
(train_dataset.jsonl, eval_dataset.jsonl) so run_config.yaml names files that hold them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.data import read_records, records_to_rows
from grpo_ray.driver import RunResult, check_output_dir, evaluate_remote, init_ray
from grpo_ray.lora import lora_config, peft_config_dict
from grpo_ray.models import resolve_model_path
from grpo_ray.rewards import ByValue, RewardSpec

__all__ = ["GRPOTrainer", "RunResult"]

TRAIN_FILE, EVAL_FILE = "train_dataset.jsonl", "eval_dataset.jsonl"

# TRL constructor arguments grpo-ray has no equivalent for, and what to use instead.
_REFUSED_ARGS = {
    "processing_class": "the tokenizer is loaded from the model folder: save yours there with tokenizer.save_pretrained(model_dir)",
    "reward_processing_classes": "reward models are not supported: pass Python reward callables or spec strings",
    "optimizers": "the optimizer is built on each trainer worker: set optim, learning_rate, lr_scheduler_type in GRPOConfig",
    "quantization_config": "pass load_in_4bit: true in GRPOConfig instead (QLoRA with bitsandbytes, GPU only) with use_peft: true",
    "rollout_func": "custom rollouts are not implemented: generation runs in grpo-ray's vLLM engines",
}


class GRPOTrainer:
    """TRL's `GRPOTrainer` constructor; `.train()` runs a grpo-ray job and returns its `RunResult`.

    model: a built-in name or a model folder (the workers load it themselves).
    reward_funcs: a callable `fn(prompts, completions, **columns) -> list[float | None]`, a spec
      string (built-in, `pkg.mod:fn`, `path/file.py:fn`), or a list mixing both; None: args.reward_funcs.
    train_dataset / eval_dataset: a `datasets.Dataset`, a list of dicts, or a .jsonl/.json/.parquet
      path, with the columns data.prompt_column / data.answer_column name (default prompt, answer);
      None: the data section of args (a task such as `arith` or `reasoning_gym/chain_sum`).
    callbacks: objects with `on_log(args, state, control, logs=...)` (TRL's TrainerCallback shape)
      and/or `on_train_end(args, state, control)`, or plain callables `fn(logs)`; called in this
      process every logged step (logs: that step's metrics, eval/* included).
    """

    def __init__(
        self,
        model: str,
        reward_funcs: RewardSpec | Callable | Sequence[str | Callable] | None = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
    ) -> None:
        given = {"processing_class": processing_class, "reward_processing_classes": reward_processing_classes,
                 "optimizers": None if tuple(optimizers) == (None, None) else optimizers, "quantization_config": quantization_config,
                 "rollout_func": rollout_func}  # fmt: skip
        for name, value in given.items():
            if value is not None:
                raise ConfigError(f"GRPOTrainer({name}=...) is not supported: {_REFUSED_ARGS[name]}")
        if not isinstance(model, (str, Path)):
            raise ConfigError(
                f"GRPOTrainer(model=...) takes a model name or folder, got a {type(model).__name__}: "
                "save it with model.save_pretrained(folder) (and the tokenizer) and pass the folder"
            )
        cfg = args if args is not None else GRPOConfig(output_dir=f"{Path(str(model)).name}-GRPO")
        overrides: dict[str, Any] = {"model_name_or_path": str(model)}
        self.reward_specs: list[RewardSpec] | None = None
        if reward_funcs is not None:
            self.reward_specs = reward_specs(reward_funcs)
            overrides["reward_funcs"] = [str(s) for s in self.reward_specs]
        # TRL's tools= / environment_factory=: callables travel by value like reward callables
        self.tool_specs = reward_specs(tools, "tools") if tools is not None else None
        self.env_spec = reward_specs(environment_factory, "environment_factory")[0] if environment_factory is not None else None
        if self.tool_specs is not None:
            overrides["tools"] = [str(s) for s in self.tool_specs]
        if self.env_spec is not None:
            overrides["environment_factory"] = str(self.env_spec)
        if peft_config is not None:  # TRL: passing one trains a LoRA adapter
            overrides["peft_config"] = peft_config_dict(peft_config)
        self.args = cfg.with_overrides(overrides)
        if self.args.use_peft:
            lora_config(self.args)  # a bad peft_config field is a one-line error now, not after Ray started
        self.callbacks = list(callbacks or [])
        self.train_records = _records(train_dataset, "train_dataset")
        self.eval_records = _records(eval_dataset, "eval_dataset")
        if self.train_records is None and self.eval_records is not None:
            raise ConfigError("eval_dataset without train_dataset: pass train_dataset too, or set data.eval_split in args")
        self.datasets = None
        if self.train_records is not None:  # rows now: a bad column is a one-line DataError before any Ray work
            self.datasets = (
                records_to_rows(self.train_records, self.args.data, "train_dataset"),
                records_to_rows(self.eval_records, self.args.data, "eval_dataset") if self.eval_records else [],
            )
        self.result: RunResult | None = None

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def train(self, resume: bool = False, overwrite: bool = False) -> RunResult:
        """Run the job to completion (`resume`: continue OUTPUT_DIR from its last checkpoint)."""
        from grpo_ray.driver import train

        cfg = self._materialize(resume, overwrite)
        forward = _Forwarder(self.callbacks, cfg) if self.callbacks else None
        try:
            self.result = train(
                cfg, resume=resume, overwrite=overwrite and self.datasets is None,
                callbacks=forward.ray_callbacks() if forward else None, datasets=self.datasets, reward_specs=self.reward_specs,
                tool_specs=self.tool_specs, env_spec=self.env_spec,
            )  # fmt: skip
        finally:
            if forward is not None:
                forward.close()
        return self.result

    def evaluate(self, model: str | None = None, num_generations: int | None = None, limit: int | None = None) -> dict[str, float]:
        """Held-out greedy accuracy and sampled pass@1 / pass@k / mean@k (k = num_generations, default
        num_generations_eval) of `model` (default: the last checkpoint of .train(), else the start model),
        in a Ray task, the same numbers as `grpo-ray eval --num-generations k`."""
        cfg = self.args.with_absolute_paths()
        path = model or (self.result.checkpoint_dir if self.result and self.result.checkpoint_dir else resolve_model_path(cfg.model_name_or_path))
        rows = self.datasets[1] if self.datasets else None
        if rows is not None and not rows:
            raise ConfigError("evaluate() needs held-out prompts: pass eval_dataset to GRPOTrainer")
        init_ray(cfg)
        k = num_generations or cfg.eval_k
        result = evaluate_remote(
            cfg, path, limit or cfg.eval_limit, num_generations=k, rows=rows, reward_specs=self.reward_specs, tool_specs=self.tool_specs, env_spec=self.env_spec
        )
        return {"eval/accuracy": result.accuracy, **result.sampled}

    # ---------------------------------------------------------------- in-memory data -> OUTPUT_DIR
    def _materialize(self, resume: bool, overwrite: bool) -> GRPOConfig:
        """Write in-memory datasets into OUTPUT_DIR and point the config at them (so run_config.yaml
        reproduces the run); workers still get the rows through Ray, so a remote cluster needs no copy."""
        if self.train_records is None:
            return self.args
        out = check_output_dir(self.args, resume, overwrite)
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / TRAIN_FILE, self.train_records)
        data: dict[str, Any] = {"task": str(out / TRAIN_FILE), "eval_size": 0, "eval_split": None}
        if self.eval_records:
            _write_jsonl(out / EVAL_FILE, self.eval_records)
            data["eval_split"] = str(out / EVAL_FILE)
        return self.args.with_overrides({"data": data})


def reward_specs(reward_funcs: Any, what: str = "reward_funcs") -> list[RewardSpec]:
    """Spec strings stay strings; callables are pickled by value, named `module:qualname` (a name
    repeated in the list gets `#2`, `#3`, ... so each has its own rewards/<name> metric)."""
    items = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    specs: list[RewardSpec] = []
    for item in items:
        if isinstance(item, (str, ByValue)):
            specs.append(item)
        elif callable(item):
            specs.append(ByValue(item))
        else:
            raise ConfigError(f"{what}: {item!r} is a {type(item).__name__}; pass callables or spec strings such as 'accuracy' / 'path/file.py:name'")
    seen: dict[str, int] = {}
    for spec in specs:
        if isinstance(spec, ByValue):
            seen[spec.name] = seen.get(spec.name, 0) + 1
            if seen[spec.name] > 1:
                spec.name = f"{spec.name}#{seen[spec.name]}"
    return specs


def _records(dataset: Any, name: str) -> list[dict] | None:
    if dataset is None:
        return None
    if isinstance(dataset, (str, Path)):
        return read_records(str(dataset))[0]  # (records, where each is in the file)
    if hasattr(dataset, "keys") and hasattr(dataset, "values"):  # a DatasetDict (a dict) or another mapping of splits
        raise ConfigError(f"{name}: a DatasetDict with splits {list(dataset.keys())}: pass one split, e.g. {name}=ds['train']")
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        return dataset.to_list()
    if isinstance(dataset, (list, tuple)) and all(isinstance(r, dict) for r in dataset):
        if not dataset:
            raise ConfigError(f"{name} is empty: pass at least one row")
        return [dict(r) for r in dataset]
    raise ConfigError(f"{name}: expected a datasets.Dataset, a list of dicts or a file path, got a {type(dataset).__name__} (an IterableDataset: materialize it first)")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))


class _Forwarder:
    """Ray Train reports -> the user's callbacks, in this process (the callbacks may touch the
    script's own objects). A Ray Train callback in the controller puts each report on a queue;
    a thread here calls the callbacks on the logged steps."""

    def __init__(self, callbacks: list, cfg: GRPOConfig) -> None:
        from ray.util.queue import Queue

        init_ray(cfg)
        self.callbacks, self.cfg = callbacks, cfg
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._drain, name="grpo-callbacks", daemon=True)
        self.thread.start()

    def ray_callbacks(self) -> list:
        return [_PutReports(self.queue)]

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not (self.stop.is_set() and self.queue.empty()):
            try:
                logs = self.queue.get(timeout=0.2)
            except Empty:
                continue
            step = int(logs.get("step", 0))
            if step % self.cfg.logging_steps and step != self.cfg.max_steps and not any(k.startswith("eval/") for k in logs):
                continue
            self._call("on_log", logs, step)

    def _call(self, event: str, logs: dict | None, step: int) -> None:
        state = _State(global_step=step, max_steps=self.cfg.max_steps)
        for cb in self.callbacks:
            try:
                if hasattr(cb, event):
                    getattr(cb, event)(self.cfg, state, None, **({"logs": logs} if logs is not None else {}))
                elif event == "on_log" and callable(cb):
                    cb(logs)
            except Exception as exc:  # noqa: BLE001 - reported after the run, a callback never kills it
                self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self._call("on_train_end", None, self.cfg.max_steps)
        import ray

        ray.kill(self.queue.actor)
        if self.errors:
            raise RuntimeError(f"a GRPOTrainer callback raised {type(self.errors[0]).__name__}: {self.errors[0]}") from self.errors[0]


@dataclasses.dataclass
class _State:
    """The part of TRL's TrainerState a callback reads."""

    global_step: int
    max_steps: int


def _put_reports_class():
    from ray.train.v2.api.callback import UserCallback

    class PutReports(UserCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.queue.put(dict(metrics[0]))

    return PutReports


def _PutReports(queue: Any) -> Any:  # noqa: N802 - a class made on first use (Ray Train imports are heavy)
    return _put_reports_class()(queue)
