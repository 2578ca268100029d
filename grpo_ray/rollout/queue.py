"""Rollouts ahead of the update: rank 0's queue of generate-and-score calls (sync or async)."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Callable

from grpo_ray.data import PromptSampler
from grpo_ray.rollout.batch import RolloutBatch
from grpo_ray.rollout.dynamic import sample_informative
from grpo_ray.rollout.runner import Rollout


@dataclass
class InFlight:
    """One submitted rollout: its step, the weights that sample it, and how to replay its rows."""

    step: int
    version: int  # updates the engines' weights had seen when it was submitted
    sampler_state: dict | None = None  # the sampler before this rollout drew its rows (what a checkpoint saves)
    future: Future | None = None


class RolloutQueue:
    """Rank 0's rollouts in flight, oldest first, `staleness` steps ahead of the update.

    Staleness 0 (sync) submits step t's rollout and waits for it at once. Staleness 1 (async)
    submits step t+1's rollout before step t's update, so vLLM generates on its own CPUs while
    the trainer updates; the batch of step t+1 is then sampled by the weights after update t-1,
    and the loss corrects for that with the sampling logprobs (vLLM importance sampling).

    Ordering with the engines: an engine actor runs one call at a time, and a weight load in the
    middle of a generation would sample one batch from two policies. So `drain` waits until every
    rollout in flight has returned before the trainer pushes weights, and the next rollout is only
    submitted after the push returned: generate(t+1) < push(w_t) < generate(t+2), always.
    Generation runs on one background thread (the Ray calls block in C++, without the GIL)."""

    def __init__(self, rollout: Rollout, sampler: PromptSampler, staleness: int, max_steps: int, start: int = 0, dynamic_rounds: int = 0) -> None:
        self.rollout, self.sampler = rollout, sampler
        self.dynamic_rounds = dynamic_rounds  # > 0: dynamic sampling, at most this many rounds a step
        self.staleness, self.max_steps = staleness, max_steps
        self.submitted = start  # the last step whose rollout was submitted
        self.inflight: deque[InFlight] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-rollout")
        self.weights_lock = threading.Lock()  # held while the update changes the weights

    def guarded(self, resync: Callable[[], None]) -> Callable[[], None]:
        """An engine restart inside an async rollout re-syncs from the rollout thread: make it wait
        for the update in flight, so that it never sends half-updated weights."""

        def locked() -> None:
            with self.weights_lock:
                resync()

        return locked

    def take(self, step: int) -> tuple[RolloutBatch, int]:
        """Step `step`'s scored batch and its staleness (updates between its sampler and the trainer).

        First tops the queue up to `step + staleness`; those rollouts sample with the engines'
        current weights, i.e. after `step - 1` updates."""
        while self.submitted < min(step + self.staleness, self.max_steps):
            self.submitted += 1
            self._submit(self.submitted, version=step - 1)
        head = self.inflight.popleft()
        assert head.step == step, f"rollout queue out of order: step {step} got step {head.step}'s batch"
        return head.future.result(), (step - 1) - head.version

    def _submit(self, step: int, version: int) -> None:
        item = InFlight(step, version)
        item.future = self.executor.submit(self._collect, item)
        self.inflight.append(item)

    def _collect(self, item: InFlight) -> RolloutBatch:
        """Runs on the rollout thread, so rows are drawn in step order even when dynamic sampling
        draws more of them after seeing the rewards."""
        item.sampler_state = self.sampler.state_dict()
        if self.dynamic_rounds:
            return sample_informative(self.rollout, self.sampler.next_batch, item.step, self.dynamic_rounds)
        return self.rollout.generate_and_score(self.sampler.next_batch(), item.step)

    def drain(self) -> float:
        """Block until no rollout is running (before a weight push); returns seconds waited."""
        t0 = time.perf_counter()
        wait_futures([item.future for item in self.inflight])
        return time.perf_counter() - t0

    def sampler_state(self) -> dict:
        """The sampler as a checkpoint must save it: rows drawn for rollouts not yet trained on are
        replayed. Waits for the rollouts in flight (a checkpoint follows `drain` anyway)."""
        self.drain()
        return self.inflight[0].sampler_state if self.inflight else self.sampler.state_dict()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
