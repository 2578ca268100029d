"""Where the time before the first step goes: wall-clock marks from the driver, the engines and
trainer rank 0, written once as OUTPUT_DIR/startup.json (and read by `bench/vs_trl.py`).

Engines and the trainer group start at the same time, so the phases overlap: each is reported as
its own span, and `to_first_step_s` is the wall time a user waits.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_FILE = "startup.json"

# (phase, from mark, to mark): what each reported number spans
PHASES = (
    ("before_train_s", "process_start", "train_called"),  # Python, imports, CLI parsing
    ("checks_s", "train_called", "ray_called"),  # model resolution, data, config checks
    ("ray_start_s", "ray_called", "ray_ready"),
    ("reward_and_tool_checks_s", "ray_ready", "pool_called"),  # their imports, in a Ray worker
    ("held_out_eval_s", "eval_called", "eval_done"),  # eval_at_start_and_end only
    ("engine_start_s", "pool_called", "engines_ready"),  # placement, process, vLLM load (overlaps the trainer's)
    ("trainer_group_start_s", "pool_called", "worker_started"),  # Ray Train controller + worker processes
    ("trainer_init_s", "worker_started", "policy_ready"),  # model load + DeepSpeed initialize
    ("first_sync_s", "policy_ready", "first_sync_done"),  # includes waiting for the engines
    ("first_step_s", "first_sync_done", "first_step_done"),
    ("to_first_step_s", "train_called", "first_step_done"),
)


def process_start() -> float | None:
    """When this process started (wall clock), for the time a command spends before `train()`."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - no psutil, or a platform that hides it: not reported
        return None


@dataclass
class Timeline:
    """Wall-clock marks (time.time(), comparable across the processes of one machine; across
    nodes only as good as their clocks). Crosses the process boundary inside LoopConfig."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, time.time() if at is None else at)  # the first time counts

    def phases(self) -> dict[str, float]:
        m = self.marks
        return {name: round(m[b] - m[a], 3) for name, a, b in PHASES if a in m and b in m}

    def write(self, output_dir: str | Path) -> dict[str, float]:
        phases = self.phases()
        Path(output_dir, STARTUP_FILE).write_text(json.dumps({"phases_s": phases, "marks": self.marks}, indent=1))
        return phases


def read_startup(output_dir: str | Path) -> dict[str, float]:
    path = Path(output_dir) / STARTUP_FILE
    return json.loads(path.read_text())["phases_s"] if path.is_file() else {}
