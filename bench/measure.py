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


def run_child(script: str, args: list[str], label: str, part: Callable[[list], list] | None = None) -> dict:
    """`python script --child ... --record FILE`; returns the record plus `peak_rss_gib` (the whole
    tree) and, when `part` picks processes out of the tree, `part_rss_gib` (their peak) and
    `part_rss_median_gib` (the median over the samples: the steady state, not the load spike)."""
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        record = f.name
    proc = subprocess.Popen([sys.executable, script, *args, "--record", record], env={**os.environ, **CHILD_ENV})
    root, peak, part_samples = psutil.Process(proc.pid), 0, []
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(rss(p) for p in tree))
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
    return {"peak_rss_gib": peak / 2**30, **(parts if part else {}), **data}
