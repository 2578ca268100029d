"""The private Ray hooks grpo-ray needs, each named once, with why (Ray 2.60 has no public API for them).

Everything else uses Ray's public API. `tests/test_ray_compat.py` checks that every hook below
still exists, so a Ray upgrade that moves one fails there, loudly, rather than mid-run.

    hook                                           why
    ray._private.worker.get_dashboard_url          is a dashboard running? (the public route is only
                                                   `ray.init()`'s return value, which a joined or
                                                   caller-started Ray does not hand us)
    TorchTrainer._create_default_callbacks,        leave out Ray Train's placement-group cleaner when no
      PlacementGroupCleanerCallback                dashboard runs (it polls the State API, which the
                                                   dashboard serves, and warns every second)
    ray.train.v2._internal.execution.context       Ray Train V2 logs every report's metrics at INFO from
      (its module logger)                          this logger; our progress bar says it better
    ray._private.authentication.                   send Ray's auth token to the job server the way
      authentication_token_setup                   `ray.init` does when joining a cluster
    ray._private.state.state.                      the most resources an autoscaling cluster can grow to
      get_max_resources_from_cluster_config        (a Tune trial that can never fit is refused up front)
    Trainable._storage.trial_fs_path               a class trainable's trial dir in the study's storage
                                                   (Tune's public `get_context()` serves function trainables)
    ray.init(_node_ip_address=, _system_config=    the embedded Ray (embedded_init_kwargs, for
      {"idle_worker_killing_time_threshold_ms",    driver.init_ray): bind to loopback where Ray
       "enable_metrics_collection"})               allows it; keep idle reward workers alive; no
                                                   unauthenticated Prometheus endpoint on 0.0.0.0
    ray._private.worker.                           where log_to_driver's worker lines go (grpo_ray/logs.py
      global_worker_stdstream_dispatcher           sends them to OUTPUT_DIR/logs, only ours to the terminal)
    ray._private.worker (its module logger)        ray.init's routine start notices (logs.quiet_ray_init)
    AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT  the two Prometheus ports a head serves with no off
                                                   switch (README "what listens where"; tested)
    TorchTrainer._register_sigint_handler          Ctrl-C: Ray Train exits 1 with no message from inside
                                                   its handler; ours aborts the same way, then raises
                                                   KeyboardInterrupt so the CLI exits 130 and says so

It imports only Ray (Ray Train at import: jobs.py, which must stay light, imports it lazily).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Callable

import ray
from ray.train.torch import TorchTrainer

PG_CLEANER_CALLBACK = "PlacementGroupCleanerCallback"
IDLE_WORKER_KILLING_KEY = "idle_worker_killing_time_threshold_ms"  # a Ray `_system_config` key (driver.init_ray)
METRICS_COLLECTION_KEY = "enable_metrics_collection"  # a Ray `_system_config` key too (driver.init_ray)
PRESTART_KEY = "prestart_worker_first_driver"  # and this one
INIT_PRIVATE_KWARGS = ("_node_ip_address", "_system_config")  # ray.init arguments driver.init_ray passes
TOKEN_SETUP_MODULE = "ray._private.authentication.authentication_token_setup"
RAY_WORKER_LOGGER = "ray._private.worker"  # logs ray.init's start notices
RAY_PRINTER = "ray_print_logs"  # the name Ray gives its log_to_driver handler


def embedded_init_kwargs(idle_worker_killing_ms: int) -> dict[str, Any]:
    """`ray.init`'s private arguments for the embedded Ray (driver.init_ray): bind to loopback where
    Ray allows it, kill idle workers only after `idle_worker_killing_ms` (Ray's default: 1 s), and
    no metrics collection: with it, each node's agent serves Prometheus metrics over HTTP on
    0.0.0.0 with no authentication, for a dashboard the embedded Ray does not run. No idle workers
    prestarted for the driver (one per CPU, by default): the engines and trainers are actors with
    their own processes and the reward tasks run under the trainer's environment, so they would
    only cost start-up CPU and ~130 MB each."""
    return {
        "_node_ip_address": "127.0.0.1",
        "_system_config": {IDLE_WORKER_KILLING_KEY: idle_worker_killing_ms, METRICS_COLLECTION_KEY: False, PRESTART_KEY: False},
    }


def unswitchable_metrics_ports() -> dict[int, str]:
    """The Prometheus endpoints a Ray 2.60 head serves over plain HTTP on 0.0.0.0 with no switch
    to turn them off (metrics collection off removes the per-node one): {port: whose}."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    return {AUTOSCALER_METRIC_PORT: "autoscaler monitor", DASHBOARD_METRIC_PORT: "dashboard process (its own request counters)"}


def dashboard_running() -> bool:
    """Whether the connected Ray runs a dashboard (and so serves the State and Job APIs)."""
    try:
        from ray._private.worker import get_dashboard_url

        return bool(get_dashboard_url())
    except Exception:  # noqa: BLE001 - not connected
        return False


class GRPOTorchTrainer(TorchTrainer):
    """`TorchTrainer` minus Ray Train's placement-group cleaner where Ray runs no dashboard (the
    embedded Ray): the cleaner asks the State API, which the dashboard serves, whether the
    controller lives, and without it warns on the driver's terminal every second of the run while
    never cleaning anything. Ray removes a finished run's placement group either way."""

    def _register_sigint_handler(self, controller: Any) -> None:
        """Ctrl-C: Ray Train's own handler aborts the run, then exits through sys.exit inside a
        signal handler (exit code 1, no message). This one aborts the same way, then raises
        KeyboardInterrupt, so the CLI says what happened and exits 130."""

        def on_sigint(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
            print("[grpo-ray] interrupted: stopping the run (its checkpoints are kept) ...", file=sys.stderr, flush=True)
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # the controller ends itself while aborting
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if dashboard_running():
            return callbacks
        return [c for c in callbacks if type(c).__name__ != PG_CLEANER_CALLBACK]


def quiet_train_report_logs() -> None:
    """Ray Train V2 logs every report's full metrics dict at INFO; raise that logger to WARNING."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # pragma: no cover - a Ray without Train V2 (tests/test_ray_compat.py fails first)
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def enable_job_token_auth() -> bool:
    """Send Ray's auth token when one is available and RAY_AUTH_MODE is unset, as `ray.init` does when
    it joins a cluster at host:port (a head started where ~/.ray/auth_token exists requires it): for
    the Job Submission client and for Ray Client (`ray://`), which do not do it themselves. The token comes
    from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE=disabled opts out."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication (tests/test_ray_compat.py fails first)
        return False
    log = logging.getLogger(TOKEN_SETUP_MODULE)
    level = log.level
    log.setLevel(logging.ERROR)  # its "token authentication is enabled" notice is for cluster starts
    try:
        return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))
    finally:
        log.setLevel(level)


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the connected cluster's autoscaler can provide (None: no autoscaler
    config published, e.g. a fixed-size or embedded cluster)."""
    from ray._private.state import state as ray_state

    try:
        return ray_state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config to read
        return None


def trial_dir(trainable: Any) -> str:
    """A class trainable's trial dir in the study's storage (its local log dir if it has none)."""
    storage = getattr(trainable, "_storage", None)
    return getattr(storage, "trial_fs_path", None) or trainable.logdir


def swap_log_to_driver_handler(name: str, handler: Callable[[dict], None]) -> Callable[[dict], None] | None:
    """Replace Ray's log_to_driver printer with `handler` (registered as `name`); returns Ray's printer,
    or None where log_to_driver is off. Ray has no public hook for where those lines go."""
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printer = next((h for n, h in dispatcher.handlers if n == RAY_PRINTER), None)
    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, handler)
    return printer
