"""`grpo-ray submit` and `grpo-ray jobs`: run grpo-ray commands as Ray jobs on a running cluster.

`grpo-ray submit [--address http://HEAD:8265] [--follow] -- train|eval|... ARGS` turns the command
into the job entrypoint `python -m grpo_ray.cli train ARGS --address auto` and submits it through
Ray's Job Submission SDK with a runtime environment:

- `--working-dir DIR` is uploaded and becomes the job's working directory (default: none, the
  package is installed in the cluster image);
- without `--working-dir`, a local `--config FILE` (and `tune`'s `--space FILE`) and the local
  files the config names (a `.jsonl` / `.parquet` data file, `path/file.py:fn` reward functions)
  are staged into a temporary folder that is uploaded as the working directory, the data and reward
  files at the same relative paths;
- `--env KEY=VALUE` sets a variable; `--env-from NAME` copies NAME's value from this shell's
  environment (API keys: never written to a file here, never printed).

`grpo-ray jobs list|status|stop|logs` inspect and control the jobs. Every mistake is one line
(`JobError`), printed by `run_submit` / `run_jobs`, exit code 2.

Layering: above the driver (it may import config/driver); only cli imports this module. Ray's
SDK is imported lazily so `grpo-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from grpo_ray.cluster import DEFAULT_CONNECT_TIMEOUT_S, ClusterError, bounded, probe
from grpo_ray.config import ConfigError, reward_file
from grpo_ray.text import text_table

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Subcommands whose config is checked (and whose local files are staged) before submission.
CONFIG_COMMANDS = ("train", "eval", "tune")
# Options naming a local file the command reads: uploaded with the job, the path rewritten
# (eval's --data may also be a task name: only an existing file is uploaded).
FILE_OPTIONS = ("--config", "--space", "--data")
STAGED_FILES = "job_files"  # their folder in the uploaded working dir
# Never uploaded from a --working-dir (gitignore syntax, relative to it).
WORKING_DIR_EXCLUDES = ["/.venv/", "/.git/", "__pycache__/", "*.pyc", "/outputs/", "/grpo_outputs/", "/.pytest_cache/"]
# The driver's ray.init(runtime_env=...) adds env vars of its own; with this set, a job env var of
# the same name yields to the driver's instead of failing the merge.
OVERRIDE_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
# With an uploaded working dir, Ray starts every worker of the job in it; Ray Train would move its
# workers into the run's artifact dir, where the config's relative data / reward paths are not.
WORKING_DIR_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
USER_ERROR_PREFIX = "grpo-ray: error: "
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobError(RuntimeError):
    """A job-submission problem, phrased as one line: what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Building the job (pure: no Ray, no network; unit-tested)
# --------------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    staging_dir: Path | None = None  # temporary upload folder, removed after submission
    notes: list[str] = field(default_factory=list)  # warnings for the user (stderr)
    # Where the driver process runs: by default on the head with no resources (it holds no model;
    # `eval` runs vLLM in the driver, so on a GPU cluster give it a GPU and a rollout node).
    entrypoint_resources: dict[str, float] = field(default_factory=dict)

    def entrypoint_kwargs(self) -> dict[str, Any]:
        res = dict(self.entrypoint_resources)
        out: dict[str, Any] = {}
        if "CPU" in res:
            out["entrypoint_num_cpus"] = res.pop("CPU")
        if "GPU" in res:
            out["entrypoint_num_gpus"] = res.pop("GPU")
        if res:
            out["entrypoint_resources"] = res
        return out

    def cleanup(self) -> None:
        if self.staging_dir is not None:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            self.staging_dir = None


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_ADDRESS, else the local dashboard."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def parse_env(pairs: list[str] | None, names: list[str] | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """`--env KEY=VALUE` pairs and `--env-from NAME` names (values read from `environ`)."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise JobError(f"--env {pair!r}: use --env KEY=VALUE with KEY a variable name, e.g. --env HF_HOME=/shared/hf")
        out[key] = value
    for name in names or []:
        if not _ENV_NAME.match(name):
            raise JobError(f"--env-from {name!r}: give a variable name, e.g. --env-from WANDB_API_KEY")
        if name not in environ:
            raise JobError(f"--env-from {name}: {name} is not set in this shell; export it first (its value is sent, never written)")
        out[name] = environ[name]
    return out


def _option_value_index(args: list[str], option: str) -> int | None:
    """Index in `args` of the value of `option` (`--opt V` or `--opt=V`), the last one if repeated."""
    found = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            found = i + 1
        elif arg.startswith(option + "="):
            found = i
    return found


def _replace_option(args: list[str], option: str, value: str, parser: argparse.ArgumentParser) -> list[str]:
    """`args` with the value of `option` replaced; checked by parsing it again (argparse also takes
    abbreviations such as `--conf`, which are refused here rather than silently not rewritten)."""
    args = list(args)
    i = _option_value_index(args, option)
    if i is not None:
        args[i] = f"{option}={value}" if args[i].startswith(option + "=") else value
    if getattr(parser.parse_args(args), option.lstrip("-").replace("-", "_")) != value:
        raise JobError(f"write {option} in full (not abbreviated) so that grpo-ray submit can upload the file")
    return args


def local_references(cfg: Any) -> list[tuple[str, str]]:
    """(field, path) of every local file a config names that the job needs: data and reward files."""
    refs: list[tuple[str, str]] = []
    data = getattr(cfg, "data", None)
    for name in ("task", "eval_split"):
        value = getattr(data, name, None) if data is not None else None
        if isinstance(value, str) and os.path.isfile(value):
            refs.append((f"data.{name}", value))
    for spec in getattr(cfg, "reward_funcs", None) or []:
        path = reward_file(spec) if isinstance(spec, str) else None
        if path and os.path.isfile(path):
            refs.append(("reward_funcs", path))
    return refs


def _stage(staging: Path, rel: str, source: Path) -> None:
    target = staging / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def parse_resources(pairs: list[str] | None) -> dict[str, float]:
    """`--entrypoint-resource NAME=AMOUNT` pairs (CPU and GPU included) -> {name: amount}."""
    out: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, amount = pair.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value < 0:
            raise JobError(f"--entrypoint-resource {pair!r}: use NAME=AMOUNT, e.g. GPU=1 or rollout=0.001")
        out[name] = value
    return out


def default_submission_id(command: str) -> str:
    return f"grpo-ray-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_job(
    command: list[str],
    parser: argparse.ArgumentParser,
    load_config: Callable[[argparse.Namespace], Any] | None = None,
    *,
    working_dir: str | None = None,
    env: dict[str, str] | None = None,
    python: str = "python",
    submission_id: str | None = None,
) -> JobSpec:
    """The entrypoint, runtime env and metadata of `grpo-ray <command>` run as a Ray job.

    `parser` is grpo-ray's own argument parser: the command is checked with it here, so a typo fails
    before anything is uploaded. `load_config` (cli.load_config) checks train/eval/tune configs too.
    Files to upload may be copied into a temporary staging folder: call `JobSpec.cleanup()`.
    """
    args = list(command)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise JobError("nothing to submit: give the grpo-ray command after '--', e.g. grpo-ray submit -- train --quick")
    if args[0] in ("submit", "jobs"):
        raise JobError(f"'{args[0]}' cannot run as a job: submit train/eval/... instead, e.g. grpo-ray submit -- train --quick")
    ns = parser.parse_args(args)  # exits 2 with argparse's usage message on a bad command
    name = args[0]
    notes: list[str] = []

    # The job's driver joins the cluster it runs on (the job server sets RAY_ADDRESS for it).
    if hasattr(ns, "address") and not ns.address:
        args += ["--address", "auto"]

    # The files the command reads (--config, tune's --space): local ones are uploaded.
    local_files: dict[str, str] = {}
    for option in FILE_OPTIONS:
        value = getattr(ns, option.lstrip("-").replace("-", "_"), None)
        if not value:
            continue
        if os.path.isfile(value):
            local_files[option] = value
        elif option != "--data":
            notes.append(f"{option} {value} is not a local file: the job reads it on the cluster as is")

    # The (base) config is checked here; the local data / reward files it names go with the job.
    cfg = None
    config_arg = getattr(ns, "config", None)
    resuming = bool(getattr(ns, "resume", None)) and not config_arg  # the run dir's own config, on the cluster
    if load_config is not None and name in CONFIG_COMMANDS and not resuming and (not config_arg or "--config" in local_files):
        try:
            cfg = load_config(ns)
        except ConfigError as exc:
            raise JobError(str(exc).strip().splitlines()[0]) from exc
    refs = local_references(cfg) if cfg is not None else []

    runtime_env: dict[str, Any] = {}
    staging: Path | None = None
    if working_dir:
        root = Path(working_dir).expanduser().resolve()
        if not root.is_dir():
            raise JobError(f"--working-dir {working_dir!r} is not a folder: point it at the folder to upload")
        for option, value in local_files.items():
            path = Path(value).resolve()
            if not path.is_relative_to(root):
                raise JobError(f"{option} {value} is outside --working-dir {working_dir}: move it inside, or drop --working-dir to upload the file alone")
            args = _replace_option(args, option, path.relative_to(root).as_posix(), parser)
        for fld, ref in refs:
            if not Path(ref).is_absolute() and not (root / ref).is_file():
                notes.append(f"{fld} {ref!r} is not under --working-dir {working_dir} at that relative path: the job will not find it")
        runtime_env.update(working_dir=str(root), excludes=list(WORKING_DIR_EXCLUDES))
    elif local_files or any(not Path(ref).is_absolute() for _, ref in refs):
        staging = Path(tempfile.mkdtemp(prefix="grpo-ray-job-"))
        try:
            for option, value in local_files.items():
                rel = f"{STAGED_FILES}/{option.lstrip('-')}/{Path(value).name}"
                _stage(staging, rel, Path(value))
                args = _replace_option(args, option, rel, parser)
            for fld, ref in refs:
                if Path(ref).is_absolute():
                    continue  # an absolute path: expected on the cluster's storage as is
                rel_path = Path(os.path.normpath(ref))
                if rel_path.parts and rel_path.parts[0] == "..":
                    raise JobError(f"{fld} {ref!r} is outside the current folder: pass --working-dir covering it, or use an absolute path on the cluster's storage")
                _stage(staging, rel_path.as_posix(), Path(ref))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        runtime_env["working_dir"] = str(staging)

    # Outputs land where the entrypoint runs: relative paths vanish with the job's working dir.
    out = None
    if name == "train" and cfg is not None:
        out = cfg.output_dir
    elif name == "tune" and not getattr(ns, "resume", None):
        out = getattr(ns, "output_dir", None) or "tune_outputs"
    if out and not Path(out).is_absolute():
        notes.append(
            f"output dir {out!r} is relative: it is written under the job's working directory on the node that runs "
            "the driver; pass --output-dir with an absolute path on shared storage (e.g. /shared/runs/NAME)"
        )

    runtime_env["env_vars"] = {**(WORKING_DIR_ENV if "working_dir" in runtime_env else {}), **(env or {}), **OVERRIDE_ENV}
    sid = submission_id or default_submission_id(name)
    metadata = {"grpo_ray_command": name, "grpo_ray_args": shlex.join(args[1:])[:1000]}
    entrypoint = shlex.join([python, "-m", "grpo_ray.cli", *args])
    return JobSpec(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, submission_id=sid, staging_dir=staging, notes=notes)


# --------------------------------------------------------------------------------------------------
# Talking to the job server
# --------------------------------------------------------------------------------------------------


def use_ray_auth_token() -> bool:
    """Send Ray's auth token when one is available and RAY_AUTH_MODE is unset, as `ray.init` does when
    it joins a cluster (a head started where ~/.ray/auth_token exists requires it). The token comes
    from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE=disabled opts out."""
    from grpo_ray.ray_compat import enable_job_token_auth

    return enable_job_token_auth()


def connect(address: str | None, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> Any:
    """A JobSubmissionClient for the cluster's dashboard within `timeout_s`, or a one-line JobError."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    use_ray_auth_token()
    try:
        probe(address, timeout_s)
        return bounded(lambda: JobSubmissionClient(address), address, timeout_s)
    except ClusterError as exc:
        raise JobError(
            f"cannot reach the Ray job server at {address} ({exc.reason}); start one with `ray start --head` or pass "
            "--address http://HEAD:8265 (on Kubernetes: kubectl port-forward svc/CLUSTER-head-svc 8265:8265)"
        ) from exc


def _sdk_call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an SDK call; its RuntimeError (HTTP 4xx/5xx) becomes a one-line JobError."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if "does not exist" in text or "404" in text:
            raise JobError(f"{what}: no such job on this cluster; list them with `grpo-ray jobs list`") from exc
        raise JobError(f"{what}: {text[:300]}") from exc


def submit(client: Any, spec: JobSpec) -> str:
    try:
        return _sdk_call(
            f"submitting {spec.submission_id}",
            client.submit_job,
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            metadata=spec.metadata,
            submission_id=spec.submission_id,
            **spec.entrypoint_kwargs(),
        )
    finally:
        spec.cleanup()  # the SDK has uploaded the folder by now


def status(client: Any, job_id: str) -> str:
    return str(_sdk_call(f"job {job_id}", client.get_job_status, job_id).value)


def wait_terminal(client: Any, job_id: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or the timeout passes); the last status."""
    deadline = time.monotonic() + timeout_s
    state = status(client, job_id)
    while state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = status(client, job_id)
    return state


def follow(client: Any, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's logs until it ends; its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    _sdk_call(f"job {job_id}", client.get_job_status, job_id)  # unknown ID: one line, not a websocket error
    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - aiohttp / websocket errors: fall back to polling
        print(f"grpo-ray: log stream of {job_id} ended early ({type(exc).__name__}); waiting for the job's status", file=sys.stderr)
        return wait_terminal(client, job_id, timeout_s=float("inf"), poll_s=2.0)
    return wait_terminal(client, job_id, timeout_s=120.0)


def user_error_in_logs(logs: str) -> str | None:
    """The last one-line grpo-ray user error the job printed, if any."""
    lines = [line.strip() for line in logs.splitlines() if line.strip().startswith(USER_ERROR_PREFIX)]
    return lines[-1][len(USER_ERROR_PREFIX):] if lines else None


def finish(client: Any, job_id: str, state: str) -> int:
    """Report a followed job's end: 0 SUCCEEDED, 2 a grpo-ray user error, 1 otherwise."""
    if state == "SUCCEEDED":
        print(f"grpo-ray: job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    info = _sdk_call(f"job {job_id}", client.get_job_info, job_id)
    message = user_error_in_logs(_sdk_call(f"job {job_id}", client.get_job_logs, job_id)) if state == "FAILED" else None
    if message:
        print(f"{USER_ERROR_PREFIX}job {job_id} FAILED: {message}", file=sys.stderr)
        return 2
    print(f"grpo-ray: job {job_id} {state}: {(info.message or '').strip()}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(info: Any) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = int(max(0, end - info.start_time) / 1000)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def job_dict(info: Any) -> dict[str, Any]:
    """A job's details as JSON-able dict, env var values redacted (they may be secrets)."""
    dump = getattr(info, "model_dump", None) or getattr(info, "dict", None)  # pydantic 2 / 1
    raw = dump() if dump else dict(vars(info))
    out = json.loads(json.dumps(raw, default=str))
    env_vars = ((out.get("runtime_env") or {}).get("env_vars")) or {}
    if env_vars:
        out["runtime_env"]["env_vars"] = {k: "<redacted>" for k in env_vars}
    for key in ("status", "type"):
        value = raw.get(key)
        out[key] = getattr(value, "value", value)
        if isinstance(out[key], str) and "." in out[key]:
            out[key] = out[key].rsplit(".", 1)[-1]
    return out


def format_table(infos: list[Any]) -> str:
    rows = []
    for info in sorted(infos, key=lambda i: i.start_time or 0):
        meta = info.metadata or {}
        command = f"{meta['grpo_ray_command']} {meta.get('grpo_ray_args', '')}".strip() if "grpo_ray_command" in meta else info.entrypoint
        rows.append((info.submission_id or info.job_id or "-", str(getattr(info.status, "value", info.status)), _when(info.start_time), _duration(info), command[:80]))
    return text_table(("SUBMISSION_ID", "STATUS", "STARTED", "DURATION", "COMMAND"), rows, markdown=False)


# --------------------------------------------------------------------------------------------------
# CLI entry points (called by grpo_ray.cli)
# --------------------------------------------------------------------------------------------------


def _report(exc: JobError, args: argparse.Namespace) -> int:
    if getattr(args, "debug", False) or os.environ.get("GRPO_RAY_DEBUG") == "1":
        traceback.print_exc()
    print(f"{USER_ERROR_PREFIX}{exc}", file=sys.stderr)
    return 2


def run_submit(args: argparse.Namespace, parser: argparse.ArgumentParser, load_config: Callable[[argparse.Namespace], Any] | None = None) -> int:
    """`grpo-ray submit`: prints the submission ID on stdout, hints on stderr; --follow streams the logs."""
    try:
        env = parse_env(args.env, args.env_from)
        spec = build_job(
            args.job,
            parser,
            load_config,
            working_dir=args.working_dir,
            env=env,
            python=args.python,
            submission_id=args.submission_id,
        )
        spec.entrypoint_resources = parse_resources(getattr(args, "entrypoint_resource", None))
        try:
            client = connect(args.address)
        except BaseException:
            spec.cleanup()
            raise
        for note in spec.notes:
            print(f"grpo-ray: note: {note}", file=sys.stderr)
        job_id = submit(client, spec)
        address = resolve_address(args.address)
        print(job_id, flush=True)
        passed = sorted(env)
        print(
            f"grpo-ray: submitted {job_id} to {address}: {spec.entrypoint}"
            + (f" (env: {', '.join(passed)})" if passed else ""),
            file=sys.stderr,
        )
        if not args.follow:
            print(
                f"grpo-ray: watch it with `grpo-ray jobs logs {job_id} --follow --address {address}`, "
                f"stop it with `grpo-ray jobs stop {job_id} --address {address}`, dashboard {address}/#/jobs/{job_id}",
                file=sys.stderr,
            )
            return 0
        try:
            state = follow(client, job_id)
        except KeyboardInterrupt:
            print(f"\ngrpo-ray: stopped following; {job_id} keeps running (grpo-ray jobs stop {job_id} to stop it)", file=sys.stderr)
            return 130
        return finish(client, job_id, state)
    except JobError as exc:
        return _report(exc, args)


def run_jobs(args: argparse.Namespace) -> int:
    """`grpo-ray jobs list|status|stop|logs`."""
    try:
        client = connect(args.address)
        action = args.jobs_command
        if action == "list":
            infos = _sdk_call("listing jobs", client.list_jobs)
            if not args.all:
                infos = [i for i in infos if "grpo_ray_command" in (i.metadata or {})]
            if args.json:
                print(json.dumps([job_dict(i) for i in infos], indent=1))
            elif infos:
                print(format_table(infos))
            else:
                print("no grpo-ray jobs on this cluster" + ("" if args.all else " (--all lists every Ray job)"), file=sys.stderr)
            return 0
        job_id = args.job_id
        if action == "status":
            info = _sdk_call(f"job {job_id}", client.get_job_info, job_id)
            if args.json:
                print(json.dumps(job_dict(info), indent=1))
            else:
                state = getattr(info.status, "value", info.status)
                print(f"{job_id}: {state}")
                if info.message:
                    print(f"  message:    {info.message.strip()}")
                print(f"  started:    {_when(info.start_time)}   duration: {_duration(info)}")
                print(f"  entrypoint: {info.entrypoint}")
            return 0
        if action == "stop":
            stopped = _sdk_call(f"job {job_id}", client.stop_job, job_id)
            if not stopped:
                print(f"grpo-ray: {job_id} had already ended: {status(client, job_id)}", file=sys.stderr)
                return 0
            if args.no_wait:
                print(f"grpo-ray: stop requested for {job_id}", file=sys.stderr)
                return 0
            state = wait_terminal(client, job_id, timeout_s=args.timeout)
            print(f"{job_id}: {state}")
            return 0 if state in TERMINAL else 1
        if action == "logs":
            if args.follow:
                try:
                    return finish(client, job_id, follow(client, job_id))
                except KeyboardInterrupt:
                    return 130
            sys.stdout.write(_sdk_call(f"job {job_id}", client.get_job_logs, job_id))
            return 0
        raise JobError(f"unknown jobs command {action!r}")
    except JobError as exc:
        return _report(exc, args)

