"""grpo-ray: GRPO post-training on Ray, configured like TRL.

    from grpo_ray import GRPOConfig, GRPOTrainer

Importing the package is light (no torch, no Ray): the trainer pulls them in when it runs.
The reward side of the Python API is here too: `RewardFn` (the TRL signature
`fn(prompts, completions, **columns) -> list[float | None]`), `RewardSpec`, `RewardError`, and the
built-in rewards (`accuracy`, `format_reward`, `reasoning_gym_reward`) to call or combine.
"""

from grpo_ray.config import ClusterConfig, ConfigError, DataConfig, GRPOConfig

_API = ("GRPOTrainer", "RunResult")
_REWARDS = ("RewardFn", "RewardSpec", "RewardError", "ByValue", "accuracy", "format_reward", "reasoning_gym_reward")

__all__ = ["GRPOConfig", "GRPOTrainer", "ClusterConfig", "DataConfig", "ConfigError", *_REWARDS]


def __getattr__(name: str):  # lazy: the API module imports the driver stack only when asked for
    if name in _API:
        from grpo_ray import api

        return getattr(api, name)
    if name in _REWARDS:
        from grpo_ray import rewards

        return getattr(rewards, name)
    raise AttributeError(f"module 'grpo_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_REWARDS})
