"""AsyncRolloutWorker: a private snapshot of the policy and head, generating one round at a time in a thread."""

import copy
import functools
import itertools
import threading
import time
import types

import pytest
import torch

from bebop_trl import MTPHead
from bebop_trl.rollout.async_worker import AsyncRolloutWorker
from bebop_trl.rollout.torch_engine import generate_from_ids


TEXTS = ("q1:", "q22:", "abc=")
SAMPLING = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0)
ENGINE = dict(num_speculative_tokens=2, draft_sampling="probabilistic")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def policy_and_head(load_tiny):
    policy = load_tiny("llama")
    torch.manual_seed(0)
    return policy, MTPHead.from_model(policy)


@pytest.fixture
def make_worker():
    workers = []

    def make(*args, **kwargs):
        workers.append(AsyncRolloutWorker(*args, **kwargs))
        return workers[-1]

    yield make
    for worker in workers:
        worker.close()


def prompt_ids(tokenizer, texts=TEXTS):
    return [tokenizer(text)["input_ids"] for text in texts]


def sampling_kwargs(tokenizer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(generator=generator, eos_token_id=[tokenizer.eos_token_id], **SAMPLING)


def generate_directly(policy, head, tokenizer, ids, seed=0):
    return generate_from_ids(policy, tokenizer, ids, head=head, **ENGINE, **sampling_kwargs(tokenizer, seed))


def assert_same_output(actual, expected):
    assert torch.equal(actual.completion_ids, expected.completion_ids)
    assert torch.equal(actual.completion_mask, expected.completion_mask)
    torch.testing.assert_close(actual.logprobs, expected.logprobs)


@torch.no_grad()
def perturb(module, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * scale)


def storages(module):
    return {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}


def test_snapshot_shares_no_tensor_with_the_live_models(policy_and_head, tiny_tokenizer, make_worker):
    policy, head = policy_and_head
    worker = make_worker(policy, head, tiny_tokenizer, **ENGINE)
    snapshot, snapshot_head = worker._snapshot, worker._head
    live = storages(policy) | storages(head)
    assert storages(snapshot).isdisjoint(live)
    assert storages(snapshot_head).isdisjoint(live)
    # The snapshot's head drafts with the snapshot's embedding and lm_head, not the live policy's.
    snapshot_io = {
        snapshot.get_input_embeddings().weight.data_ptr(),
        snapshot.get_output_embeddings().weight.data_ptr(),
    }
    assert snapshot_head.lm_head_weight.data_ptr() in snapshot_io
    ids = torch.tensor([prompt_ids(tiny_tokenizer)[0]])
    expected = snapshot.get_input_embeddings()(ids)
    perturb(policy.get_input_embeddings(), seed=3, scale=1.0)
    torch.testing.assert_close(snapshot_head.embed(ids), expected)
    assert not snapshot.training and not any(p.requires_grad for p in snapshot.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # the live policy is left as it was


@pytest.mark.parametrize("with_head", [True, False])
def test_each_submit_generates_with_the_weights_it_was_given(policy_and_head, tiny_tokenizer, make_worker, with_head):
    policy, head = policy_and_head
    head = head if with_head else None
    ids = prompt_ids(tiny_tokenizer)
    original = generate_directly(policy, head, tiny_tokenizer, ids)
    worker = make_worker(policy, head, tiny_tokenizer, **ENGINE)

    # The live weights change after the worker made its snapshot ...
    for seed, module in enumerate([policy, head] if with_head else [policy]):
        perturb(module, seed=seed + 1)
    expected = generate_directly(policy, head, tiny_tokenizer, ids)
    worker.submit(ids, policy, head, version=3, **sampling_kwargs(tiny_tokenizer))
    # ... and again while the round is being generated: the round keeps the weights it was submitted with.
    weights_at_submit = copy.deepcopy(policy), copy.deepcopy(head)
    for seed, module in enumerate([policy, head] if with_head else [policy]):
        perturb(module, seed=seed + 10)
    rollout = worker.take(ids)
    assert rollout is not None and rollout.version == 3 and rollout.prompt_ids == ids
    assert rollout.started <= rollout.finished
    assert_same_output(rollout.output, expected)
    assert not torch.allclose(rollout.output.logprobs, original.logprobs)

    # The next submit copies the current weights again.
    expected = generate_directly(policy, head, tiny_tokenizer, ids, seed=1)
    worker.submit(ids, policy, head, version=4, **sampling_kwargs(tiny_tokenizer, seed=1))
    rollout = worker.take(ids)
    assert rollout.version == 4
    assert_same_output(rollout.output, expected)
    stale_policy, stale_head = weights_at_submit
    stale = generate_directly(stale_policy, stale_head, tiny_tokenizer, ids, seed=1)
    assert not torch.allclose(rollout.output.logprobs, stale.logprobs)


def test_take_returns_only_the_round_submitted_for_these_prompts(policy_and_head, tiny_tokenizer, make_worker):
    policy, head = policy_and_head
    worker = make_worker(policy, head, tiny_tokenizer, **ENGINE)
    ids, other = prompt_ids(tiny_tokenizer), prompt_ids(tiny_tokenizer, ("zz:", "q1:", "abc="))
    assert worker.take(ids) is None  # nothing pending
    worker.submit(ids, policy, head, version=0, **sampling_kwargs(tiny_tokenizer))
    assert worker.take(other) is None
    assert worker.take(ids) is None  # the mismatched round was dropped, not kept for later
    # A new submit replaces the pending round.
    worker.submit(other, policy, head, version=1, **sampling_kwargs(tiny_tokenizer))
    worker.submit(ids, policy, head, version=2, **sampling_kwargs(tiny_tokenizer))
    assert worker.take(other) is None
    worker.submit(other, policy, head, version=1, **sampling_kwargs(tiny_tokenizer))
    worker.submit(ids, policy, head, version=2, **sampling_kwargs(tiny_tokenizer))
    rollout = worker.take(ids)
    assert rollout.version == 2 and rollout.prompt_ids == ids


def test_close_waits_for_the_pending_round_and_joins_the_thread(
    policy_and_head, tiny_tokenizer, make_worker, monkeypatch
):
    policy, head = policy_and_head
    runs = []
    original_generate = AsyncRolloutWorker._generate

    def slow_generate(self, *args):
        run = dict(thread=threading.current_thread(), done=False)
        runs.append(run)
        time.sleep(0.3)
        rollout = original_generate(self, *args)
        run["done"] = True
        return rollout

    monkeypatch.setattr(AsyncRolloutWorker, "_generate", slow_generate)
    worker = make_worker(policy, head, tiny_tokenizer, **ENGINE)
    worker.submit(prompt_ids(tiny_tokenizer), policy, head, version=0, **sampling_kwargs(tiny_tokenizer))
    worker.close()
    [run] = runs
    assert run["done"]
    assert run["thread"] is not threading.current_thread() and run["thread"].name.startswith("bebop-rollouts")
    assert not run["thread"].is_alive()
    with pytest.raises(RuntimeError):
        worker.submit(prompt_ids(tiny_tokenizer), policy, head, version=1, **sampling_kwargs(tiny_tokenizer))


def patch_forward(policy, style, calls):
    """Patches `forward` on an instance the way trainers do, counting the calls that go through the patch."""
    if style == "partial":
        original = policy.forward

        def counting(forward, *args, **kwargs):
            calls.append(style)
            return forward(*args, **kwargs)

        policy.forward = functools.partial(counting, original)
        return policy
    if style == "bound_method":
        original = policy.forward  # the live model's forward, as TRL's fused log-prob forward closes over it

        def fused_forward(self, *args, **kwargs):
            calls.append(style)
            return original(*args, **kwargs)

        policy.forward = types.MethodType(fused_forward, policy)
        return policy
    lm_head = policy.get_output_embeddings()  # as TRL's cast of the lm_head to float32
    original = lm_head.forward

    def cast_forward(*args, **kwargs):
        calls.append(style)
        return original(*args, **kwargs)

    lm_head.forward = cast_forward
    return lm_head


@pytest.mark.parametrize("style", ["partial", "bound_method", "submodule"])
def test_snapshot_ignores_forward_patched_on_the_instance(
    policy_and_head, load_tiny, tiny_tokenizer, make_worker, style
):
    policy, head = policy_and_head
    ids = prompt_ids(tiny_tokenizer)
    unpatched = load_tiny("llama")  # the same weights, without any patch
    reference_head = copy.deepcopy(head).bind(unpatched, check_base_model=False)
    calls = []
    patched = patch_forward(policy, style, calls)
    worker = make_worker(policy, head, tiny_tokenizer, **ENGINE)
    worker.submit(ids, policy, head, version=0, **sampling_kwargs(tiny_tokenizer))
    rollout = worker.take(ids)
    # A deep copy keeps the instance's `forward`: the copy would call the patch (and, for a bound method closing
    # over the original, the live model itself).
    assert calls == []
    assert_same_output(rollout.output, generate_directly(unpatched, reference_head, tiny_tokenizer, ids))
    # The live policy keeps its patch, and the patch is live (the check above is not vacuous).
    assert "forward" in patched.__dict__
    with torch.no_grad():
        policy(input_ids=torch.tensor([ids[0]]))
    assert calls
