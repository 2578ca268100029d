"""Every private Ray hook grpo_ray/ray_compat.py names still exists in the installed Ray.

A Ray upgrade that moves or renames one fails here, by name, instead of silently (a swallowed
ImportError) or mid-run. No Ray cluster is started."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path

import pytest
import ray

from grpo_ray import ray_compat


def test_dashboard_url_hook():
    from ray._private import worker

    assert callable(worker.get_dashboard_url)
    assert ray_compat.dashboard_running() is False  # not connected: no dashboard, no error


def test_default_callbacks_hook_and_the_placement_group_cleaner():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import placement_group_callback  # noqa: F401 - where it lives today

    assert callable(getattr(TorchTrainer, "_create_default_callbacks", None)), "TorchTrainer._create_default_callbacks is gone"
    source = inspect.getsource(TorchTrainer._create_default_callbacks)
    assert ray_compat.PG_CLEANER_CALLBACK in source, f"Ray Train no longer adds {ray_compat.PG_CLEANER_CALLBACK} there"


def test_train_report_logger_hook():
    from ray.train.v2._internal.execution import context as train_context

    assert "logger = logging.getLogger(__file__)" in Path(train_context.__file__).read_text()  # the logger we quieten
    ray_compat.quiet_train_report_logs()
    assert logging.getLogger(train_context.__file__).level == logging.WARNING


def test_token_auth_hook():
    module = importlib.import_module(ray_compat.TOKEN_SETUP_MODULE)
    assert "warn_if_disabled" in inspect.signature(module.maybe_enable_token_auth_if_token_available).parameters


def test_autoscaler_max_resources_hook():
    from ray._private.state import state as ray_state

    assert callable(ray_state.get_max_resources_from_cluster_config)


def test_trial_storage_hook():
    from ray.tune import Trainable

    source = inspect.getsource(Trainable.__init__)
    assert "self._storage = storage" in source
    from ray.train._internal.storage import StorageContext

    assert isinstance(inspect.getattr_static(StorageContext, "trial_fs_path"), property)


def test_embedded_ray_init_hooks():
    source = inspect.getsource(inspect.unwrap(ray.init))  # private kwargs are popped from **kwargs
    for name in ray_compat.INIT_PRIVATE_KWARGS:
        assert f'kwargs.pop("{name}"' in source, f"ray.init no longer takes {name}"
    raylet = Path(importlib.import_module("ray._raylet").__file__).read_bytes()
    for key in (ray_compat.IDLE_WORKER_KILLING_KEY, ray_compat.METRICS_COLLECTION_KEY):
        assert key.encode() in raylet, f"Ray's system config lost {key}"


def test_embedded_ray_gets_the_private_init_arguments_through_the_adapter(monkeypatch, tmp_path):
    """driver.init_ray passes exactly the private ray.init arguments the adapter names (ray.init is
    replaced: no Ray starts)."""
    from grpo_ray import driver
    from grpo_ray.config import GRPOConfig

    assert tuple(ray_compat.embedded_init_kwargs(5)) == ray_compat.INIT_PRIVATE_KWARGS
    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(driver, "quiet_ray_init", lambda: None)
    monkeypatch.setattr(driver, "route_worker_output", lambda: None)
    driver.init_ray(GRPOConfig())
    assert seen["_node_ip_address"] == "127.0.0.1"
    assert seen["_system_config"] == {ray_compat.IDLE_WORKER_KILLING_KEY: 300_000, ray_compat.METRICS_COLLECTION_KEY: False, ray_compat.PRESTART_KEY: False}
    assert seen["include_dashboard"] is False and seen["log_to_driver"] is True


def test_sigint_hook():
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "_register_sigint_handler" in inspect.getsource(DataParallelTrainer), "Ray Train no longer registers its Ctrl-C handler there"
    assert "_register_sigint_handler" in vars(ray_compat.GRPOTorchTrainer)


def test_log_to_driver_dispatcher_hook():
    """The handler swap works on Ray's own dispatcher: Ray's printer comes back, ours is registered."""
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    before = list(dispatcher.handlers)
    seen = []
    try:
        dispatcher.add_handler(ray_compat.RAY_PRINTER, print)
        assert ray_compat.swap_log_to_driver_handler("test_handler", seen.append) is print
        names = [name for name, _ in dispatcher.handlers]
        assert "test_handler" in names and ray_compat.RAY_PRINTER not in names
        dispatcher.emit({"lines": ["x"]})
        assert seen == [{"lines": ["x"]}]
    finally:
        dispatcher.handlers[:] = before
    assert logging.getLogger(ray_compat.RAY_WORKER_LOGGER) is logging.getLogger(worker.__name__)


def test_no_other_module_reaches_into_private_ray():
    """The adapter is the only place: a new private use elsewhere must be added there (and here)."""
    root = Path(ray_compat.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "ray_compat.py":
            continue
        text = path.read_text()
        for needle in ("ray._private", "._internal", "._storage", "._create_default_callbacks"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
        for name in ray_compat.INIT_PRIVATE_KWARGS:  # a whole word: ray.util.get_node_ip_address is public
            if re.search(rf"\b{name}\b", text):
                offenders.append(f"{path.relative_to(root)}: {name}")
    assert offenders == [], offenders


def test_unswitchable_metrics_ports_hook():
    assert set(ray_compat.unswitchable_metrics_ports()) == {44217, 44227}  # Ray 2.60's defaults


@pytest.mark.parametrize("name", ["GRPOTorchTrainer", "embedded_init_kwargs", "enable_job_token_auth", "autoscaler_max_resources", "trial_dir", "swap_log_to_driver_handler", "unswitchable_metrics_ports"])
def test_every_hook_is_exported(name):
    assert callable(getattr(ray_compat, name))
