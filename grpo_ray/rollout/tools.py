"""Tools and environments of multi-turn rollouts, as TRL 1.16 defines them.

- A *tool* is a plain Python function with type hints and a docstring (its JSON schema comes from
  transformers' `get_json_schema`). `tools: ["path/file.py:fn", "pkg.mod:fn"]`.
- An *environment* (`environment_factory: "path/file.py:Class"`) is built once per episode;
  `reset(**row)` may return text appended to the prompt's last user message; its public methods
  are tools; `get_reward()` (optional) owns a reward column named after the class. Beyond TRL, an
  optional `step(text)` answers a model turn that called no tool: a string continues the episode
  as the next user message, None ends it (an answer checker that says "wrong, try again").

User code never runs in the trainer: one `ToolHost` actor (a Ray worker process, threaded) holds
the episode's environments and runs every call with `cluster.tool_timeout_s`. A tool that raises
or times out answers the model with the error and is counted; a broken `reset`/`get_reward` or an
unimportable tool is a one-line `ToolError` that stops the run (a retry would fail the same way).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import ray

from grpo_ray.config import ConfigError
from grpo_ray.rewards import RewardError, RewardSpec, import_object

# The Hermes / Qwen call format: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
ENV_METHODS = ("reset", "step", "get_reward")  # an environment's own methods, never offered as tools

FALLBACK_SYSTEM_PROMPT = (
    "You can call tools. To call one, write\n"
    '<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "and stop; its result comes back inside <tool_response></tool_response>. Tools:\n{tools}"
)


class ToolError(RewardError):
    """A tool or environment that cannot be loaded, or an environment method that failed: one line."""


@dataclass(frozen=True)
class Call:
    """One tool call parsed from a model turn (`error` set when it could not be parsed)."""

    name: str
    arguments: dict
    error: str | None = None


def parse_tool_calls(text: str) -> list[Call]:
    """Every `<tool_call>` block of a model turn; a block that is not a JSON call becomes a Call
    with an error, which the model gets back as that call's result."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(Call("?", {}, f"the tool call is not valid JSON ({exc.msg}); write a JSON object"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append(Call("?", {}, 'the tool call needs {"name": ..., "arguments": {...}}'))
            continue
        args = data.get("arguments", data.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(Call(data["name"], {}, "the tool call's arguments must be a JSON object"))
            continue
        calls.append(Call(data["name"], args))
    return calls


def tool_schema(fn: Any) -> dict:
    """TRL's tool schema for one function (transformers' `get_json_schema`), or a one-line error."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise ToolError(
            f"tool {name!r}: no JSON schema ({str(exc).splitlines()[0]}); give it type hints and a docstring with an Args: section"
        ) from None


def public_methods(env: Any) -> list[Any]:
    """An environment's tools: its public methods, as TRL lists them (on the class, so properties are not run)."""
    names = [n for n, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)]
    return [getattr(env, n) for n in names if not n.startswith("_") and n not in ENV_METHODS]


@dataclass(frozen=True)
class ToolsInfo:
    """What the rollout needs to know about the user's tools and environment (crosses to the trainer)."""

    schemas: list[dict]
    has_env: bool
    has_step: bool
    reward_name: str | None  # the environment's class name when it defines get_reward


class ToolHost:
    """Runs user tools and environments for many episodes at once (a threaded Ray actor).

    Episodes are keyed by an id the rollout chooses; each has its own environment instance."""

    def __init__(self, tool_specs: Sequence[RewardSpec], env_spec: RewardSpec | None) -> None:
        self.tools = {}
        for spec in tool_specs:
            fn = _load(spec, "tool")
            if not callable(fn):
                raise ToolError(f"tool {spec!r} is a {type(fn).__name__}, not a function; point at a function")
            tool_schema(fn)
            self.tools[fn.__name__] = fn
        self.factory = _load(env_spec, "environment_factory") if env_spec is not None else None
        self.envs: dict[str, Any] = {}
        self.info = self._probe(env_spec)

    def _probe(self, env_spec: RewardSpec | None) -> ToolsInfo:
        """Build one environment to read its tools and methods (TRL probes one the same way)."""
        schemas = [tool_schema(fn) for fn in self.tools.values()]
        if self.factory is None:
            return ToolsInfo(schemas, False, False, None)
        env = self._new_env(env_spec)
        if not callable(getattr(env, "reset", None)):
            raise ToolError(f"environment_factory {env_spec!r}: its environments need a reset(**row) method")
        schemas += [tool_schema(m) for m in public_methods(env)]
        has_reward = callable(getattr(env, "get_reward", None))
        return ToolsInfo(schemas, True, callable(getattr(env, "step", None)), type(env).__name__ if has_reward else None)

    def _new_env(self, env_spec: Any = None) -> Any:
        try:
            return self.factory()
        except Exception as exc:
            raise ToolError(f"environment_factory {env_spec or self.factory!r} raised {type(exc).__name__}: {exc}") from None

    def describe(self) -> ToolsInfo:
        return self.info

    def reset(self, episode: str, row: dict) -> str | None:
        if self.factory is None:
            return None
        env = self.envs[episode] = self._new_env()
        return self._env_call(env, "reset", **row)

    def call(self, episode: str, name: str, arguments: dict) -> tuple[str, bool]:
        """(result text, ok). A missing tool, bad arguments or an exception answer the model."""
        env = self.envs.get(episode)
        tools = dict(self.tools)
        if env is not None:
            tools.update({m.__name__: m for m in public_methods(env)})
        if name not in tools:
            return f"error: no tool named {name!r}; the tools are: {', '.join(tools) or 'none'}", False
        try:
            return _as_text(tools[name](**arguments)), True
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}", False

    def step(self, episode: str, text: str) -> str | None:
        return self._env_call(self.envs[episode], "step", text)

    def reward(self, episode: str) -> float | None:
        value = self._env_call(self.envs[episode], "get_reward")
        return None if value is None else float(value)

    def close(self, episodes: list[str]) -> None:
        for episode in episodes:
            self.envs.pop(episode, None)

    @staticmethod
    def _env_call(env: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(env, method)(*args, **kwargs)
        except Exception as exc:
            raise ToolError(f"environment {type(env).__name__}.{method} raised {type(exc).__name__}: {exc}") from None


def _load(spec: RewardSpec, what: str) -> Any:
    try:
        return import_object(spec, what)
    except ToolError:
        raise
    except RewardError as exc:  # the import machinery is the rewards' one: same lines, a tool's error class
        raise ToolError(str(exc)) from None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


LOAD_TIMEOUT_S = 120.0  # starting the host: a new worker process imports transformers and the user's modules


def start_host(tool_specs: Sequence[RewardSpec], env_spec: RewardSpec | None, timeout_s: float) -> tuple[Any, ToolsInfo]:
    """A `ToolHost` actor and what it found, or a one-line `ToolError` (import, schema, factory).
    Loading gets `LOAD_TIMEOUT_S` at least: a busy machine starts a worker process slowly."""
    actor = ray.remote(ToolHost).options(num_cpus=0, max_concurrency=64, scheduling_strategy="DEFAULT")
    host = actor.remote(list(tool_specs), env_spec)
    return host, call_with_timeout(host.describe.remote(), max(timeout_s, LOAD_TIMEOUT_S), "loading tools / environment_factory")


def call_with_timeout(ref: ray.ObjectRef, timeout_s: float, what: str) -> Any:
    """`ray.get` with a deadline; a user error inside comes back as its one line."""
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        raise ToolError(f"{what} did not finish within {timeout_s:g}s (cluster.tool_timeout_s): make it faster or raise the timeout")
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        cause = str(exc).strip().splitlines()
        line = next((x for x in reversed(cause) if "ToolError" in x or "RewardError" in x), cause[-1] if cause else "")
        raise ToolError(line.split("Error: ", 1)[-1]) from None
    except ray.exceptions.RayTaskError as exc:
        last = str(exc.as_instanceof_cause()).strip().splitlines()[-1]
        raise ToolError(last.split("Error: ", 1)[-1]) from None


def gather(refs: list[ray.ObjectRef], timeout_s: float) -> tuple[list[Any], list[bool]]:
    """Results of many calls with one deadline: (values, timed_out); a timed-out value is None."""
    if not refs:
        return [], []
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    values = [call_with_timeout(r, 0, "a tool call") if r in done else None for r in refs]
    return values, [r not in done for r in refs]


def check_tool_keys(cfg: Any, tool_specs: Sequence[RewardSpec] | None = None, env_spec: RewardSpec | None = None) -> None:
    """Before Ray starts: `max_tool_calling_iterations` means nothing without tools (TRL sets it in
    the config and the tools on the trainer, so this is checked where both are known)."""
    if cfg.max_tool_calling_iterations is not None and not (tool_specs or cfg.tools or env_spec is not None or cfg.environment_factory):
        raise ConfigError("max_tool_calling_iterations is set but the run has no tools or environment_factory: add them, or drop the key")


def check_tools(cfg: Any, tool_specs: Sequence[RewardSpec] | None = None, env_spec: RewardSpec | None = None) -> ToolsInfo | None:
    """Load the run's tools and environment once in a Ray worker (a typo fails in seconds, before
    OUTPUT_DIR is written), and check that the run has a reward source."""
    tools = list(tool_specs) if tool_specs else list(cfg.tools)
    env = env_spec if env_spec is not None else cfg.environment_factory
    if not tools and env is None:
        return None
    host, info = start_host(tools, env, cfg.cluster.tool_timeout_s)
    ray.kill(host)
    if not cfg.reward_funcs and info.reward_name is None:
        raise ToolError(
            f"reward_funcs is empty and environment_factory {env!r} has no get_reward(): "
            "add a get_reward() method to the environment or name reward_funcs"
        )
    return info
