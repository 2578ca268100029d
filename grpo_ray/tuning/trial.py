"""A Tune trial: one whole GRPO run (`driver.train` in a thread of the trial's actor), its reports
handed to Tune one step at a time, its checkpoints handed to PBT."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Trainable

from grpo_ray.checkpoints import RUN_FILE, export_for_tune, latest_checkpoint, seed_run_from_checkpoint
from grpo_ray.driver import held_out_accuracy, train
from grpo_ray.models import resolve_model_path
from grpo_ray.ray_compat import trial_dir as trial_dir_of
from grpo_ray.resources import run_bundles
from grpo_ray.tuning.admission import TRIAL_HEAD_BUNDLE, Admission, log
from grpo_ray.tuning.space import Study, trial_config

RUN_DIR = "run"  # a trial's GRPO output_dir, inside its Tune trial dir


class ForwardReports(UserCallback):
    """Ray Train V2 callback (runs in the Train controller): every report -> the trial's queue.

    Like ray.tune.integration.ray_train.TuneReportCallback (metrics of rank 0), plus the path of
    the report's checkpoint (PBT clones it), and paced: the controller waits until Tune asks for
    the next result. (Ray Train's per-worker report queue still lets the workers run up to two
    steps ahead: a trial ASHA stops at step k may have computed k+1 and k+2; Tune never sees them.)"""

    def __init__(self, reports: Any, acks: Any) -> None:
        self.reports = reports
        self.acks = acks

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.reports.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))
            self.acks.get()
        except Exception:  # noqa: BLE001 - the trial killed its queues: Tune stopped it
            raise RuntimeError("grpo-ray tune: the trial was stopped by its scheduler; ending its run") from None


class GRPOTrial(Trainable):
    """One Tune trial = one whole GRPO run (`driver.train` in a thread of this actor).

    A class trainable, not a function one, for the stop path: when Tune stops a trial (ASHA,
    PBT exploit, end of the study) it removes the trial's placement group right after `stop()`,
    which kills everything captured in it -- the Train controller included -- while this process
    still waits on that controller: the process then never exits and the run's engines and
    trainer workers hold their CPUs forever. Here `cleanup()` ends the run (and waits for it)
    before Tune frees anything. `step()` returns one training step's report;
    `save_checkpoint`/`load_checkpoint` give PBT the run's latest grpo-ray checkpoint."""

    def setup(self, config: dict[str, Any], study: dict[str, Any] | None = None) -> None:
        self.spec = Study.from_dict(study or {})
        trial_dir = Path(trial_dir_of(self))
        self.out = trial_dir / RUN_DIR
        self.cfg = trial_config(self.spec, config, self.out)
        # held-out eval runs here (driver.held_out_accuracy: outside the trial's placement group, which holds no CPU)
        self.run_cfg = self.cfg.with_overrides({"eval_at_start_and_end": False}) if self.cfg.eval_at_start_and_end else self.cfg
        self.restored = False
        self.thread: threading.Thread | None = None
        self.reports: Any = None
        self.acks: Any = None
        self.box: dict[str, Any] = {}
        self.pending_ack = False
        self.last: dict[str, Any] = {}
        self.last_checkpoint: str | None = None
        self.extra: dict[str, float] = {}
        self.gate: Admission | None = None

    # -- PBT (and restored trials): continue from a checkpoint, maybe another trial's
    def load_checkpoint(self, checkpoint: Any) -> None:
        seed_run_from_checkpoint(self.run_cfg, Path(checkpoint), self.out)
        self.restored = True

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        source = self.last_checkpoint
        if source is None:
            latest = latest_checkpoint(self.out)
            source = latest.path if latest is not None else None
        if source is None:
            raise RuntimeError(f"trial {self.trial_id}: no grpo-ray checkpoint yet to hand to Tune (save_steps={self.run_cfg.save_steps})")
        export_for_tune(source, checkpoint_dir, self.out)
        return checkpoint_dir

    # -- the run
    def _start(self) -> None:
        from ray.util.queue import Queue

        resume = self.restored or ((self.out / RUN_FILE).is_file() and latest_checkpoint(self.out) is not None)
        if self.cfg.eval_at_start_and_end and not resume:
            self.extra["eval_accuracy_start"] = held_out_accuracy(self.cfg, resolve_model_path(self.cfg.model_name_or_path))
        self.gate = Admission(run_bundles(self.cfg), holder=f"trial {self.trial_id}")
        waited = self.gate.acquire()
        log(f"trial {self.trial_id} admitted after {waited:.0f}s: {json.dumps(self.config)}")
        self.reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.acks = Queue(maxsize=1, actor_options={"num_cpus": 0})
        callbacks = [ForwardReports(self.reports, self.acks)]

        def work() -> None:
            try:
                self.box["result"] = train(self.run_cfg, resume=resume, overwrite=not resume, callbacks=callbacks)
            except BaseException as exc:  # noqa: BLE001 - raised in step()
                self.box["error"] = exc

        self.thread = threading.Thread(target=work, name="grpo-ray-trial-run", daemon=True)
        self.thread.start()

    def _next_report(self) -> tuple[dict[str, Any], str | None] | None:
        from ray.util.queue import Empty

        while True:
            try:
                return self.reports.get(block=True, timeout=0.5)
            except Empty:
                if self.thread.is_alive() or not self.reports.empty():
                    continue
                return None

    def _finish(self) -> None:
        self.thread.join()
        if self.gate is not None:
            self.gate.release()
        if "error" in self.box:
            raise self.box["error"]

    def step(self) -> dict[str, Any]:
        if self.thread is None:
            self._start()
        if self.pending_ack:
            self.acks.put(True)  # Tune wants the next step
            self.pending_ack = False
        item = self._next_report()
        if item is None:  # the run ended without another report
            self._finish()
            return {**self.last, **self.extra, "done": True}
        metrics, checkpoint = item
        self.gate.release()  # the run reported: its placement groups are held; the next trial may acquire
        self.last = metrics
        if checkpoint:
            self.last_checkpoint = checkpoint
        result = {**metrics, **self.extra}
        if int(metrics.get("step", 0)) >= self.run_cfg.max_steps:
            self.acks.put(True)  # the last step: let the run finish (final checkpoint, engines down)
            self._finish()
            if self.cfg.eval_at_start_and_end and self.box["result"].checkpoint_dir:
                result["eval_accuracy_end"] = held_out_accuracy(self.cfg, self.box["result"].checkpoint_dir)
            result["done"] = True
        else:
            self.pending_ack = True
        return result

    def cleanup(self) -> None:
        """Stopped mid-run (or done): end the run and wait for it before Tune frees the trial."""
        import ray

        if self.thread is not None and self.thread.is_alive():
            for queue in (self.reports, self.acks):
                try:
                    ray.kill(queue.actor)  # the controller's pending report fails: the run ends
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.thread.join(timeout=300)
        if self.gate is not None:
            self.gate.release()


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def make_trainable(study: Study) -> Any:
    from ray import tune

    trainable = tune.with_parameters(GRPOTrial, study=study.to_dict())
    return tune.with_resources(trainable, tune.PlacementGroupFactory([dict(TRIAL_HEAD_BUNDLE)]))
