"""Weight sync: move the policy's new weights from trainer rank 0 into every vLLM engine.

One code path, the transport a parameter:

- `gloo` / `nccl`: a standalone `torch.distributed` broadcast group (trainer rank 0 = root, one
  rank per engine), built from a `TCPStore` beside the default groups that Ray Train and vLLM
  already own (`init_process_group` cannot be called twice in a process). Tensors stream
  one by one, so under ZeRO-3 only one gathered parameter is materialised at a time.
- `object_store`: rank 0 puts the weights in Ray's object store as 64 MiB numpy buckets; engines
  on its node map them without a copy, others pull them through Ray. Works anywhere Ray works.

Either way the engine applies the tensors with vLLM's own in-place `reload_weights`, and only
after checking them: every push carries a version and a fingerprint per tensor (`PushStamp`);
each engine checks what arrived and answers with a `PushReceipt`; a wrong or missing tensor is
sent once more, then stops the run (`WeightSyncError`). The engine loads nothing it did not verify.
Tied embeddings matter: the sender yields every *name* the checkpoint has (including
`lm_head.weight` when tied to `embed_tokens`), or vLLM's output head silently goes stale.
"""

from __future__ import annotations

import math
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import ray
import torch
import torch.distributed as dist

from grpo_ray.config import TRANSPORTS, WEIGHT_SYNC


class WeightSyncError(RuntimeError):
    """The engines do not hold the trainer's weights (seen in logprob_mismatch, or a push that
    arrived wrong twice): fatal, as a restart would repeat it."""


def check_logprob_mismatch(mismatch: float | None, limit: float | None, step: int) -> None:
    """Stop instead of training on a batch sampled by other weights than the trainer's.

    Only meaningful where the batch was sampled by the weights the trainer holds (staleness 0,
    or against the old-policy logps): the caller decides that."""
    if limit is None or mismatch is None or not mismatch > limit:
        return
    raise WeightSyncError(
        f"step {step}: vLLM sampled the batch with log-probabilities {mismatch:.3g} nats/token away from the trainer's "
        f"(max_logprob_mismatch={limit:g}), so the engines do not hold the trainer's weights. Probable causes: a weight sync "
        "that did not reach the engines (a parameter name vLLM maps differently, cluster.weight_sync), engines and trainer in "
        "different precision (bf16 / fp32), or a different tokenizer; set max_logprob_mismatch: null to train anyway"
    )


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver must allocate before a broadcast: crosses the Ray boundary."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"; torch dtypes are not JSON-friendly

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class GroupAddress:
    """Where the broadcast group's rendezvous store listens."""

    host: str
    port: int
    world_size: int
    backend: str


@dataclass(frozen=True)
class PushStamp:
    """What a push is checked against: its version and one `fingerprint` per tensor, in metas order."""

    version: int
    fingerprints: tuple[int, ...]


@dataclass(frozen=True)
class PushReceipt:
    """An engine's answer to a push: what it received, and the tensors whose bytes arrived other
    than sent (then it loaded nothing and keeps its previous weights)."""

    version: int
    tensors: int
    wrong: tuple[str, ...] = ()


class WeightTransferError(Exception):
    """A push that an engine did not verify (sent once more before it becomes a `WeightSyncError`)."""


def fingerprint(tensor: torch.Tensor) -> int:
    """A tensor's bytes summed twice: as 4-byte words and as 8-byte words, each wrapping around.

    Equal at both ends exactly when the bytes arrived: a missing, truncated, zeroed, stale or
    misnamed tensor changes it, and the two word sizes disagree when values trade places between
    even and odd positions. Wrapping integer sums do not depend on the order of addition, so CPU and
    GPU agree, and they run near memory speed. Not a cryptographic hash."""
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
    n4, n8 = raw.numel() // 4 * 4, raw.numel() // 8 * 8
    words = int(raw[:n4].view(torch.int32).sum(dtype=torch.int32)) + int(raw[n4:].sum(dtype=torch.int32))
    return words * 1_000_003 + int(raw[:n8].view(torch.int64).sum())


def fingerprinted(tensors: Iterable[torch.Tensor], into: list[int]) -> Iterator[torch.Tensor]:
    """Pass `tensors` through, appending each one's fingerprint to `into` (one pass, no copy kept)."""
    for tensor in tensors:
        into.append(fingerprint(tensor))
        yield tensor


def check_received(received: list[tuple[str, torch.Tensor]], stamp: PushStamp) -> PushReceipt:
    """Engine side: the receipt for what arrived (see `PushReceipt`)."""
    wrong = tuple(name for (name, tensor), expected in zip(received, stamp.fingerprints) if fingerprint(tensor) != expected)
    return PushReceipt(stamp.version, len(received), wrong)


def resolve_transport(weight_sync: str, use_gpu: bool) -> str:
    """`cluster.weight_sync` (one of config.WEIGHT_SYNC) -> a transport: the one it names, or for
    the one choice that names none ("auto") nccl on GPU, gloo on CPU."""
    if weight_sync not in WEIGHT_SYNC:
        raise ValueError(f"cluster.weight_sync={weight_sync!r}: use one of {', '.join(WEIGHT_SYNC)}")
    if weight_sync in TRANSPORTS:
        return weight_sync
    return "nccl" if use_gpu else "gloo"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class SyncGroup:
    """A broadcast group and the store it rendezvoused through (kept alive together)."""

    pg: dist.ProcessGroup
    store: dist.Store


def open_group(address: GroupAddress, rank: int, timeout_s: float = 300.0) -> SyncGroup:
    """Join the standalone broadcast group (blocks until every rank has joined)."""
    store = dist.TCPStore(
        address.host,
        address.port,
        address.world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    prefixed = dist.PrefixStore("grpo_ray_weight_sync", store)
    if address.backend == "nccl":  # pragma: no cover - needs GPUs
        pg = dist.ProcessGroupNCCL(prefixed, rank, address.world_size)
    else:
        pg = dist.ProcessGroupGloo(prefixed, rank, address.world_size, timedelta(seconds=timeout_s))
    return SyncGroup(pg, store)


def broadcast(group: SyncGroup, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.pg.broadcast([tensor], opts).wait()


BUCKET_BYTES = 64 << 20  # object-store transport: one object per bucket rather than per tensor


def buckets(metas: list[TensorMeta]) -> list[list[int]]:
    """Consecutive tensors of one dtype, up to BUCKET_BYTES together (a bigger tensor goes alone)."""
    out: list[list[int]] = []
    size = 0
    for i, meta in enumerate(metas):
        nbytes = math.prod(meta.shape) * meta.torch_dtype.itemsize
        if not out or size + nbytes > BUCKET_BYTES or meta.dtype != metas[out[-1][0]].dtype:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


def flat_buckets(tensors: Iterable[torch.Tensor], metas: list[TensorMeta], device: torch.device) -> Iterator[torch.Tensor]:
    """The tensors concatenated bucket by bucket (see `buckets`), one bucket materialised at a time."""
    stream = iter(tensors)
    for bucket in buckets(metas):
        yield torch.cat([next(stream).detach().to(device).reshape(-1) for _ in bucket])


def split_buckets(flats: Iterable[torch.Tensor], metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of `flat_buckets`: (name, view) per tensor."""
    for bucket, flat in zip(buckets(metas), flats):
        sizes = [math.prod(metas[i].shape) for i in bucket]
        for i, part in zip(bucket, flat.split(sizes)):
            yield metas[i].name, part.view(metas[i].shape)


def to_shared(flat: torch.Tensor) -> Any:
    """A bucket as an object-store value that readers on the node map without a copy (a numpy
    array; 2-byte dtypes travel as int16, as numpy has no bfloat16)."""
    return (flat.view(torch.int16) if flat.element_size() == 2 else flat).numpy()


def from_shared(arrays: list[Any], metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of `to_shared` over all buckets: (name, read-only view) per tensor."""

    def flats() -> Iterator[torch.Tensor]:
        for bucket, array in zip(buckets(metas), arrays):
            with warnings.catch_warnings():  # the mapped buffer is read-only; vLLM copies out of it
                warnings.simplefilter("ignore", UserWarning)
                yield torch.from_numpy(array).view(metas[bucket[0]].torch_dtype)

    return split_buckets(flats(), metas)


def send_tensors(group: SyncGroup, tensors: Iterable[torch.Tensor], device: torch.device) -> None:
    """Root side: broadcast each tensor in order (one materialised at a time). Per tensor, not in
    buckets: concatenating first measured slower over gloo (README "Performance", weight sync)."""
    for tensor in tensors:
        broadcast(group, tensor.detach().to(device).contiguous())


def receive_tensors(group: SyncGroup, metas: list[TensorMeta], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: allocate each tensor from its meta and fill it from the root."""
    for meta in metas:
        buffer = torch.empty(meta.shape, dtype=meta.torch_dtype, device=device)
        broadcast(group, buffer)
        yield meta.name, buffer


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every checkpoint name with its parameter, tied aliases included (see module docstring)."""
    return list(model.named_parameters(remove_duplicate=False))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The unpartitioned shape (ZeRO-3 keeps it in `ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def metas_for(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[TensorMeta]:
    return [TensorMeta(name, full_shape(p), str(dtype).removeprefix("torch.")) for name, p in named]


def plain_weights(named: list[tuple[str, torch.nn.Parameter]], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Full tensors of an unpartitioned model (ZeRO 0/2, or a plain module)."""
    for _, param in named:
        yield param.data.to(dtype)


def wait_until_up(actors: list[Any], timeout_s: float = 600.0) -> None:
    """Block until every actor answers `ready()`. A restarting actor refuses calls at once
    (`ActorUnavailableError`) instead of queueing them, so poll; a dead one raises."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get([a.ready.remote() for a in actors])
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class WeightSender:
    """Trainer side: every rank walks the weights (ZeRO-3 gathers are collective), rank 0 sends.

    `engines` are actor handles exposing `join_weight_group`, `receive_weights`, `load_weights`.
    """

    def __init__(
        self,
        engines: list[Any],
        module: torch.nn.Module,
        dtype: torch.dtype,
        transport: str,
        rank: int = 0,
        full_weights: Callable[[list[tuple[str, torch.nn.Parameter]]], Iterator[torch.Tensor]] | None = None,
        device: torch.device | None = None,
        named: list[tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        self.engines, self.transport, self.rank = list(engines), transport, rank
        self.named = named if named is not None else named_weights(module)  # LoRA: only the adapted layers (grpo_ray.lora)
        self.metas = metas_for(self.named, dtype)
        self.full_weights = full_weights or (lambda named: plain_weights(named, dtype))
        self.device = device if (transport == "nccl" and device is not None) else torch.device("cpu")
        self.group: SyncGroup | None = None
        # ZeRO-3 on several ranks gathers every tensor collectively: rank 0 cannot gather alone, so
        # it keeps the last full weights it sent in the object store (one copy, sync dtype) and
        # re-syncs a restarted engine from there.
        partitioned = any(hasattr(p, "ds_shape") for _, p in self.named)
        self.collective = partitioned and dist.is_initialized() and dist.get_world_size() > 1
        self.kept: list[ray.ObjectRef] | None = None
        self.kept_stamp: PushStamp | None = None
        self.version = 0  # of the last push (each push, resends included, takes the next)
        self.resends = 0  # pushes an engine did not verify the first time
        # push() (training thread) and resync() (asked for by a generation after an engine restart,
        # possibly from a rollout thread) must not interleave broadcasts on one group.
        self.lock = threading.RLock()

    def _connect(self) -> None:
        host = ray.util.get_node_ip_address()
        address = GroupAddress(host, free_port(host), 1 + len(self.engines), self.transport)
        joins = [e.join_weight_group.remote(address, i + 1) for i, e in enumerate(self.engines)]
        self.group = open_group(address, rank=0)
        ray.get(joins)

    def push(self) -> float:
        """Send the current weights to every engine; returns seconds spent.

        An engine that died (and that Ray restarted: see `RolloutPool`) breaks the broadcast group:
        wait for every engine to be up, rebuild the group and send once more."""
        t0 = time.perf_counter()
        with self.lock:
            try:
                self._verified(self._push)
            except WeightSyncError:
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, RuntimeError) as exc:
                if self.rank != 0 or (self.collective and self.kept is None):
                    raise
                print(f"[grpo-ray] weight sync failed ({type(exc).__name__}); waiting for the engines and sending again")
                self.resync()
        return time.perf_counter() - t0

    def resync(self) -> None:
        """Rank 0, after an engine restart: wait until every engine is up, rebuild the group, push
        (ZeRO-3 on several ranks: the copy kept from the last push, without the other ranks)."""
        with self.lock:
            wait_until_up(self.engines)
            self.group = None
            if not self.collective:
                self._verified(self._push)
                return
            if self.kept is None:
                raise RuntimeError("a rollout engine restarted before the first complete weight push: no weights to re-sync it from")
            self._verified(lambda: self._load_shared(self.kept, self.kept_stamp))

    def _verified(self, send: Callable[[], None]) -> None:
        """`send`, and once more if an engine did not verify it; twice: `WeightSyncError` (fatal)."""
        try:
            send()
        except WeightTransferError as exc:  # rank 0 only: the engines verified nothing, loaded nothing
            print(f"[grpo-ray] {exc}; sending it once more")
            self.resends += 1
            try:
                self._resend()
            except WeightTransferError as again:
                raise WeightSyncError(f"{again}, twice in a row: the weight sync is broken (cluster.weight_sync={self.transport})") from again

    def _push(self) -> None:
        tensors = self.full_weights(self.named)
        if self.rank != 0:
            for _ in tensors:  # take part in the ZeRO-3 gathers
                pass
            return
        self.version += 1
        prints: list[int] = []
        tensors = fingerprinted(tensors, prints)
        if self.collective:  # gather it all first (the other ranks take part), keep it, send from the copy
            self.kept = None
            self.kept = self._put_buckets(flat_buckets(tensors, self.metas, torch.device("cpu")))
            self.kept_stamp = PushStamp(self.version, tuple(prints))
            self._send_kept()
        elif self.transport == "object_store":
            refs = self._put_buckets(flat_buckets(tensors, self.metas, torch.device("cpu")))
            self._load_shared(refs, PushStamp(self.version, tuple(prints)))
        else:
            self._broadcast(tensors, lambda: PushStamp(self.version, tuple(prints)))

    def _resend(self) -> None:
        """Rank 0, after a push an engine did not verify: the same weights once more (ZeRO-3 on
        several ranks: from the kept copy, as the other ranks have moved on)."""
        if self.collective:
            self.version += 1
            self.kept_stamp = PushStamp(self.version, self.kept_stamp.fingerprints)
            self._send_kept()
        else:
            self._push()

    def _send_kept(self) -> None:
        if self.transport == "object_store":
            self._load_shared(self.kept, self.kept_stamp)
        else:
            stamp = self.kept_stamp
            self._broadcast((t for _, t in from_shared(ray.get(self.kept), self.metas)), lambda: stamp)

    def _put_buckets(self, flats: Iterable[torch.Tensor]) -> list[ray.ObjectRef]:
        return [ray.put(to_shared(flat)) for flat in flats]

    def _load_shared(self, refs: list[ray.ObjectRef], stamp: PushStamp) -> None:
        self._verify(ray.get([e.load_weights.remote(self.metas, refs, stamp) for e in self.engines]), stamp)

    def _broadcast(self, tensors: Iterable[torch.Tensor], stamp: Callable[[], PushStamp]) -> None:
        """Stream the tensors to every engine, then (the fingerprints now known) have each verify and load."""
        if self.group is None:
            self._connect()
        pending = [e.receive_weights.remote(self.metas) for e in self.engines]
        send_tensors(self.group, tensors, self.device)
        ray.get(pending)
        final = stamp()
        self._verify(ray.get([e.apply_weights.remote(final) for e in self.engines]), final)

    def _verify(self, receipts: list[PushReceipt], stamp: PushStamp) -> None:
        """Every engine loaded this version, every tensor of it, as sent; else `WeightTransferError`."""
        for index, r in enumerate(receipts):
            if r.version != stamp.version or r.tensors != len(self.metas) or r.wrong:
                bucket = next((b for b, ids in enumerate(buckets(self.metas)) if r.wrong and any(self.metas[i].name == r.wrong[0] for i in ids)), None)
                what = (
                    f"{len(r.wrong)} tensor(s) arrived other than sent, first {r.wrong[0]!r} (bucket {bucket})"
                    if r.wrong
                    else f"it received {r.tensors} of {len(self.metas)} tensors of push {r.version}"
                )
                raise WeightTransferError(f"weight push {stamp.version} to rollout engine {index} not loaded: {what}")
