"""Multi-turn rollouts: the model calls tools (or answers an environment) for several turns.

Token in, token out: each model turn continues from the exact ids of the episode so far, and
what a tool or environment says is appended as ids (rendered by the chat template, as TRL does)
with `loss_mask` 0, so it never enters the loss, the KL, the ratios or `logprob_mismatch`.
All episodes of a step advance together, one model turn at a time (one batched generate per
turn over the engine pool); their tool calls run in the `ToolHost` actor with a timeout.

Budget, as in TRL: everything after the prompt (model and tool tokens) fits in
`max_completion_length`; an episode that runs out is truncated (and masked like a truncated
completion with `mask_truncated_completions`). `max_tool_calling_iterations` bounds the number
of tool/environment answers, so an episode has at most that many + 1 model turns.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import ray

from grpo_ray.config import GRPOConfig
from grpo_ray.rewards import RewardSpec
from grpo_ray.rollout.batch import Episodes, Generator
from grpo_ray.rollout.tools import FALLBACK_SYSTEM_PROMPT, ToolError, ToolsInfo, gather, parse_tool_calls, start_host

TURN_SEED = 7_919  # seeds of turn t are offset by t * TURN_SEED (distinct, reproducible)


@dataclass
class Episode:
    """One episode's ids so far; `mask` is 1 on the model's ids."""

    id: str
    row: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # TRL-shaped completion: assistant / tool / user turns
    text: str = ""  # the model's last turn
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False

    def add(self, ids: list[int], logprobs: list[float] | None, model: bool) -> None:
        self.ids += ids
        self.mask += [int(model)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


class ChatFormat:
    """How a conversation becomes ids: the tokenizer's chat template, with the tools offered through
    its `tools=` argument, or (a template without tool support, such as SmolLM2's) a system prompt
    that lists them and tool results sent back as user messages in <tool_response> tags."""

    def __init__(self, tokenizer: Any, schemas: list[dict], chat_template_kwargs: dict | None) -> None:
        self.tokenizer = tokenizer
        self.schemas = schemas
        self.kwargs = dict(chat_template_kwargs or {})
        self.native = bool(schemas) and "tools" in str(tokenizer.chat_template or "")

    def prompt(self, prompt: Any, observation: str | None) -> list[dict]:
        """The prompt's messages (a plain string becomes a user message), TRL's reset observation
        appended to the last user message, and the fallback tool list in the system message."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if observation:
            messages[-1] = {**messages[-1], "content": str(messages[-1]["content"]) + observation}
        if self.schemas and not self.native:
            tools = "\n".join(json.dumps(s["function"] if "function" in s else s) for s in self.schemas)
            text = FALLBACK_SYSTEM_PROMPT.format(tools=tools)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
            else:
                messages.insert(0, {"role": "system", "content": text})
        return messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        tools = {"tools": self.schemas} if self.native else {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **tools, **self.kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tool_message(self, name: str, result: str) -> dict:
        if self.native:
            return {"role": "tool", "name": name, "content": result}
        return {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"}

    def suffix_ids(self, messages: list[dict]) -> list[int]:
        """The ids that follow a finished assistant turn: `messages`, then the next assistant
        header. Rendered after a dummy conversation and cut at its last end-of-turn token (TRL's
        `_get_tool_suffix_ids`), so the model's own ids are never re-tokenised."""
        dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "dummy"}]
        tools = {"tools": self.schemas} if self.native else {}
        render = lambda msgs, gen: self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **tools, **self.kwargs)  # noqa: E731
        prefix = self.tokenizer(render(dummy, False), add_special_tokens=False)["input_ids"]
        full = self.tokenizer(render(dummy + messages, True), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        ends = [i for i, t in enumerate(prefix) if t == eos]
        if ends:
            prefix = prefix[: ends[-1] + 1]
        if full[: len(prefix)] != prefix:
            raise ValueError("the chat template renders a conversation differently when a turn is added; multi-turn needs a prefix-stable template")
        return full[len(prefix):]


class MultiTurn:
    """The multi-turn backend: episodes with tools and/or an environment."""

    def __init__(self, cfg: GRPOConfig, tokenizer: Any, tool_specs: Sequence[RewardSpec], env_spec: RewardSpec | None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tool_specs, self.env_spec = list(tool_specs), env_spec
        self.timeout_s = cfg.cluster.tool_timeout_s
        self.host, self.info = start_host(self.tool_specs, env_spec, self.timeout_s)
        self.format = ChatFormat(tokenizer, self.info.schemas, cfg.chat_template_kwargs)
        self.max_iterations = cfg.max_tool_calling_iterations if cfg.max_tool_calling_iterations is not None else 10**9
        self.eos = tokenizer.eos_token_id

    @property
    def tools_info(self) -> ToolsInfo:
        return self.info

    def sample(self, generator: Generator, rows: list[dict], sampling: Any, seed: int) -> Episodes:
        """`sampling.n` episodes per row, every one run to its end."""
        t0 = time.perf_counter()
        k, budget = sampling.n, sampling.max_tokens
        episodes = [Episode(uuid.uuid4().hex, i, []) for i in range(len(rows)) for _ in range(k)]
        observations = self._all([self.host.reset.remote(ep.id, rows[ep.row]) for ep in episodes], "reset")
        for ep, obs in zip(episodes, observations):
            ids = self.format.prompt_ids(self.format.prompt(rows[ep.row]["prompt"], obs))
            limit = self.cfg.max_prompt_length
            ep.prompt_ids = ids[-limit:] if limit else ids
        one = replace(sampling, n=1)
        active, turn, timed_out = list(episodes), 0, False
        while active:
            groups = generator.generate(
                [ep.prompt_ids + ep.ids for ep in active], one, seed + turn * TURN_SEED, [budget - len(ep.ids) for ep in active]
            )
            for ep, g in zip(active, groups):
                ep.add(g.completion_ids[0], g.logprobs[0] if g.logprobs is not None else None, model=True)
                ep.text, ep.truncated, ep.turns = g.texts[0], g.truncated[0], ep.turns + 1
                ep.messages.append({"role": "assistant", "content": g.texts[0]})
            active, timed_out = self._answer(active, budget, timed_out)
            turn += 1
        env_rewards = {}
        if self.info.reward_name is not None:
            env_rewards[self.info.reward_name] = self._all([self.host.reward.remote(ep.id) for ep in episodes], "get_reward")
        self.host.close.remote([ep.id for ep in episodes])
        if timed_out:  # a hung tool still holds a thread of the host: start a clean one
            ray.kill(self.host)
            self.host, _ = start_host(self.tool_specs, self.env_spec, self.timeout_s)
        return Episodes(
            prompt_ids=[ep.prompt_ids for ep in episodes],
            completion_ids=[ep.ids for ep in episodes],
            loss_mask=[ep.mask for ep in episodes],
            sampling_logprobs=[ep.logprobs for ep in episodes] if sampling.logprobs else None,
            truncated=[ep.truncated for ep in episodes],
            texts=[ep.text for ep in episodes],
            completions=[ep.messages for ep in episodes],
            num_generations=k,
            turns=[ep.turns for ep in episodes],
            tool_calls=[ep.tool_calls for ep in episodes],
            tool_errors=[ep.tool_errors for ep in episodes],
            env_rewards={name: [float("nan") if v is None else v for v in values] for name, values in env_rewards.items()},
            generate_s=time.perf_counter() - t0,
        )

    def _answer(self, episodes: list[Episode], budget: int, timed_out: bool) -> tuple[list[Episode], bool]:
        """Run the tool calls (or the environment's `step`) of each episode's last turn; append
        the answers. Returns the episodes that go on, and whether any call timed out.

        An episode goes on while its turns were not cut off and `max_tool_calling_iterations`
        allows another answer. `step` sees every model turn without a tool call, the last one too
        (an answer checker must see the final answer to score it), but only continues the above."""
        jobs: list[tuple[Episode, str, Any]] = []  # (episode, tool name or "", ref or error text)
        can_go = {ep.id: not ep.truncated and ep.turns <= self.max_iterations for ep in episodes}
        for ep in episodes:
            calls = parse_tool_calls(ep.text) if can_go[ep.id] else []
            if calls:
                ep.messages[-1]["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                for c in calls:
                    ep.tool_calls += 1
                    jobs.append((ep, c.name, f"error: {c.error}" if c.error else self.host.call.remote(ep.id, c.name, c.arguments)))
            elif self.info.has_step:
                jobs.append((ep, "", self.host.step.remote(ep.id, ep.text)))
        pending = [job for job in jobs if not isinstance(job[2], str)]
        values, late = gather([ref for _, _, ref in pending], self.timeout_s)
        results = dict(zip([id(j) for j in pending], zip(values, late)))
        answers: dict[str, list[dict]] = {}
        for job in jobs:
            ep, name, ref = job
            if isinstance(ref, str):  # unparsable call
                text, ok = ref, False
            else:
                value, was_late = results[id(job)]
                timed_out |= was_late
                if was_late:
                    text, ok = f"error: {name or 'the environment'} did not answer within cluster.tool_timeout_s={self.timeout_s:g}s", False
                elif name:
                    text, ok = value
                elif value is None:  # step() ended the episode
                    continue
                else:
                    text, ok = str(value), True
            if name:
                ep.tool_errors += int(not ok)
                answers.setdefault(ep.id, []).append(self.format.tool_message(name, text))
            elif ok:
                answers.setdefault(ep.id, []).append({"role": "user", "content": text})
            else:  # a step() that timed out ends the episode, counted as a tool error
                ep.tool_errors += 1
        going = []
        for ep in episodes:
            messages = answers.get(ep.id)
            if not messages or not can_go[ep.id]:
                continue
            ids = self.format.suffix_ids(messages)
            if not ep.ids or ep.ids[-1] != self.eos:  # the turn ended on a stop string: close it as the template does
                ids = [self.eos] + ids
            if len(ep.ids) + len(ids) >= budget:  # no room for the answer and another turn
                ep.truncated = True
                continue
            ep.add(ids, None, model=False)
            ep.messages += messages
            going.append(ep)
        return going, timed_out

    def _all(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        values, late = gather(refs, self.timeout_s)
        if any(late):
            raise ToolError(f"the environment's {what} did not finish within cluster.tool_timeout_s={self.timeout_s:g}s: make it faster or raise the timeout")
        return values

    def close(self) -> None:
        ray.kill(self.host)
