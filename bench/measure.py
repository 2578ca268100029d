"""Run one benchmark arm in a child process and measure its memory (shared by the benches).

Each arm gets its own process so its peak memory is its own; the parent samples the child's whole
process tree (Ray workers, vLLM engine cores) every 0.2 s and reads the arm's record back."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHILD_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def strict_json(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that writes strict JSON (what every JSON reader takes): a NaN or infinity, i.e. a
    number that was not measured, is written as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:  # noqa: BLE001 - a process that just exited
        return 0


def process_name(p) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline()[:1])
    except Exception:  # noqa: BLE001 - a process that just exited
        return ""


# A process's role from its title (Ray names its workers `ray::<Class>.<method>` / `ray::<task>`):
# the first role with a matching needle wins; a process that matches none takes its parent's role.
ROLES = (
    ("ray gcs", ("gcs_server",)),
    ("raylet", ("raylet",)),
    ("rollout engine", ("RolloutEngine",)),
    ("trainer worker", ("RayTrainWorker",)),
    ("ray train actors", ("TrainController", "SynchronizationActor", "DatasetManager", "AutoscalingCoordinator", "PreemptionWatcher")),
    ("idle ray workers", ("ray::IDLE",)),
    ("reward / eval tasks", ("ray::",)),
    ("ray agents", ("/ray/",)),  # dashboard head and agent, runtime-env agent, log monitor, autoscaler monitor
)


def role(p, root_pid: int) -> str:
    """The role of one process of an arm's tree, read at each sample: a Ray worker's title changes
    when it becomes an actor (`ray::IDLE` -> `ray::RolloutEngine`)."""
    if p.pid == root_pid:
        return "driver"
    title = process_name(p) + " " + " ".join(_cmdline(p))
    name = next((r for r, needles in ROLES if any(n in title for n in needles)), None)
    if name is None:
        parent = _parent(p)
        return role(parent, root_pid) if parent is not None else "other"
    return name


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - a process that just exited
        return []


def _parent(p):
    try:
        return p.parent()
    except Exception:  # noqa: BLE001 - a process that just exited
        return None


def run_child(script: str, args: list[str], label: str, part: Callable[[list], list] | None = None) -> dict:
    """`python script --child ... --record FILE`; returns the record plus `peak_rss_gib` (the whole
    tree), `rss_at_peak_gib` ({role: GiB} at the sample where the tree peaked: it sums to the peak),
    `peak_rss_by_role_gib` (each role's own peak) and, when `part` picks processes out of the tree,
    `part_rss_gib` (their peak) and `part_rss_median_gib` (the median over the samples: the steady
    state, not the load spike)."""
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        record = f.name
    proc = subprocess.Popen([sys.executable, script, *args, "--record", record], env={**os.environ, **CHILD_ENV})
    root, peak, part_samples = psutil.Process(proc.pid), 0, []
    at_peak: dict[str, int] = {}
    role_peak: dict[str, int] = {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            by_role: dict[str, int] = {}
            for p in tree:
                r = role(p, root.pid)
                by_role[r] = by_role.get(r, 0) + rss(p)
            total = sum(by_role.values())
            if total > peak:
                peak, at_peak = total, by_role
            for r, v in by_role.items():
                role_peak[r] = max(role_peak.get(r, 0), v)
            if part is not None and (chosen := part(tree)):
                part_samples.append(max(rss(p) for p in chosen))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"arm {label!r} failed with exit code {proc.returncode}")
    data = json.loads(Path(record).read_text())
    os.unlink(record)
    parts = {"part_rss_gib": max(part_samples, default=0) / 2**30, "part_rss_median_gib": statistics.median(part_samples or [0]) / 2**30}
    gib = lambda d: {r: v / 2**30 for r, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    memory = {"peak_rss_gib": peak / 2**30, "rss_at_peak_gib": gib(at_peak), "peak_rss_by_role_gib": gib(role_peak)}
    return {**memory, **(parts if part else {}), **data}


def role_table(runs: dict[str, dict]) -> list[str]:
    """Markdown rows of peak RSS per role for `run_child` results ({column label: result}): each
    cell is GiB at the tree's peak / the role's own peak, roles by their largest own peak."""
    own = {a: r.get("peak_rss_by_role_gib", {}) for a, r in runs.items()}
    roles = sorted({role for o in own.values() for role in o}, key=lambda role: -max(o.get(role, 0.0) for o in own.values()))
    lines = [f"| {'role':24s} | " + " | ".join(f"{a:>16s}" for a in runs) + " |", "|" + "---|" * (1 + len(runs))]
    for role_name in roles:
        cells = (f"{r.get('rss_at_peak_gib', {}).get(role_name, 0.0):7.2f} / {own[a].get(role_name, 0.0):6.2f}" for a, r in runs.items())
        lines.append(f"| {role_name:24s} | " + " | ".join(cells) + " |")
    return lines
