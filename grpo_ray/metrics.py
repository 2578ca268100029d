"""Run metrics: one JSON line per logged step, TensorBoard / MLflow / W&B mirrors, a reward-curve plot.

`metrics.jsonl` is the source of truth: on resume it is cut back to the checkpoint's step,
so every step appears exactly once however often the run was restarted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from grpo_ray.config import ConfigError, GRPOConfig

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"
COMPLETIONS_FILE = "completions.jsonl"  # log_completions
TRACKERS_FILE = "trackers.json"  # MLflow / W&B run ids, so --resume continues the same runs


def json_line(row: dict[str, Any]) -> str:
    """One metrics line of strict JSON: a NaN/inf value (no reward scored, say) is written as null,
    since `NaN` is not JSON and strict parsers (jq, JavaScript, Go) reject the whole file."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: str | Path, last_step: int, name: str = METRICS_FILE) -> None:
    """Drop lines past `last_step` (steps a crashed run logged after its last checkpoint)."""
    path = Path(output_dir) / name
    if name != METRICS_FILE and not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json_line(r) for r in rows))
    os.replace(tmp, path)


class Tracker(Protocol):
    """An experiment tracker that mirrors metrics.jsonl (TensorBoard, MLflow, W&B)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, out: Path, cfg: GRPOConfig, resume_step: int, run_id: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.run_id = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(rows[0]) if rows else []
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in columns) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """MLflow through its client (no global active run). Where to is MLflow's own environment:
    MLFLOW_TRACKING_URI (default: sqlite in OUTPUT_DIR), MLFLOW_EXPERIMENT_NAME (default grpo-ray),
    MLFLOW_TRACKING_TOKEN etc. are read by MLflow itself and never copied anywhere."""

    def __init__(self, out: Path, cfg: GRPOConfig, resume_step: int, run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "grpo-ray")
        experiment = self.client.get_experiment_by_name(name)
        # the default local store keeps artifacts (log_completions tables) in OUTPUT_DIR, not ./mlruns
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else (out / "mlflow-artifacts").resolve().as_uri()
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifact_location=local)
        if run_id is not None and self._logged_past(run_id, resume_step):
            run_id = self._rewound_copy(run_id, resume_step, out.name)
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in flatten(cfg.to_dict()).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        self.run_id = run_id

    def _logged_past(self, run_id: str, step: int) -> bool:
        run = self.client.get_run(run_id)
        return any(m.step > step for key in run.data.metrics for m in self.client.get_metric_history(run_id, key))

    def _rewound_copy(self, run_id: str, step: int, run_name: str) -> str:
        """MLflow cannot delete logged points, and a resume re-runs the steps a crash logged after
        its last checkpoint: continue in a new run holding the old one's params and history up to
        `step` (tags link the two; the old run ends KILLED), so every step is logged once."""
        from mlflow.entities import Metric, Param, RunTag

        old = self.client.get_run(run_id)
        new_id = self.client.create_run(old.info.experiment_id, run_name=run_name, tags={"grpo_ray.resumed_from": run_id}).info.run_id
        params = [Param(k, v) for k, v in old.data.params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(new_id, params=params[i : i + 100])
        points = [Metric(key, m.value, m.timestamp, m.step) for key in old.data.metrics for m in self.client.get_metric_history(run_id, key) if m.step <= step]
        for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(new_id, metrics=points[i : i + 1000])
        self.client.log_batch(run_id, tags=[RunTag("grpo_ray.superseded_by", new_id)])
        self.client.set_terminated(run_id, status="KILLED")
        return new_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        data = {c: [r[c] if isinstance(r[c], (int, float, str)) else json.dumps(r[c]) for r in rows] for c in (rows[0] if rows else {})}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{name}/step_{step}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """Weights & Biases. WANDB_API_KEY / WANDB_PROJECT / WANDB_ENTITY / WANDB_MODE (e.g. offline)
    come from the environment, as in transformers' integration; the key is never written out."""

    def __init__(self, out: Path, cfg: GRPOConfig, resume_step: int, run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "grpo-ray"),
            name=out.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(out),
            config=cfg.to_dict(),
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        data = [[r[c] if isinstance(r[c], (int, float, str)) else json.dumps(r[c]) for c in columns] for r in rows]
        self.run.log({name: wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKER_CLASSES: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(cfg: GRPOConfig) -> None:
    """Before any work starts: every `report_to` tracker's package is importable."""
    for name in cfg.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"report_to: {name!r} needs the {TRACKER_PACKAGES[name]} package: pip install 'grpo-ray[trackers]', or drop {name!r} from report_to")


def open_trackers(out: Path, cfg: GRPOConfig, resume_step: int) -> dict[str, Tracker]:
    """Start each `report_to` tracker; a resumed run continues the same MLflow/W&B run (ids in trackers.json)."""
    ids_file = out / TRACKERS_FILE
    ids = json.loads(ids_file.read_text()) if resume_step and ids_file.is_file() else {}
    trackers: dict[str, Tracker] = {}
    for name in cfg.report_to:
        trackers[name] = TRACKER_CLASSES[name](out, cfg, resume_step, ids.get(name))
    ids = {name: t.run_id for name, t in trackers.items() if getattr(t, "run_id", None)}
    ids_file.write_text(json.dumps(ids))
    return trackers


class MetricsLogger:
    """Appends metrics every `logging_steps`; mirrors them to the configured trackers."""

    def __init__(self, output_dir: str | Path, cfg: GRPOConfig, resume_step: int = 0) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every = cfg.logging_steps
        self.max_steps = cfg.max_steps
        truncate_metrics(self.dir, resume_step)
        truncate_metrics(self.dir, resume_step, COMPLETIONS_FILE)
        self.file = open(self.dir / METRICS_FILE, "a", buffering=1)
        self.trackers = open_trackers(self.dir, cfg, resume_step)

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        if step % self.every and step != self.max_steps and not any(k.startswith("eval/") for k in metrics):
            return
        row = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}
        row["time"] = round(time.time(), 3)  # wall clock: reward vs wall time, step-to-step overheads
        self.file.write(json_line(row))
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self.trackers.values():
            tracker.log(numeric, step)

    def log_completions(self, rows: list[dict[str, Any]], step: int) -> None:
        """`log_completions`: the step's (prompt, completion, rewards, advantage) rows, on the
        logged steps, to OUTPUT_DIR/completions.jsonl and each tracker's table."""
        if step % self.every and step != self.max_steps:
            return
        with open(self.dir / COMPLETIONS_FILE, "a") as f:
            f.write("".join(json.dumps({"step": step, **r}) + "\n" for r in rows))
        for tracker in self.trackers.values():
            tracker.log_table("completions", rows, step)

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers.values():
            tracker.close()
        plot_reward_curve(self.dir)


def plot_reward_curve(output_dir: str | Path, label: str | None = None) -> Path | None:
    rows = [r for r in read_metrics(output_dir) if r.get("reward_mean") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r.get("reward_std") or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, alpha=0.5, label=label or "reward_mean")
    window = max(1, min(10, len(mean) // 5))
    smooth = [sum(mean[max(0, i - window + 1): i + 1]) / len(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))]
    ax.plot(steps, smooth, linewidth=2, label=f"moving average ({window} steps)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    evals = [r for r in read_metrics(output_dir) if any(k.startswith("eval/") for k in r)]
    for key in sorted({k for r in evals for k in r if k.startswith(("eval/mean@", "eval/pass@"))}):
        points = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o--", markersize=4, label=f"held-out {key[5:]}")
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
