"""The study runner: `grpo-ray tune` (cli.py parses, `run_cli` runs) and `run_study`, which starts
(or joins) Ray, checks capacity, runs Ray Tune over `GRPOTrial`s and writes the report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from grpo_ray.config import ConfigError
from grpo_ray.driver import init_ray
from grpo_ray.tuning.admission import check_capacity, study_ray_cpus
from grpo_ray.tuning.report import TABLE_CSV, StudyResult, record_from_result, write_summary
from grpo_ray.tuning.space import Study, load_study, make_scheduler, param_space, search_algorithm
from grpo_ray.tuning.trial import make_trainable, trial_dirname

STUDY_FILE = "study.yaml"  # everything needed to rebuild the study (for --resume)


def run_study(study: Study, root: str | Path, address: str | None = None, resume: bool = False, overwrite: bool = False) -> StudyResult:
    """Run (or `resume`) the study in ROOT/NAME: Tune's experiment dir plus our table, best config and plot."""
    import ray
    from ray import tune

    root = Path(root).resolve()
    study_dir = root / study.name
    if resume:
        if not tune.Tuner.can_restore(str(study_dir)):
            raise ConfigError(f"--resume: {str(study_dir)!r} holds no Tune study to resume; drop --resume to start one")
    elif study_dir.exists() and any(p.name != STUDY_FILE for p in study_dir.iterdir()):  # only study.yaml: it never started
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
        over: dict[str, Any] = {"cluster": {"address": address}} if address else {"cluster": {"num_cpus": study_ray_cpus(study, max_concurrent)}}
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
                    search_alg=search_algorithm(study, max_concurrent),
                    num_samples=study.num_samples,
                    max_concurrent_trials=None if study.search == "random" else max_concurrent,
                    trial_dirname_creator=trial_dirname,
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
