"""Where the output of a run goes.

The terminal gets grpo-ray's own lines: `[grpo-ray] ...` notices (from the driver or any worker),
the result, or the one-line error, which comes last. Everything else the Ray processes print
(vLLM, DeepSpeed, Ray Train, a failing worker's traceback) goes to `OUTPUT_DIR/logs/ROLE.log`,
one file per process role (RolloutEngine, RayTrainWorker, TrainController, score_task, ...).
`--debug` (or GRPO_RAY_DEBUG=1) prints it all on the terminal as well, as Ray does by default.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable

OURS = "[grpo-ray]"  # the prefix of every line meant for the terminal
LOGS_DIR = "logs"


# Lines ray.init logs on the driver at every start, for nothing the user must act on: the local
# Ray's token authentication (README "Using it"), the start itself, and the SIGTERM
# handler that grpo_ray/cluster.py installs itself.
RAY_NOTICES = {
    "worker": ("Started a local Ray instance", "Connecting to existing Ray cluster", "SIGTERM handler is not set"),
    "token": ("Token authentication is enabled",),
}


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return debug_enabled() or not record.getMessage().startswith(self.starts)


def quiet_ray_init() -> None:
    """Before `ray.init`: its routine start notices stay off the terminal (shown with --debug)."""
    from grpo_ray.ray_compat import RAY_WORKER_LOGGER, TOKEN_SETUP_MODULE  # lazy: Ray Train is heavy

    loggers = {"worker": RAY_WORKER_LOGGER, "token": TOKEN_SETUP_MODULE}
    for key, starts in RAY_NOTICES.items():
        log = logging.getLogger(loggers[key])
        if not any(isinstance(f, _DropNotices) for f in log.filters):
            log.addFilter(_DropNotices(starts))


def debug_enabled() -> bool:
    return os.environ.get("GRPO_RAY_DEBUG") == "1"


class WorkerOutput:
    """Ray's log_to_driver handler, replaced: each batch of worker lines is appended to its role's
    file; only grpo-ray's lines are printed (all of them with --debug)."""

    def __init__(self, ray_printer: Callable[[dict], None] | None) -> None:
        self.ray_printer = ray_printer
        self.dir: Path | None = None
        self.terminal = True
        self.lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        if self.dir is not None:
            role = re.sub(r"[^A-Za-z0-9_.-]", "_", str(data.get("actor_name") or data.get("task_name") or data.get("pid") or "worker"))
            with self.lock:
                self.dir.mkdir(parents=True, exist_ok=True)  # recreated after an --overwrite removed it
                with open(self.dir / f"{role}.log", "a") as f:
                    f.writelines(f"pid={data.get('pid')} {line}\n" for line in lines)
        if not self.terminal:
            return
        if debug_enabled() and self.ray_printer is not None:
            self.ray_printer(data)
            return
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in lines:
            if line.lstrip().startswith(OURS):
                print(line.lstrip(), file=sink, flush=True)


_router: WorkerOutput | None = None


def route_worker_output() -> None:
    """Call once after `ray.init(log_to_driver=True)`: worker lines go through `WorkerOutput`."""
    global _router
    from grpo_ray.ray_compat import swap_log_to_driver_handler

    router = _router or WorkerOutput(None)
    printer = swap_log_to_driver_handler("grpo_ray_logs", router)
    if _router is None:
        router.ray_printer = printer
        _router = router


def set_log_dir(output_dir: str | Path) -> Path:
    """Worker lines from now on go to OUTPUT_DIR/logs (before this: only grpo-ray's are printed)."""
    path = Path(output_dir) / LOGS_DIR
    if _router is not None:
        _router.dir = path
    return path


def log_dir() -> Path | None:
    return _router.dir if _router is not None else None


def new_command() -> None:
    """A CLI command starts (several may run in one process: tests, notebooks): no log dir yet."""
    if _router is not None:
        _router.dir = None
        _router.terminal = True


def stop_terminal_output() -> None:
    """Before the final error line: later worker lines (a shutdown's) go to the files only."""
    if _router is not None:
        _router.terminal = False
