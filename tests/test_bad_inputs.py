"""Every bad input a new user may type, run as they would (`grpo-ray ...` in a fresh process):
exit 2, one stderr line naming the field and the fix, no traceback anywhere, within a time
limit, and nothing left in OUTPUT_DIR that refuses the re-run. One row per case: a feature adds
its rows to CASES (a LoRA target module that does not exist, a tool that fails to import, ...).

Rows marked slow start Ray (the error is raised in a trainer worker or a reward task) and run
in a fresh process, as do the cluster-address rows; the others fail before Ray starts and run
`main()` here (what reaches fd 1 and 2 is captured either way), within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grpo_ray.config import GRPOConfig

TOOLS = '''
def undocumented(x):
    return x

class NoReset:
    def check(self, x: int) -> int:
        """Check.

        Args:
            x: a number
        """
        return x

class ResetRaises:
    def reset(self, **row):
        raise KeyError("level")

class NoReward:
    def reset(self, **row):
        return None
'''

REWARDS = '''
def raises(prompts, completions, **kw):
    raise ValueError("boom")

not_callable = 3
'''
ROW = json.dumps({"prompt": "What is 1 + 1?", "answer": "2"})
FAST_S = 10.0  # the checks before Ray, on a loaded 2-core machine (a fresh process adds ~5 s of imports)
PROCESS_S = 30.0  # a fresh process: ~5 s of imports first (and address-not-ray waits its 2 s twice)
SLOW_S = 240.0  # Ray, a vLLM engine and a trainer worker start before step 1 fails


@dataclass
class Case:
    """`argv` after `grpo-ray`; placeholders: {tmp} (a fresh folder, the cwd), {out} (OUTPUT_DIR),
    {port} (a closed port), {silent} (a port where something listens that is not Ray), {http} (a
    web server that is not Ray's)."""

    argv: list[str]
    expected: str  # a substring of the error line
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {tmp} first
    setup: Callable[[Path], None] | None = None
    max_s: float = FAST_S
    process: bool = False  # run in a fresh `python -m grpo_ray.cli` (else main() in this process)
    twice: bool = False  # run it again: the same line (what the first left behind refuses nothing)


def _model_without(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from grpo_ray.models import resolve_model_path

        shutil.copytree(resolve_model_path("tiny-arith"), tmp / "model", ignore=shutil.ignore_patterns(name))

    return setup


def _model_truncated(tmp: Path) -> None:
    """A copy of the tiny model whose weights file was cut in half (an interrupted copy)."""
    _model_without("nothing")(tmp)
    weights = tmp / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _recorded_run(tmp: Path) -> None:
    """OUTPUT_DIR of a started run (as `train` records it), for the --resume rows."""
    from tests.conftest import quick_config

    out = tmp / "out"
    out.mkdir()
    cfg = quick_config(tmp).with_overrides({"output_dir": str(out)}).with_absolute_paths(tmp)
    cfg.to_yaml(out / "run_config.yaml")


QUICK = ["train", "--quick", "--output-dir", "{out}"]
CASES: dict[str, Case] = {
    # config
    "empty-config": Case(["train", "--config", "{tmp}/c.yaml", "--output-dir", "{out}"], "is empty", {"c.yaml": "# nothing\n"}),
    "unknown-key": Case([*QUICK, "--set", "lerning_rate=1e-5"], "did you mean 'learning_rate'"),
    "bad-value": Case([*QUICK, "--set", "beta=-1"], "beta=-1.0"),
    "all-none-rewards-choice": Case([*QUICK, "--set", "all_none_rewards=ignore"], "all_none_rewards='ignore' is not supported"),
    "connect-timeout-zero": Case([*QUICK, "--set", "cluster.connect_timeout_s=0"], "cluster.connect_timeout_s=0.0: must be > 0"),
    # cluster address: every form answers within cluster.connect_timeout_s
    "address-refused": Case([*QUICK, "--address", "127.0.0.1:{port}"], "cannot reach the Ray cluster at 127.0.0.1:", process=True, max_s=PROCESS_S),
    "address-ray-client-refused": Case([*QUICK, "--address", "ray://127.0.0.1:{port}"], "connection refused; is the head running with the Ray Client server", process=True, max_s=PROCESS_S),
    "address-not-ray": Case([*QUICK, "--address", "127.0.0.1:{silent}", "--set", "cluster.connect_timeout_s=2"], "no Ray (gRPC) server answered within cluster.connect_timeout_s=2s", process=True, max_s=PROCESS_S),
    "address-ray-client-not-ray": Case([*QUICK, "--address", "ray://127.0.0.1:{silent}", "--set", "cluster.connect_timeout_s=2"], "no Ray (gRPC) server answered", process=True, max_s=PROCESS_S),
    "address-bad-port": Case([*QUICK, "--address", "127.0.0.1:http"], "the port is not a number", process=True, max_s=PROCESS_S),
    # (`--address auto` with no Ray on the machine: one line, checked by hand; not a row, since `auto`
    # joins any Ray this machine runs, the suite's own included, by scanning for its processes)
    "tune-address-refused": Case(["tune", "--quick", "--space", "{tmp}/s.yaml", "--output-dir", "{out}", "--address", "127.0.0.1:{port}"], "cannot reach the Ray cluster at 127.0.0.1:", {"s.yaml": "space: {beta: {grid: [0.0]}}\n"}, process=True, max_s=PROCESS_S, twice=True),
    "jobs-not-a-job-server": Case(["jobs", "list", "--address", "http://127.0.0.1:{http}"], "Jobs API is not supported", process=True, max_s=PROCESS_S),
    "jobs-refused": Case(["jobs", "list", "--address", "http://127.0.0.1:{port}"], "cannot reach the Ray job server", process=True, max_s=PROCESS_S),
    "submit-refused": Case(["submit", "--address", "http://127.0.0.1:{port}", "--", "train", "--quick"], "cannot reach the Ray job server", process=True, max_s=PROCESS_S),
    # data files
    "data-latin1": Case([*QUICK, "--set", "data.task={tmp}/d.jsonl"], "d.jsonl line 2 is not UTF-8", {"d.jsonl": (ROW + '\n{"prompt": "caf\u00e9", "answer": "1"}\n').encode("latin-1")}),
    "data-bad-json": Case([*QUICK, "--set", "data.task={tmp}/d.jsonl"], "d.jsonl line 3 is not valid JSON", {"d.jsonl": f"{ROW}\n\n{{oops\n"}),
    "data-missing-prompt-column": Case([*QUICK, "--set", "data.task={tmp}/d.jsonl"], "prompt column 'prompt' not found", {"d.jsonl": '{"question": "x", "answer": "1"}\n'}),
    "data-missing-answer": Case([*QUICK, "--set", "data.task={tmp}/d.jsonl", "--set", "data.eval_size=0"], "missing answer at line 2 of", {"d.jsonl": f'{ROW}\n{{"prompt": "x"}}\n'}),
    "data-missing-file": Case([*QUICK, "--set", "data.task={tmp}/nope.jsonl"], "not found"),
    # models: a local folder is checked before Ray starts (train and eval)
    "model-no-weights": Case([*QUICK, "--set", "model={tmp}/model"], "folder has no weights", setup=_model_without("*.safetensors")),
    "model-no-tokenizer": Case([*QUICK, "--set", "model={tmp}/model"], "folder has no tokenizer", setup=_model_without("tokenizer.json")),
    "model-truncated-weights": Case([*QUICK, "--set", "model={tmp}/model"], "model.safetensors is not a complete safetensors file", setup=_model_truncated),
    "model-no-config": Case([*QUICK, "--set", "model={tmp}/model"], "no config.json", setup=_model_without("config.json")),
    "eval-model-no-weights": Case(["eval", "--quick", "--model", "{tmp}/model"], "folder has no weights", setup=_model_without("*.safetensors")),
    "context-too-long": Case([*QUICK, "--set", "max_completion_length=1000"], "max_prompt_length + max_completion_length = 1128 tokens, more than the model holds (max_position_embeddings=1024"),
    "eval-context-too-long": Case(["eval", "--quick", "--set", "max_completion_length=1000"], "more than the model holds (max_position_embeddings=1024"),
    "model-missing": Case([*QUICK, "--set", "model_name_or_path=/no/such/model"], "does not exist"),
    # LoRA: checked against the model's modules (meta device) before Ray starts
    "lora-missing-target": Case([*QUICK, "--set", "use_peft=true", "--set", "lora_target_modules=[q_prj]"], "lora_target_modules: 'q_prj' is not a module of the model; its linear modules are: down_proj"),
    "lora-tied-embedding": Case([*QUICK, "--set", "use_peft=true", "--set", "lora_target_modules=[embed_tokens]"], "LoRA on 'embed_tokens': this model ties its input and output embeddings"),
    "lora-sync-typo": Case([*QUICK, "--set", "use_peft=true", "--set", "lora_sync=adaptor"], "lora_sync='adaptor' is not supported: did you mean 'adapter'?"),
    "lora-adapter-rank": Case([*QUICK, "--set", "use_peft=true", "--set", "lora_sync=adapter", "--set", "lora_r=1024"], "vLLM serves LoRA ranks up to 512"),
    "lora-4bit-on-cpu": Case([*QUICK, "--set", "use_peft=true", "--set", "load_in_4bit=true"], "load_in_4bit=true (QLoRA) needs bitsandbytes on a CUDA GPU"),
    "lora-key-without-peft": Case([*QUICK, "--set", "lora_r=8"], "lora_r=8 has no effect without use_peft: true"),
    "eval-adapter-without-base": Case(["eval", "--quick", "--model", "{tmp}/adapter"], "base_model_name_or_path '/no/such/base' is not a local folder",
                                      {"adapter/adapter_config.json": '{"base_model_name_or_path": "/no/such/base", "peft_type": "LORA", "r": 8}', "adapter/adapter_model.safetensors": b""}),
    "export-full-checkpoint": Case(["export", "--merge", "{tmp}/model", "{tmp}/merged"], "holds no adapter_config.json", setup=_model_without("nothing")),
    # reward functions found at import time (before Ray: resolution; in a Ray task: the import)
    "reward-unknown": Case([*QUICK, "--set", "reward_funcs=[acuracy]"], "did you mean 'accuracy'"),
    "reward-missing-file": Case([*QUICK, "--set", "reward_funcs=[{tmp}/nope.py:f]"], "not found"),
    # --resume: what cannot change mid-run is refused, before anything starts
    "resume-fixed-key": Case(["train", "--resume", "{out}", "--set", "num_generations=4"], "--resume cannot change num_generations (8 -> 4)", setup=_recorded_run),
    "resume-other-model": Case(["train", "--resume", "{out}", "--set", "model=smollm2-135m"], "--resume cannot change model_name_or_path", setup=_recorded_run),
    # raised inside Ray (a reward task, a trainer worker): the line still stands alone and last
    "reward-not-callable": Case([*QUICK, "--set", "reward_funcs=[{tmp}/r.py:not_callable]"], "is a int, not callable", {"r.py": REWARDS}, max_s=90),
    # One end-to-end row for a reward that fails while scoring: a wrong length, strings, all None and
    # a timeout raise the same RewardError on this path; their messages are rows of
    # tests/test_rewards.py::test_score_errors, test_all_none_rewards_error_or_warning and
    # tests/test_rollout.py (timeout in a real Ray task), each under a second instead of a minute.
    "reward-raises": Case([*QUICK, "--set", "reward_funcs=[{tmp}/r.py:raises]"], "raised ValueError: boom (first failing sample: 0)", {"r.py": REWARDS}, max_s=SLOW_S),
    # the engines' sampling logprobs checked against the trainer's every step (fp32: ~1e-6, so 1e-12 must stop it)
    "logprob-mismatch": Case([*QUICK, "--set", "max_logprob_mismatch=1e-12"], "(max_logprob_mismatch=1e-12), so the engines do not hold the trainer's weights", max_s=SLOW_S),
    "logprob-mismatch-zero": Case([*QUICK, "--set", "max_logprob_mismatch=0"], "max_logprob_mismatch=0.0: a positive number"),
    # tools and environments (multi-turn): loaded once in a Ray worker before OUTPUT_DIR is written
    "tool-missing-file": Case([*QUICK, "--set", "tools=[{tmp}/nope.py:f]"], "tool '", max_s=90),
    "tool-no-docstring": Case([*QUICK, "--set", "tools=[{tmp}/t.py:undocumented]"], "tool 'undocumented': no JSON schema", {"t.py": TOOLS}, max_s=90),
    "env-no-reset": Case([*QUICK, "--set", "environment_factory={tmp}/t.py:NoReset"], "its environments need a reset(**row) method", {"t.py": TOOLS}, max_s=90),
    "env-no-reward-source": Case([*QUICK, "--set", "environment_factory={tmp}/t.py:NoReward", "--set", "reward_funcs=[]"], "has no get_reward()", {"t.py": TOOLS}, max_s=90),
    "env-reset-raises": Case([*QUICK, "--set", "environment_factory={tmp}/t.py:ResetRaises"], "environment ResetRaises.reset raised KeyError", {"t.py": TOOLS}, max_s=SLOW_S),
    "tool-iterations-without-tools": Case([*QUICK, "--set", "max_tool_calling_iterations=2"], "max_tool_calling_iterations is set but the run has no tools"),
}
SLOW = {name for name, case in CASES.items() if case.max_s > PROCESS_S}
UNRUN: set[str] = set()  # rows written but not yet run once (tests/conftest.py OPT_IN)
for _name in SLOW:
    CASES[_name].process = True


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts TCP connections and never answers: something that is not Ray."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def http_port():
    """A port where a plain web server answers 404 to everything: a web server that is not Ray's."""
    import http.server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_cli(argv: list[str], cwd: Path, timeout_s: float) -> tuple[int, str, str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    env.pop("GRPO_RAY_DEBUG", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def run_main(argv: list[str], capfd) -> tuple[int, str, str, float]:
    from grpo_ray.cli import main

    capfd.readouterr()
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    captured = capfd.readouterr()
    return code, captured.out, captured.err, seconds


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow, *([pytest.mark.unrun] if n in UNRUN else [])]) if n in SLOW else n for n in CASES])
def test_bad_input(name, tmp_path, silent_port, http_port, capfd, monkeypatch, request):
    case = CASES[name]
    if "--quick" in case.argv:
        request.getfixturevalue("tiny_model_path")  # a first build of the tiny model is not the time to fail
    for rel, content in case.files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup is not None:
        case.setup(tmp_path)
    out = tmp_path / "out"
    values = {"tmp": str(tmp_path), "out": str(out), "port": str(_closed_port()), "silent": str(silent_port), "http": str(http_port)}
    argv = [a.format(**values) for a in case.argv]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("GRPO_RAY_DEBUG", raising=False)
    code, stdout, stderr, seconds = run_cli(argv, tmp_path, case.max_s) if case.process else run_main(argv, capfd)

    err = stderr.strip().splitlines()
    assert code == 2, (code, stdout[-3000:], stderr[-3000:])
    assert len(err) == 1 and err[0].startswith("grpo-ray: error: "), err[-40:]  # stands alone, and last
    assert case.expected in err[0], err[0]
    assert "Traceback" not in stdout + stderr
    assert seconds < case.max_s, f"took {seconds:.1f}s (limit {case.max_s}s)"
    if case.twice:
        again = (run_cli(argv, tmp_path, case.max_s) if case.process else run_main(argv, capfd))[2].strip().splitlines()
        assert again == err, again[-5:]
    if case.setup is not _recorded_run:  # what the failed run left must not refuse the fixed re-run
        from grpo_ray.driver import check_output_dir

        check_output_dir(GRPOConfig(output_dir=str(out)), resume=False, overwrite=False)


# --------------------------------------------------------------------------------------------------
# The pieces behind the rows, checked directly
# --------------------------------------------------------------------------------------------------


def test_metrics_file_stays_strict_json(tmp_path):
    """A step with no reward scored logs reward_mean NaN: written as null, which every JSON parser
    reads (Python's json writes a bare NaN by default, which jq / JavaScript reject)."""
    from grpo_ray.metrics import METRICS_FILE, MetricsLogger, read_metrics, truncate_metrics

    logger = MetricsLogger(tmp_path, GRPOConfig(report_to=[], logging_steps=1))
    logger.log({"step": 1, "reward_mean": float("nan"), "loss": 0.5, "grad_norm": float("inf")})
    logger.log({"step": 2, "reward_mean": 0.25, "loss": 0.4})
    logger.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert strict[0]["reward_mean"] is None and strict[0]["grad_norm"] is None and strict[0]["loss"] == 0.5
    assert strict[1]["reward_mean"] == 0.25
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "reward_mean": NaN}\n{"step": 2, "reward_mean": 1.0}\n')  # an old file
    truncate_metrics(tmp_path, 1)
    assert (tmp_path / METRICS_FILE).read_text() == '{"step": 1, "reward_mean": null}\n'
    assert read_metrics(tmp_path) == [{"step": 1, "reward_mean": None}]


def test_all_none_rewards_error_or_warning(capsys):
    import torch

    from grpo_ray.rewards import RewardError
    from grpo_ray.rollout import check_some_rewards

    nan = float("nan")
    cfg = GRPOConfig(reward_funcs=["accuracy"])
    check_some_rewards(torch.tensor([nan, 1.0, nan]), cfg, step=3)  # one scored: trains on
    with pytest.raises(RewardError, match="step 3: every reward function \\(accuracy\\) returned None for all 3 completions"):
        check_some_rewards(torch.tensor([nan, nan, nan]), cfg, step=3)
    check_some_rewards(torch.tensor([nan, nan]), cfg.with_overrides({"all_none_rewards": "warn"}), step=4)
    assert "[grpo-ray] warning: step 4: every reward function" in capsys.readouterr().out


def test_resume_records_overrides_and_refuses_fixed_keys(tmp_path, capsys):
    """`--resume DIR --set k=v` used to train with v while DIR/run_config.yaml kept the old value,
    which the next plain --resume reloaded."""
    from grpo_ray.driver import FIXED_ON_RESUME, RUN_FILE, RunDirError, check_output_dir, prepare_output_dir
    from tests.conftest import quick_config

    cfg = quick_config(tmp_path)
    out = prepare_output_dir(cfg, resume=False, overwrite=False)
    resumed = cfg.with_overrides({"learning_rate": 5e-4, "max_steps": 20})
    prepare_output_dir(resumed, resume=True, overwrite=False)
    assert GRPOConfig.from_yaml(out / RUN_FILE) == resumed
    printed = capsys.readouterr().out
    assert "--resume: learning_rate 0.001 -> 0.0005" in printed and "max_steps 10 -> 20" in printed
    for key, value in (("num_generations", 4), ("data", {"size": 100}), ("cluster", {"zero_stage": 2}), ("model_name_or_path", "smollm2-135m")):
        with pytest.raises(RunDirError, match="--resume cannot change"):
            check_output_dir(resumed.with_overrides({key: value}), resume=True, overwrite=False)
    assert "cluster.zero_stage" in FIXED_ON_RESUME and "learning_rate" not in FIXED_ON_RESUME
    assert GRPOConfig.from_yaml(out / RUN_FILE) == resumed  # nothing written by the refusals
    # A LoRA checkpoint holds an adapter of this shape, scale and set of modules: those are fixed.
    # How vLLM gets it (lora_sync) and dropout are not: the restored weights are pushed either way.
    lora = quick_config(tmp_path / "lora", use_peft=True)
    prepare_output_dir(lora, resume=False, overwrite=False)
    for key, value in (("use_peft", False), ("lora_r", 8), ("lora_alpha", 16), ("lora_target_modules", ["q_proj"]),
                       ("lora_modules_to_save", ["lm_head"]), ("peft_config", {"use_rslora": True})):  # fmt: skip
        with pytest.raises(RunDirError, match=f"--resume cannot change {key}"):
            check_output_dir(lora.with_overrides({key: value}), resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="--resume cannot change use_peft"):  # a full run resumed as LoRA
        check_output_dir(resumed.with_overrides({"use_peft": True}), resume=True, overwrite=False)
    check_output_dir(lora.with_overrides({"lora_sync": "adapter", "lora_dropout": 0.0}), resume=True, overwrite=False)


def test_a_run_that_never_logged_a_step_does_not_block_the_next(tmp_path):
    """A run that failed before step 1 leaves run_config.yaml (and an empty metrics.jsonl): the
    re-run with the fix starts; one with a logged step still needs --resume or --overwrite."""
    from grpo_ray.driver import RunDirError, check_output_dir, prepare_output_dir
    from grpo_ray.metrics import METRICS_FILE
    from tests.conftest import quick_config

    cfg = quick_config(tmp_path)
    out = prepare_output_dir(cfg, resume=False, overwrite=False)
    (out / METRICS_FILE).write_text("")
    check_output_dir(cfg, resume=False, overwrite=False)
    (out / METRICS_FILE).write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run"):
        check_output_dir(cfg, resume=False, overwrite=False)


def test_worker_output_goes_to_role_files(tmp_path, capsys, monkeypatch):
    """What Ray hands the driver for each batch of worker lines (the dict its log_to_driver printer
    gets): all lines to OUTPUT_DIR/logs/ROLE.log, only grpo-ray's to the terminal."""
    from grpo_ray.logs import WorkerOutput

    monkeypatch.delenv("GRPO_RAY_DEBUG", raising=False)
    printed = []
    router = WorkerOutput(ray_printer=printed.append)
    router.dir = tmp_path / "logs"
    trace = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom"]
    router({"pid": 11, "actor_name": "RayTrainWorker", "is_err": True, "lines": trace})
    router({"pid": 12, "task_name": "score_task", "is_err": False, "lines": ["[grpo-ray] optim fell back", "noise"]})
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "[grpo-ray] optim fell back\n"
    assert (tmp_path / "logs" / "RayTrainWorker.log").read_text().splitlines() == [f"pid=11 {line}" for line in trace]
    assert "pid=12 noise" in (tmp_path / "logs" / "score_task.log").read_text()
    monkeypatch.setenv("GRPO_RAY_DEBUG", "1")  # --debug: Ray's own printer shows everything
    router({"pid": 11, "actor_name": "RayTrainWorker", "is_err": True, "lines": trace})
    assert len(printed) == 1 and printed[0]["lines"] == trace
    router.terminal = False  # after the error line: files only
    router({"pid": 12, "task_name": "score_task", "is_err": False, "lines": ["[grpo-ray] late"]})
    assert capsys.readouterr().out == "" and len(printed) == 1


def test_connect_gives_up_on_a_port_that_is_not_ray(silent_port):
    from grpo_ray.cluster import ClusterError, connect

    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match="no Ray \\(gRPC\\) server answered within cluster.connect_timeout_s=1s"):
        connect(f"127.0.0.1:{silent_port}", timeout_s=1)
    assert time.perf_counter() - t0 < 5


def test_bounded_gives_up_on_a_call_that_never_returns():
    from grpo_ray.cluster import ClusterError, bounded, connect_abandoned

    release = threading.Event()
    with pytest.raises(ClusterError, match="nothing answered within cluster.connect_timeout_s=0.5s"):
        bounded(release.wait, "10.0.0.1:6379", 0.5)
    assert connect_abandoned()  # the CLI leaves with os._exit then
    release.set()
    time.sleep(0.2)
    assert not connect_abandoned()
    with pytest.raises(ClusterError, match=r"\(ValueError: nope\)|nope"):
        bounded(lambda: (_ for _ in ()).throw(ValueError("nope")), "h:1", 5)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_with_a_message_and_exit_130(tmp_path):
    """SIGINT to a real run after its first logged step: Ray Train's own handler used to end the
    process with exit 1 and no message; now it is the CLI's: one line, exit 130, within seconds."""
    import signal

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "grpo_ray.cli", "train", "--quick", "--output-dir", str(out), "--set", "max_steps=200"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics, deadline = out / "metrics.jsonl", time.time() + SLOW_S
        while proc.poll() is None and time.time() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                break
            time.sleep(0.5)
        assert proc.poll() is None and metrics.read_text().strip(), proc.communicate()
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    seconds = time.perf_counter() - t0
    err = stderr.strip().splitlines()
    assert proc.returncode == 130, (proc.returncode, stdout[-2000:], stderr[-2000:])
    assert err[-1] == f"grpo-ray: interrupted; continue it with: grpo-ray train --resume {out.resolve()}", err
    assert all(line.startswith(("[grpo-ray]", "grpo-ray: ")) for line in err), err  # grpo-ray's lines only
    assert "Traceback" not in stdout + stderr
    assert seconds < 30, f"stopping took {seconds:.1f}s"
