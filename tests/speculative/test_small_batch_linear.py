"""The small-batch linear path: same results up to float rounding, scoped to its modules and thread, and the engine
stays exact with it."""

import contextlib
import threading

import pytest
import torch
from torch import nn

from bebop_trl.modeling.model_inputs import cache_of, with_cache
from bebop_trl.speculative import SpeculativeGenerator
from bebop_trl.speculative import small_batch_linear as small_batch_module
from bebop_trl.speculative.small_batch_linear import MAX_ROWS, small_batch_linear
from bebop_trl.testing import char_tokenizer, tiny_causal_lm

from . import test_engine_exactness as exactness
from .helpers import perturbed_head


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2's attention projections have biases
def policy(request):
    return tiny_causal_lm(request.param, seed=0)


@pytest.fixture(scope="module")
def head(policy):
    return perturbed_head(policy, scale=0.02)


@pytest.fixture(scope="module")
def prompts():
    return char_tokenizer()(["hello there", "2+2="], return_tensors="pt", padding=True)


def linears(*modules: nn.Module) -> list[nn.Linear]:
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]


def routed(module: nn.Linear) -> bool:
    return "forward" in vars(module)


@torch.no_grad()
def cached_logits(
    policy: nn.Module, ids: torch.LongTensor, new_tokens: int, small_batch: bool = False
) -> torch.Tensor:
    """Logits of the last `new_tokens` of `ids` over a cache of the others (which is always built with F.linear)."""
    outputs = policy(input_ids=ids[:, :-new_tokens], use_cache=True)
    with small_batch_linear(policy) if small_batch else contextlib.nullcontext():
        return policy(input_ids=ids[:, -new_tokens:], **with_cache(cache_of(outputs))).logits


@pytest.mark.parametrize("new_tokens", [1, 4, MAX_ROWS // 2 + 1])
def test_routed_forward_equals_the_plain_one(policy, prompts, new_tokens):
    expected = cached_logits(policy, prompts.input_ids, new_tokens)
    actual = cached_logits(policy, prompts.input_ids, new_tokens, small_batch=True)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    if prompts.input_ids.shape[0] * new_tokens > MAX_ROWS:  # too many rows: the plain path, bit for bit
        assert torch.equal(actual, expected)


def test_modules_are_restored_after_the_context_and_after_an_exception(policy, head, prompts):
    modules = linears(policy, head)
    before = cached_logits(policy, prompts.input_ids, 2)
    with small_batch_linear(policy, head):
        assert all(routed(m) for m in modules)
        with small_batch_linear(policy):  # nested, and the policy's layers entered twice
            pass
        assert all(routed(m) for m in modules), "leaving the inner context must not unroute the outer one"
    assert not any(routed(m) for m in modules)
    with pytest.raises(RuntimeError, match="boom"), small_batch_linear(policy, head):
        raise RuntimeError("boom")
    assert not any(routed(m) for m in modules)
    assert torch.equal(cached_logits(policy, prompts.input_ids, 2), before)


def test_other_threads_keep_f_linear(policy, prompts):
    # A training step in another thread must not see the path while the engine's thread routes the same modules.
    plain = cached_logits(policy, prompts.input_ids, 2)
    inside, outside = {}, {}
    entered, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        entered.wait()
        outside["logits"] = cached_logits(policy, prompts.input_ids, 2)
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with small_batch_linear(policy):
        entered.set()
        done.wait()
        inside["logits"] = cached_logits(policy, prompts.input_ids, 2, small_batch=True)
    thread.join()
    assert torch.equal(outside["logits"], plain)
    torch.testing.assert_close(inside["logits"], plain, atol=1e-5, rtol=1e-5)


def test_the_engine_routes_only_while_it_generates(policy, head, prompts, monkeypatch):
    seen = []
    forward = SpeculativeGenerator._decode_cycle

    def recording_cycle(self, *args):
        seen.append(all(routed(m) for m in linears(policy, head)))
        return forward(self, *args)

    monkeypatch.setattr(SpeculativeGenerator, "_decode_cycle", recording_cycle)
    SpeculativeGenerator(policy, head, small_batch_linear=True).generate(
        prompts.input_ids, prompts.attention_mask, max_new_tokens=4
    )
    assert seen and all(seen)
    assert not any(routed(m) for m in linears(policy, head))


@pytest.mark.parametrize("k", [None, 1, 3])
def test_greedy_decoding_is_unchanged(policy, prompts, k):
    # Random tiny models have no near-ties between their top logits, so rounding cannot flip an argmax here.
    head = None if k is None else perturbed_head(policy, scale=0.02)

    def greedy(small_batch: bool) -> torch.LongTensor:
        engine = SpeculativeGenerator(policy, head, num_speculative_tokens=k or 3, small_batch_linear=small_batch)
        return engine.generate(
            prompts.input_ids, prompts.attention_mask, max_new_tokens=24, temperature=0.0
        ).completion_ids

    assert torch.equal(greedy(True), greedy(False))


@pytest.fixture(scope="module")
def exactness_policy():
    return tiny_causal_lm("llama", seed=1, vocab_size=exactness.VOCAB)


@pytest.mark.parametrize("case", list(exactness.CASES))
def test_completions_follow_the_policy_law(exactness_policy, case, monkeypatch):
    # The law test samples thousands of rows per call: lift the row limit so that every product takes the path.
    monkeypatch.setattr(small_batch_module, "MAX_ROWS", 1 << 30)
    draft_sampling, k, sampling = exactness.CASES[case]
    engine = SpeculativeGenerator(
        exactness_policy,
        perturbed_head(exactness_policy, scale=0.1),
        num_speculative_tokens=k,
        draft_sampling=draft_sampling,
        small_batch_linear=True,
    )
    pvalues = exactness.pvalues(exactness_policy, engine, **sampling)
    for prompt, pvalue in zip(exactness.PROMPTS, pvalues, strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


def test_autotuning_keeps_one_path_per_shape_and_row_count(policy, prompts, monkeypatch):
    monkeypatch.setattr(small_batch_module, "_autotuned", {})
    expected = cached_logits(policy, prompts.input_ids, 4)
    with torch.no_grad():
        cache = cache_of(policy(input_ids=prompts.input_ids[:, :-4], use_cache=True))
        with small_batch_linear(policy, autotune=True):
            actual = policy(input_ids=prompts.input_ids[:, -4:], **with_cache(cache)).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    decisions = small_batch_module._autotuned
    shapes = {tuple(m.weight.shape) for m in linears(policy)}
    # One decision per weight shape, for the 8 rows of 2 prompts x 4 new tokens.
    assert {key[:2] for key in decisions} == shapes and {key[2] for key in decisions} == {8}
    assert all(isinstance(choice, bool) for choice in decisions.values())
    # A decision is reused, not timed again.
    monkeypatch.setattr(small_batch_module, "_fastest", lambda *args: pytest.fail("timed twice"))
    with torch.no_grad(), small_batch_linear(policy, autotune=True):
        policy(input_ids=prompts.input_ids[:, -4:])


def test_autotuning_follows_the_timings(policy, prompts, monkeypatch):
    # Whichever path times faster is taken: here `W @ x.T` is made to look twice as fast for every shape.
    times = iter([2.0, 1.0] * 100)
    monkeypatch.setattr(small_batch_module, "_autotuned", {})
    monkeypatch.setattr(small_batch_module, "_fastest", lambda function, device: next(times))
    with torch.no_grad(), small_batch_linear(policy, autotune=True):
        policy(input_ids=prompts.input_ids[:, :4])
    assert small_batch_module._autotuned and all(small_batch_module._autotuned.values())


def test_the_engine_takes_auto(policy, head, prompts):
    greedy = [
        SpeculativeGenerator(policy, head, num_speculative_tokens=2, small_batch_linear=mode)
        .generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=12, temperature=0.0)
        .completion_ids
        for mode in (False, "auto")
    ]
    assert torch.equal(*greedy)
    with pytest.raises(ValueError, match="small_batch_linear"):
        SpeculativeGenerator(policy, head, small_batch_linear="always")
