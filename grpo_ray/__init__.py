"""grpo-ray: GRPO post-training on Ray, configured like TRL.

    from grpo_ray import GRPOConfig, GRPOTrainer

Importing the package is light (no torch, no Ray): the trainer pulls them in when it runs.
"""

from grpo_ray.config import ClusterConfig, ConfigError, DataConfig, GRPOConfig

__all__ = ["GRPOConfig", "GRPOTrainer", "ClusterConfig", "DataConfig", "ConfigError"]


def __getattr__(name: str):  # lazy: the API module imports the driver stack only when asked for
    if name in ("GRPOTrainer", "RunResult"):
        from grpo_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'grpo_ray' has no attribute {name!r}")
