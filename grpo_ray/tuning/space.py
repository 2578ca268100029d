"""The search space: a study file (`space:`, `fixed:`, scheduler and search options) on top of a
base config, validated as one-line errors before anything starts, and the Tune objects that search it."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grpo_ray.config import ALIASES, PRESETS, ConfigError, GRPOConfig, merge, one_of, read_yaml
from grpo_ray.text import suggest

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
        hint = suggest(kind, DISTRIBUTIONS, end=" ")
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
    search_algorithm(study)  # a missing optional package is a one-line error now, not after Ray starts


def check_flags(flags: dict[str, Any]) -> None:
    """A bad `--num-samples` / `--max-concurrent` is the flag's fault, not the space file's: say so."""
    for key in ("num_samples", "max_concurrent"):
        value = flags.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"--{key.replace('_', '-')} {value!r}: must be an integer >= 1")


def load_study(space_file: str | Path, base: GRPOConfig, overrides: dict[str, Any] | None = None, name: str | None = None) -> Study:
    """A study from a search-space YAML on top of a base config; `overrides` are CLI flags (None = keep)."""
    check_flags(overrides or {})
    path = Path(space_file)
    raw = read_yaml(path, f"search space {str(path)!r} does not exist: check the path (ready-made: tune/beta_lr.yaml, tune/presets.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a `space:` section, got {type(raw).__name__}")
    if "space" not in raw:
        if any(key in STUDY_KEYS for key in raw):
            raise ConfigError(f"{path}: no `space:` section: put the searched keys under space:")
        names = {f.name for f in dataclasses.fields(GRPOConfig)} | set(ALIASES) | {PRESET_KEY}
        for key in raw:
            hint = suggest(key, STUDY_KEYS)
            if str(key).split(".")[0] not in names and hint:
                raise ConfigError(f"{path}: unknown study key {key!r}: {hint}")
        raw = {"space": raw}  # the file is the space itself
    for key in raw:
        if key not in STUDY_KEYS:
            hint = suggest(key, STUDY_KEYS, end=" ")
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


def search_algorithm(study: Study, max_concurrent: int = 0) -> Any:
    if study.search == "random":
        from ray.tune.search import BasicVariantGenerator

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
