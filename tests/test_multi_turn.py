"""Multi-turn rollouts: tools and environments (TRL's `tools` / `environment_factory`).

Fast tests check the pieces without Ray (call parsing, the chat template's turn suffix, the tool
host in-process, config). The slow ones run a real vLLM engine on the tiny model with a scripted
environment (its answers are known, so the loss mask is checked token by token and the engine's
logprobs against the trainer model's), the tool path on real Ray workers, and a whole training
run with a resume.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from grpo_ray.config import ConfigError, GRPOConfig
from grpo_ray.rollout.batch import Group
from grpo_ray.rollout.multi_turn import ChatFormat
from grpo_ray.rollout.tools import ToolError, ToolHost, parse_tool_calls
from tests.conftest import quick_config

ENV = '''
class Retry:
    """A scripted environment: every model turn is answered "wrong" (so the turns are known)."""

    def reset(self, **row):
        self.turns = 0
        return None

    def step(self, text):
        self.turns += 1
        return f" Turn {self.turns}: wrong, try again."

    def get_reward(self):
        return float(self.turns)
'''

TOOLS = '''
import time

def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b

def boom(x: int) -> int:
    """Always fails.

    Args:
        x: anything
    """
    raise ValueError(f"no luck with {x}")

def hang(x: int) -> int:
    """Never answers in time.

    Args:
        x: anything
    """
    time.sleep(600)
    return x

def undocumented(x):
    return x
'''


@pytest.fixture
def user_code(tmp_path: Path) -> Path:
    (tmp_path / "env.py").write_text(textwrap.dedent(ENV))
    (tmp_path / "tools.py").write_text(textwrap.dedent(TOOLS))
    return tmp_path


# ------------------------------------------------------------------------------------------ fast
def test_parse_tool_calls():
    calls = parse_tool_calls(
        'x <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and '
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>'
        "<tool_call>not json</tool_call><tool_call>[1]</tool_call><tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>"
        "<tool_call>unclosed"
    )
    assert [(c.name, c.arguments) for c in calls[:2]] == [("add", {"a": 1, "b": 2}), ("add", {"a": 3})]
    assert [c.error is not None for c in calls] == [False, False, True, True, True]
    assert "not valid JSON" in calls[2].error and "name" in calls[3].error and "JSON object" in calls[4].error
    assert parse_tool_calls("The answer is 4.") == []


def test_turn_suffix_continues_the_conversation_as_the_template_renders_it(tiny_model_path):
    """prompt ids + the model's ids (ending at its end-of-turn token) + the suffix of an
    environment answer are exactly the template's rendering of the whole conversation."""
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    fmt = ChatFormat(tok, [], None)
    messages = fmt.prompt([{"role": "user", "content": "What is 2 + 3?"}], observation=" (be brief)")
    assert messages[-1]["content"] == "What is 2 + 3? (be brief)"  # TRL: reset's text joins the last user message
    prompt = fmt.prompt_ids(messages)
    model = tok("The answer is \\boxed{5}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    answer = [{"role": "user", "content": "Wrong, try again."}]
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": "The answer is \\boxed{5}."}] + answer, tokenize=False, add_generation_prompt=True)
    assert prompt + model + fmt.suffix_ids(answer) == tok(whole, add_special_tokens=False)["input_ids"]


def test_a_template_without_tools_gets_the_fallback_system_prompt(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    host = ToolHost([], None)
    from grpo_ray.rollout.tools import tool_schema

    def add(a: int, b: int) -> int:
        """Add.

        Args:
            a: x
            b: y
        """
        return a + b

    fmt = ChatFormat(tok, [tool_schema(add)], None)
    assert not fmt.native  # the tiny model's ChatML template has no tools section
    messages = fmt.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}], None)
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call tools.") and '"name": "add"' in messages[0]["content"]
    assert fmt.tool_message("add", "5") == {"role": "user", "content": "<tool_response>\n5\n</tool_response>"}
    assert host.describe().schemas == []


def test_tool_host_answers_errors_to_the_model_and_refuses_bad_tools(user_code):
    tools = str(user_code / "tools.py")
    host = ToolHost([f"{tools}:add", f"{tools}:boom"], f"{user_code / 'env.py'}:Retry")
    info = host.describe()
    assert [s["function"]["name"] for s in info.schemas] == ["add", "boom"]  # the env's step/reset/get_reward are not tools
    assert info.has_env and info.has_step and info.reward_name == "Retry"
    host.reset("e1", {"prompt": "p", "answer": "5"})
    assert host.call("e1", "add", {"a": 2, "b": 3}) == ("5", True)
    text, ok = host.call("e1", "boom", {"x": 1})
    assert not ok and text == "error: ValueError: no luck with 1"
    text, ok = host.call("e1", "nope", {})
    assert not ok and "no tool named 'nope'" in text and "add, boom" in text
    text, ok = host.call("e1", "add", {"a": 1})
    assert not ok and "TypeError" in text
    assert host.step("e1", "x") == " Turn 1: wrong, try again." and host.reward("e1") == 1.0
    with pytest.raises(ToolError, match=r"tool 'undocumented': no JSON schema .* docstring"):
        ToolHost([f"{tools}:undocumented"], None)
    with pytest.raises(ToolError, match=r"tool '.*missing.py:add': file .* not found"):
        ToolHost([f"{user_code / 'missing.py'}:add"], None)
    with pytest.raises(ToolError, match=r"environment_factory .*env.py:Nope'.* has no attribute 'Nope'"):
        ToolHost([], f"{user_code / 'env.py'}:Nope")


def test_multi_turn_config_keys():
    cfg = GRPOConfig(tools=["t.py:f"], max_tool_calling_iterations=2, cluster={"tool_timeout_s": 5})
    assert cfg.max_tool_calling_iterations == 2 and cfg.cluster.tool_timeout_s == 5
    assert GRPOConfig(environment_factory="e.py:E", reward_funcs=[]).reward_funcs == []  # the environment may own the reward
    from grpo_ray.rollout.tools import check_tool_keys

    lone = GRPOConfig(max_tool_calling_iterations=2)  # TRL: the key in the config, the tools on the trainer
    check_tool_keys(lone, tool_specs=["t.py:f"])
    with pytest.raises(ConfigError, match="max_tool_calling_iterations is set but the run has no tools"):
        check_tool_keys(lone)
    with pytest.raises(ConfigError, match=r"cluster.tool_timeout_s=0.0: must be > 0"):
        GRPOConfig(tools=["t.py:f"], cluster={"tool_timeout_s": 0})
    with pytest.raises(ConfigError, match="reward_funcs is empty"):
        GRPOConfig(reward_funcs=[])


# ------------------------------------------------------------------------------------------ slow
def _segments(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for t, m in zip(ids, mask):
        if out and out[-1][0] == m:
            out[-1][1].append(t)
        else:
            out.append((m, [t]))
    return out


@pytest.mark.slow
def test_scripted_environment_on_a_real_engine_masks_exactly_the_environments_tokens(tmp_path, tiny_model_path, ray_local, user_code):
    from transformers import AutoModelForCausalLM

    from grpo_ray.data import load_datasets
    from grpo_ray.rollout import EngineSpec, RolloutPool, SamplingSpec, make_backend

    cfg = quick_config(tmp_path, environment_factory=f"{user_code / 'env.py'}:Retry", max_tool_calling_iterations=2, max_completion_length=160)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    pool = RolloutPool(cfg, EngineSpec.from_config(cfg, tiny_model_path))
    backend = make_backend(cfg, tok)
    try:
        rows = load_datasets(cfg.data)[0][:3]
        sampling = SamplingSpec.from_config(cfg)
        eps = backend.sample(pool, rows, SamplingSpec(**{**sampling.__dict__, "n": 2}), seed=11)
    finally:
        backend.close()
        pool.shutdown()
    fmt = ChatFormat(tok, [], None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    assert len(eps) == 6 and eps.num_generations == 2
    for i in range(len(eps)):
        segs = _segments(eps.completion_ids[i], eps.loss_mask[i])
        model_turns = [ids for m, ids in segs if m == 1]
        env_turns = [ids for m, ids in segs if m == 0]
        assert [m for m, _ in segs] == [1, 0] * len(env_turns) + [1]  # model, env, model, env, ..., model
        # max_tool_calling_iterations=2: two environment answers, three model turns (none ran out here)
        assert not eps.truncated[i] and eps.turns[i] == 3 == len(model_turns) and len(env_turns) == 2
        for n, ids in enumerate(env_turns, start=1):  # the environment's tokens, exactly as the template renders them
            assert ids == fmt.suffix_ids([{"role": "user", "content": f" Turn {n}: wrong, try again."}])
        for ids, msg in zip(model_turns, [m for m in eps.completions[i] if m["role"] == "assistant"]):
            assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == msg["content"]
        assert eps.env_rewards["Retry"][i] == 3.0  # its own episode's steps: every model turn, the last one too
        # The engine's logprobs of the model's tokens equal the trainer model's on the whole episode;
        # the environment's positions carry 0 (not sampled) and would fail the same check if unmasked.
        seq = torch.tensor([eps.prompt_ids[i] + eps.completion_ids[i]])
        with torch.no_grad():
            logits = model(seq).logits[0, len(eps.prompt_ids[i]) - 1 : -1] / cfg.temperature
        hf = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(eps.completion_ids[i])[:, None])[:, 0]
        mask = torch.tensor(eps.loss_mask[i], dtype=torch.bool)
        vllm = torch.tensor(eps.sampling_logprobs[i])
        assert float((hf - vllm)[mask].abs().max()) < 1e-3
        assert float(vllm[~mask].abs().max()) == 0.0 and float((hf - vllm)[~mask].abs().mean()) > 0.1
    assert eps.metrics() == {"turns_mean": 3.0, "tool_calls_mean": 0.0, "tool_errors": 0.0, "env_tokens_masked": float(sum(len(m) - sum(m) for m in eps.loss_mask))}


class ScriptedModel:
    """Stands in for the engine where the tiny model cannot write tool calls: each turn answers
    with the next scripted text (token ids + end-of-turn). The tools run on real Ray workers."""

    def __init__(self, tok, turns: list[str]) -> None:
        self.tok, self.turns, self.calls = tok, turns, 0

    def generate(self, prompt_ids, sampling, seed, max_tokens=None):
        text = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return [Group([ids] * sampling.n, [[-0.5] * len(ids)] * sampling.n, [False] * sampling.n, [text] * sampling.n) for _ in prompt_ids]


@pytest.mark.slow
def test_tools_that_raise_hang_or_are_garbled_answer_the_model_and_the_run_goes_on(tmp_path, tiny_model_path, ray_local, user_code):
    import ray

    from grpo_ray.rollout import SamplingSpec, make_backend

    tools = str(user_code / "tools.py")
    cfg = quick_config(
        tmp_path, tools=[f"{tools}:add", f"{tools}:boom", f"{tools}:hang"], max_tool_calling_iterations=1,
        max_completion_length=4000, cluster={"tool_timeout_s": 3},
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    backend = make_backend(cfg, tok)
    calls = (
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "boom", "arguments": {"x": 7}}</tool_call>'
        '<tool_call>{"name": "hang", "arguments": {"x": 1}}</tool_call>'
        "<tool_call>{oops}</tool_call>"
    )
    scripted = ScriptedModel(tok, [calls, calls, "The answer is \\boxed{5}."])
    try:
        host = backend.host
        rows = [{"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5"}]
        eps = backend.sample(scripted, rows, SamplingSpec(**{**SamplingSpec.from_config(cfg).__dict__, "n": 1}), seed=0)
        assert backend.host != host  # a hung call held a thread of the old host: it was replaced
        again = backend.sample(ScriptedModel(tok, ["The answer is \\boxed{5}."]), rows, SamplingSpec(**{**SamplingSpec.from_config(cfg).__dict__, "n": 1}), seed=0)
        assert again.turns == [1]
    finally:
        backend.close()
    # max_tool_calling_iterations=1: one round of answers, then the model's second turn ends the episode
    assert eps.turns == [2] and eps.tool_calls == [4] and eps.tool_errors == [3]  # the 2nd turn's calls are not run
    messages = eps.completions[0]
    assert [m["role"] for m in messages] == ["assistant", "user", "user", "user", "user", "assistant"]  # fallback: tool results as user turns
    results = [m["content"] for m in messages[1:5]]
    assert results[0] == "<tool_response>\n5\n</tool_response>"
    assert "error: ValueError: no luck with 7" in results[1]
    assert "error: hang did not answer within cluster.tool_timeout_s=3s" in results[2]
    assert "not valid JSON" in results[3]
    assert [c["function"]["name"] for c in messages[0]["tool_calls"]] == ["add", "boom", "hang", "?"]
    segs = _segments(eps.completion_ids[0], eps.loss_mask[0])
    assert [m for m, _ in segs] == [1, 0, 1]
    assert segs[1][1] == ChatFormat(tok, [{}], None).suffix_ids(messages[1:5])
    assert all(lp == 0.0 for lp, m in zip(eps.sampling_logprobs[0], eps.loss_mask[0]) if m == 0)
    assert not ray.util.list_named_actors()  # nothing named left behind


@pytest.mark.slow
def test_multi_turn_training_run_resumes_and_keeps_engine_and_trainer_in_step(tmp_path, tiny_model_path, user_code):
    """A real run (Ray Train + DeepSpeed + vLLM, weights synced every step) with the scripted
    environment: the trainer's logprobs of the model's tokens match the engine's after every sync,
    then a resume continues the same run."""
    from grpo_ray.cli import main

    cfg = quick_config(
        tmp_path, environment_factory=f"{user_code / 'env.py'}:Retry", max_tool_calling_iterations=1, max_completion_length=128,
        max_steps=3, save_steps=2, reward_funcs=["accuracy"], eval_at_start_and_end=False,
    )  # fmt: skip
    config = tmp_path / "cfg.yaml"
    cfg.to_yaml(config)
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--resume", cfg.output_dir, "--set", "max_steps=4"]) == 0
    rows = [json.loads(line) for line in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 ran twice (saved at 2): logged once
    for r in rows:
        assert r["logprob_mismatch"] < 1e-3, r
        assert r["turns_mean"] > 1 and r["env_tokens_masked"] > 0 and r["rewards/Retry"] == 2.0
        assert math.isfinite(r["loss"])


def test_answer_checker_example_rewards_the_attempt_that_got_it_right():
    from grpo_ray.examples.answer_checker import RETRY, AnswerChecker

    env = AnswerChecker()
    env.reset(prompt="15 + 4 =", answer="19")
    assert env.step("The answer is \\boxed{18}.") == RETRY and env.get_reward() == 0.0
    assert env.step("\\boxed{19}") is None and env.get_reward() == 0.5
    env.reset(answer="19")
    assert env.step("19") is None and env.get_reward() == 1.0
    cfg = GRPOConfig.from_yaml(Path(__file__).parents[1] / "grpo_ray" / "configs" / "tools.yaml")
    assert cfg.environment_factory == "grpo_ray.examples.answer_checker:AnswerChecker" and cfg.max_tool_calling_iterations == 1


class Countdown:
    """An environment defined in the test module: the Python API ships it to the tool worker by value."""

    def reset(self, **row):
        self.left = 1

    def step(self, text):
        self.left -= 1
        return "Once more." if self.left >= 0 else None

    def get_reward(self):
        return 1.0


def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: what to shout
    """
    return text.upper()


@pytest.mark.slow
def test_python_api_takes_tools_and_environment_factory_callables(tmp_path, tiny_model_path):
    from grpo_ray import GRPOConfig as Config
    from grpo_ray import GRPOTrainer

    args = Config(output_dir=str(tmp_path / "api"), max_steps=2, num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                  max_completion_length=64, max_tool_calling_iterations=1, eval_at_start_and_end=False, report_to=[], save_steps=2, logging_steps=1,
                  cluster={"num_rollout_actors": 1, "rollout_num_cpus": 1, "kv_cache_gib": 1, "trainer_num_cpus": 1})  # fmt: skip
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    trainer = GRPOTrainer("tiny-arith", reward_funcs=[], args=args, train_dataset=rows, tools=[shout], environment_factory=Countdown)
    assert trainer.args.tools == ["tests.test_multi_turn:shout"] and trainer.args.environment_factory == "tests.test_multi_turn:Countdown"
    result = trainer.train()
    rows = [json.loads(line) for line in Path(result.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rewards/Countdown"] == 1.0 and r["turns_mean"] > 1 for r in rows)


NATIVE_TOOLS_TEMPLATE = (  # a ChatML template with a tools section and a `tool` role, as Qwen's has
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_with_tools_gets_them_through_apply_chat_template(tiny_model_path):
    from grpo_ray.rollout.tools import tool_schema

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = NATIVE_TOOLS_TEMPLATE
    fmt = ChatFormat(tok, [tool_schema(shout)], None)
    assert fmt.native
    messages = fmt.prompt([{"role": "user", "content": "hi"}], None)
    assert messages == [{"role": "user", "content": "hi"}]  # no fallback system prompt
    text = tok.decode(fmt.prompt_ids(messages))
    assert text.startswith("<|im_start|>system\nTools: [") and '"name": "shout"' in text
    answer = [fmt.tool_message("shout", "HI")]
    assert answer == [{"role": "tool", "name": "shout", "content": "HI"}]
    assert tok.decode(fmt.suffix_ids(answer)) == "\n<|im_start|>tool\nHI<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------- both backends' wiring
def test_backends_render_prompts_with_chat_template_kwargs(tiny_model_path, user_code):
    """TRL's chat_template_kwargs reach the template in both backends (a template that reads one)."""
    from grpo_ray.rollout.single_turn import SingleTurn

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}" + tok.chat_template
    rows = [{"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5"}]
    plain = GRPOConfig()
    quiet = GRPOConfig(chat_template_kwargs={"enable_thinking": False})
    assert not tok.decode(SingleTurn(plain, tok).prompt_ids(rows)[0]).startswith("/no_think")
    assert tok.decode(SingleTurn(quiet, tok).prompt_ids(rows)[0]).startswith("/no_think ")
    fmt = ChatFormat(tok, [], quiet.chat_template_kwargs)
    assert tok.decode(fmt.prompt_ids(fmt.prompt(rows[0]["prompt"], None))).startswith("/no_think ")


class FixedEpisodes:
    """A backend that returns the same two groups every time (what the runner does with them is under test)."""

    def __init__(self, texts: list[str], env: list[float]) -> None:
        from grpo_ray.rollout.batch import Episodes

        n = len(texts)
        self.episodes = Episodes(
            prompt_ids=[[1]] * n, completion_ids=[[2, 3]] * n, loss_mask=[[1, 0]] * n, sampling_logprobs=[[-1.0, 0.0]] * n,
            truncated=[False] * n, texts=texts, completions=texts, num_generations=n // 2, turns=[2] * n, tool_calls=[0] * n,
            tool_errors=[0] * n, env_rewards={"Env": env},
        )  # fmt: skip

    def sample(self, generator, rows, sampling, seed):
        return self.episodes

    def close(self):
        pass


class NoPool:
    restarts = 0


@pytest.mark.slow
def test_runner_scores_with_weights_env_columns_and_the_chosen_aggregation(ray_local):
    """The runner's advantages are compute_advantages of exactly the scored table (reward_funcs then
    the environment's column, weight 1) with cfg's weights and multi_objective_aggregation."""
    from grpo_ray.algorithm import compute_advantages
    from grpo_ray.rollout.runner import Rollout

    texts = ["\\boxed{5}", "5", "\\boxed{4}", "no", "\\boxed{1}", "x", "\\boxed{2}", "\\boxed{3}"]
    env = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25]
    rows = [{"prompt": "2+3?", "answer": "5"}, {"prompt": "1+1?", "answer": "2"}]
    tables = {}
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        cfg = GRPOConfig(reward_funcs=["accuracy", "format"], reward_weights=[1.0, 0.5], multi_objective_aggregation=aggregation, num_generations=4)
        batch = Rollout(cfg, NoPool(), FixedEpisodes(texts, env)).generate_and_score(rows, step=1)
        assert batch.reward_names == ["accuracy", "format", "Env"]
        assert batch.rewards_per_func[:, 2].tolist() == env
        adv, rewards = compute_advantages(batch.rewards_per_func, 4, [1.0, 0.5, 1.0], cfg.scale_rewards, aggregation)
        assert torch.equal(batch.advantages, adv) and torch.equal(batch.rewards, rewards)
        assert batch.loss_mask == [[1, 0]] * 8 and batch.trained_tokens(False) == 8 and batch.metrics()["turns_mean"] == 2
        tables[aggregation] = batch.advantages
    assert not torch.allclose(tables["sum_then_normalize"], tables["normalize_then_sum"])  # the key changes the result
