"""Data loading: generated tasks, local files, errors, chat rendering, the resumable sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from grpo_ray import data
from grpo_ray.data import DataError, PromptSampler, load_datasets, render_prompts


@dataclass
class Cfg:
    """Stand-in for grpo_ray.config.DataConfig (data.py must only duck-type it)."""

    task: str = "reasoning_gym/chain_sum"
    config: dict[str, Any] = field(default_factory=dict)
    size: int = 64
    eval_size: int = 16
    seed: int = 0
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    system_prompt: str | None = data.DEFAULT_SYSTEM_PROMPT
    eval_split: str | None = None


def _question(row: dict[str, Any]) -> str:
    return row["prompt"][-1]["content"]


def _assert_schema(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["prompt"][0]["content"] == data.DEFAULT_SYSTEM_PROMPT
        assert isinstance(row["answer"], str)
        json.dumps(row)  # rows must stay JSON-safe (Ray, checkpoints)


# --- reasoning-gym -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic"])
def test_reasoning_gym_rows(name: str) -> None:
    train, evals = load_datasets(Cfg(task=f"reasoning_gym/{name}", size=40, eval_size=10))
    assert len(train) == 40 and len(evals) == 10
    _assert_schema(train + evals)
    assert all(r["rg_task"] == name for r in train + evals)
    assert not {_question(r) for r in evals} & {_question(r) for r in train}
    entry = json.loads(train[0]["rg_entry"])
    assert entry["answer"] == train[0]["answer"] and entry["question"] == _question(train[0])


def test_reasoning_gym_deterministic_and_config_passed() -> None:
    cfg = Cfg(size=8, eval_size=4, config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    a, b = load_datasets(cfg), load_datasets(cfg)
    assert a == b
    # two one-digit terms: "State the final answer ...: 4 - 1 ="
    assert all(len(_question(r).split(":")[1].split()) == 4 for r in a[0])
    other_seed = load_datasets(Cfg(size=8, eval_size=4, seed=1))
    assert [_question(r) for r in other_seed[0]] != [_question(r) for r in load_datasets(Cfg(size=8, eval_size=4))[0]]


def test_reasoning_gym_unknown_task_suggests() -> None:
    with pytest.raises(DataError, match=r"unknown reasoning-gym task 'chain_summ'.*reasoning_gym/chain_sum"):
        load_datasets(Cfg(task="reasoning_gym/chain_summ"))


def test_reasoning_gym_bad_config() -> None:
    with pytest.raises(DataError, match="invalid data.config for reasoning-gym task 'chain_sum'"):
        load_datasets(Cfg(config={"no_such_option": 1}))
    with pytest.raises(DataError, match=r"must not set \['seed'\]"):
        load_datasets(Cfg(config={"seed": 3}))


# --- arith -------------------------------------------------------------------------------------


def test_arith_deterministic_no_overlap() -> None:
    cfg = Cfg(task="arith", size=512, eval_size=100, seed=3)
    train, evals = load_datasets(cfg)
    assert (train, evals) == load_datasets(cfg)
    assert len(train) == 512 and len(evals) == 100
    _assert_schema(train + evals)
    eval_q = [_question(r) for r in evals]
    assert len(set(eval_q)) == 100
    assert not set(eval_q) & {_question(r) for r in train}
    for r in train[:50] + evals[:50]:
        expr = _question(r).removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == r["answer"]
    assert load_datasets(Cfg(task="arith", seed=4))[0] != load_datasets(Cfg(task="arith", seed=3))[0]


def test_arith_knobs_and_errors() -> None:
    train, _ = load_datasets(Cfg(task="arith", size=50, eval_size=5, config={
        "min_terms": 3, "max_terms": 3, "ops": "+", "max_int": 9}))
    assert all(_question(r).count("+") == 2 and "-" not in _question(r) for r in train)
    train, _ = load_datasets(Cfg(task="arith", size=50, eval_size=5, config={"allow_negative": False, "ops": "-"}))
    assert all(int(r["answer"]) >= 0 for r in train)
    with pytest.raises(DataError, match=r"unknown arith option\(s\) \['max_value'\]"):
        load_datasets(Cfg(task="arith", config={"max_value": 3}))
    with pytest.raises(DataError, match="arith problem space is too small"):
        load_datasets(Cfg(task="arith", eval_size=100, config={"max_int": 2}))


def test_system_prompt_default_and_off() -> None:
    train, _ = load_datasets(Cfg(task="arith", size=4, eval_size=2, system_prompt=None))
    assert train[0]["prompt"][0] == {"role": "system", "content": data.DEFAULT_SYSTEM_PROMPT}
    train, _ = load_datasets(Cfg(task="arith", size=4, eval_size=2, system_prompt=""))
    assert [m["role"] for m in train[0]["prompt"]] == ["user"]


# --- local files -------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


STRING_ROWS = [{"question": f"q{i}?", "solution": i, "level": i % 3} for i in range(20)]
MESSAGE_ROWS = [
    {"prompt": [{"role": "user", "content": f"q{i}?"}], "answer": str(i)} for i in range(20)
]


@pytest.mark.parametrize("writer", [_write_jsonl, _write_parquet])
def test_file_string_prompts(tmp_path: Path, writer: Any) -> None:
    suffix = ".jsonl" if writer is _write_jsonl else ".parquet"
    path = writer(tmp_path / f"d{suffix}", STRING_ROWS)
    cfg = Cfg(task=path, prompt_column="question", answer_column="solution", eval_size=5, seed=1)
    train, evals = load_datasets(cfg)
    assert len(train) == 15 and len(evals) == 5
    _assert_schema(train + evals)
    assert (train, evals) == load_datasets(cfg)
    assert sorted(_question(r) for r in train + evals) == sorted(r["question"] for r in STRING_ROWS)
    row = next(r for r in train if _question(r) == "q7?")
    assert row["answer"] == "7" and row["level"] == 1 and "question" not in row and "solution" not in row


@pytest.mark.parametrize("writer", [_write_jsonl, _write_parquet])
def test_file_message_prompts_and_eval_file(tmp_path: Path, writer: Any) -> None:
    suffix = ".jsonl" if writer is _write_jsonl else ".parquet"
    train_path = writer(tmp_path / f"train{suffix}", MESSAGE_ROWS)
    eval_path = writer(tmp_path / f"eval{suffix}", MESSAGE_ROWS[:3])
    train, evals = load_datasets(Cfg(task=train_path, eval_split=eval_path))
    assert len(train) == 20 and len(evals) == 3
    _assert_schema(train + evals)  # system prompt prepended to message lists without one
    with_system = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
                    "answer": "1"}] * 3
    train, _ = load_datasets(Cfg(task=writer(tmp_path / f"s{suffix}", with_system), eval_size=1))
    assert train[0]["prompt"][0] == {"role": "system", "content": "S"} and len(train[0]["prompt"]) == 2


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(MESSAGE_ROWS))
    train, evals = load_datasets(Cfg(task=str(path), eval_size=0))
    assert len(train) == 20 and evals == []


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file '.*nope\.jsonl' not found"):
        load_datasets(Cfg(task=str(tmp_path / "nope.jsonl")))
    path = _write_jsonl(tmp_path / "d.jsonl", STRING_ROWS)
    with pytest.raises(DataError, match=r"prompt column 'prompt' not found .*\(columns: question, solution, level\)"):
        load_datasets(Cfg(task=path))
    with pytest.raises(DataError, match=r"answer column 'answer' not found .*set data.answer_column"):
        load_datasets(Cfg(task=path, prompt_column="question"))
    rows = [dict(r) for r in STRING_ROWS]
    rows[4]["question"] = None
    rows[6]["question"] = ""
    with pytest.raises(DataError, match=r"empty or missing prompt at line 5 of"):
        load_datasets(Cfg(task=_write_jsonl(tmp_path / "e.jsonl", rows), prompt_column="question",
                          answer_column="solution"))
    with pytest.raises(DataError, match="eval_size=100 leaves no training rows from 20 rows"):
        load_datasets(Cfg(task=path, prompt_column="question", answer_column="solution", eval_size=100))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_datasets(Cfg(task=str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_datasets(Cfg(task=str(empty)))
    msgs = [{"prompt": [{"content": "no role"}], "answer": "1"}]
    with pytest.raises(DataError, match=r"prompt message 0 at line 1 .* must be an object with 'role' and 'content'"):
        load_datasets(Cfg(task=_write_jsonl(tmp_path / "m.jsonl", msgs), eval_size=0))


def test_errors_name_file_lines(tmp_path: Path) -> None:
    """Every row error counts lines as an editor does (1-based, blank lines included), for bad JSON
    and a bad row alike; a parquet/JSON-list row is counted from 1 too."""
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"missing answer at line 3 of .*gaps\.jsonl"):
        load_datasets(Cfg(task=str(path), eval_size=0))
    pq_path = _write_parquet(tmp_path / "p.parquet", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}])
    with pytest.raises(DataError, match=r"missing answer at row 2 of"):
        load_datasets(Cfg(task=pq_path, eval_size=0))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_latin1_file_names_the_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes('{"prompt": "a", "answer": "1"}\n{"prompt": "caf\u00e9", "answer": "2"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl? line 2 is not UTF-8 \(byte 0xe9\); re-save the file as UTF-8"):
        load_datasets(Cfg(task=str(path), eval_size=0))


def test_utf8_bom_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "answer": "1"}\n')
    train, _ = load_datasets(Cfg(task=str(path), eval_size=0))
    assert _question(train[0]) == "a"


def test_no_answer_column_allowed(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    train, _ = load_datasets(Cfg(task=path, answer_column="", eval_size=0))
    assert "answer" not in train[0] and _question(train[0]) == "hi"


def test_errors_are_one_line(tmp_path: Path) -> None:
    for cfg in [Cfg(task=str(tmp_path / "x.parquet")), Cfg(task="reasoning_gym/nosuchtask"), Cfg(task="")]:
        with pytest.raises(DataError) as info:
            load_datasets(cfg)
        assert "\n" not in str(info.value)


def test_hub_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*_: Any, **__: Any) -> None:
        raise ConnectionError("Couldn't reach 'org/ds' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load 'org/ds' .*ConnectionError.*offline\? save it as") as info:
        load_datasets(Cfg(task="org/ds"))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"did you mean 'reasoning_gym/chain_sum'"):
        load_datasets(Cfg(task="chain_sum"))


# --- rendering ---------------------------------------------------------------------------------


def test_render_prompts() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    train, _ = load_datasets(Cfg(task="arith", size=2, eval_size=1, system_prompt="S"))
    out = render_prompts(tok, train + [{"prompt": "raw text"}])
    assert out[0] == f"<|system|>S\n<|user|>{_question(train[0])}\n<|assistant|>"
    assert out[2] == "raw text"


# --- sampler -----------------------------------------------------------------------------------


ROWS = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]


def _ids(batches: list[list[dict[str, Any]]]) -> list[str]:
    return [r["prompt"] for b in batches for r in b]


def test_sampler_epochs_and_determinism() -> None:
    s = PromptSampler(ROWS, batch_size=4, seed=7)
    got = _ids([s.next_batch() for _ in range(5)])  # 20 rows = exactly 2 epochs
    assert sorted(got[:10]) == sorted(r["prompt"] for r in ROWS)
    assert sorted(got[10:]) == sorted(r["prompt"] for r in ROWS)
    assert got[:10] != got[10:]  # reshuffled per epoch
    again, other = PromptSampler(ROWS, 4, seed=7), PromptSampler(ROWS, 4, seed=8)
    assert got == _ids([again.next_batch() for _ in range(5)])
    assert got != _ids([other.next_batch() for _ in range(5)])
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 10


def test_sampler_resume() -> None:
    full = PromptSampler(ROWS, batch_size=3, seed=1)
    reference = [full.next_batch() for _ in range(9)]
    first = PromptSampler(ROWS, batch_size=3, seed=1)
    for _ in range(4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are JSON
    resumed = PromptSampler(ROWS, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == reference[4:]
    with pytest.raises(DataError, match="saved for 10 rows but the dataset has 9"):
        PromptSampler(ROWS[:9], 3).load_state_dict(state)


def test_sampler_batch_larger_than_data() -> None:
    s = PromptSampler(ROWS[:3], batch_size=7, seed=0)
    assert len(s.next_batch()) == 7
    with pytest.raises(DataError):
        PromptSampler([], 2)
