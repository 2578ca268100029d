"""`grpo-ray tune`: hyperparameter search over whole GRPO runs with Ray Tune.

Each Tune trial (`GRPOTrial`) is one complete GRPO run -- its own vLLM rollout engines and Ray
Train workers, started by `driver.train` -- whose every `ray.train.report` is handed to Tune, so
ASHA can stop poor trials early and PBT can exploit/explore `beta` and `learning_rate` from
checkpoints.

Resources (tune/README.md has the reasoning). Ray has no nested placement groups, and both
`RolloutPool` and Ray Train V2 create placement groups of their own, so a trial's Tune placement
group cannot be the one its engines and trainers run in. Instead:

* Tune's placement group for a trial holds only the trial's driver process: one bundle of
  1 byte of memory (no CPU, so it never fragments a node's CPUs).
* Before it starts its run, a trial is *admitted*: it takes a cluster-wide admission ticket (a
  named actor that dies with the trial), then requests ONE placement group covering all its
  engines and trainer workers, gang-scheduled (the autoscaler sees the whole trial as one
  request), releases it and immediately starts the run, whose own placement groups take those
  resources. The ticket is handed back at the run's first report.
* So only the ticket holder ever acquires resources; every other trial holds either nothing or
  everything it needs. No two trials can each hold part of what the other waits for.

This module sits above the driver: it imports config/driver (and below); only cli imports it.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.util
import itertools
import json
import math
from numbers import Number as numbers_Number
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.train.v2.api.callback import UserCallback
from ray.tune import Trainable

from grpo_ray.checkpoints import RUN_FILE, export_for_tune, latest_checkpoint, seed_run_from_checkpoint
from grpo_ray.config import ALIASES, PRESETS, ConfigError, GRPOConfig, merge, one_of, read_yaml
from grpo_ray.driver import init_ray, train

SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHERS = ("random", "optuna", "hyperopt")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
STUDY_KEYS = ("space", "fixed", "metric", "mode", "num_samples", "scheduler", "search", "max_concurrent", "asha", "pbt")
ASHA_KEYS = ("grace_period", "reduction_factor")
PBT_KEYS = ("perturbation_interval", "quantile_fraction", "resample_probability", "synch")
# `preset: NAME` in a space applies these hyperparameters of config.PRESETS[NAME]; model, data,
# batch sizes, cluster and step budget stay the base config's.
PRESET_KEY = "preset"
PRESET_HPARAMS = ("num_generations", "temperature", "beta", "loss_type", "learning_rate", "warmup_ratio")
# What PBT perturbs while a trial runs (other space keys are sampled once and inherited on exploit).
PBT_MUTABLE = ("learning_rate", "beta")

RUN_DIR = "run"  # a trial's GRPO output_dir, inside its Tune trial dir
STUDY_FILE = "study.yaml"  # everything needed to rebuild the study (for --resume)
TABLE_CSV = "trials.csv"
TABLE_MD = "trials.md"
BEST_FILE = "best_config.yaml"
CURVES_FILE = "reward_curves.png"
SUMMARY_FILE = "summary.json"
# Tune's placement group per trial holds the trial's driver process only: 1 byte of memory, no
# CPU (a fractional CPU would stop a node from fitting whole-CPU engine/trainer bundles).
TRIAL_HEAD_BUNDLE = {"memory": 1}
ADMISSION_NAME = "grpo-ray-admission"
ADMISSION_NAMESPACE = "grpo_ray"
FINAL_WINDOW = 3  # a trial's score: mean of its metric over its last FINAL_WINDOW steps


def log(message: str) -> None:
    print(f"[grpo-ray tune] {message}", flush=True)


# ---------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Dim:
    """One searched key: a dotted config key (or `preset`) and its distribution."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    args: tuple

    def candidates(self) -> list[Any]:
        """Values to validate the config with: both ends of a range, every listed value."""
        return list(self.args) if self.kind in ("choice", "grid") else [self.args[0], self.args[1]]

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # ours is inclusive, Tune's is not
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def pbt_mutation(self) -> Any:
        """PBT moves a listed value to a neighbour; a range is perturbed x0.8/x1.2 or resampled."""
        return list(self.args) if self.kind in ("choice", "grid") else self.tune_domain()

    def to_yaml(self) -> dict[str, list]:
        return {self.kind: list(self.args)}


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-6` as a string: turn numeric strings into numbers, leave the rest."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def parse_dim(key: str, spec: Any, where: str) -> Dim:
    example = "e.g. {loguniform: [1.0e-6, 1.0e-4]} or {choice: [0.0, 0.001, 0.01]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: space.{key}: expected one distribution, {example}; put fixed values under `fixed:`")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: space.{key}: unknown distribution {kind!r}: {hint}use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: space.{key}: {kind} needs a list, e.g. {kind}: [{'1.0e-6, 1.0e-4' if kind in ('loguniform', 'uniform') else '...'}]")
    values = [_number(v) for v in args]
    if kind in ("choice", "grid"):
        return Dim(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: space.{key}: {kind} needs [low, high] as two numbers, got {list(args)!r}")
    low, high = values
    if kind == "randint":
        if not all(float(v).is_integer() for v in values) or low > high:
            raise ConfigError(f"{where}: space.{key}: randint needs two integers [low, high] with low <= high (both included), got {list(args)!r}")
        return Dim(key, kind, (int(low), int(high)))
    if not low < high:
        raise ConfigError(f"{where}: space.{key}: {kind} needs low < high, got {list(args)!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: space.{key}: loguniform needs 0 < low < high, got {list(args)!r}; to include 0 use choice: [0.0, ...]")
    return Dim(key, kind, (float(low), float(high)))


def dotted_to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"cluster.zero_stage": 2, "beta": 0.1} -> {"cluster": {"zero_stage": 2}, "beta": 0.1}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node: Any = value
        for part in reversed(str(key).split(".")):
            node = {part: node}
        out = merge(out, node)
    return out


def sample_overrides(sample: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as nested config overrides; `preset` first, then the rest on top."""
    out: dict[str, Any] = {}
    if PRESET_KEY in sample:
        preset = PRESETS[sample[PRESET_KEY]]
        out = {key: preset[key] for key in PRESET_HPARAMS if key in preset}
    return merge(out, dotted_to_nested({k: v for k, v in sample.items() if k != PRESET_KEY}))


# ---------------------------------------------------------------------------------------- study
@dataclass
class Study:
    """A search: the base run config, the space, and how to search it. Saved as study.yaml."""

    base: dict[str, Any]  # a full GRPOConfig as a dict (relative paths made absolute)
    space: dict[str, dict[str, list]]  # key -> {distribution: args}
    fixed: dict[str, Any] = field(default_factory=dict)  # nested overrides for every trial
    metric: str = "reward_mean"
    mode: str = "max"
    num_samples: int = 1
    scheduler: str = "asha"
    search: str = "random"
    max_concurrent: int | None = None
    asha: dict[str, Any] = field(default_factory=dict)
    pbt: dict[str, Any] = field(default_factory=dict)
    name: str = "study"
    source: str | None = None  # the space file it came from

    @property
    def dims(self) -> list[Dim]:
        return [parse_dim(k, v, self.source or "space") for k, v in self.space.items()]

    def base_config(self) -> GRPOConfig:
        return GRPOConfig.from_dict(self.base).with_overrides(self.fixed)

    @property
    def max_steps(self) -> int:
        return self.base_config().max_steps

    def asha_options(self) -> dict[str, int]:
        steps = self.max_steps
        grace = int(self.asha.get("grace_period") or max(1, steps // 10))
        return {"grace_period": min(grace, steps), "reduction_factor": int(self.asha.get("reduction_factor") or 3)}

    def pbt_options(self) -> dict[str, Any]:
        steps = self.max_steps
        return {
            "perturbation_interval": int(self.pbt.get("perturbation_interval") or max(1, steps // 10)),
            "quantile_fraction": float(self.pbt.get("quantile_fraction", 0.25)),
            "resample_probability": float(self.pbt.get("resample_probability", 0.25)),
            "synch": bool(self.pbt.get("synch", False)),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Study":
        return cls(**raw)


def trial_config(study: Study, sample: dict[str, Any], output_dir: str | Path, for_best: bool = False) -> GRPOConfig:
    """The GRPOConfig one trial trains with: base + fixed + sampled values, writing to `output_dir`.

    Under PBT a trial checkpoints every `perturbation_interval` steps (PBT clones checkpoints);
    `for_best` leaves that out: the config a user retrains with."""
    over = merge(sample_overrides(sample), {"output_dir": str(output_dir), "cluster": {"address": None}})
    if study.scheduler == "pbt" and not for_best:
        over["save_steps"] = study.pbt_options()["perturbation_interval"]
    return study.base_config().with_overrides(over)


def validate_study(study: Study) -> None:
    """Every problem as one ConfigError line naming the file and the key, before anything starts."""
    where = study.source or "space"
    one_of("scheduler", study.scheduler, SCHEDULERS, where)
    one_of("search", study.search, SEARCHERS, where)
    one_of("mode", study.mode, ("max", "min"), where)
    if not isinstance(study.num_samples, int) or study.num_samples < 1:
        raise ConfigError(f"{where}: num_samples={study.num_samples!r}: must be an integer >= 1")
    if study.max_concurrent is not None and (not isinstance(study.max_concurrent, int) or study.max_concurrent < 1):
        raise ConfigError(f"{where}: max_concurrent={study.max_concurrent!r}: must be an integer >= 1")
    for section, keys in (("asha", ASHA_KEYS), ("pbt", PBT_KEYS)):
        value = getattr(study, section)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {section}: expected a mapping of {', '.join(keys)}")
        for key in value:
            if key not in keys:
                raise ConfigError(f"{where}: {section}.{key}: unknown option: use {', '.join(keys)}")
    if not study.space:
        raise ConfigError(f"{where}: the space is empty: search at least one key, e.g. learning_rate: {{loguniform: [1.0e-6, 1.0e-4]}}")
    dims = study.dims
    try:
        base = study.base_config()
    except ConfigError as exc:
        raise ConfigError(f"{where}: fixed: {exc}") from None
    for dim in dims:
        if dim.key == PRESET_KEY:
            for name in dim.args:
                if name not in PRESETS:
                    raise ConfigError(f"{where}: space.preset: unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    # Validate the configs the space can produce: every combination of listed values and range
    # ends when there are few, else each key on its own (the trial re-validates its own config).
    choices = [[(d.key, v) for v in d.candidates()] for d in dims]
    combos = itertools.product(*choices) if math.prod(len(c) for c in choices) <= 256 else ([c] for cs in choices for c in cs)
    for combo in combos:
        sample = dict(combo)
        try:
            base.with_overrides(sample_overrides(sample))
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in sample.items())
            raise ConfigError(f"{where}: {exc} (with {shown})") from None
    grid = [d.key for d in dims if d.kind == "grid"]
    if grid and study.search != "random":
        raise ConfigError(f"{where}: space.{grid[0]}: grid is only supported with search: random; use choice with {study.search}")
    if study.scheduler == "pbt":
        if study.search != "random":
            raise ConfigError(f"{where}: scheduler pbt samples its own mutations: use search: random with it")
        if not any(d.key in PBT_MUTABLE for d in dims):
            raise ConfigError(f"{where}: scheduler pbt perturbs {' and '.join(PBT_MUTABLE)}: put at least one of them in the space")
    _search_algorithm(study)  # a missing optional package is a one-line error now, not after Ray starts


def load_study(space_file: str | Path, base: GRPOConfig, overrides: dict[str, Any] | None = None, name: str | None = None) -> Study:
    """A study from a search-space YAML on top of a base config; `overrides` are CLI flags (None = keep)."""
    path = Path(space_file)
    raw = read_yaml(path, f"search space {str(path)!r} does not exist: check the path (ready-made: tune/beta_lr.yaml, tune/presets.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a `space:` section, got {type(raw).__name__}")
    if "space" not in raw:
        if any(key in STUDY_KEYS for key in raw):
            raise ConfigError(f"{path}: no `space:` section: put the searched keys under space:")
        names = {f.name for f in dataclasses.fields(GRPOConfig)} | set(ALIASES) | {PRESET_KEY}
        for key in raw:
            close = difflib.get_close_matches(str(key), STUDY_KEYS, n=1)
            if str(key).split(".")[0] not in names and close:
                raise ConfigError(f"{path}: unknown study key {key!r}: did you mean {close[0]!r}?")
        raw = {"space": raw}  # the file is the space itself
    for key in raw:
        if key not in STUDY_KEYS:
            close = difflib.get_close_matches(str(key), STUDY_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{path}: unknown study key {key!r}: {hint}use {', '.join(STUDY_KEYS)} (config keys go under space: or fixed:)")
    if not isinstance(raw["space"], dict):
        raise ConfigError(f"{path}: space: expected a mapping of config keys to distributions")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed: expected a mapping of config keys to values")
    options = {k: raw[k] for k in ("metric", "mode", "num_samples", "scheduler", "search", "max_concurrent", "asha", "pbt") if raw.get(k) is not None}
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    study = Study(
        base=base.with_absolute_paths().to_dict(),
        space={str(k): v for k, v in raw["space"].items()},
        fixed=dotted_to_nested(fixed),
        name=name or path.stem,
        source=str(path),
        **options,
    )
    validate_study(study)
    return study


# ------------------------------------------------------------------------------ Tune objects
def _search_algorithm(study: Study, max_concurrent: int = 0) -> Any:
    if study.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for this one: it takes its own.
        return BasicVariantGenerator(random_state=GRPOConfig.from_dict(study.base).seed, max_concurrent=max_concurrent)
    package = {"optuna": "optuna", "hyperopt": "hyperopt"}[study.search]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"search: {study.search} needs the {package} package: pip install 'grpo-ray[tune]' (or pip install {package}), or use --search random")
    seed = GRPOConfig.from_dict(study.base).seed
    if study.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def make_scheduler(study: Study) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if study.scheduler == "asha":
        return ASHAScheduler(time_attr="step", max_t=study.max_steps, **study.asha_options())
    if study.scheduler == "pbt":
        opts = study.pbt_options()
        mutations = {d.key: d.pbt_mutation() for d in study.dims if d.key in PBT_MUTABLE}
        return PopulationBasedTraining(time_attr="step", hyperparam_mutations=mutations, **opts)
    return FIFOScheduler()


def param_space(study: Study) -> dict[str, Any]:
    return {d.key: d.tune_domain() for d in study.dims}


def trial_bundles(cfg: GRPOConfig) -> list[dict[str, float]]:
    """What one trial's run holds: its engines' and trainers' bundles (as RolloutPool and
    driver.make_trainer request them) and headroom for its reward-scoring tasks."""
    cl = cfg.cluster
    engine: dict[str, float] = {"CPU": float(cl.rollout_num_cpus)}
    trainer: dict[str, float] = {"CPU": float(cl.trainer_num_cpus)}
    if cl.use_gpu:
        engine["GPU"] = float(cl.tensor_parallel_size)
        trainer["GPU"] = 1.0
    if cl.rollout_resource:
        engine[cl.rollout_resource] = 0.001
    if cl.trainer_resource:
        trainer[cl.trainer_resource] = 0.001
    bundles = [dict(engine) for _ in range(cl.num_rollout_actors)] + [dict(trainer) for _ in range(cl.num_trainer_workers)]
    if cl.reward_num_cpus > 0:
        bundles.append({"CPU": float(cl.reward_num_cpus)})
    return bundles


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def make_trainable(study: Study) -> Any:
    from ray import tune

    trainable = tune.with_parameters(GRPOTrial, study=study.to_dict())
    return tune.with_resources(trainable, tune.PlacementGroupFactory([dict(TRIAL_HEAD_BUNDLE)]))


# ------------------------------------------------------------------------------- admission
class _AdmissionTicket:
    """Exists while one trial is acquiring its resources; named, so there is only ever one."""

    def __init__(self, holder: str) -> None:
        self.holder = holder

    def who(self) -> str:
        return self.holder


class Admission:
    """Take the cluster-wide ticket, then gang-reserve the whole trial once (the autoscaler sees one
    request), release the reservation and let the run's own placement groups take it; give the
    ticket back once the run reports (its placement groups are then all held)."""

    def __init__(self, bundles: list[dict[str, float]], holder: str, poll_s: float = 0.5) -> None:
        self.bundles = bundles
        self.holder = holder
        self.poll_s = poll_s
        self.ticket: Any = None

    def acquire(self) -> float:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        t0 = time.monotonic()
        cls = ray.remote(num_cpus=0)(_AdmissionTicket)
        said = 0.0
        while self.ticket is None:
            try:
                self.ticket = cls.options(name=ADMISSION_NAME, namespace=ADMISSION_NAMESPACE, lifetime=None).remote(self.holder)
            except ValueError:  # the name is taken: another trial is being admitted
                if time.monotonic() - said > 60:
                    said = time.monotonic()
                    log(f"{self.holder}: waiting for another trial to finish acquiring its resources")
                time.sleep(self.poll_s)
        probe = placement_group([dict(b) for b in self.bundles], strategy="PACK")
        said = time.monotonic()
        while True:
            ready, _ = ray.wait([probe.ready()], timeout=30)
            if ready:
                break
            log(f"{self.holder}: waiting for {_total(self.bundles)} (the whole trial at once; an autoscaler adds nodes for it)")
        remove_placement_group(probe)
        return time.monotonic() - t0

    def release(self) -> None:
        if self.ticket is not None:
            import ray

            try:
                ray.kill(self.ticket)
            except Exception:  # noqa: BLE001 - already gone with its owner
                pass
            self.ticket = None


# ------------------------------------------------------------------------------------ trials
class ForwardReports(UserCallback):
    """Ray Train V2 callback (runs in the Train controller): every report -> the trial's queue.

    Like ray.tune.integration.ray_train.TuneReportCallback (metrics of rank 0), plus the path of
    the report's checkpoint (PBT clones it), and paced: the controller waits until Tune asks for
    the next result. (Ray Train's per-worker report queue still lets the workers run up to two
    steps ahead: a trial ASHA stops at step k may have computed k+1 and k+2; Tune never sees them.)"""

    def __init__(self, reports: Any, acks: Any) -> None:
        self.reports = reports
        self.acks = acks

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.reports.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))
            self.acks.get()
        except Exception:  # noqa: BLE001 - the trial killed its queues: Tune stopped it
            raise RuntimeError("grpo-ray tune: the trial was stopped by its scheduler; ending its run") from None


class GRPOTrial(Trainable):
    """One Tune trial = one whole GRPO run (`driver.train` in a thread of this actor).

    A class trainable, not a function one, for the stop path: when Tune stops a trial (ASHA,
    PBT exploit, end of the study) it removes the trial's placement group right after `stop()`,
    which kills everything captured in it -- the Train controller included -- while this process
    still waits on that controller: the process then never exits and the run's engines and
    trainer workers hold their CPUs forever. Here `cleanup()` ends the run (and waits for it)
    before Tune frees anything. `step()` returns one training step's report;
    `save_checkpoint`/`load_checkpoint` give PBT the run's latest grpo-ray checkpoint."""

    def setup(self, config: dict[str, Any], study: dict[str, Any] | None = None) -> None:
        self.spec = Study.from_dict(study or {})
        trial_dir = Path(getattr(self._storage, "trial_fs_path", None) or self.logdir)
        self.out = trial_dir / RUN_DIR
        self.cfg = trial_config(self.spec, config, self.out)
        # held-out eval runs here, outside the trial's placement group (which holds no CPU)
        self.run_cfg = self.cfg.with_overrides({"eval_at_start_and_end": False}) if self.cfg.eval_at_start_and_end else self.cfg
        self.restored = False
        self.thread: threading.Thread | None = None
        self.reports: Any = None
        self.acks: Any = None
        self.box: dict[str, Any] = {}
        self.pending_ack = False
        self.last: dict[str, Any] = {}
        self.last_checkpoint: str | None = None
        self.extra: dict[str, float] = {}
        self.gate: Admission | None = None

    # -- PBT (and restored trials): continue from a checkpoint, maybe another trial's
    def load_checkpoint(self, checkpoint: Any) -> None:
        seed_run_from_checkpoint(self.run_cfg, Path(checkpoint), self.out)
        self.restored = True

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        source = self.last_checkpoint
        if source is None:
            latest = latest_checkpoint(self.out)
            source = latest.path if latest is not None else None
        if source is None:
            raise RuntimeError(f"trial {self.trial_id}: no grpo-ray checkpoint yet to hand to Tune (save_steps={self.run_cfg.save_steps})")
        export_for_tune(source, checkpoint_dir, self.out)
        return checkpoint_dir

    # -- the run
    def _start(self) -> None:
        from ray.util.queue import Queue

        resume = self.restored or ((self.out / RUN_FILE).is_file() and latest_checkpoint(self.out) is not None)
        if self.cfg.eval_at_start_and_end and not resume:
            self.extra["eval_accuracy_start"] = _held_out_accuracy(self.cfg, self.cfg.model_name_or_path)
        self.gate = Admission(trial_bundles(self.cfg), holder=f"trial {self.trial_id}")
        waited = self.gate.acquire()
        log(f"trial {self.trial_id} admitted after {waited:.0f}s: {json.dumps(self.config)}")
        self.reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.acks = Queue(maxsize=1, actor_options={"num_cpus": 0})
        callbacks = [ForwardReports(self.reports, self.acks)]

        def work() -> None:
            try:
                self.box["result"] = train(self.run_cfg, resume=resume, overwrite=not resume, callbacks=callbacks)
            except BaseException as exc:  # noqa: BLE001 - raised in step()
                self.box["error"] = exc

        self.thread = threading.Thread(target=work, name="grpo-ray-trial-run", daemon=True)
        self.thread.start()

    def _next_report(self) -> tuple[dict[str, Any], str | None] | None:
        from ray.util.queue import Empty

        while True:
            try:
                return self.reports.get(block=True, timeout=0.5)
            except Empty:
                if self.thread.is_alive() or not self.reports.empty():
                    continue
                return None

    def _finish(self) -> None:
        self.thread.join()
        if self.gate is not None:
            self.gate.release()
        if "error" in self.box:
            raise self.box["error"]

    def step(self) -> dict[str, Any]:
        if self.thread is None:
            self._start()
        if self.pending_ack:
            self.acks.put(True)  # Tune wants the next step
            self.pending_ack = False
        item = self._next_report()
        if item is None:  # the run ended without another report
            self._finish()
            return {**self.last, **self.extra, "done": True}
        metrics, checkpoint = item
        self.gate.release()  # the run reported: its placement groups are held; the next trial may acquire
        self.last = metrics
        if checkpoint:
            self.last_checkpoint = checkpoint
        result = {**metrics, **self.extra}
        if int(metrics.get("step", 0)) >= self.run_cfg.max_steps:
            self.acks.put(True)  # the last step: let the run finish (final checkpoint, engines down)
            self._finish()
            if self.cfg.eval_at_start_and_end and self.box["result"].checkpoint_dir:
                result["eval_accuracy_end"] = _held_out_accuracy(self.cfg, self.box["result"].checkpoint_dir)
            result["done"] = True
        else:
            self.pending_ack = True
        return result

    def cleanup(self) -> None:
        """Stopped mid-run (or done): end the run and wait for it before Tune frees the trial."""
        import ray

        if self.thread is not None and self.thread.is_alive():
            for queue in (self.reports, self.acks):
                try:
                    ray.kill(queue.actor)  # the controller's pending report fails: the run ends
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.thread.join(timeout=300)
        if self.gate is not None:
            self.gate.release()


def _held_out_accuracy(cfg: GRPOConfig, model: str) -> float:
    """driver.held_out_accuracy, but outside the trial's placement group (it holds no CPU)."""
    import ray

    from grpo_ray.evaluate import evaluate
    from grpo_ray.models import resolve_model_path

    task = ray.remote(num_cpus=cfg.cluster.rollout_num_cpus, max_retries=0)(evaluate).options(scheduling_strategy="DEFAULT")
    return float(ray.get(task.remote(cfg, resolve_model_path(model), cfg.eval_limit)).accuracy)


# ------------------------------------------------------------------------------------ results
@dataclass
class TrialRecord:
    trial_id: str
    config: dict[str, Any]  # the sampled values (PBT: as they ended)
    history: list[dict[str, float]]  # one row per report: step and metrics
    error: str | None = None
    path: str | None = None


@dataclass
class StudyResult:
    study_dir: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: str | None
    curves: str | None
    table: str


def record_from_result(result: Any, keys: list[str]) -> TrialRecord:
    df = result.metrics_dataframe
    history: list[dict[str, float]] = []
    if df is not None and "step" in df.columns:
        for row in df.to_dict("records"):
            numbers = {k: float(v) for k, v in row.items() if isinstance(v, numbers_Number) and not isinstance(v, bool) and v == v}
            if "step" in numbers:
                history.append(numbers)
    metrics = result.metrics or {}
    error = None
    if result.error is not None:
        error = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else type(result.error).__name__
    config = {k: (result.config or {}).get(k) for k in keys}
    return TrialRecord(trial_id=str(metrics.get("trial_id") or Path(result.path).name), config=config, history=history, error=error, path=result.path)


def _score(record: TrialRecord, metric: str) -> float | None:
    values = [h[metric] for h in record.history if metric in h and h[metric] == h[metric]]
    return sum(values[-FINAL_WINDOW:]) / len(values[-FINAL_WINDOW:]) if values else None


def summarize(records: list[TrialRecord], metric: str, mode: str, max_steps: int) -> list[dict[str, Any]]:
    """One row per trial: its config, best/final metric, steps run, stopped early or not."""
    rows = []
    sign = 1 if mode == "max" else -1
    for rec in sorted(records, key=lambda r: r.trial_id):  # Tune returns them in finishing order
        values = [h[metric] for h in rec.history if metric in h and h[metric] == h[metric]]
        steps = int(max((h.get("step", 0) for h in rec.history), default=0))
        stopped = rec.error is None and 0 < steps < max_steps
        status = "error" if rec.error else ("stopped early" if stopped else ("completed" if steps >= max_steps else "not run"))
        rows.append(
            {
                "trial": rec.trial_id,
                **{k: v for k, v in rec.config.items()},
                f"best_{metric}": (max(values, key=lambda v: sign * v) if values else None),
                f"final_{metric}": _score(rec, metric),
                "steps": steps,
                "stopped_early": stopped,
                "status": status if not rec.error else f"error: {rec.error}",
            }
        )
    return rows


def best_record(records: list[TrialRecord], metric: str, mode: str, max_steps: int) -> TrialRecord | None:
    """The trial to retrain: among those that ran all steps (else all), the best final metric
    (mean over its last FINAL_WINDOW steps), ties to the best single step."""
    sign = 1 if mode == "max" else -1
    scored = [r for r in records if r.error is None and _score(r, metric) is not None]
    finished = [r for r in scored if max(h.get("step", 0) for h in r.history) >= max_steps]
    pool = finished or scored
    if not pool:
        return None
    return max(pool, key=lambda r: (sign * _score(r, metric), max(sign * h[metric] for h in r.history if metric in h)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (also readable as plain text)."""
    if not rows:
        return "(no trials)"
    headers = list(rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    table = [[cell(r.get(h)) for h in headers] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(t) for t in table)])


def write_table(rows: list[dict[str, Any]], study_dir: Path) -> str:
    text = format_table(rows)
    (study_dir / TABLE_MD).write_text(text + "\n")
    if rows:
        with open(study_dir / TABLE_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    return text


def write_best_config(study: Study, record: TrialRecord, study_dir: Path, metric: str) -> Path:
    """The best trial's config as a YAML that `grpo-ray train --config` runs as is."""
    cfg = trial_config(study, record.config, study_dir / "best_run", for_best=True)
    path = study_dir / BEST_FILE
    score = _score(record, metric)
    header = (
        f"# Best trial {record.trial_id} of study {study.name!r} ({metric} {score:.4f} over its last {FINAL_WINDOW} steps).\n"
        f"# Sampled: {json.dumps(record.config)}\n"
        f"# Train it: grpo-ray train --config {path}\n"
    )
    path.write_text(header + cfg.to_yaml())
    GRPOConfig.from_yaml(path)  # it must load back
    return path


def plot_curves(records: list[TrialRecord], path: Path, metric: str, max_steps: int) -> Path | None:
    """Every trial's metric per step; dashed: stopped early, x: errored."""
    curves = [(r, [(h["step"], h[metric]) for h in r.history if metric in h and "step" in h]) for r in records]
    curves = [(r, pts) for r, pts in curves if pts]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rec, pts in curves:
        steps, values = zip(*pts)
        stopped = rec.error is None and max(steps) < max_steps
        label = rec.trial_id + " " + ", ".join(f"{k}={_short(v)}" for k, v in rec.config.items())
        ax.plot(steps, values, linestyle="--" if stopped else "-", marker="x" if rec.error else None, label=label[:70])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(curves)} trials ({metric}; dashed = stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_summary(study: Study, records: list[TrialRecord], study_dir: Path) -> StudyResult:
    keys = list(study.space)
    for rec in records:
        rec.config = {k: rec.config.get(k) for k in keys}
    max_steps = study.max_steps
    rows = summarize(records, study.metric, study.mode, max_steps)
    table = write_table(rows, study_dir)
    best = best_record(records, study.metric, study.mode, max_steps)
    best_path = write_best_config(study, best, study_dir, study.metric) if best else None
    curves = plot_curves(records, study_dir / CURVES_FILE, study.metric, max_steps)
    best_row = next((r for r in rows if best and r["trial"] == best.trial_id), None)
    (study_dir / SUMMARY_FILE).write_text(json.dumps({"best": best_row, "trials": rows}, indent=1, default=str))
    return StudyResult(str(study_dir), rows, best_row, str(best_path) if best_path else None, str(curves) if curves else None, table)


# -------------------------------------------------------------------------------------- study
def _study_ray_cpus(study: Study, max_concurrent: int) -> int:
    cfg = study.base_config()
    need = _total(trial_bundles(cfg)).get("CPU", 0.0)
    return max(int(math.ceil(need * max_concurrent)) + 1, cfg.cluster.num_cpus or 0)


def check_capacity(study: Study, fixed_size: bool) -> None:
    """A trial that can never fit would wait forever: say so now. The bound is the autoscaler's max
    size when Ray publishes it, else today's resources -- an error on a fixed-size (embedded)
    cluster, only a warning on a joined one, whose autoscaler may not publish its max."""
    import ray
    from ray._private.state import state as ray_state

    need = _total(trial_bundles(study.base_config()))
    try:
        limit = ray_state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config to read
        limit = None
    where = "can grow to" if limit else "has"
    binding = bool(limit) or fixed_size
    limit = limit or ray.cluster_resources()
    for key, amount in need.items():
        if amount > limit.get(key, 0) + 1e-9:
            message = (
                f"one trial needs {key}={amount:g} ({_describe(study.base_config())}) but the cluster {where} {key}={limit.get(key, 0):g}: "
                "shrink cluster.* in the base config or add nodes"
            )
            if binding:
                raise ConfigError(message)
            log(f"warning: {message} (waiting in case an autoscaler adds them)")


def _describe(cfg: GRPOConfig) -> str:
    cl = cfg.cluster
    return (
        f"{cl.num_rollout_actors} engine(s) x {cl.rollout_num_cpus} CPU + {cl.num_trainer_workers} trainer(s) x "
        f"{cl.trainer_num_cpus} CPU + {cl.reward_num_cpus:g} CPU for reward tasks"
    )


def run_study(study: Study, root: str | Path, address: str | None = None, resume: bool = False, overwrite: bool = False) -> StudyResult:
    """Run (or `resume`) the study in ROOT/NAME: Tune's experiment dir plus our table, best config and plot."""
    import ray
    from ray import tune

    root = Path(root).resolve()
    study_dir = root / study.name
    if resume:
        if not tune.Tuner.can_restore(str(study_dir)):
            raise ConfigError(f"--resume: {str(study_dir)!r} holds no Tune study to resume; drop --resume to start one")
    elif study_dir.exists() and any(study_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"study dir {str(study_dir)!r} already holds a study: pass --resume to continue it, --overwrite to replace it, or --name to start another")
        shutil.rmtree(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (study_dir / STUDY_FILE).write_text(yaml.safe_dump(study.to_dict(), sort_keys=False))
    local = address is None and not study.base.get("cluster", {}).get("address") and not os.environ.get("RAY_ADDRESS")
    max_concurrent = study.max_concurrent or (1 if local else 4)
    started = not ray.is_initialized()
    if started:
        over: dict[str, Any] = {"cluster": {"address": address}} if address else {"cluster": {"num_cpus": _study_ray_cpus(study, max_concurrent)}}
        init_ray(study.base_config().with_overrides(over))
    try:
        check_capacity(study, fixed_size=started and local)
        trainable = make_trainable(study)
        if resume:
            tuner = tune.Tuner.restore(str(study_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(study),
                tune_config=tune.TuneConfig(
                    metric=study.metric,
                    mode=study.mode,
                    scheduler=make_scheduler(study),
                    search_alg=_search_algorithm(study, max_concurrent),
                    num_samples=study.num_samples,
                    max_concurrent_trials=None if study.search == "random" else max_concurrent,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=study.name,
                    storage_path=str(root),
                    # PBT clones checkpoints; keep a few so the one being cloned is never deleted under it.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if study.scheduler == "pbt" else None, checkpoint_at_end=False),
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=1,
                ),
            )
        results = tuner.fit()
        records = [record_from_result(r, list(study.space)) for r in results]
    finally:
        if started:
            ray.shutdown()
    return write_summary(study, records, study_dir)


def run_cli(args: Any, load_config: Any) -> int:
    """`grpo-ray tune ...` (cli.py parses, this runs)."""
    root = Path(args.output_dir or "tune_outputs")
    if args.resume:
        study_dir = Path(args.resume)
        if not (study_dir / STUDY_FILE).is_file():
            raise ConfigError(f"--resume: {str(study_dir)!r} holds no {STUDY_FILE}: give the study dir `grpo-ray tune` printed")
        study = Study.from_dict(yaml.safe_load((study_dir / STUDY_FILE).read_text()))
        study.name, root = study_dir.resolve().name, study_dir.resolve().parent
        address = args.address
    else:
        if not args.space:
            raise ConfigError("--space FILE is required (e.g. --space tune/beta_lr.yaml), or --resume STUDY_DIR")
        base = load_config(args)
        flags = {"num_samples": args.num_samples, "scheduler": args.scheduler, "search": args.search, "max_concurrent": args.max_concurrent}
        study = load_study(args.space, base, flags, name=args.name)
        address = base.cluster.address
    result = run_study(study, root, address=address, resume=bool(args.resume), overwrite=args.overwrite)
    print(result.table)
    print(f"study: {result.study_dir} (Tune experiment dir; continue it with: grpo-ray tune --resume {result.study_dir})")
    print(f"table: {Path(result.study_dir) / TABLE_CSV}; curves: {result.curves}")
    if result.best_config:
        print(f"best: trial {result.best['trial']} -> {result.best_config} (grpo-ray train --config {result.best_config})")
    else:
        print("best: no trial reported a result")
    return 0
