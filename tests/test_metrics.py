"""Metrics logger and its trackers: real TensorBoard, real MLflow (sqlite store), real W&B (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.metrics import TRACKERS_FILE, MetricsLogger, check_trackers, read_metrics

SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567", "MLFLOW_TRACKING_TOKEN": "mlflow-secret-token-42"}


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """W&B offline (nothing leaves the machine), secrets in the environment as a user would set them."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


def log_steps(out, cfg: GRPOConfig, steps: range, resume_step: int = 0) -> dict[str, str]:
    logger = MetricsLogger(out, cfg, resume_step=resume_step)
    for step in steps:
        logger.log({"step": step, "reward_mean": step / 10, "rewards/accuracy": step / 20, "loss": 0.5, "note": "text"})
    logger.close()
    return json.loads((out / TRACKERS_FILE).read_text())


def test_report_to_accepts_trl_spellings_and_names_a_typo():
    assert GRPOConfig(report_to="none").report_to == []
    assert GRPOConfig(report_to="wandb").report_to == ["wandb"]
    assert GRPOConfig(report_to="all").report_to == ["tensorboard", "mlflow", "wandb"]
    with pytest.raises(ConfigError, match=r"report_to='wandbb' is not supported: did you mean 'wandb'\?"):
        GRPOConfig(report_to=["tensorboard", "wandbb"])


def test_every_tracker_logs_each_step_once_and_resume_continues_the_same_runs(tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    cfg = GRPOConfig.from_dict({"report_to": "all", "logging_steps": 1, "max_steps": 4, "learning_rate": 3e-6, "cluster": {"zero_stage": 3}})
    check_trackers(cfg)
    first = log_steps(out, cfg, range(1, 4))  # a run that crashed after step 3 (checkpoint at 2)
    second = log_steps(out, cfg, range(3, 5), resume_step=2)
    assert set(first) == {"mlflow", "wandb"} and first["wandb"] == second["wandb"]  # the same W&B run continues
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # MLflow cannot drop step 3 of the crashed process: the resume continues in a new run with
    # steps 1-2 copied, so each step is there once (counted, not deduplicated)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert second["mlflow"] != first["mlflow"]
    for key in ("rewards/accuracy", "reward_mean", "loss"):
        assert sorted(m.step for m in client.get_metric_history(second["mlflow"], key)) == [1, 2, 3, 4], key
    assert [m.value for m in sorted(client.get_metric_history(second["mlflow"], "reward_mean"), key=lambda m: m.step)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    run = client.get_run(second["mlflow"])
    assert run.data.params["learning_rate"] == "3e-06" and run.data.params["cluster.zero_stage"] == "3"
    assert run.info.status == "FINISHED" and run.data.tags["grpo_ray.resumed_from"] == first["mlflow"]
    old = client.get_run(first["mlflow"])
    assert old.info.status == "KILLED" and old.data.tags["grpo_ray.superseded_by"] == second["mlflow"]
    # the control: the crashed run itself holds step 3 and stops there
    assert sorted(m.step for m in client.get_metric_history(first["mlflow"], "reward_mean")) == [1, 2, 3]
    # a resume from the last logged step (nothing to re-run) continues the same run
    third = log_steps(out, cfg.with_overrides({"max_steps": 6}), range(5, 7), resume_step=4)
    assert third["mlflow"] == second["mlflow"]
    assert sorted(m.step for m in client.get_metric_history(second["mlflow"], "reward_mean")) == [1, 2, 3, 4, 5, 6]
    wandb_runs = list((out / "wandb").glob(f"offline-run-*-{first['wandb']}"))
    assert len(wandb_runs) >= 2  # one W&B run id over three processes (dirs are named by the second, so two may share one)

    # Secrets are read from the environment by the trackers themselves and written nowhere.
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for key, secret in SECRETS.items():
                assert secret.encode() not in data, f"{key} leaked into {path}"


def test_a_missing_tracker_package_is_a_one_line_error_before_any_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to: 'wandb' needs the wandb package: pip install 'grpo-ray\[trackers\]'"):
        check_trackers(GRPOConfig(report_to=["tensorboard", "wandb"]))


def test_log_completions_table_goes_to_the_file_and_every_tracker_and_resume_cuts_it(tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grpo_ray.metrics import COMPLETIONS_FILE

    out = tmp_path / "run"
    cfg = GRPOConfig(report_to="all", logging_steps=2, max_steps=4)
    rows = [{"prompt": "1+1", "completion": "\\boxed{2}", "accuracy": 1.0, "reward": 1.0, "advantage": 0.5}]
    logger = MetricsLogger(out, cfg)
    for step in (1, 2, 3):
        logger.log_completions(rows, step)  # logged steps only: 2
    run_id = logger.trackers["mlflow"].run_id
    logger.close()
    lines = [json.loads(line) for line in (out / COMPLETIONS_FILE).read_text().splitlines()]
    assert lines == [{"step": 2, **rows[0]}]
    artifacts = [a.path for a in MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").list_artifacts(run_id, "completions")]
    assert artifacts == ["completions/step_2.json"]
    assert (out / "mlflow-artifacts").is_dir() and not Path("mlruns").exists()  # inside OUTPUT_DIR, not the cwd
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert any("completions" in tag for tag in events.Tags()["tensors"])
    assert list((out / "wandb").glob("offline-run-*/files/media/table/completions_*.table.json"))
    # a resume from step 0 cuts the table back like metrics.jsonl
    MetricsLogger(out, cfg, resume_step=1).close()
    assert (out / COMPLETIONS_FILE).read_text() == ""


def test_reward_curve_plots_the_held_out_evals(tmp_path, monkeypatch):
    """eval/* rows (eval_steps, eval_on_start) appear in reward_curve.png beside the training reward."""
    from matplotlib.figure import Figure

    from grpo_ray.config import GRPOConfig
    from grpo_ray.metrics import MetricsLogger, plot_reward_curve

    legends: list[list[str]] = []
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        legends.append([t.get_text() for ax in self.axes for t in ax.get_legend().get_texts()])
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    logger = MetricsLogger(tmp_path, GRPOConfig(report_to=[], logging_steps=1, max_steps=2))
    logger.log({"step": 0, "eval/pass@1": 0.1, "eval/pass@4": 0.3, "eval/mean@4": 0.2})
    logger.log({"step": 1, "reward_mean": 0.2, "reward_std": 0.1})
    logger.log({"step": 2, "reward_mean": 0.3, "reward_std": 0.1, "eval/pass@1": 0.2, "eval/pass@4": 0.5, "eval/mean@4": 0.3})
    logger.close()
    assert plot_reward_curve(tmp_path).is_file()
    assert legends[-1][0] == "reward_mean" and {"held-out pass@1", "held-out pass@4", "held-out mean@4"} <= set(legends[-1])


def test_progress_lines_and_summary_read_rows_with_nulls_and_a_half_written_line(tmp_path, capsys, monkeypatch):
    """The console follows metrics.jsonl as it is written: a step whose rewards all failed logs
    reward_mean null, and the poll can catch the last line half-written."""
    from types import SimpleNamespace

    from grpo_ray.console import PROGRESS_ENV, Progress, summary

    monkeypatch.setenv(PROGRESS_ENV, "lines")
    rows = [{"step": 1, "reward_mean": None, "loss": 0.5, "step_time_s": 2.0}, {"step": 2, "reward_mean": 0.25, "loss": None, "step_time_s": 4.0}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:10])  # step 2's line half-written
    progress = Progress(tmp_path, total=4)
    progress._refresh()  # unreadable as it stands: read again at the next poll
    metrics.write_text(json.dumps(rows[0]) + "\n")
    progress._refresh()
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    progress._refresh()
    assert capsys.readouterr().out.splitlines() == [
        "[grpo-ray] step 1/4: reward nan, loss +0.5000, s/step 2.0, ETA 0:06",
        "[grpo-ray] step 2/4: reward 0.250, loss +nan, s/step 3.0, ETA 0:06",
    ]
    result = SimpleNamespace(output_dir=str(tmp_path), steps=2, eval={"start": 0.1, "end": 0.3}, checkpoint_dir="ck", reward_curve="c.png")
    assert summary(result, 61.2).startswith("done: 2 steps in 61 s; reward 0.250 -> 0.250 (step 2 -> 2); held-out accuracy 0.100 -> 0.300; model ck;")
    from grpo_ray.startup import Timeline

    startup = Timeline({"train_called": 100.0, "pool_called": 103.0, "engines_ready": 120.0, "first_sync_done": 121.5, "first_step_done": 124.25})
    assert startup.write(tmp_path) == {"engine_start_s": 17.0, "first_step_s": 2.75, "to_first_step_s": 24.25}
    assert summary(result, 61.2).startswith("done: 2 steps in 61 s (first step done after 24 s: startup.json); reward 0.250")
