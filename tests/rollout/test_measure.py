"""The side-by-side speed measurement: same batches for every engine, an untimed warm-up, continuous batching."""

import pytest

from bebop_trl import SpeculativeGenerator
from bebop_trl.rollout.measure import compare_engine_speeds
from bebop_trl.speculative import RolloutDrafter


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_engines_run_the_same_batches_after_an_untimed_warm_up(load_tiny, tiny_tokenizer):
    policy = load_tiny("llama")
    drafter = RolloutDrafter()
    engines = {
        "plain": SpeculativeGenerator(policy),
        "rollouts": SpeculativeGenerator(policy, None, 3, rollout_drafter=drafter),
    }
    prompt, warmup_prompt = tiny_tokenizer("abcab")["input_ids"], tiny_tokenizer("xyz")["input_ids"]
    measured = compare_engine_speeds(
        engines,
        tiny_tokenizer,
        [[prompt] * 4, [prompt] * 4],
        repeats=2,
        max_new_tokens=6,
        temperature=0.0,
        seed=0,
        warmup_batches=[[warmup_prompt] * 2],
        max_batch_size=2,
    )
    assert set(measured["speedup"]) == {"rollouts"} and len(measured["speedup_per_repeat"]["rollouts"]) == 2
    # Greedy decoding: both engines emit the same tokens, and only the 16 timed completions count.
    assert measured["plain"]["tokens"] == measured["rollouts"]["tokens"] <= 16 * 6
    assert len(drafter.history(warmup_prompt)) == 2  # the warm-up ran, untimed
    # Every completion after the first of a prompt drafts from the others; greedy one-hot drafts of identical
    # completions are all accepted.
    rollouts = measured["rollouts"]
    assert rollouts["num_drafts"] > 0 and rollouts["rollout_draft_share"] == 1.0
    assert rollouts["rollout_acceptance_rate"] == 1.0 and rollouts["rollout_accepted_per_cycle"] >= 1.0
    assert "rollout_draft_share" not in measured["plain"]
