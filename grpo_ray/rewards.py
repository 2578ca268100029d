"""Reward functions with the TRL signature ``fn(prompts, completions, **columns) -> list[float | None]``.

``None`` means "not applicable to this sample" (e.g. the reasoning-gym reward on a non reasoning-gym row);
:func:`score` turns it into NaN and, like TRL, ignores it in the weighted sum. Everything here is pure
Python so the rollout workers can call it inside Ray tasks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Union

from grpo_ray.config import reward_file
from grpo_ray.text import suggest

RewardFn = Callable[..., Sequence[float | None]]


class ByValue:
    """A reward callable pickled by value (cloudpickle) where it was given, so it reaches Ray
    workers that cannot import its module (a script's `__main__`, a notebook, a `ray://` client's
    files). Its `name` is what the config records (`module:qualname`)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        import cloudpickle

        if not callable(fn):
            raise RewardError(f"reward {fn!r} is a {type(fn).__name__}, not callable: pass a function")
        self.name = callable_name(fn)
        module = sys.modules.get(getattr(fn, "__module__", "") or "")
        by_value = module is not None and _is_user_module(module)
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            self.blob = cloudpickle.dumps(fn)
        except Exception as exc:
            raise RewardError(f"reward {self.name!r} cannot be pickled for the Ray workers ({type(exc).__name__}: {exc}); define it at module level") from None
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)

    def load(self) -> RewardFn:
        import cloudpickle

        return cloudpickle.loads(self.blob)

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


RewardSpec = Union[str, ByValue]


def callable_name(fn: Callable[..., Any]) -> str:
    """How a config records a Python reward callable: `module:qualname` (e.g. `__main__:<lambda>`)."""
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', None) or type(fn).__name__}"


def _is_user_module(module: Any) -> bool:
    """A module of the user's own code (not grpo_ray, not an installed package, not the stdlib)."""
    path = getattr(module, "__file__", None)
    if module.__name__ == "__main__" or path is None:
        return module.__name__ != "builtins" and not module.__name__.startswith("grpo_ray")
    return not module.__name__.startswith("grpo_ray") and "site-packages" not in path and not path.startswith(sys.base_prefix)


class RewardError(ValueError):
    """A one-line, user-facing reward problem naming the function and the fix."""


# --------------------------------------------------------------------------------------------------
# Answer extraction / normalization
# --------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every *closed* ``\\boxed{...}`` (nested braces ok); truncated ones are skipped."""
    found = []
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start:i].strip())
                break
    return found


def extract_answer(text: str | None) -> str | None:
    """Final answer of a completion: last ``\\boxed{}``, else last ``<answer>`` tag, else text after
    ``####``, else the last number. ``None`` when nothing answer-like is present."""
    if not text:
        return None
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1]
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.splitlines()[0].strip()
    numbers_ = _NUMBER.findall(text)
    return numbers_[-1] if numbers_ else None


def has_boxed_answer(text: str | None) -> bool:
    return bool(text) and bool(_boxed_contents(text))


def _strip_latex(s: str) -> str:
    """Remove wrappers that change presentation, not value: $...$, \\text{}, \\left/\\right, trailing '.'."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.strip().rstrip(".").strip()


def parse_number(s: str | None) -> Fraction | float | None:
    """Exact (Fraction) when possible so integer answers compare exactly; float for huge/odd forms."""
    if s is None:
        return None
    t = _strip_latex(s).replace(",", "").replace(" ", "").replace("\\%", "").rstrip("%")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", t)
    if m:
        t = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)(/[+-]?(\d+\.?\d*|\.\d+))?|[+-]?\d+(\.\d*)?e[+-]?\d+", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        try:
            return float(t)
        except ValueError:
            return None


def normalize_text(s: str) -> str:
    return re.sub(r"\s+", " ", _strip_latex(s)).lower()


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric match (exact for rationals, 1e-6 relative for floats), else normalized string equality."""
    if pred is None:
        return False
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        integers = all(isinstance(x, Fraction) and x.denominator == 1 for x in (p, g))
        if integers:  # no tolerance: 1234567 vs 1234568 must not match
            return p == g
        return p == g or math.isclose(float(p), float(g), rel_tol=1e-6, abs_tol=1e-9)
    return normalize_text(pred) == normalize_text(gold)


def completion_text(completion: Any) -> str:
    """String completions as-is; conversational ones -> concatenated assistant contents."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content") or "")
    msgs = list(completion)
    assistant = [m for m in msgs if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"]
    return "".join(str(m.get("content") or "") for m in (assistant or msgs) if isinstance(m, Mapping))


def _gold(answer: Any) -> str | None:
    """Gold answers may be GSM8K-style ('... #### 42') or boxed; reduce those to the final answer."""
    if answer is None:
        return None
    s = str(answer).strip()
    if not s:
        return None
    if "####" in s or _BOXED.search(s):
        return extract_answer(s) or s
    return s


# --------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
             **_: Any) -> list[float | None]:
    """1.0 if the extracted answer matches the gold ``answer`` column; None where there is no gold."""
    if answer is None:
        raise RewardError(
            "reward 'accuracy' needs an 'answer' column; set data.answer_column or drop 'accuracy' from rewards"
        )
    out: list[float | None] = []
    for comp, gold_raw in zip(completions, answer):
        gold = _gold(gold_raw)
        out.append(None if gold is None else float(answers_match(extract_answer(completion_text(comp)), gold)))
    return out


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 if the completion states its answer in a closed ``\\boxed{}`` (what accuracy grading relies on)."""
    return [float(has_boxed_answer(completion_text(c))) for c in completions]


@functools.lru_cache(maxsize=64)
def _rg_dataset(name: str, spec_key: str) -> Any:
    """Cached per process: building a dataset can be slow and rows of one task share it."""
    import reasoning_gym

    spec = json.loads(spec_key)
    kwargs = {**spec.get("config", {}), **{k: spec[k] for k in ("seed", "size") if k in spec}}
    return reasoning_gym.create_dataset(name, **kwargs)


def _spec_key(spec: Mapping[str, Any]) -> str:
    """Cache key for the dataset a row came from (everything but the row index)."""
    return json.dumps({k: spec[k] for k in ("config", "seed", "size") if k in spec}, sort_keys=True)


def _rg_entry(name: str, stored: dict[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """The original entry, regenerated by index (keeps tuples etc. that JSON loses) when it matches the
    stored one; otherwise the stored JSON entry (e.g. non-deterministic generators, hand-written rows)."""
    if "index" in spec:
        regenerated = _rg_dataset(name, _spec_key(spec))[int(spec["index"])]
        if not stored or regenerated.get("question") == stored.get("question"):
            return regenerated
    return stored


def _rg_score_one(name: str, entry_json: Any, spec_json: Any, text: str) -> float:
    stored = json.loads(entry_json) if isinstance(entry_json, str) else dict(entry_json or {})
    spec = json.loads(spec_json) if isinstance(spec_json, str) and spec_json else dict(spec_json or {})
    entry = _rg_entry(name, stored, spec)
    ds = _rg_dataset(name, _spec_key(spec))
    try:
        return float(ds.score_answer(extract_answer(text), entry))
    except Exception:  # graders may choke on malformed model output: that is a wrong answer, not a crash
        return 0.0


def reasoning_gym_reward(prompts: Sequence[Any], completions: Sequence[Any], rg_task: Sequence[Any] | None = None,
                         rg_entry: Sequence[Any] | None = None, rg_spec: Sequence[Any] | None = None,
                         **_: Any) -> list[float | None]:
    """Grade with the task's own ``score_answer``; None for rows without reasoning-gym columns."""
    n = len(completions)
    tasks = list(rg_task) if rg_task is not None else [None] * n
    entries = list(rg_entry) if rg_entry is not None else [None] * n
    specs = list(rg_spec) if rg_spec is not None else [None] * n
    out: list[float | None] = []
    for comp, task, entry, spec in zip(completions, tasks, entries, specs):
        if not task or entry is None:
            out.append(None)
        else:
            out.append(_rg_score_one(str(task), entry, spec, completion_text(comp)))
    return out


BUILTINS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_reward,
    "reasoning_gym": reasoning_gym_reward,
}


# --------------------------------------------------------------------------------------------------
# Resolution of user specs
# --------------------------------------------------------------------------------------------------


def _import_file(path: str, spec_str: str, what: str = "reward") -> Any:
    """Load ``path`` as a module. It is removed from ``sys.modules`` afterwards so cloudpickle ships its
    functions to Ray workers by value (the file need not be importable there)."""
    if not os.path.isfile(path):
        raise RewardError(f"{what} {spec_str!r}: file {path!r} not found (cwd: {os.getcwd()}); fix the path")
    mod_name = f"_grpo_ray_reward_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"{what} {spec_str!r}: cannot load {path!r} as a Python module; use a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses/typing look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise RewardError(
            f"{what} {spec_str!r}: importing {path!r} failed with {type(exc).__name__}: {exc}; fix the file"
        ) from exc
    finally:
        sys.modules.pop(mod_name, None)
    return module


def _import_module(name: str, spec_str: str, what: str = "reward") -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise RewardError(
            f"{what} {spec_str!r}: cannot import module {name!r} ({type(exc).__name__}: {exc}); "
            "check the name and that it is on PYTHONPATH, or use 'path/to/file.py:function'"
        ) from exc


def import_object(spec: str | ByValue, what: str) -> Any:
    """`pkg.mod:name` or `path/file.py:name` -> the object (a tool, an environment class); a
    `ByValue` unpickles. Every failure is one line naming `what` and the spec."""
    if isinstance(spec, ByValue):
        return spec.load()
    s = str(spec).strip()
    mod_part, _, attr = s.rpartition(":")
    if not mod_part or not attr:
        raise RewardError(f"{what} {s!r} must look like 'package.module:name' or 'path/to/file.py:name'")
    module = _import_file(mod_part, s, what) if reward_file(s) else _import_module(mod_part, s, what)
    if not hasattr(module, attr):
        names = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise RewardError(f"{what} {s!r}: module {mod_part!r} has no attribute {attr!r} (callables: {', '.join(names) or 'none'})")
    return getattr(module, attr)


def resolve_reward_function(spec: str | ByValue | Callable[..., Any]) -> tuple[str, RewardFn]:
    """One spec -> (name, callable). Built-in name, ``pkg.mod:fn``, ``path/file.py:fn``, or a callable."""
    if isinstance(spec, ByValue):
        return spec.name, spec.load()
    if callable(spec):
        return getattr(spec, "__qualname__", repr(spec)), spec
    s = str(spec).strip()
    if s in BUILTINS:
        return s, BUILTINS[s]
    if ":" not in s:
        hint = suggest(s, BUILTINS, end=" ")
        raise RewardError(
            f"unknown reward {s!r}; {hint}built-ins: {', '.join(BUILTINS)}; "
            "or give 'package.module:function' / 'path/to/file.py:function'"
        )
    mod_part, attr = s.rsplit(":", 1)
    if not mod_part or not attr:
        raise RewardError(f"reward {s!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    module = _import_file(mod_part, s) if reward_file(s) else _import_module(mod_part, s)
    if not hasattr(module, attr):
        funcs = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise RewardError(
            f"reward {s!r}: module {mod_part!r} has no attribute {attr!r} (callables: {', '.join(funcs) or 'none'})"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"reward {s!r}: {attr!r} is a {type(fn).__name__}, not callable; point at a function")
    return s, fn


def check_reward_specs(specs: Sequence[str | Callable[..., Any]]) -> None:
    """What can be checked without running user code (the driver does this before Ray starts):
    built-in names exist and reward files are there. Importing them is `resolve_reward_functions`."""
    for spec in [specs] if isinstance(specs, str) else specs:
        if callable(spec):
            continue
        s = str(spec).strip()
        if ":" not in s:
            resolve_reward_function(s)  # a built-in, or one line naming the closest
            continue
        mod_part, _, attr = s.rpartition(":")
        if not mod_part or not attr:
            raise RewardError(f"reward {s!r} must look like 'package.module:function' or 'path/to/file.py:function'")
        path = reward_file(s)
        if path is not None and not os.path.isfile(path):
            raise RewardError(f"reward {s!r}: file {path!r} not found (cwd: {os.getcwd()}); fix the path")


def resolve_reward_functions(specs: Sequence[str | Callable[..., Any]]) -> list[tuple[str, RewardFn]]:
    """Resolve every spec up front so a typo fails before any GPU time is spent."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise RewardError("no reward functions configured; set rewards to e.g. ['accuracy', 'format']")
    return [resolve_reward_function(s) for s in specs]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _accepted_kwargs(fn: Callable[..., Any], columns: Mapping[str, Any]) -> dict[str, Any]:
    """Pass every column to ``**kwargs`` functions, otherwise only the parameters they declare."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(columns)
    names = {p.name for p in params}
    return {k: v for k, v in columns.items() if k in names}


def _first_failing_index(fn: Callable[..., Any], prompts: Sequence[Any], completions: Sequence[Any],
                         columns: Mapping[str, Sequence[Any]]) -> int | None:
    """Re-run one sample at a time (only after a failure) to point the user at the offending sample."""
    for i in range(len(completions)):
        one = {k: [v[i]] for k, v in columns.items()}
        try:
            fn([prompts[i]], [completions[i]], **_accepted_kwargs(fn, one))
        except Exception:
            return i
    return None


def _check_values(name: str, values: Any, n: int) -> list[float]:
    """Validate a reward function's output and map None/NaN -> NaN."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward function {name!r} returned {type(values).__name__}; it must return a list of floats/None"
        )
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real):
            f = float(v)
            if math.isinf(f):
                raise RewardError(f"reward function {name!r} returned {f} at index {i}; rewards must be finite")
            out.append(f)
        else:
            raise RewardError(
                f"reward function {name!r} returned {type(v).__name__} {v!r:.40} at index {i}; expected a float or None"
            )
    return out


def _call_one(name: str, fn: Callable[..., Any], prompts: Sequence[Any], completions: Sequence[Any],
              columns: Mapping[str, Sequence[Any]], index_offset: int = 0) -> list[float]:
    try:
        values = fn(list(prompts), list(completions), **_accepted_kwargs(fn, columns))
    except RewardError:
        raise
    except Exception as exc:
        idx = _first_failing_index(fn, prompts, completions, columns)
        where = f" (first failing sample: {idx + index_offset})" if idx is not None else ""
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {msg}{where}") from exc
    return _check_values(name, values, len(completions))


def score(funcs: Sequence[tuple[str, RewardFn]], weights: Sequence[float] | None, prompts: Sequence[Any],
          completions: Sequence[Any], columns: Mapping[str, Sequence[Any]] | None = None,
          index_offset: int = 0) -> list[list[float]]:
    """Call each function once over the batch; return ``rewards_per_func[f][i]`` (function-major, NaN
    where a function returned None). Weights are only validated here (so a bad config fails inside the
    reward task); combine them with ``algorithm.combine_rewards``."""
    n = len(completions)
    columns = dict(columns or {})
    if len(prompts) != n:
        raise RewardError(f"score() got {len(prompts)} prompts for {n} completions; pass one prompt per completion")
    for k, v in columns.items():
        if len(v) != n:
            raise RewardError(f"column {k!r} has {len(v)} values for {n} completions; repeat columns per completion")
    if weights is not None and len(weights) != len(funcs):
        raise RewardError(f"got {len(weights)} reward weights for {len(funcs)} reward functions; give one weight each")
    return [_call_one(name, fn, prompts, completions, columns, index_offset) for name, fn in funcs]
