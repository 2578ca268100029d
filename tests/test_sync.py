"""Weight sync is correct: after a push, vLLM scores tokens exactly as the trainer's model does.

Every parameter is perturbed, the tied embedding included (it also feeds vLLM's output head: a
sync that misses the alias leaves the head stale while every layer looks fine)."""

from __future__ import annotations

import pytest
import ray
import torch

from grpo_ray.rollout import EngineSpec, RolloutPool, SamplingSpec
from grpo_ray.sync import WeightSender, WeightSyncError, to_shared
from tests.conftest import quick_config

pytestmark = pytest.mark.slow


def hf_logprobs(model, prompt_ids, completion_ids):
    out = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completion_ids):
            ids = torch.tensor([p + c])
            logps = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
            out.append(logps.gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def max_diff(a, b):
    return max(float((torch.tensor(x) - torch.as_tensor(y)).abs().max()) for x, y in zip(a, b))


def sample_tokens(tokenizer):
    # long enough to fill KV blocks (32 tokens on CPU): only whole blocks are prefix-cached
    prompts = [f"<|im_start|>user\n{'What is 3 + 4? ' * 8}<|im_end|>\n<|im_start|>assistant\n", f"<|im_start|>user\n{'What is 5 - 2? ' * 8}<|im_end|>\n<|im_start|>assistant\n"]
    completions = ["The answer is \\boxed{7}.", "The answer is \\boxed{3}."]
    p = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
    c = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in completions]
    return p, c


class TamperingSender(WeightSender):
    """The real sender, with a fault in transit on its next `tamper` sends, after it fingerprinted
    the weights (so no engine can tell from the stamp): "flip" changes one bit of the first tensor
    (either transport), "drop" leaves out the last object-store bucket (a tensor that never arrives)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tamper, self.mode = 0, "flip"

    def _flip(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.reshape(-1)[:1].view(torch.uint8)[0] ^= 1  # the lowest mantissa bit of one value
        return tensor

    def _put_buckets(self, flats):
        flats = list(flats)
        if self.tamper:
            self.tamper -= 1
            flats = flats[:-1] if self.mode == "drop" else [self._flip(flats[0]), *flats[1:]]
        return [ray.put(to_shared(flat)) for flat in flats]

    def _broadcast(self, tensors, stamp):
        if self.tamper:
            self.tamper -= 1
            tensors = (self._flip(t) if i == 0 else t for i, t in enumerate(tensors))
        return super()._broadcast(tensors, stamp)


@ray.remote
class TrainerSide:
    """Holds the HF model and the sender: stands in for trainer rank 0 on its own node."""

    def __init__(self, model_path, engines):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engines = engines
        self.senders = {}

    def node_id(self):
        return ray.get_runtime_context().get_node_id()

    def perturb(self, seed, only=None):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if only is None or only in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    def push(self, transport, tamper=0, mode="flip"):
        """Push; returns (version, resends so far) of that transport's sender."""
        if transport not in self.senders:
            self.senders[transport] = TamperingSender(self.engines, self.model, torch.float32, transport)
        sender = self.senders[transport]
        sender.tamper, sender.mode = tamper, mode
        sender.push()
        return sender.version, sender.resends

    def resync(self, transport):
        """What rank 0 does after a failed push: a new broadcast group to engines that may still
        hold the old one (the engine's own group is replaced, not leaked or waited on)."""
        self.senders[transport].resync()

    def logprobs(self):
        p, c = sample_tokens(self.tokenizer)
        return p, c, self.score(p, c)

    def score(self, prompt_ids, completion_ids):
        return [x.tolist() for x in hf_logprobs(self.model, prompt_ids, completion_ids)]


def sample_and_score(pool, side, prompt_ids, n=2):
    """Sample a group per prompt (temperature 1, so vLLM's logprobs are the model's); return
    vLLM's logprobs of the sampled tokens and the trainer model's."""
    spec = SamplingSpec(n=n, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=6)
    groups = pool.generate(prompt_ids, spec, seed=0)
    rows = [(p, c, lp) for p, g in zip(prompt_ids, groups) for c, lp in zip(g.completion_ids, g.logprobs) if c]
    prompts, comps, sampled = map(list, zip(*rows))
    return sampled, ray.get(side.score.remote(prompts, comps))


def each_engine(pool, p, c):
    """Every engine's logprobs of the same tokens (pool.completion_logprobs asks only the first)."""
    return ray.get([e.completion_logprobs.remote(p, c) for e in pool.engines])


def check_verified_pushes(pool, side, p, c) -> None:
    """Each engine checks every push against the sender's fingerprints: a fault in transit is sent
    once more and loaded; twice, the run stops and every engine keeps its last verified weights."""
    for seed, transport, mode in [(11, "gloo", "flip"), (12, "object_store", "flip"), (13, "object_store", "drop")]:
        ray.get(side.perturb.remote(seed))
        _, _, hf = ray.get(side.logprobs.remote())
        _, before = ray.get(side.push.remote(transport))
        version, resends = ray.get(side.push.remote(transport, tamper=1, mode=mode))
        assert resends == before + 1, f"{transport}/{mode}: the fault was not caught"
        assert ray.get([e.loaded_version.remote() for e in pool.engines]) == [version] * len(pool.engines)
        assert all(max_diff(lp, hf) < 1e-3 for lp in each_engine(pool, p, c)), f"{transport}/{mode}: resent weights not loaded"
        # The fault twice in a row: one line that names the tensor's bucket, and nothing loaded.
        ray.get(side.perturb.remote(seed + 100))
        _, _, moved = ray.get(side.logprobs.remote())
        expected = r"\d+ tensor\(s\) arrived other than sent, first '.+' \(bucket 0\)" if mode == "flip" else r"it received \d+ of \d+ tensors of push \d+"
        with pytest.raises(WeightSyncError, match=f"to rollout engine 0 not loaded: {expected}, twice in a row"):
            ray.get(side.push.remote(transport, tamper=2, mode=mode))
        assert ray.get([e.loaded_version.remote() for e in pool.engines]) == [version] * len(pool.engines)
        stale = each_engine(pool, p, c)
        assert all(max_diff(lp, hf) < 1e-3 < 1e-2 < max_diff(lp, moved) for lp in stale), f"{transport}/{mode}: a refused push was loaded"
    ray.get(side.push.remote("gloo"))  # and the group still works after a refused push
    _, _, hf = ray.get(side.logprobs.remote())
    assert all(max_diff(lp, hf) < 1e-3 for lp in each_engine(pool, p, c))


def check_sync(cfg, model_path, trainer_resources):
    pool = RolloutPool(cfg, EngineSpec(model_path=model_path, dtype="float32", max_model_len=256))
    try:
        side = TrainerSide.options(num_cpus=1, resources=trainer_resources).remote(model_path, pool.engines)
        p, c, hf0 = ray.get(side.logprobs.remote())
        assert max_diff(pool.completion_logprobs(p, c), hf0) < 1e-3  # same weights to start with
        for seed, transport, only in [(1, "gloo", None), (2, "object_store", None), (3, "gloo", "embed_tokens")]:
            ray.get(side.perturb.remote(seed, only))
            _, _, hf = ray.get(side.logprobs.remote())
            stale = pool.completion_logprobs(p, c)
            assert max_diff(stale, hf) > 1e-2, "the perturbation must be visible before the sync"
            ray.get(side.push.remote(transport), timeout=60)
            assert all(max_diff(lp, hf) < 1e-3 for lp in each_engine(pool, p, c)), f"{transport} sync (perturbed: {only or 'all'}) left an engine out of step"
            # Generation shares a prompt's KV across its group (prefix caching): the prompts were
            # cached before this sync, so a stale cache would show here.
            sampled, hf_sampled = sample_and_score(pool, side, p)
            assert max_diff(sampled, hf_sampled) < 1e-3, f"generation after a {transport} sync used stale prompt KV"
        # A second gloo group to the same live engines (resync after a transient error), then a plain push on it.
        for seed, method in [(4, "resync"), (5, "push")]:
            ray.get(side.perturb.remote(seed))
            _, _, hf = ray.get(side.logprobs.remote())
            ray.get(getattr(side, method).remote("gloo"), timeout=120)
            assert all(max_diff(lp, hf) < 1e-3 for lp in each_engine(pool, p, c)), f"gloo {method} on a rebuilt group left an engine out of step"
        if len(pool.engines) > 1:
            check_verified_pushes(pool, side, p, c)
        return ray.get(side.node_id.remote()), ray.get(pool.engines[0].node_id.remote())
    finally:
        pool.shutdown()


def test_sync_to_two_engines_each_verified(tmp_path, tiny_model_path, ray_local):
    check_sync(quick_config(tmp_path, cluster={"num_rollout_actors": 2}), tiny_model_path, {})


def test_sync_across_nodes(tmp_path, tiny_model_path, two_node_cluster):
    cfg = quick_config(tmp_path, cluster={"rollout_resource": "rollout", "trainer_resource": "trainer"})
    trainer_node, engine_node = check_sync(cfg, tiny_model_path, {"trainer": 1})
    assert trainer_node != engine_node


def test_buckets_hold_consecutive_tensors_of_one_dtype_up_to_the_limit(monkeypatch):
    from grpo_ray import sync
    from grpo_ray.sync import TensorMeta, buckets

    monkeypatch.setattr(sync, "BUCKET_BYTES", 1000)
    metas = [TensorMeta("a", (100,), "float32"), TensorMeta("b", (150,), "float32"), TensorMeta("c", (10, 100), "float32"),
             TensorMeta("d", (4,), "float32"), TensorMeta("e", (4,), "bfloat16"), TensorMeta("f", (4,), "bfloat16")]  # fmt: skip
    # a+b = 1000 bytes fit; c (4000 bytes) goes alone; d follows; a dtype change starts a bucket
    assert buckets(metas) == [[0, 1], [2], [3], [4, 5]]


def test_fingerprint_changes_with_any_byte_and_with_values_trading_places():
    from grpo_ray.sync import fingerprint

    for x in (torch.randn(1001), torch.randn(7).bfloat16(), torch.randn(3, 5, dtype=torch.float16), torch.tensor(3.0)):
        assert fingerprint(x) == fingerprint(x.clone())
        for index in (0, x.numel() * x.element_size() - 1):  # the first byte and one past the last whole word
            y = x.clone()
            y.view(-1).view(torch.uint8)[index] ^= 1
            assert fingerprint(y) != fingerprint(x), (x.dtype, index)
        if x.numel() > 1:
            y = x.clone().view(-1)
            y[[0, 1]] = y[[1, 0]]
            assert fingerprint(y) != fingerprint(x), x.dtype
