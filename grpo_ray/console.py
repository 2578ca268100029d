"""What a person sees on the terminal during a run: one banner, one progress bar, one summary.

The bar is drawn by the driver alone, from OUTPUT_DIR/metrics.jsonl as rank 0 writes it, so its
rate and ETA are the run's own and no worker process redraws it (worker output goes to
OUTPUT_DIR/logs, grpo_ray/logs.py). A tuning trial runs `train` inside a Ray worker: no bar there.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import ray

from grpo_ray.config import GRPOConfig
from grpo_ray.logs import LOGS_DIR, OURS
from grpo_ray.metrics import METRICS_FILE, read_metrics
from grpo_ray.startup import STARTUP_FILE, read_startup

POLL_S = 0.5


def banner(cfg: GRPOConfig, model_path: str, num_prompts: tuple[int, int], out: Path, address: str | None) -> str:
    """One line: what trains on what, where it runs, where its outputs go."""
    cl = cfg.cluster
    task = cfg.data.task if isinstance(cfg.data.task, str) else "in-memory data"
    device = "1 GPU" if cl.use_gpu else f"{cl.trainer_num_cpus} CPU"
    where = f"Ray at {address}" if address else "embedded Ray on this machine"
    engines = f"{cl.num_rollout_actors} vLLM engine{'s' if cl.num_rollout_actors > 1 else ''}"
    workers = f"{cl.num_trainer_workers} trainer worker{'s' if cl.num_trainer_workers > 1 else ''} x {device} (ZeRO {cl.zero_stage})"
    lora = f", LoRA r={cfg.lora_r}" if cfg.use_peft else ""
    return (
        f"{OURS} GRPO on {Path(model_path).name}{lora}, {task}: {num_prompts[0]} train / {num_prompts[1]} held-out prompts, "
        f"{cfg.max_steps} steps | {engines}, {workers} | {where} | output {out} (library logs: {out / LOGS_DIR})"
    )


def in_driver() -> bool:
    """Whether this process is a Ray driver (not a task or actor, such as a tuning trial)."""
    return not ray.is_initialized() or ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE


PROGRESS_ENV = "GRPO_RAY_PROGRESS"  # "bar" or "lines": how progress is shown (default: bar on a terminal)


class Progress:
    """`with Progress(out, total, start):` follow metrics.jsonl on the driver's terminal.

    On a terminal, a tqdm bar on stderr, cleared if the run fails so that the error line stands
    alone; elsewhere (a log file, a Ray job's log) a `[grpo-ray] step` line on stdout about every
    tenth of the run, which stays readable where a redrawn bar would not."""

    def __init__(self, out: Path, total: int, start: int = 0) -> None:
        self.out, self.total, self.shown = out, total, start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True, name="grpo-ray-progress")
        self.bar: Any = None
        self.held_out: float | None = None
        self.times: list[float] = []  # step_time_s of the rows seen
        self.every = 1  # lines mode: print when the step crosses a multiple of this

    def __enter__(self) -> "Progress":
        if not in_driver():
            return self
        self.every = max(1, self.total // 10)
        if os.environ.get(PROGRESS_ENV, "bar" if sys.stderr.isatty() else "lines") == "bar":
            from tqdm import tqdm

            # tqdm's own rate would count the start-up as a step: s/step and ETA come from the rows
            fmt = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
            self.bar = tqdm(total=self.total, initial=self.shown, desc="GRPO", file=sys.stderr, dynamic_ncols=True, bar_format=fmt)
        self.thread.start()
        return self

    def __exit__(self, failed: type | None, *exc: Any) -> None:
        if not self.thread.is_alive():
            return
        self.stop.set()
        self.thread.join(timeout=5)
        if failed is None:
            self._refresh()  # the last rows, written just before the run ended
        if self.bar is not None:
            self.bar.leave = failed is None
            self.bar.close()

    def _follow(self) -> None:
        while not self.stop.wait(POLL_S):
            self._refresh()

    def _refresh(self) -> None:
        try:
            rows = [r for r in read_metrics(self.out) if r.get("step", 0) > self.shown]
        except (OSError, ValueError):  # a line being written, or the file being truncated on resume
            return
        if not rows:
            return
        last = rows[-1]
        self.times += [r["step_time_s"] for r in rows if r.get("step_time_s") is not None]
        recent = self.times[-10:]
        per_step = sum(recent) / len(recent) if recent else float("nan")
        left = int(per_step * (self.total - int(last["step"]))) if recent else 0
        post = {
            "reward": f"{_num(last.get('reward_mean')):.3f}",
            "loss": f"{_num(last.get('loss')):+.4f}",
            "s/step": f"{per_step:.1f}",
            "ETA": f"{left // 60}:{left % 60:02d}",
        }
        evals = [r for r in rows if any(k.startswith("eval/mean@") for k in r)]
        if evals:  # the step's held-out mean reward (eval_strategy: steps)
            self.held_out = next(v for k, v in evals[-1].items() if k.startswith("eval/mean@"))
        if self.held_out is not None:
            post["held-out"] = f"{self.held_out:.3f}"
        step, before = int(last["step"]), self.shown
        self.shown = step
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - before)
        elif step // self.every > before // self.every or step == self.total:
            print(f"{OURS} step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in post.items()), flush=True)


def _num(value: Any) -> float:
    """A logged number, or NaN where the row has none (metrics.jsonl writes NaN as null)."""
    return float("nan") if value is None else float(value)


def summary(result: Any, seconds: float) -> str:
    """The closing line of `grpo-ray train` (`result`: a driver.RunResult)."""
    rows = [r for r in read_metrics(result.output_dir) if r.get("step", 0) > 0 and r.get("reward_mean") is not None]
    reward = f"reward {rows[0]['reward_mean']:.3f} -> {rows[-1]['reward_mean']:.3f} (step {rows[0]['step']} -> {rows[-1]['step']})" if rows else "no step logged"
    held_out = ""
    if result.eval and "start" in result.eval and "end" in result.eval:
        held_out = f"; held-out accuracy {result.eval['start']:.3f} -> {result.eval['end']:.3f}"
    out = Path(result.output_dir)
    first = read_startup(out).get("to_first_step_s")
    started = f" (first step done after {first:.0f} s: {STARTUP_FILE})" if first is not None else ""
    return (
        f"done: {result.steps} steps in {seconds:.0f} s{started}; {reward}{held_out}; model {result.checkpoint_dir}; "
        f"curve {result.reward_curve}; metrics {out / METRICS_FILE}; logs {out / LOGS_DIR}"
    )
