"""`grpo-ray`: the command line. Parses arguments, builds a `GRPOConfig`, calls the driver
(`submit` / `jobs`: grpo_ray/jobs.py, which runs these commands as Ray jobs on a cluster).

User mistakes (config, data, model, reward function, output dir) print one line naming the
problem and the fix, exit 2, and show no traceback unless `--debug` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from grpo_ray.cluster import connect_abandoned
from grpo_ray.config import GRPOConfig, merge, parse_override
from grpo_ray.logs import log_dir, new_command, stop_terminal_output
from grpo_ray.tuning import SCHEDULERS, SEARCHERS, run_cli

USER_ERRORS = ("ConfigError", "DataError", "RewardError", "ToolError", "ModelError", "RunDirError", "TrainingDivergedError", "ClusterError", "WeightSyncError")
_USER_ERROR_LINE = re.compile(rf"({'|'.join(USER_ERRORS)}): (.+)")


def builtin_config(name: str) -> Path:
    return Path(str(resources.files("grpo_ray") / "configs" / f"{name}.yaml"))


def load_config(args: argparse.Namespace) -> GRPOConfig:
    """--config FILE (or the demo / --quick preset), then --set overrides, then flags."""

    path = Path(args.config) if args.config else builtin_config("quick" if getattr(args, "quick", False) else "demo")
    if args.config and not path.exists() and builtin_config(args.config).is_file():
        path = builtin_config(args.config)  # a built-in name: demo, quick, lora
    cfg = GRPOConfig.from_yaml(path)
    raw = cfg.to_dict()
    for item in args.set or []:
        raw = merge(raw, parse_override(item))
    if getattr(args, "output_dir", None):
        raw["output_dir"] = args.output_dir
    if getattr(args, "address", None):
        raw.setdefault("cluster", {})["address"] = args.address
    return GRPOConfig.from_dict(raw)


def cmd_train(args: argparse.Namespace) -> int:
    from grpo_ray.checkpoints import RUN_FILE
    from grpo_ray.console import summary
    from grpo_ray.driver import train

    if args.resume and not args.config:
        run_file = Path(args.resume) / RUN_FILE
        if run_file.is_file():
            args.config = str(run_file)
    if args.resume:
        args.output_dir = args.output_dir or args.resume
    cfg = load_config(args)
    t0 = time.monotonic()
    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    print(summary(result, time.monotonic() - t0))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from grpo_ray.evaluate import evaluate
    from grpo_ray.lora import is_checkpoint
    from grpo_ray.models import check_context_length, resolve_model_path

    cfg = load_config(args)
    if args.data:
        cfg = cfg.with_overrides({"data": {"task": args.data}})
    model = args.model or cfg.model_name_or_path
    model = model if is_checkpoint(model) else resolve_model_path(model)  # a checkpoint / adapter is merged for vLLM
    check_context_length(model, cfg.context_length)
    result = evaluate(cfg, model, limit=args.limit, num_generations=args.num_generations)
    line = {"model": result.model, "task": result.task, "accuracy": result.accuracy, "num_samples": result.num_samples, **result.sampled, "seconds": round(result.seconds, 1)}
    print(json.dumps(line))
    if args.output:
        Path(args.output).write_text(json.dumps({**line, "examples": result.examples}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from grpo_ray.config import ConfigError
    from grpo_ray.lora import export_merged

    if not args.merge:
        raise ConfigError("grpo-ray export: pass --merge (adapter + base -> one HF model folder; the adapter itself is already in CHECKPOINT/model)")
    print(f"merged model: {export_merged(args.checkpoint, args.out)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    return run_cli(args, load_config)


def cmd_submit(args: argparse.Namespace) -> int:
    from grpo_ray.jobs import run_submit

    return run_submit(args, build_parser(), load_config)


def cmd_jobs(args: argparse.Namespace) -> int:
    from grpo_ray.jobs import run_jobs

    return run_jobs(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-ray", description="GRPO post-training on Ray: vLLM rollouts, DeepSpeed updates.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (default: the built-in demo)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set cluster.zero_stage=2")
        p.add_argument("--quick", action="store_true", help="use the one-minute tiny-model config instead of the demo")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")

    train = sub.add_parser("train", help="run a GRPO training job")
    common(train)
    train.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    train.add_argument("--output-dir", help="where metrics, checkpoints and plots go")
    train.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out accuracy of a model with vLLM")
    common(ev)
    ev.add_argument("--model", help="model folder, LoRA checkpoint or built-in name (default: the config's model)")
    ev.add_argument("--data", help="task, e.g. reasoning_gym/chain_sum, arith, or a .jsonl path")
    ev.add_argument("--limit", type=int, help="evaluate only the first N eval rows")
    ev.add_argument("--num-generations", type=int, metavar="K", help="also sample K completions per prompt: eval/pass@1, eval/pass@K, eval/mean@K (as logged during training)")
    ev.add_argument("--output", help="write the result and a few examples as JSON")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a LoRA checkpoint as one merged HF model folder (transformers / vLLM)")
    ex.add_argument("--merge", action="store_true", help="merge the adapter into its base (the only export there is)")
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint_* dir, its model/ folder or a PEFT adapter folder")
    ex.add_argument("out", metavar="OUT", help="the merged model folder to write")
    ex.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    ex.set_defaults(func=cmd_export)

    # Hyperparameter search (grpo_ray/tuning/, tune/README.md): every trial is a whole GRPO run.
    tn = sub.add_parser("tune", help="hyperparameter search over GRPO runs with Ray Tune (ASHA / PBT / FIFO)")
    common(tn)
    tn.add_argument("--space", help="search-space YAML, e.g. tune/beta_lr.yaml or tune/presets.yaml")
    tn.add_argument("--num-samples", type=int, help="trials to sample (x each grid point); default: the space file's, else 1")
    tn.add_argument("--scheduler", choices=SCHEDULERS, help="asha (default): stop poor trials early; pbt: exploit/explore beta and LR")
    tn.add_argument("--search", choices=SEARCHERS, help="how to sample the space (default random)")
    tn.add_argument("--max-concurrent", type=int, help="trials running at once (default: 1 on a local Ray, 4 on a cluster)")
    tn.add_argument("--address", help="Ray cluster address (default: start a local Ray sized for the concurrent trials)")
    tn.add_argument("--output-dir", help="where studies go (default tune_outputs); the study is OUTPUT_DIR/NAME")
    tn.add_argument("--name", help="study name (default: the space file's name)")
    tn.add_argument("--resume", metavar="STUDY_DIR", help="continue an interrupted study from its Tune experiment dir")
    tn.add_argument("--overwrite", action="store_true", help="replace an existing study of the same name")
    tn.set_defaults(func=cmd_tune)

    # Cluster jobs (grpo_ray/jobs.py): run any command above as a Ray job on a running cluster.
    address_help = "Ray dashboard address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)"
    submit = sub.add_parser("submit", help="run a grpo-ray command as a Ray job on a cluster: grpo-ray submit -- train ...")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    submit.add_argument("--working-dir", help="folder to upload as the job's working directory (default: only --config and the files it names)")
    submit.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    submit.add_argument("--env-from", action="append", metavar="NAME", help="pass NAME's value from this shell, e.g. WANDB_API_KEY (repeatable)")
    submit.add_argument("--submission-id", help="job ID (default: grpo-ray-COMMAND-DATE-TIME-XXXX)")
    submit.add_argument("--python", default="python", help="Python on the cluster that runs `-m grpo_ray.cli` (default: python)")
    submit.add_argument("--entrypoint-resource", action="append", metavar="NAME=AMOUNT", help="resources for the driver process, e.g. GPU=1 rollout=0.001 for eval on a GPU node (default: none, on the head)")
    submit.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    submit.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the grpo-ray command to run, e.g. -- train --config my.yaml")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, stop and read the logs of submitted jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("list", "jobs on the cluster"), ("status", "one job's status"), ("stop", "stop a job"), ("logs", "a job's logs")):
        p = jobs_sub.add_parser(name, help=text)
        p.add_argument("--address", help=address_help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if name != "list":
            p.add_argument("job_id", metavar="SUBMISSION_ID", help="the ID `grpo-ray submit` printed")
        p.set_defaults(func=cmd_jobs)
    jobs_sub.choices["list"].add_argument("--all", action="store_true", help="every Ray job, not only grpo-ray's")
    jobs_sub.choices["list"].add_argument("--json", action="store_true", help="JSON instead of a table")
    jobs_sub.choices["status"].add_argument("--json", action="store_true", help="JSON details (env var values redacted)")
    jobs_sub.choices["stop"].add_argument("--no-wait", action="store_true", help="return at once instead of waiting for STOPPED")
    jobs_sub.choices["stop"].add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to end (default 60)")
    jobs_sub.choices["logs"].add_argument("--follow", action="store_true", help="stream until the job ends; exit like submit --follow")
    return parser


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user mistake, even when it surfaced through Ray."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in USER_ERRORS:
            return str(exc).strip().splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("GRPO_RAY_DEBUG") == "1"
    before = os.environ.get("GRPO_RAY_DEBUG")
    if debug:
        os.environ["GRPO_RAY_DEBUG"] = "1"  # grpo_ray/logs.py: every worker line on the terminal too
    new_command()
    try:
        code = _run(args, debug)
    finally:
        if before is None:
            os.environ.pop("GRPO_RAY_DEBUG", None)
    if connect_abandoned():  # a connect thread is stuck inside Ray: leave without interpreter shutdown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:
        stop_terminal_output()
        logs = log_dir()
        hint = f"; continue it with: grpo-ray train --resume {logs.parent}" if logs is not None and args.command == "train" else ""
        print(f"grpo-ray: interrupted{hint}", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the top of the program: report, then exit
        message = user_error_message(exc)
        if message is None:
            found = _USER_ERROR_LINE.findall(str(exc))
            message = found[-1][1].strip() if found else None
        stop_terminal_output()  # the error line comes last: later worker lines go to the log files
        if debug or message is None:
            traceback.print_exc()
        if message is not None:
            logs = log_dir()
            where = f" (details: {logs})" if logs is not None and logs.is_dir() and not debug else ""
            print(f"grpo-ray: error: {message}{where}", file=sys.stderr, flush=True)
            return 2
        return 1


if __name__ == "__main__":
    sys.exit(main())
