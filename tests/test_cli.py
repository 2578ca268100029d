"""User mistakes reach the terminal as one line naming the problem and the fix (no Ray needed:
they are caught before anything starts), and nothing is written that a resume would trip on."""

from __future__ import annotations

import pytest

from grpo_ray.cli import main
from grpo_ray.metrics import METRICS_FILE, read_metrics, truncate_metrics


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("learning_rate: [1, 2", "malformed YAML at line"),
        ("lerning_rate: 1e-5\n", "did you mean 'learning_rate'"),
        ("beta: -1\n", "beta=-1.0"),
        ("data: {task: arith}\ncluster: {num_trainer_worker: 2}\n", "cluster.num_trainer_workers"),
        ("model_name_or_path: /does/not/exist\n", "model_name_or_path='/does/not/exist' does not exist"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    code, err = run(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("grpo-ray: error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_bad_set_override_is_one_line(tmp_path, capsys):
    code, err = run(["train", "--quick", "--set", "num_generations=1", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "num_generations=1" in err[0]


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: -1\n")
    code = main(["--debug", "train", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("grpo-ray: error:")


def test_resume_of_nothing_is_refused(tmp_path, capsys):
    code, err = run(["train", "--quick", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "holds no run to resume" in err[-1]


def test_metrics_truncated_to_checkpoint_step(tmp_path):
    (tmp_path / METRICS_FILE).write_text("".join(f'{{"step": {i}, "loss": 0.{i}}}\n' for i in range(1, 8)))
    truncate_metrics(tmp_path, 4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
