"""Joining a running Ray cluster with a bounded wait.

`ray.init(address="host:port")` where nothing listens retries for ever, and `ray://` fails after
~30 s with a traceback. Every address form goes through `connect` (train, eval, tune) or
`bounded` (the job server of submit / jobs): the wait ends after `cluster.connect_timeout_s`
with one line that says what was tried and how to check it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from grpo_ray.config import ClusterConfig
from grpo_ray.logs import quiet_ray_init

DEFAULT_CONNECT_TIMEOUT_S = ClusterConfig.connect_timeout_s
T = TypeVar("T")
CONNECT_THREAD = "grpo-ray-connect"


class ClusterError(ConnectionError):
    """A cluster that does not answer, phrased as one line: what was tried and how to check it.
    `reason` is the short middle part (e.g. "connection refused"), for callers that phrase their own."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot reach the Ray cluster at {address}: {reason}; {how_to_check(address)}")
        self.reason = reason


def host_port(address: str) -> tuple[str, int | None]:
    """`host:port`, `ray://host:port`, `http://host:port` -> (host, port); port None where not given."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        return parts.hostname or "", parts.port
    except ValueError:  # a port that is not a number
        raise ClusterError(address, "the port is not a number (e.g. 10.0.0.1:6379, ray://10.0.0.1:10001)") from None


def how_to_check(address: str) -> str:
    if address.startswith(("http://", "https://")):
        return f"is the head running and its dashboard on that port (default 8265)? check with `curl {address}/api/version`"
    if address.startswith("ray://"):
        return "is the head running with the Ray Client server on that port (default 10001)? check with `ray status` on the head"
    if address == "auto":
        return "start one with `ray start --head`, or pass --address HOST:6379"
    return f"is the head running, and is that its GCS port (default 6379)? check with `ray status --address {address}`"


def probe(address: str, timeout_s: float) -> None:
    """Before `ray.init`: a TCP connect to the address's port (a refused port fails at once), then,
    for the gRPC forms (GCS, Ray Client), an HTTP/2 handshake, so a port where something else
    listens fails after `timeout_s` instead of leaving ray.init retrying in a thread."""
    host, port = host_port(address)
    if not host or port is None:
        return  # "auto", or a form whose port Ray fills in: left to the bounded ray.init
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except TimeoutError:
        raise ClusterError(address, f"no answer within cluster.connect_timeout_s={timeout_s:g}s") from None
    except OSError as exc:
        raise ClusterError(address, (exc.strerror or type(exc).__name__).lower()) from None
    if address.startswith(("http://", "https://")) or os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):
        return
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ClusterError(address, f"the port is open but no Ray (gRPC) server answered within cluster.connect_timeout_s={timeout_s:g}s") from None
    finally:
        channel.close()


def bounded(fn: Callable[[], T], address: str, timeout_s: float) -> T:
    """`fn()` in a daemon thread, given up after `timeout_s` (a stuck connect cannot be interrupted,
    and the daemon thread does not keep the process alive). Its exception becomes one line."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=CONNECT_THREAD, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ClusterError(address, f"nothing answered within cluster.connect_timeout_s={timeout_s:g}s")
    if "error" in box:
        exc = box["error"]
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(address, detail) from exc
    return box["value"]


def connect_abandoned() -> bool:
    """A `bounded` call timed out and its thread is still inside Ray: the process must leave with
    os._exit, since interpreter shutdown under that thread can crash (seen: SIGSEGV)."""
    return any(t.name == CONNECT_THREAD and t.is_alive() for t in threading.enumerate())


def connect(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, **init_kwargs: Any) -> None:
    """`ray.init(address=...)` that answers within `timeout_s` for every form (auto, host:port, ray://)."""
    import ray

    probe(address, timeout_s)
    if threading.current_thread() is threading.main_thread():
        # What ray.init does in the main thread (it runs in a helper thread here): SIGTERM exits
        # through atexit, so the driver leaves the cluster cleanly.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    quiet_ray_init()  # also its "SIGTERM handler is not set" notice: set above instead
    if address.startswith("ray://"):
        # ray.init attaches the auth token when it joins host:port, but not over Ray Client: a head
        # with token auth (the default where ~/.ray/auth_token exists) then never answers.
        from grpo_ray.ray_compat import enable_job_token_auth  # imports Ray Train: only when joining

        enable_job_token_auth()
    bounded(lambda: ray.init(address=address, **init_kwargs), address, timeout_s)
