"""`grpo-ray tune`: hyperparameter search over whole GRPO runs with Ray Tune.

Each Tune trial (`trial.GRPOTrial`) is one complete GRPO run -- its own vLLM rollout engines and
Ray Train workers, started by `driver.train` -- whose every `ray.train.report` is handed to Tune,
so ASHA can stop poor trials early and PBT can exploit/explore `beta` and `learning_rate` from
checkpoints (`grpo_ray.checkpoints` seeds the clone).

One module per role, imported in this order (none imports a later one):

    space      the study file, its validation, the Tune search algorithm / scheduler / param space
    admission  what a trial holds, the cluster-wide admission ticket, the capacity check
    report     table, best config, curves, summary.json
    trial      GRPOTrial (Tune's trainable) and the report-forwarding Ray Train callback
    study      run_study and `run_cli`, the entry point cli.py calls

The package sits above the driver: it imports config/checkpoints/driver (and below); only cli
imports it.
"""

from typing import Any

from grpo_ray.tuning.space import SCHEDULERS, SEARCHERS  # the CLI's choices (space imports no Ray)

__all__ = ["SCHEDULERS", "SEARCHERS", "run_cli"]


def run_cli(args: Any, load_config: Any) -> int:
    """`grpo-ray tune ...`; imported on call, so `grpo_ray.tuning.space` stays light (no Ray)."""
    from grpo_ray.tuning.study import run_cli as run

    return run(args, load_config)
