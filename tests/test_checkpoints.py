"""grpo_ray/checkpoints.py: a restored LR schedule runs at the config's learning rate (PBT's
perturbation), applied to the live optimizer and scheduler, never by editing checkpoint files.

Real torch optimizers and transformers schedulers (the ones the trainer builds); no Ray."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from grpo_ray.checkpoints import set_learning_rate

STEPS, WARMUP, TOTAL = 3, 2, 10
GRAD = torch.tensor([1.0, -2.0])  # constant: every SGD step moves the weights by exactly -lr * GRAD


def build(lr: float, kind: str = "sgd") -> tuple[torch.nn.Parameter, torch.optim.Optimizer, object]:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=lr) if kind == "sgd" else torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    return w, opt, get_scheduler("linear", opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)


def step(w, opt, sched, n: int) -> list[float]:
    """n optimizer steps; the learning rate each one applied."""
    used = []
    for _ in range(n):
        used.append(opt.param_groups[0]["lr"])
        w.grad = GRAD.clone()
        opt.step()
        sched.step()
    return used


def restored(saved_lr: float, new_lr: float, kind: str = "sgd", retarget: bool = True):
    """A run saved after STEPS steps at `saved_lr`, restored into one the config builds at `new_lr`."""
    w0, opt0, sched0 = build(saved_lr, kind)
    step(w0, opt0, sched0, STEPS)
    w, opt, sched = build(new_lr, kind)
    with torch.no_grad():
        w.copy_(w0)
    opt.load_state_dict(opt0.state_dict())  # what DeepSpeed's load_checkpoint does
    sched.load_state_dict(sched0.state_dict())
    old = set_learning_rate(opt, sched, new_lr) if retarget else None
    return w, opt, sched, old


def test_restored_schedule_runs_at_the_new_peak_from_the_saved_position():
    w_ref, opt_ref, sched_ref = build(4e-3)  # the schedule the new config would have run from the start
    step(w_ref, opt_ref, sched_ref, STEPS)
    w, opt, sched, old = restored(1e-3, 4e-3)
    assert old == pytest.approx(1e-3)
    assert sched.base_lrs == [pytest.approx(4e-3)] and opt.param_groups[0]["initial_lr"] == pytest.approx(4e-3)
    assert sched.get_last_lr() == [pytest.approx(sched_ref.get_last_lr()[0])]  # what metrics report
    before = w.detach().clone()
    used = step(w, opt, sched, TOTAL - STEPS)
    expected = step(w_ref, opt_ref, sched_ref, TOTAL - STEPS)
    assert used == pytest.approx(expected) and used[0] > 0
    # ...and the optimizer applied those rates: SGD on a constant gradient moves by sum(lr) * grad
    assert torch.allclose(w.detach() - before, -sum(expected) * GRAD, rtol=1e-6)


def test_negative_control_without_the_retarget_the_old_rate_continues():
    w, opt, sched, _ = restored(1e-3, 4e-3, retarget=False)
    w_ref, opt_ref, sched_ref = build(4e-3)
    step(w_ref, opt_ref, sched_ref, STEPS)
    assert step(w, opt, sched, 2) != pytest.approx(step(w_ref, opt_ref, sched_ref, 2))


def test_same_rate_is_a_no_op_and_adamw_keeps_its_moments():
    w, opt, sched, old = restored(1e-3, 1e-3, kind="adamw")
    assert old == pytest.approx(1e-3)
    w2, opt2, sched2, _ = restored(1e-3, 1e-3, kind="adamw", retarget=False)
    assert torch.equal(opt.state[w]["exp_avg"], opt2.state[w2]["exp_avg"])
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] and sched.base_lrs == sched2.base_lrs
    w3, opt3, sched3, _ = restored(1e-3, 2e-3, kind="adamw")
    assert torch.equal(opt3.state[w3]["exp_avg_sq"], opt2.state[w2]["exp_avg_sq"])  # only the rate changed
    assert opt3.param_groups[0]["lr"] == pytest.approx(2 * opt2.param_groups[0]["lr"])
