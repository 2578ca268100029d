"""`grpo-ray submit` / `grpo-ray jobs` (grpo_ray/jobs.py).

Fast tests build the job (entrypoint, runtime env, staged files, env vars, one-line errors) with
no Ray. The slow ones start a real `ray start --head` on 127.0.0.1 with its dashboard (the Job
Submission server), submit the quick training job through the CLI, follow it to SUCCEEDED and
read its metrics, and stop a long job while it trains.

The cluster is started with `ray start --head --block` in a process group of its own and torn down
by signalling that group only: `ray stop --force` would also kill any other Ray on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from grpo_ray.cli import build_parser, load_config, main
from grpo_ray.jobs import JobError, build_job, connect, job_dict, parse_env, parse_resources, resolve_address, user_error_in_logs
from grpo_ray.metrics import read_metrics
from tests.conftest import stop_ray_head


def job(argv: list[str], **kwargs):
    return build_job(argv, build_parser(), load_config, **kwargs)


# --------------------------------------------------------------------------------------------------
# Building the job: no Ray
# --------------------------------------------------------------------------------------------------


def test_entrypoint_runs_the_cli_and_joins_the_cluster():
    spec = job(["--", "train", "--quick", "--output-dir", "/shared/runs/q", "--set", "max_steps=2"])
    assert spec.entrypoint == "python -m grpo_ray.cli train --quick --output-dir /shared/runs/q --set max_steps=2 --address auto"
    assert spec.runtime_env == {"env_vars": {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}}  # no working_dir: the image has the package
    assert spec.metadata["grpo_ray_command"] == "train"
    assert spec.submission_id.startswith("grpo-ray-train-")
    assert spec.staging_dir is None and spec.notes == []


def test_explicit_address_and_python_are_kept():
    spec = job(["train", "--quick", "--output-dir", "/o", "--address", "ray://head:10001"], python="/opt/venv/bin/python", submission_id="my-run")
    assert spec.entrypoint.endswith("--address ray://head:10001") and "auto" not in spec.entrypoint
    assert spec.entrypoint.startswith("/opt/venv/bin/python -m grpo_ray.cli train")
    assert spec.submission_id == "my-run"


def test_relative_output_dir_gets_a_note():
    spec = job(["train", "--quick"])
    assert len(spec.notes) == 1 and "output dir 'outputs/quick' is relative" in spec.notes[0]


def test_config_and_the_files_it_names_are_staged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text("def score(completions, **kw):\n    return [0.0 for _ in completions]\n")
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "my.yaml").write_text(
        "model_name_or_path: tiny-arith\noutput_dir: /shared/runs/x\n"
        "reward_funcs: [accuracy, rewards/mine.py:score]\ndata: {task: data/train.jsonl}\n"
    )
    spec = job(["--", "train", "--config", "cfgs/my.yaml"])
    try:
        staged = spec.staging_dir
        assert spec.runtime_env["working_dir"] == str(staged)
        assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == [
            "data/train.jsonl",
            "job_files/config/my.yaml",
            "rewards/mine.py",
        ]
        assert "--config job_files/config/my.yaml" in spec.entrypoint
        assert spec.runtime_env["env_vars"]["RAY_CHDIR_TO_TRIAL_DIR"] == "0"  # Ray Train workers stay in it
    finally:
        spec.cleanup()
    assert not staged.exists()


def test_tune_uploads_its_space_file_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "study.yaml").write_text("model_name_or_path: tiny-arith\noutput_dir: /o\ndata: {task: arith}\n")
    (tmp_path / "b" / "study.yaml").write_text("space:\n  beta: {choice: [0.0, 0.01]}\n")  # same file name
    spec = job(["tune", "--config", "a/study.yaml", "--space", "b/study.yaml", "--output-dir", "/shared/studies"])
    try:
        files = {str(p.relative_to(spec.staging_dir)): p.read_text() for p in spec.staging_dir.rglob("*") if p.is_file()}
        assert sorted(files) == ["job_files/config/study.yaml", "job_files/space/study.yaml"]
        assert "beta" in files["job_files/space/study.yaml"]
        assert spec.entrypoint == (
            "python -m grpo_ray.cli tune --config job_files/config/study.yaml --space job_files/space/study.yaml "
            "--output-dir /shared/studies --address auto"
        )
        assert spec.notes == []
    finally:
        spec.cleanup()
    spec = job(["tune", "--quick", "--space", "/cluster/space.yaml"])  # remote space, default output dir
    assert "--space /cluster/space.yaml" in spec.entrypoint and "working_dir" not in spec.runtime_env
    assert any("'tune_outputs' is relative" in n for n in spec.notes) and any("not a local file" in n for n in spec.notes)


def test_eval_uploads_a_local_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held_out.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    spec = job(["eval", "--quick", "--model", "/shared/runs/r1/model", "--data", "held_out.jsonl"])
    try:
        assert (spec.staging_dir / "job_files" / "data" / "held_out.jsonl").is_file()
        assert "--data job_files/data/held_out.jsonl" in spec.entrypoint and "--address" not in spec.entrypoint
    finally:
        spec.cleanup()
    spec = job(["eval", "--quick", "--data", "reasoning_gym/chain_sum"])  # a task name: nothing to upload
    assert spec.staging_dir is None and spec.notes == [] and "--data reasoning_gym/chain_sum" in spec.entrypoint


def test_file_outside_the_current_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(JobError, match=r"data.task '../d.jsonl' is outside the current folder"):
        job(["train", "--quick", "--output-dir", "/o", "--set", "data.task=../d.jsonl"])
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging folder was removed


def test_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "cfg").mkdir(parents=True)
    (tmp_path / "proj" / "cfg" / "a.yaml").write_text("model_name_or_path: tiny-arith\noutput_dir: /o\ndata: {task: arith}\n")
    spec = job(["train", "--config=proj/cfg/a.yaml"], working_dir="proj")
    assert spec.runtime_env["working_dir"] == str((tmp_path / "proj").resolve())
    assert "/.venv/" in spec.runtime_env["excludes"]
    assert "--config=cfg/a.yaml" in spec.entrypoint and spec.staging_dir is None
    (tmp_path / "b.yaml").write_text("model_name_or_path: tiny-arith\n")
    with pytest.raises(JobError, match="write --config in full"):
        job(["train", "--conf", "proj/cfg/a.yaml"], working_dir="proj")
    with pytest.raises(JobError, match="outside --working-dir"):
        job(["train", "--config", "b.yaml"], working_dir="proj")
    with pytest.raises(JobError, match="is not a folder"):
        job(["train", "--quick"], working_dir="nope")


def test_remote_config_path_is_passed_as_is():
    spec = job(["train", "--config", "/cluster/only/cfg.yaml"])
    assert "--config /cluster/only/cfg.yaml" in spec.entrypoint and "working_dir" not in spec.runtime_env
    assert any("not a local file" in n for n in spec.notes)


def test_env_vars_and_secrets_by_name():
    env = parse_env(["HF_HOME=/shared/hf", "A=b=c"], ["WANDB_API_KEY"], environ={"WANDB_API_KEY": "s3cret"})
    assert env == {"HF_HOME": "/shared/hf", "A": "b=c", "WANDB_API_KEY": "s3cret"}
    spec = job(["train", "--quick", "--output-dir", "/o"], env=env)
    assert spec.runtime_env["env_vars"]["WANDB_API_KEY"] == "s3cret"
    assert "s3cret" not in spec.entrypoint and "s3cret" not in json.dumps(spec.metadata)
    with pytest.raises(JobError, match="MLFLOW_TRACKING_TOKEN is not set"):
        parse_env([], ["MLFLOW_TRACKING_TOKEN"], environ={})
    with pytest.raises(JobError, match="KEY=VALUE"):
        parse_env(["novalue"], [], environ={})


def test_entrypoint_resources():
    spec = job(["eval", "--quick"])
    assert spec.entrypoint_kwargs() == {}
    spec.entrypoint_resources = parse_resources(["GPU=1", "rollout=0.001", "CPU=2"])
    assert spec.entrypoint_kwargs() == {"entrypoint_num_cpus": 2.0, "entrypoint_num_gpus": 1.0, "entrypoint_resources": {"rollout": 0.001}}
    with pytest.raises(JobError, match="NAME=AMOUNT"):
        parse_resources(["GPU"])
    with pytest.raises(JobError, match="NAME=AMOUNT"):
        parse_resources(["GPU=-1"])


def test_job_details_redact_env_values():
    class Info:
        def dict(self):
            return {"submission_id": "x", "status": "RUNNING", "runtime_env": {"env_vars": {"WANDB_API_KEY": "s3cret"}}}

    out = job_dict(Info())
    assert out["runtime_env"]["env_vars"] == {"WANDB_API_KEY": "<redacted>"} and out["status"] == "RUNNING"


def test_user_error_is_found_in_job_logs():
    logs = "starting\n(pid=1) noise\ngrpo-ray: error: beta=-1.0 must be >= 0; fix it\n"
    assert user_error_in_logs(logs) == "beta=-1.0 must be >= 0; fix it"
    assert user_error_in_logs("Traceback ...\n") is None


def test_default_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address(None) == "http://head:8265" and resolve_address("http://x:1") == "http://x:1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["submit", "--"], "nothing to submit"),
        (["submit", "--", "jobs", "list"], "'jobs' cannot run as a job"),
        (["submit", "--", "train", "--quick", "--set", "lerning_rate=1"], "did you mean 'learning_rate'"),
        (["submit", "--env-from", "GRPO_RAY_TEST_UNSET_VAR", "--", "train", "--quick"], "GRPO_RAY_TEST_UNSET_VAR is not set"),
        (["submit", "--", "train", "--quick", "--output-dir", "/o"], "cannot reach the Ray job server"),
        (["jobs", "list"], "cannot reach the Ray job server"),
        (["jobs", "stop", "some-id"], "cannot reach the Ray job server"),
    ],
)
def test_mistakes_are_one_line(argv, expected, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.delenv("GRPO_RAY_TEST_UNSET_VAR", raising=False)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("grpo-ray: error: ") and expected in err[-1], err


def test_bad_subcommand_is_argparse_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--", "trian"])
    assert exc.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# A real cluster: `ray start --head` on loopback with its dashboard / Job Submission server
# --------------------------------------------------------------------------------------------------


class HeadNode:
    """`ray start --head --block` in its own process group; `stop()` ends that group only."""

    def __init__(self, num_cpus: int = 4) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rayjt-", dir="/tmp")  # short: Ray's socket paths
        self.port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.client_port = _free_port()  # Ray Client: ray://127.0.0.1:<client_port>
        venv_bin = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # the job's `python` is this venv's
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        cmd = [
            str(Path(venv_bin) / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = self._wait_ready(timeout_s=180)

    def _wait_ready(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {Path(self.log.name).read_text()[-3000:]}")
            try:
                client = connect(self.address)  # as the CLI does (Ray's auth token included)
                client.list_jobs()
                return client
            except Exception as exc:  # noqa: BLE001 - not up yet
                error = exc
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray's job server did not come up at {self.address} in {timeout_s}s: {error}")

    def stop(self) -> None:
        try:
            for info in self.client.list_jobs() if getattr(self, "client", None) else []:
                if str(getattr(info.status, "value", info.status)) not in ("SUCCEEDED", "FAILED", "STOPPED") and info.submission_id:
                    self.client.stop_job(info.submission_id)
        except Exception:  # noqa: BLE001 - best effort before the signal
            pass
        stop_ray_head(self.proc)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    auth_mode = os.environ.get("RAY_AUTH_MODE")  # connect() may set it, as ray.init does
    head = HeadNode(num_cpus=4)
    yield head
    head.stop()
    if auth_mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = auth_mode


def _status(head: HeadNode, job_id: str) -> str:
    return str(head.client.get_job_status(job_id).value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_train_follows_to_succeeded(ray_head, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "submit", "--address", ray_head.address, "--follow", "--env", "GRPO_RAY_JOB_TEST=1",
            "--", "train", "--quick", "--output-dir", str(out), "--set", "max_steps=2", "--set", "save_steps=2",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:] + captured.out[-3000:]
    job_id = captured.out.splitlines()[0].strip()
    assert job_id.startswith("grpo-ray-train-")
    assert "done: 2 steps" in captured.out  # the job's own log, streamed by --follow
    assert f"job {job_id} SUCCEEDED" in captured.err
    assert _status(ray_head, job_id) == "SUCCEEDED"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert (out / "run_config.yaml").is_file()

    assert main(["jobs", "status", job_id, "--address", ray_head.address]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
    assert main(["jobs", "list", "--address", ray_head.address]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "SUCCEEDED" in listing and "train --quick" in listing
    assert main(["jobs", "status", job_id, "--json", "--address", ray_head.address]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["status"] == "SUCCEEDED" and details["runtime_env"]["env_vars"]["GRPO_RAY_JOB_TEST"] == "<redacted>"
    assert main(["jobs", "logs", job_id, "--address", ray_head.address]) == 0
    assert "done: 2 steps" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.study
@pytest.mark.timeout(900)
def test_submit_a_tuning_study_with_a_local_space_file(ray_head, tmp_path, capsys, monkeypatch):
    """What deploy/kuberay/rayjob-tune.yaml runs: `grpo-ray tune` as a job on the cluster, its
    space file uploaded with the job; the study's table and best config land in --output-dir."""
    monkeypatch.chdir(tmp_path)
    Path("space.yaml").write_text("scheduler: fifo\nnum_samples: 1\nspace: {learning_rate: {choice: [1.0e-3]}}\n")
    studies = tmp_path / "studies"
    code = main(
        [
            "submit", "--address", ray_head.address, "--follow",
            "--", "tune", "--quick", "--space", "space.yaml", "--output-dir", str(studies), "--set", "max_steps=2",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:] + captured.out[-3000:]
    assert "--space job_files/space/space.yaml" in captured.err  # the entrypoint reads the uploaded copy
    rows = json.loads((studies / "space" / "summary.json").read_text())["trials"]
    assert [(r["learning_rate"], r["steps"], r["status"]) for r in rows] == [(1e-3, 2, "completed")]
    from grpo_ray.config import GRPOConfig

    assert GRPOConfig.from_yaml(studies / "space" / "best_config.yaml").learning_rate == 1e-3


def write_local_run(root: Path) -> Path:
    """A config (the quick one, 200 steps) naming a JSONL data file by a relative path, under root."""
    from grpo_ray.cli import builtin_config

    (root / "data").mkdir(parents=True)
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (root / "data" / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "cfg").mkdir()
    raw = yaml.safe_load(builtin_config("quick").read_text())
    raw.update(max_steps=200, save_steps=1000, data={"task": "data/sums.jsonl", "eval_size": 6})
    config = root / "cfg" / "long.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stop_a_running_job(ray_head, tmp_path, capsys, monkeypatch):
    """A job that reads a local config and the local data file it names (both uploaded with the
    job), stopped while it trains: STOPPED, and its engines and trainer workers are gone."""
    from ray.util.state import list_actors

    monkeypatch.chdir(tmp_path)
    write_local_run(tmp_path)
    out = tmp_path / "long"
    code = main(
        [
            "submit", "--address", ray_head.address, "--submission-id", "grpo-ray-stop-test",
            "--", "train", "--config", "cfg/long.yaml", "--output-dir", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() == "grpo-ray-stop-test", captured.err
    assert "--config job_files/config/long.yaml" in captured.err  # the entrypoint reads the uploaded copy
    job_id = "grpo-ray-stop-test"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (_status(ray_head, job_id) == "RUNNING" and read_metrics(out)):
        assert _status(ray_head, job_id) in ("PENDING", "RUNNING"), ray_head.client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    assert _status(ray_head, job_id) == "RUNNING" and read_metrics(out), "the job never started training"
    ray_job_id = ray_head.client.get_job_info(job_id).job_id
    assert list_actors(address=ray_head.address, filters=[("job_id", "=", ray_job_id), ("state", "=", "ALIVE")])  # engines + trainer

    assert main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: STOPPED"
    assert _status(ray_head, job_id) == "STOPPED"
    deadline = time.monotonic() + 60
    while list_actors(address=ray_head.address, filters=[("job_id", "=", ray_job_id), ("state", "=", "ALIVE")]):
        assert time.monotonic() < deadline, "the stopped job's actors are still alive"
        time.sleep(1)
    steps = len(read_metrics(out))
    assert steps < 200
    # Stopping it again is not an error: it says the job had already ended.
    assert main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert "had already ended: STOPPED" in capsys.readouterr().err
