"""Run metrics: one JSON line per logged step, TensorBoard / MLflow mirrors, a reward-curve plot.

`metrics.jsonl` is the source of truth: on resume it is cut back to the checkpoint's step,
so every step appears exactly once however often the run was restarted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from grpo_ray.config import GRPOConfig

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """Drop lines past `last_step` (steps a crashed run logged after its last checkpoint)."""
    path = Path(output_dir) / METRICS_FILE
    rows = [r for r in read_metrics(output_dir) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


class MetricsLogger:
    """Appends metrics every `logging_steps`; mirrors them to the configured trackers."""

    def __init__(self, output_dir: str | Path, cfg: GRPOConfig, resume_step: int = 0) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every = cfg.logging_steps
        self.max_steps = cfg.max_steps
        truncate_metrics(self.dir, resume_step)
        self.file = open(self.dir / METRICS_FILE, "a", buffering=1)
        self.tb = None
        self.mlflow = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if "mlflow" in cfg.report_to:  # pragma: no cover - optional extra
            import mlflow

            mlflow.start_run(run_name=self.dir.name)
            self.mlflow = mlflow

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        if step % self.every and step != self.max_steps:
            return
        row = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(row) + "\n")
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.mlflow is not None:  # pragma: no cover
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:  # pragma: no cover
            self.mlflow.end_run()
        plot_reward_curve(self.dir)


def plot_reward_curve(output_dir: str | Path, label: str | None = None) -> Path | None:
    rows = [r for r in read_metrics(output_dir) if "reward_mean" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r.get("reward_std", 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, alpha=0.5, label=label or "reward_mean")
    window = max(1, min(10, len(mean) // 5))
    smooth = [sum(mean[max(0, i - window + 1): i + 1]) / len(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))]
    ax.plot(steps, smooth, linewidth=2, label=f"moving average ({window} steps)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(f"GRPO reward: {Path(output_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(output_dir) / CURVE_FILE
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
