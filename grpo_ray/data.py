"""Prompt datasets for GRPO: generated tasks (reasoning-gym, built-in ``arith``), local files, hub datasets.

Every loader returns plain, JSON-safe ``dict`` rows so they can cross Ray process boundaries and be
checkpointed without custom serializers::

    {"prompt": [{"role": "system", ...}, {"role": "user", "content": ...}],  # TRL conversational prompt
     "answer": str,                                                          # gold answer ("" if none)
     ...other columns}                                                       # passed to reward functions

Reasoning-gym rows also carry ``rg_task`` (dataset name), ``rg_entry`` (JSON string of the original
entry) and ``rg_spec`` (JSON string of config/seed/size/index) so :mod:`grpo_ray.rewards` can rebuild the
exact entry and use the task's own grader.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from grpo_ray.text import suggest

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Reason step by step, briefly, "
    "then write only the final answer inside \\boxed{}."
)

RG_PREFIXES = ("reasoning_gym/", "reasoning-gym/", "rg/")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ARITH_DEFAULTS: dict[str, Any] = {
    "min_int": 0,  # smallest operand
    "max_int": 20,  # largest operand
    "min_terms": 2,  # operands per problem
    "max_terms": 2,
    "ops": "+-",  # subset of "+-*"
    "allow_negative": True,  # if False, resample problems whose result is < 0
}

Row = dict[str, Any]
Message = dict[str, str]


class DataError(ValueError):
    """A one-line, user-facing data problem: what is wrong and how to fix it."""


class DataConfigLike(Protocol):
    """The attributes :func:`load_datasets` reads (``grpo_ray.config.DataConfig`` satisfies it)."""

    task: str
    config: dict[str, Any]
    size: int
    eval_size: int
    seed: int
    prompt_column: str
    answer_column: str
    system_prompt: str | None
    eval_split: str | None


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_datasets(cfg: DataConfigLike) -> tuple[list[Row], list[Row]]:
    """Return ``(train_rows, eval_rows)`` for ``cfg.task``; dispatch on the task string's shape."""
    task = str(getattr(cfg, "task", "") or "").strip()
    if not task:
        raise DataError("data.task is empty; set it to 'reasoning_gym/<name>', 'arith', or a .jsonl/.parquet path")
    if task == "arith":
        return _load_arith(cfg)
    if task.startswith(RG_PREFIXES):
        return _load_reasoning_gym(cfg, task.split("/", 1)[1])
    if task.lower().endswith(FILE_SUFFIXES) or os.path.exists(task):
        return _load_files(cfg, task)
    return _load_hub(cfg, task)


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    """Duck-typed attribute read so any config-like object (or a test stub) works."""
    value = getattr(cfg, name, default)
    return default if value is None and default is not None else value


def _system_prompt(cfg: Any) -> str | None:
    """``None`` (or no attribute) -> the module default, which asks for the \\boxed{} answer the rewards
    grade; ``""`` -> no system message at all."""
    value = getattr(cfg, "system_prompt", None)
    return DEFAULT_SYSTEM_PROMPT if value is None else (value or None)


def _make_prompt(question: str, system_prompt: str | None) -> list[Message]:
    msgs: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


# --------------------------------------------------------------------------------------------------
# Built-in arithmetic task
# --------------------------------------------------------------------------------------------------


def _arith_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Merge user knobs over defaults, rejecting typos early instead of silently ignoring them."""
    unknown = sorted(set(config) - set(ARITH_DEFAULTS))
    if unknown:
        raise DataError(f"unknown arith option(s) {unknown}; valid options: {sorted(ARITH_DEFAULTS)}")
    opts = {**ARITH_DEFAULTS, **config}
    if not opts["ops"] or set(opts["ops"]) - set("+-*"):
        raise DataError(f"arith ops={opts['ops']!r} is invalid; use a non-empty subset of '+-*'")
    if opts["min_int"] > opts["max_int"] or not 1 <= opts["min_terms"] <= opts["max_terms"]:
        raise DataError("arith needs min_int <= max_int and 1 <= min_terms <= max_terms; fix data.config")
    return opts


def _arith_problem(rng: random.Random, opts: Mapping[str, Any]) -> tuple[str, str]:
    """One problem (question, answer); evaluated with Python so precedence of '*' is standard."""
    while True:
        n = rng.randint(opts["min_terms"], opts["max_terms"])
        nums = [rng.randint(opts["min_int"], opts["max_int"]) for _ in range(n)]
        ops = [rng.choice(opts["ops"]) for _ in range(n - 1)]
        expr = str(nums[0]) + "".join(f" {op} {x}" for op, x in zip(ops, nums[1:]))
        result = eval(expr, {"__builtins__": {}})  # noqa: S307 - digits and + - * only
        if opts["allow_negative"] or result >= 0:
            return f"What is {expr}?", str(result)


def _load_arith(cfg: Any) -> tuple[list[Row], list[Row]]:
    """Eval questions are drawn first (distinct); train draws skip them, so the splits never overlap."""
    opts = _arith_options(_cfg(cfg, "config", {}) or {})
    size, eval_size, seed = int(_cfg(cfg, "size", 512)), int(_cfg(cfg, "eval_size", 100)), int(_cfg(cfg, "seed", 0))
    rng = random.Random(f"arith-{seed}")
    max_draws = 50 * (size + eval_size) + 1000
    eval_qa: dict[str, str] = {}
    draws = 0
    while len(eval_qa) < eval_size and draws < max_draws:
        q, a = _arith_problem(rng, opts)
        eval_qa.setdefault(q, a)
        draws += 1
    train_qa: list[tuple[str, str]] = []
    while len(train_qa) < size and draws < max_draws:
        q, a = _arith_problem(rng, opts)
        if q not in eval_qa:
            train_qa.append((q, a))
        draws += 1
    if len(eval_qa) < eval_size or len(train_qa) < size:
        raise DataError(
            f"arith problem space is too small for {eval_size} distinct eval + {size} train problems; "
            "raise data.config max_int/max_terms or lower data.eval_size"
        )
    system = _system_prompt(cfg)
    train = [{"prompt": _make_prompt(q, system), "answer": a} for q, a in train_qa]
    evals = [{"prompt": _make_prompt(q, system), "answer": a} for q, a in eval_qa.items()]
    return train, evals


# --------------------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------------------


def reasoning_gym_names() -> list[str]:
    """Registered reasoning-gym dataset names (imported lazily: the import takes ~1 s)."""
    import reasoning_gym  # noqa: F401  (registers datasets)
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_rg_task(name: str) -> None:
    names = reasoning_gym_names()
    if name not in names:
        hint = suggest(name, names, n=3, cutoff=0.5, prefix="reasoning_gym/")
        raise DataError(
            f"unknown reasoning-gym task {name!r}; {hint or 'see reasoning_gym.factory.DATASETS for the list'}"
        )


def make_rg_dataset(name: str, config: Mapping[str, Any], seed: int, size: int) -> Any:
    """Build a reasoning-gym dataset, turning its assert/TypeError config failures into one-line DataErrors."""
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **dict(config))
    except (TypeError, AssertionError, ValueError) as exc:
        raise DataError(
            f"invalid data.config for reasoning-gym task {name!r}: {type(exc).__name__}: {exc}; "
            "check the option names/values against the task's *Config dataclass"
        ) from exc


def _rg_row(name: str, entry: Mapping[str, Any], spec: Mapping[str, Any], system: str | None) -> Row:
    """JSON strings keep metadata (tuples, nested dicts of varying shape) Arrow/Ray friendly."""
    answer = entry.get("answer")
    return {
        "prompt": _make_prompt(str(entry["question"]), system),
        "answer": "" if answer is None else str(answer),
        "rg_task": name,
        "rg_entry": json.dumps(
            {"question": entry["question"], "answer": answer, "metadata": entry.get("metadata", {})}, default=str
        ),
        "rg_spec": json.dumps(dict(spec), default=str),
    }


def _load_reasoning_gym(cfg: Any, name: str) -> tuple[list[Row], list[Row]]:
    """Train from ``seed``; eval from a disjoint seed range, skipping any question that occurs in train."""
    _check_rg_task(name)
    config = dict(_cfg(cfg, "config", {}) or {})
    clash = sorted({"seed", "size"} & set(config))
    if clash:
        raise DataError(f"data.config must not set {clash}; use data.seed / data.size / data.eval_size instead")
    size, eval_size, seed = int(_cfg(cfg, "size", 512)), int(_cfg(cfg, "eval_size", 100)), int(_cfg(cfg, "seed", 0))
    system = _system_prompt(cfg)

    train_ds = make_rg_dataset(name, config, seed, max(size, 1))
    train: list[Row] = []
    for i in range(size):
        spec = {"config": config, "seed": seed, "size": max(size, 1), "index": i}
        train.append(_rg_row(name, train_ds[i], spec, system))

    # Datasets index rows by seed + idx, so starting the eval seed after the train range avoids
    # regenerating train entries; the question filter catches coincidental duplicates.
    eval_seed, eval_pool = seed + size + 1, max(4 * eval_size, eval_size + 64)
    eval_ds = make_rg_dataset(name, config, eval_seed, eval_pool)
    seen = {row["prompt"][-1]["content"] for row in train}
    evals: list[Row] = []
    for i in range(eval_pool):
        if len(evals) >= eval_size:
            break
        entry = eval_ds[i]
        if str(entry["question"]) in seen:
            continue
        seen.add(str(entry["question"]))
        spec = {"config": config, "seed": eval_seed, "size": eval_pool, "index": i}
        evals.append(_rg_row(name, entry, spec, system))
    if len(evals) < eval_size:
        raise DataError(
            f"reasoning-gym task {name!r} produced only {len(evals)} eval questions distinct from train "
            f"(wanted {eval_size}); widen data.config (more digits/terms) or lower data.eval_size"
        )
    return train, evals


# --------------------------------------------------------------------------------------------------
# Local files (.jsonl / .json / .parquet)
# --------------------------------------------------------------------------------------------------


def _not_utf8(path: str, data: bytes, exc: UnicodeDecodeError, lineno: int | None = None) -> DataError:
    line = lineno if lineno is not None else data.count(b"\n", 0, exc.start) + 1
    return DataError(
        f"{path} line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl"
    )


def _read_jsonl(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Objects and the file line each came from (what every later error names)."""
    rows, where = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, raw, exc, lineno) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno} is a {type(obj).__name__}, not a JSON object; one object per line")
            rows.append(obj)
            where.append(f"line {lineno}")
    return rows, where


def _read_json(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A ``.json`` file may be a list of objects, ``{"data": [...]}``, or actually JSON lines."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path} must hold a JSON list of objects (or JSON lines); got {type(obj).__name__}")
    return obj, [f"record {i}" for i in range(1, len(obj) + 1)]


def _read_parquet(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read parquet file {path}: {type(exc).__name__}: {exc}") from exc
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def read_records(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Raw records from a local file and where each is in it ("line 7": counted as editors do),
    with a one-line error for a missing, unsupported or undecodable file."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} not found (cwd: {os.getcwd()}); fix the path in data.task/data.eval_split")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; point data.task at a .jsonl, .json or .parquet file")
    lower = path.lower()
    if lower.endswith(".parquet"):
        rows, where = _read_parquet(path)
    elif lower.endswith(".json"):
        rows, where = _read_json(path)
    elif lower.endswith(".jsonl"):
        rows, where = _read_jsonl(path)
    else:
        raise DataError(f"unsupported data file type {path!r}; use .jsonl, .json or .parquet")
    if not rows:
        raise DataError(f"data file {path!r} has no rows; add data or point data.task at another file")
    return rows, where


def _columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in records:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _normalize_messages(value: Any, where: str) -> list[Message]:
    """Validate a chat prompt so a bad row fails at load time, not in the middle of a rollout."""
    msgs = list(value)
    if not msgs:
        raise DataError(f"empty prompt at {where}; remove the row or fill in the prompt")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"prompt message {j} at {where} must be an object with 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": "" if m["content"] is None else str(m["content"])})
    return out


def to_prompt(value: Any, system: str | None, where: str) -> list[Message]:
    """String -> [system?, user]; message list -> validated, with the system prompt prepended if it has none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"empty or missing prompt at {where}; remove the row or fill in the prompt")
    if isinstance(value, str):
        return _make_prompt(value, system)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        msgs = _normalize_messages(value, where)
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return msgs
    raise DataError(f"prompt at {where} is a {type(value).__name__}; use a string or a list of chat messages")


def records_to_rows(records: Sequence[Mapping[str, Any]], cfg: Any, source: str, where: Sequence[str] | None = None) -> list[Row]:
    """Rename the configured prompt/answer columns to ``prompt``/``answer``; keep every other column.
    ``where``: each record's place in its file (default "row N", counted from 1)."""
    pcol = str(_cfg(cfg, "prompt_column", "prompt"))
    acol = _cfg(cfg, "answer_column", "answer") or None
    cols = _columns(records)
    if pcol not in cols:
        raise DataError(
            f"prompt column {pcol!r} not found in {source} (columns: {', '.join(cols)}); "
            "set data.prompt_column to one of them"
        )
    if acol is not None and acol not in cols:
        raise DataError(
            f"answer column {acol!r} not found in {source} (columns: {', '.join(cols)}); set data.answer_column "
            "to one of them, or to '' if your reward functions need no answer"
        )
    system = _system_prompt(cfg)
    rows = []
    for i, rec in enumerate(records):
        at = f"{where[i] if where else f'row {i + 1}'} of {source}"
        row = {k: v for k, v in rec.items() if k not in (pcol, acol)}
        row["prompt"] = to_prompt(rec.get(pcol), system, f"{at} (column {pcol!r})")
        if acol is not None:
            ans = rec.get(acol)
            if ans is None:
                raise DataError(f"missing answer at {at} (column {acol!r}); fill it in or drop the row")
            row["answer"] = ans if isinstance(ans, str) else json.dumps(ans) if isinstance(ans, (list, dict)) else str(ans)
        rows.append(row)
    return rows


def split_off_eval(rows: list[Row], eval_size: int, seed: int, source: str) -> tuple[list[Row], list[Row]]:
    """Deterministic held-out split; both halves keep file order (the sampler shuffles train anyway)."""
    if eval_size <= 0:
        return rows, []
    if eval_size >= len(rows):
        raise DataError(
            f"data.eval_size={eval_size} leaves no training rows from {len(rows)} rows in {source}; "
            "lower data.eval_size or give a separate data.eval_split file"
        )
    idx = list(range(len(rows)))
    random.Random(f"split-{seed}").shuffle(idx)
    held = set(idx[:eval_size])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _load_files(cfg: Any, path: str) -> tuple[list[Row], list[Row]]:
    records, where = read_records(path)
    train = records_to_rows(records, cfg, path, where)
    eval_path = _cfg(cfg, "eval_split", None)
    if eval_path:
        records, where = read_records(str(eval_path))
        return train, records_to_rows(records, cfg, str(eval_path), where)
    return split_off_eval(train, int(_cfg(cfg, "eval_size", 100)), int(_cfg(cfg, "seed", 0)), path)


# --------------------------------------------------------------------------------------------------
# Hugging Face hub datasets (needs network or a warm HF cache)
# --------------------------------------------------------------------------------------------------


def _hub_error(name: str, exc: BaseException) -> DataError:
    hint = ""
    try:
        rg = reasoning_gym_names()
        if name in rg:
            hint = f" (did you mean 'reasoning_gym/{name}'?)"
    except Exception:  # reasoning-gym missing must not mask the real error
        pass
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return DataError(
        f"could not load {name!r} as a local file or Hugging Face hub dataset{hint}: {type(exc).__name__}: {msg}; "
        "offline? save it as .jsonl/.parquet and set data.task to that path"
    )


def _load_hub(cfg: Any, name: str) -> tuple[list[Row], list[Row]]:
    """``datasets.load_dataset(name, **config)``; eval comes from ``eval_split`` (a split name) or a split-off."""
    try:
        import datasets

        dsd = datasets.load_dataset(name, **(_cfg(cfg, "config", {}) or {}))
    except Exception as exc:
        raise _hub_error(name, exc) from exc
    splits = list(dsd.keys()) if hasattr(dsd, "keys") else []
    if "train" not in splits:
        raise DataError(f"hub dataset {name!r} has no 'train' split (splits: {', '.join(splits)}); export it to a file")
    train = records_to_rows(dsd["train"].to_list(), cfg, f"{name}[train]")
    eval_split = _cfg(cfg, "eval_split", None)
    if eval_split:
        if eval_split not in splits:
            raise DataError(f"eval split {eval_split!r} not in hub dataset {name!r} (splits: {', '.join(splits)})")
        evals = records_to_rows(dsd[eval_split].to_list(), cfg, f"{name}[{eval_split}]")
        return train, evals[: int(_cfg(cfg, "eval_size", len(evals)))]
    return split_off_eval(train, int(_cfg(cfg, "eval_size", 100)), int(_cfg(cfg, "seed", 0)), name)


# --------------------------------------------------------------------------------------------------
# Chat template rendering
# --------------------------------------------------------------------------------------------------


def render_prompts(tokenizer: Any, rows: Sequence[Row | str | list[Message]], chat_template_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """Text the policy actually sees: chat template + generation prompt (+ TRL's `chat_template_kwargs`,
    e.g. enable_thinking); plain strings pass through."""
    out = []
    for r in rows:
        prompt = r["prompt"] if isinstance(r, Mapping) else r
        if isinstance(prompt, str):
            out.append(prompt)
        else:
            out.append(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})))
    return out


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


class PromptSampler:
    """Infinite, epoch-shuffled batches; (seed, epoch, position) fully determine the next batch,
    so restoring :meth:`state_dict` on resume continues with exactly the same data."""

    def __init__(self, rows: Sequence[Row], batch_size: int, seed: int = 0) -> None:
        if not rows:
            raise DataError("no training rows to sample from; check data.task / data.size")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = list(rows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"sampler-{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[Row]:
        """The next ``batch_size`` rows; a batch that crosses an epoch boundary continues into the next epoch."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(self.rows[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[Row]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpointed position; refuse a different dataset, since the position would be meaningless."""
        n = state.get("num_rows", len(self.rows))
        if n != len(self.rows):
            raise DataError(
                f"sampler state was saved for {n} rows but the dataset has {len(self.rows)}; "
                "resume with the same data config or start a fresh run"
            )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)
