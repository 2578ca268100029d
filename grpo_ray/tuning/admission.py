"""Admission: a trial takes the cluster's resources for its whole run at once, or waits holding none.

Ray has no nested placement groups, and both `RolloutPool` and Ray Train V2 create placement groups
of their own, so a trial's Tune placement group cannot be the one its engines and trainers run in
(tune/README.md has the reasoning). Instead:

* Tune's placement group for a trial holds only the trial's driver process: one bundle of
  1 byte of memory (no CPU, so it never fragments a node's CPUs).
* Before it starts its run, a trial is *admitted*: it takes a cluster-wide admission ticket (a
  named actor that dies with the trial), then requests ONE placement group covering all its
  engines and trainer workers, gang-scheduled (the autoscaler sees the whole trial as one
  request), releases it and immediately starts the run, whose own placement groups take those
  resources. The ticket is handed back at the run's first report.
* So only the ticket holder ever acquires resources; every other trial holds either nothing or
  everything it needs. No two trials can each hold part of what the other waits for.

`check_capacity` refuses, before a study starts, a trial that could never fit.
"""

from __future__ import annotations

import math
import time
from typing import Any

from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.ray_compat import autoscaler_max_resources
from grpo_ray.resources import run_bundles, total
from grpo_ray.tuning.space import Study

# Tune's placement group per trial holds the trial's driver process only: 1 byte of memory, no
# CPU (a fractional CPU would stop a node from fitting whole-CPU engine/trainer bundles).
TRIAL_HEAD_BUNDLE = {"memory": 1}
ADMISSION_NAME = "grpo-ray-admission"
ADMISSION_NAMESPACE = "grpo_ray"


def log(message: str) -> None:
    print(f"[grpo-ray tune] {message}", flush=True)


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
            log(f"{self.holder}: waiting for {total(self.bundles)} (the whole trial at once; an autoscaler adds nodes for it)")
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


def study_ray_cpus(study: Study, max_concurrent: int) -> int:
    cfg = study.base_config()
    need = total(run_bundles(cfg)).get("CPU", 0.0)
    return max(int(math.ceil(need * max_concurrent)) + 1, cfg.cluster.num_cpus or 0)


def check_capacity(study: Study, fixed_size: bool) -> None:
    """A trial that can never fit would wait forever: say so now. The bound is the autoscaler's max
    size when Ray publishes it, else today's resources -- an error on a fixed-size (embedded)
    cluster, only a warning on a joined one, whose autoscaler may not publish its max."""
    import ray

    need = total(run_bundles(study.base_config()))
    limit = autoscaler_max_resources()
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
