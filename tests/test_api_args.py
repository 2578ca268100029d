"""The Python API's constructor: TRL's arguments, each either used or refused in one line (no Ray started)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from grpo_ray import ConfigError, GRPOConfig, GRPOTrainer


def test_import_grpo_ray_is_light():
    code = "import sys, grpo_ray; grpo_ray.GRPOConfig(); print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr[-1000:]


def test_reward_types_are_exported_and_the_import_stays_light():
    """A Python-API user types and combines rewards from `grpo_ray` itself, without pulling in torch or Ray."""
    import grpo_ray
    from grpo_ray import rewards

    for name in ("RewardFn", "RewardSpec", "RewardError", "ByValue", "accuracy", "format_reward", "reasoning_gym_reward"):
        assert name in grpo_ray.__all__ and name in dir(grpo_ray)
        assert getattr(grpo_ray, name) is getattr(rewards, name), name
    assert grpo_ray.accuracy(["q"], ["\\boxed{3}"], answer=["3"]) == [1.0]
    code = ("import sys; from grpo_ray import ByValue, RewardError, RewardFn, RewardSpec, accuracy, format_reward, reasoning_gym_reward; "
            "print(callable(accuracy), 'torch' in sys.modules, 'ray' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True False False", out.stderr[-1000:]


def args(tmp_path) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path / "run"), report_to="none")


def test_reward_funcs_mix_callables_and_specs_and_name_them_in_the_config(tmp_path):
    def mine(prompts, completions, **kw):
        return [0.0] * len(completions)

    t = GRPOTrainer("tiny-arith", reward_funcs=[mine, "format", mine], args=args(tmp_path), train_dataset=[{"prompt": "hi", "answer": "1"}] * 3)
    name = f"{__name__}:test_reward_funcs_mix_callables_and_specs_and_name_them_in_the_config.<locals>.mine"
    assert t.args.reward_funcs == [name, "format", f"{name}#2"]  # a repeated callable gets its own metric name
    assert t.args.model_name_or_path == "tiny-arith"
    train, held_out = t.datasets
    assert train[0]["prompt"][-1] == {"role": "user", "content": "hi"} and held_out == []  # TRL: no eval_dataset, no eval
    assert GRPOTrainer("tiny-arith", reward_funcs=mine, args=args(tmp_path)).datasets is None  # the config's data section


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"processing_class": object()}, "GRPOTrainer(processing_class=...) is not supported: the tokenizer is loaded from the model folder"),
        ({"peft_config": {"r": 8, "lora_alpah": 16}}, "peft_config.lora_alpah: not a peft.LoraConfig field; did you mean 'lora_alpha'?"),
        ({"peft_config": 3}, "peft_config: expected a peft.LoraConfig or a mapping of its fields, got int"),
        ({"quantization_config": object()}, "load_in_4bit: true"),
        ({"optimizers": (object(), None)}, "set optim, learning_rate"),
        ({"tools": [3]}, "tools: 3 is a int"),
        ({"rollout_func": print}, "custom rollouts are not implemented"),
        ({"train_dataset": 42}, "train_dataset: expected a datasets.Dataset, a list of dicts or a file path, got a int"),
        ({"train_dataset": []}, "train_dataset is empty"),
        ({"train_dataset": [{"question": "x"}]}, "prompt column 'prompt' not found in train_dataset"),
        ({"eval_dataset": [{"prompt": "x", "answer": "1"}]}, "eval_dataset without train_dataset"),
        ({"reward_funcs": [3]}, "reward_funcs: 3 is a int"),
        ({"args": GRPOConfig(reward_weights=[1.0, 1.0]), "reward_funcs": ["format"]}, "reward_weights has 2 values for 1 reward_funcs"),
    ],
)
def test_unsupported_or_bad_arguments_are_one_line_errors(kwargs, expected):
    from grpo_ray.data import DataError

    with pytest.raises((ConfigError, DataError)) as exc_info:
        GRPOTrainer("tiny-arith", **kwargs)
    msg = str(exc_info.value)
    assert expected in msg and "\n" not in msg, msg


def test_peft_config_trains_a_lora_as_in_trl():
    from peft import LoraConfig

    t = GRPOTrainer("tiny-arith", peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert t.args.use_peft and t.args.lora_sync == "merged"
    built = __import__("grpo_ray.lora", fromlist=["lora_config"]).lora_config(t.args)
    assert (built.r, built.lora_alpha, sorted(built.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    assert not GRPOTrainer("tiny-arith").args.use_peft


def test_a_model_object_is_refused_with_how_to_pass_it():
    import torch

    with pytest.raises(ConfigError, match=r"save it with model.save_pretrained\(folder\)"):
        GRPOTrainer(torch.nn.Linear(2, 2))


def test_dataset_dict_and_datasets_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "1+1", "answer": 2}])
    with pytest.raises(ConfigError, match=r"pass one split, e.g. train_dataset=ds\['train'\]"):
        GRPOTrainer("tiny-arith", train_dataset=datasets.DatasetDict({"train": ds}))
    t = GRPOTrainer("tiny-arith", args=args(tmp_path), train_dataset=ds, eval_dataset=ds)
    assert t.datasets[0][0]["answer"] == "2" and len(t.datasets[1]) == 1


def test_a_dataset_path_gives_the_rows_an_in_memory_dataset_gives(tmp_path):
    import json

    records = [{"prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(6)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    by_path = GRPOTrainer("tiny-arith", train_dataset=str(path), eval_dataset=str(path))
    in_memory = GRPOTrainer("tiny-arith", train_dataset=records, eval_dataset=records)
    assert by_path.datasets == in_memory.datasets and len(by_path.datasets[0]) == 6
    assert by_path.datasets[0][3]["answer"] == "5"
