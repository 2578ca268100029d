"""Results: one row per trial (table as Markdown and CSV), the best trial's config as a YAML that
`grpo-ray train` runs, every trial's curve in one plot, and summary.json."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from numbers import Number as numbers_Number
from pathlib import Path
from typing import Any

from grpo_ray.config import GRPOConfig
from grpo_ray.text import text_table
from grpo_ray.tuning.space import Study, trial_config

TABLE_CSV = "trials.csv"
TABLE_MD = "trials.md"
BEST_FILE = "best_config.yaml"
CURVES_FILE = "reward_curves.png"
SUMMARY_FILE = "summary.json"
FINAL_WINDOW = 3  # a trial's score: mean of its metric over its last FINAL_WINDOW steps


@dataclass
class TrialRecord:
    trial_id: str
    config: dict[str, Any]  # the sampled values (PBT: as they ended)
    history: list[dict[str, float]]  # one row per report: step and metrics
    error: str | None = None
    path: str | None = None


@dataclass
class StudyResult:
    study_dir: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: str | None
    curves: str | None
    table: str


def record_from_result(result: Any, keys: list[str]) -> TrialRecord:
    df = result.metrics_dataframe
    history: list[dict[str, float]] = []
    if df is not None and "step" in df.columns:
        for row in df.to_dict("records"):
            numbers = {k: float(v) for k, v in row.items() if isinstance(v, numbers_Number) and not isinstance(v, bool) and v == v}
            if "step" in numbers:
                history.append(numbers)
    metrics = result.metrics or {}
    error = None
    if result.error is not None:
        error = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else type(result.error).__name__
    config = {k: (result.config or {}).get(k) for k in keys}
    return TrialRecord(trial_id=str(metrics.get("trial_id") or Path(result.path).name), config=config, history=history, error=error, path=result.path)


def _score(record: TrialRecord, metric: str) -> float | None:
    values = [h[metric] for h in record.history if metric in h and h[metric] == h[metric]]
    return sum(values[-FINAL_WINDOW:]) / len(values[-FINAL_WINDOW:]) if values else None


def summarize(records: list[TrialRecord], metric: str, mode: str, max_steps: int) -> list[dict[str, Any]]:
    """One row per trial: its config, best/final metric, steps run, stopped early or not."""
    rows = []
    sign = 1 if mode == "max" else -1
    for rec in sorted(records, key=lambda r: r.trial_id):  # Tune returns them in finishing order
        values = [h[metric] for h in rec.history if metric in h and h[metric] == h[metric]]
        steps = int(max((h.get("step", 0) for h in rec.history), default=0))
        stopped = rec.error is None and 0 < steps < max_steps
        status = "error" if rec.error else ("stopped early" if stopped else ("completed" if steps >= max_steps else "not run"))
        rows.append(
            {
                "trial": rec.trial_id,
                **{k: v for k, v in rec.config.items()},
                f"best_{metric}": (max(values, key=lambda v: sign * v) if values else None),
                f"final_{metric}": _score(rec, metric),
                "steps": steps,
                "stopped_early": stopped,
                "status": status if not rec.error else f"error: {rec.error}",
            }
        )
    return rows


def best_record(records: list[TrialRecord], metric: str, mode: str, max_steps: int) -> TrialRecord | None:
    """The trial to retrain: among those that ran all steps (else all), the best final metric
    (mean over its last FINAL_WINDOW steps), ties to the best single step."""
    sign = 1 if mode == "max" else -1
    scored = [r for r in records if r.error is None and _score(r, metric) is not None]
    finished = [r for r in scored if max(h.get("step", 0) for h in r.history) >= max_steps]
    pool = finished or scored
    if not pool:
        return None
    return max(pool, key=lambda r: (sign * _score(r, metric), max(sign * h[metric] for h in r.history if metric in h)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (also readable as plain text)."""
    if not rows:
        return "(no trials)"
    headers = list(rows[0].keys())
    return text_table(headers, [[r.get(h) for h in headers] for r in rows])


def write_table(rows: list[dict[str, Any]], study_dir: Path) -> str:
    text = format_table(rows)
    (study_dir / TABLE_MD).write_text(text + "\n")
    if rows:
        with open(study_dir / TABLE_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    return text


def write_best_config(study: Study, record: TrialRecord, study_dir: Path, metric: str) -> Path:
    """The best trial's config as a YAML that `grpo-ray train --config` runs as is."""
    cfg = trial_config(study, record.config, study_dir / "best_run", for_best=True)
    path = study_dir / BEST_FILE
    score = _score(record, metric)
    header = (
        f"# Best trial {record.trial_id} of study {study.name!r} ({metric} {score:.4f} over its last {FINAL_WINDOW} steps).\n"
        f"# Sampled: {json.dumps(record.config)}\n"
        f"# Train it: grpo-ray train --config {path}\n"
    )
    path.write_text(header + cfg.to_yaml())
    GRPOConfig.from_yaml(path)  # it must load back
    return path


def plot_curves(records: list[TrialRecord], path: Path, metric: str, max_steps: int) -> Path | None:
    """Every trial's metric per step; dashed: stopped early, x: errored."""
    curves = [(r, [(h["step"], h[metric]) for h in r.history if metric in h and "step" in h]) for r in records]
    curves = [(r, pts) for r, pts in curves if pts]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rec, pts in curves:
        steps, values = zip(*pts)
        stopped = rec.error is None and max(steps) < max_steps
        label = rec.trial_id + " " + ", ".join(f"{k}={_short(v)}" for k, v in rec.config.items())
        ax.plot(steps, values, linestyle="--" if stopped else "-", marker="x" if rec.error else None, label=label[:70])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(curves)} trials ({metric}; dashed = stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_summary(study: Study, records: list[TrialRecord], study_dir: Path) -> StudyResult:
    keys = list(study.space)
    for rec in records:
        rec.config = {k: rec.config.get(k) for k in keys}
    max_steps = study.max_steps
    rows = summarize(records, study.metric, study.mode, max_steps)
    table = write_table(rows, study_dir)
    best = best_record(records, study.metric, study.mode, max_steps)
    best_path = write_best_config(study, best, study_dir, study.metric) if best else None
    curves = plot_curves(records, study_dir / CURVES_FILE, study.metric, max_steps)
    best_row = next((r for r in rows if best and r["trial"] == best.trial_id), None)
    (study_dir / SUMMARY_FILE).write_text(json.dumps({"best": best_row, "trials": rows}, indent=1, default=str))
    return StudyResult(str(study_dir), rows, best_row, str(best_path) if best_path else None, str(curves) if curves else None, table)
