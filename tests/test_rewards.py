"""Rewards: answer extraction, built-ins (incl. real reasoning-gym grading), resolution, score() checks."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from grpo_ray import data, rewards
from grpo_ray.rewards import RewardError, extract_answer, resolve_reward_functions, score


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows] for k in keys}


# --- extract_answer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{ {a, b} }", "{a, b}"),
        ("done \\boxed{7} and then \\boxed{8", "7"),  # truncated last box is ignored
        ("<answer> cat </answer>", "cat"),
        ("work...\n#### 1,234\nbye", "1,234"),
        ("3 apples and 5 pears make 8.", "8"),
        ("the result is -12.5 or so", "-12.5"),
        ("no answer here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text: str | None, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("8", "8", True),
        ("8.0", "8", True),
        ("1,000", "1000", True),
        ("$-3$", "-3", True),
        ("\\frac{1}{2}", "0.5", True),
        ("0.3333333", "1/3", True),
        ("1234567", "1234568", False),  # integers compare exactly
        ("7", "8", False),
        ("\\text{Paris}", "paris", True),
        ("Paris", "London", False),
    ],
)
def test_answers_match(pred: str, gold: str, ok: bool) -> None:
    assert rewards.answers_match(pred, gold) is ok


# --- built-ins -----------------------------------------------------------------------------------


def test_accuracy_and_format_builtin() -> None:
    completions = ["\\boxed{8}", "I think 8", "\\boxed{9}", [{"role": "assistant", "content": "x \\boxed{8}"}], "??"]
    answers = ["8", "8", "8", "#### 8", None]
    assert rewards.accuracy([None] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]
    assert rewards.format_reward([None] * 5, completions) == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match="needs an 'answer' column"):
        rewards.accuracy(["p"], ["c"])


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic"])
def test_reasoning_gym_reward_real_rows(name: str) -> None:
    cfg = SimpleNamespace(task=f"reasoning_gym/{name}", config={}, size=6, eval_size=3, seed=5)
    train, evals = data.load_datasets(cfg)
    rows = train + evals
    right = [f"Reasoning... \\boxed{{{r['answer']}}}" for r in rows]
    wrong = [f"\\boxed{{{int(r['answer']) + 1}}}" for r in rows]
    cols = _columns(rows)
    prompts = [r["prompt"] for r in rows]
    assert rewards.reasoning_gym_reward(prompts, right, **cols) == [1.0] * len(rows)
    assert rewards.reasoning_gym_reward(prompts, wrong, **cols) == [0.0] * len(rows)
    convo = [[{"role": "assistant", "content": c}] for c in right]
    assert rewards.reasoning_gym_reward(prompts, convo, **cols) == [1.0] * len(rows)


def test_reasoning_gym_reward_stored_entry_and_non_rg_rows() -> None:
    """Hand-written rows (no rg_spec) are graded from the stored entry; non-rg rows give None."""
    entry = json.dumps({"question": "1 + 2 =", "answer": "3", "metadata": {}})
    got = rewards.reasoning_gym_reward(
        ["p", "p", "p"], ["\\boxed{3}", "\\boxed{4}", "\\boxed{3}"],
        rg_task=["chain_sum", "chain_sum", None], rg_entry=[entry, entry, None], rg_spec=[None, None, None],
    )
    assert got == [1.0, 0.0, None]
    assert rewards.reasoning_gym_reward(["p"], ["\\boxed{3}"], answer=["3"]) == [None]


# --- resolution ----------------------------------------------------------------------------------


MODULE_SRC = textwrap.dedent(
    """
    LENGTH_LIMIT = 3

    def short(prompts, completions, **kw):
        return [1.0 if len(c) <= LENGTH_LIMIT else 0.0 for c in completions]

    def only_answer(prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]
    """
)


def test_resolve_builtins_and_import_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards_mod.py").write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    file_spec = f"{tmp_path / 'my_rewards_mod.py'}:short"
    resolved = resolve_reward_functions(["accuracy", "format", "reasoning_gym", "my_rewards_mod:short", file_spec])
    names = [n for n, _ in resolved]
    assert names == ["accuracy", "format", "reasoning_gym", "my_rewards_mod:short", file_spec]
    assert resolved[3][1](["p"], ["ab"]) == [1.0]
    assert resolved[4][1](["p"], ["abcd"]) == [0.0]
    # file modules are not left in sys.modules, so cloudpickle ships them to Ray workers by value
    assert resolved[4][1].__module__ not in sys.modules


def test_resolve_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rw_ok.py").write_text(MODULE_SRC)
    (tmp_path / "rw_broken.py").write_text("import no_such_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("acuracy", r"unknown reward 'acuracy'; did you mean 'accuracy'\?"),
        ("no_such_mod_xyz:f", r"reward 'no_such_mod_xyz:f': cannot import module 'no_such_mod_xyz'"),
        ("rw_broken:f", r"cannot import module 'rw_broken' \(ModuleNotFoundError"),
        ("rw_ok:missing", r"module 'rw_ok' has no attribute 'missing' \(callables: short, only_answer\)"),
        ("rw_ok:LENGTH_LIMIT", r"'LENGTH_LIMIT' is a int, not callable"),
        (f"{tmp_path}/nope.py:f", r"file '.*nope\.py' not found"),
        (f"{tmp_path}/rw_broken.py:f", r"importing '.*rw_broken\.py' failed with ModuleNotFoundError"),
    ]
    for spec, pattern in cases:
        with pytest.raises(RewardError, match=pattern) as info:
            resolve_reward_functions([spec])
        assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match="no reward functions configured"):
        resolve_reward_functions([])


# --- score ---------------------------------------------------------------------------------------


def test_score_weights_nan_and_kwarg_filtering(tmp_path: Path) -> None:
    (tmp_path / "rw.py").write_text(MODULE_SRC)
    funcs = resolve_reward_functions(["accuracy", "format", "reasoning_gym", f"{tmp_path}/rw.py:only_answer"])
    completions = ["\\boxed{3}", "\\boxed{4}", "3"]
    per_func = score(funcs, [1.0, 0.5, 2.0, 1.0], ["p"] * 3, completions, {"answer": ["3", "3", "3"]})
    assert per_func[0] == [1.0, 0.0, 1.0]
    assert per_func[1] == [1.0, 1.0, 0.0]
    assert all(math.isnan(x) for x in per_func[2])  # not reasoning-gym rows -> None -> NaN
    assert per_func[3] == [0.0, 0.0, 1.0]  # only_answer has no **kwargs: only `answer` is passed
    from grpo_ray.algorithm import combine_rewards

    totals = combine_rewards(torch.tensor(per_func).T, [1.0, 0.5, 2.0, 1.0])
    assert totals.tolist() == [1.5, 0.5, 2.0]
    per_func = score(funcs[2:3], None, ["p"], ["x"], {})
    assert math.isnan(per_func[0][0]) and math.isnan(float(combine_rewards(torch.tensor(per_func).T)[0]))


def _bad_length(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1.0] * 3


def _raises_on_sample(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1.0 / len(c) for c in completions]  # ZeroDivisionError on empty completions


def _returns_string(prompts: list[Any], completions: list[Any], **_: Any) -> list[Any]:
    return [1.0, "high"]


def test_score_errors() -> None:
    with pytest.raises(RewardError, match=r"reward function 'mymod:f' returned 3 values for 8 completions"):
        score([("mymod:f", _bad_length)], None, ["p"] * 8, ["c"] * 8, {})
    with pytest.raises(RewardError, match=r"'boom' raised ZeroDivisionError: .* \(first failing sample: 2\)"):
        score([("boom", _raises_on_sample)], None, ["p"] * 4, ["a", "b", "", "d"], {})
    with pytest.raises(RewardError, match=r"'s' returned str 'high' at index 1; expected a float or None"):
        score([("s", _returns_string)], None, ["p"] * 2, ["a", "b"], {})
    with pytest.raises(RewardError, match=r"'n' returned int; it must return a list"):
        score([("n", lambda p, c, **k: 1)], None, ["p"], ["a"], {})
    with pytest.raises(RewardError, match="got 1 reward weights for 2 reward functions"):
        score([("a", _bad_length), ("b", _bad_length)], [1.0], ["p"], ["a"], {})
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2 completions"):
        score([("a", _bad_length)], None, ["p"] * 2, ["a", "b"], {"answer": ["x"]})
    with pytest.raises(RewardError, match="'accuracy' raised RewardError|needs an 'answer' column"):
        score(resolve_reward_functions(["accuracy"]), None, ["p"], ["a"], {})


def test_by_value_reward_loads_where_its_module_cannot_be_imported(tmp_path):
    """rewards.ByValue pickles a user module's function by value: a fresh process without the module
    runs it. Negative control: plain cloudpickle pickles it by reference, and that process fails."""
    import importlib.util
    import pickle
    import subprocess
    import sys

    import cloudpickle

    from grpo_ray.rewards import ByValue, resolve_reward_function

    path = tmp_path / "user_rewards_xyz.py"
    path.write_text("def short(prompts, completions, **kw):\n    return [float(len(c) < 5) for c in completions]\n")
    spec = importlib.util.spec_from_file_location("user_rewards_xyz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_rewards_xyz"] = module
    spec.loader.exec_module(module)
    try:
        spec_obj = ByValue(module.short)
        by_ref = cloudpickle.dumps(module.short)
    finally:
        sys.modules.pop("user_rewards_xyz")
    assert spec_obj.name == "user_rewards_xyz:short" and str(spec_obj) == "user_rewards_xyz:short"
    assert resolve_reward_function(spec_obj)[1](["p", "p"], ["ab", "abcdef"]) == [1.0, 0.0]
    code = "import pickle, sys; spec = pickle.loads(sys.stdin.buffer.read()); print(spec.load()(['p'], ['ab']))"
    ok = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(spec_obj), capture_output=True, cwd="/", timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == b"[1.0]", ok.stderr[-500:]
    bad = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=by_ref, capture_output=True, cwd="/", timeout=120)
    assert bad.returncode != 0 and b"user_rewards_xyz" in bad.stderr
