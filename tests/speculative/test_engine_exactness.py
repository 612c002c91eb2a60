"""The core promise: the engine's completions follow the policy's own law, whatever the head drafts.

A tiny policy with an 8-token vocabulary makes the joint law of the first three tokens enumerable (512 cells, 729
with EOS). Each test samples a few thousand completions per prompt from a ragged batch and runs a chi-square test
of every prompt's completions against that prompt's exact law.
"""

import pytest
import torch

from bebop_trl.rollout import left_pad
from bebop_trl.speculative import SpeculativeGenerator, rejection, slot_cache
from bebop_trl.speculative import engine as engine_module
from bebop_trl.speculative.draft_length import AdaptiveDraftLength, StepCosts
from bebop_trl.speculative.rollout_drafts import RolloutDrafter
from bebop_trl.testing import tiny_causal_lm

from .helpers import chisquare_pvalue, encode_sequences, exact_sequence_law, perturbed_head


VOCAB, NUM_TOKENS, EOS = 8, 3, 3
PROMPTS = [[4, 5], [6, 4, 7, 5, 6], [7]]
ROWS_PER_PROMPT, CALLS = 1024, 4


@pytest.fixture(scope="module")
def policy():
    return tiny_causal_lm("llama", seed=1, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def head(policy):
    return perturbed_head(policy, scale=0.1)


def sample_completions(
    engine: SpeculativeGenerator, seed: int, eos_token_id: int | None, max_batch_size: int | None = None, **sampling
) -> torch.Tensor:
    """[len(PROMPTS), ROWS_PER_PROMPT * CALLS] cell indices of sampled completions, grouped by prompt."""
    input_ids, attention_mask = left_pad([p for p in PROMPTS for _ in range(ROWS_PER_PROMPT)], pad_token_id=0)
    generator = torch.Generator().manual_seed(seed)
    cells = []
    for _ in range(CALLS):
        out = engine.generate(
            input_ids,
            attention_mask,
            max_new_tokens=NUM_TOKENS,
            eos_token_id=[] if eos_token_id is None else eos_token_id,
            generator=generator,
            max_batch_size=max_batch_size,
            **sampling,
        )
        mask = out.completion_mask
        if out.completion_ids.shape[1] < NUM_TOKENS:  # every row ended early
            pad = NUM_TOKENS - out.completion_ids.shape[1]
            out.completion_ids, mask = [torch.nn.functional.pad(t, (0, pad)) for t in (out.completion_ids, mask)]
        cells.append(encode_sequences(out.completion_ids, mask, VOCAB).view(len(PROMPTS), ROWS_PER_PROMPT))
    return torch.cat(cells, dim=1)


def pvalues(policy, engine, seed=0, eos_token_id=None, max_batch_size=None, **sampling) -> list[float]:
    cells = sample_completions(engine, seed, eos_token_id, max_batch_size, **sampling)
    laws = [exact_sequence_law(policy, p, NUM_TOKENS, eos_token_id=eos_token_id, **sampling) for p in PROMPTS]
    return [chisquare_pvalue(c, law) for c, law in zip(cells, laws, strict=True)]


CASES = {
    "probabilistic-T1-k1": ("probabilistic", 1, dict(temperature=1.0)),
    "greedy-T1-k1": ("greedy", 1, dict(temperature=1.0)),
    "probabilistic-T0.7-topk-k2": ("probabilistic", 2, dict(temperature=0.7, top_k=5)),
    "greedy-T0.7-topp-k2": ("greedy", 2, dict(temperature=0.7, top_p=0.8)),
    "probabilistic-topk-topp-k3": ("probabilistic", 3, dict(temperature=1.0, top_k=6, top_p=0.9)),
}


@pytest.fixture(scope="module")
def eagle3_head(policy):
    return perturbed_head(policy, scale=0.1, layout="eagle3", aux_layers=[0, 1])


@pytest.mark.parametrize("case", list(CASES))
def test_completions_follow_the_policy_law(policy, head, case):
    draft_sampling, k, sampling = CASES[case]
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=k, draft_sampling=draft_sampling)
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, **sampling), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


@pytest.mark.parametrize("case", ["probabilistic-T1-k1", "probabilistic-topk-topp-k3"])
def test_an_eagle3_heads_completions_follow_the_policy_law(policy, eagle3_head, case):
    draft_sampling, k, sampling = CASES[case]
    engine = SpeculativeGenerator(policy, eagle3_head, num_speculative_tokens=k, draft_sampling=draft_sampling)
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, **sampling), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_completions_with_eos_follow_the_policy_law(policy, head, draft_sampling):
    # Rows end at EOS at different cycles and leave the batch; the survivors must keep their own law.
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=2, draft_sampling=draft_sampling)
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, eos_token_id=EOS, temperature=1.0), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


def test_plain_sampling_follows_the_policy_law(policy):
    engine = SpeculativeGenerator(policy, head=None)
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, temperature=0.7, top_p=0.9), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_wrong_residual_is_detected(policy, head, draft_sampling, monkeypatch):
    # Negative control: the same test must reject an engine that resamples from p instead of norm(max(0, p - q)).
    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=1, draft_sampling=draft_sampling)
    assert max(pvalues(policy, engine, temperature=1.0)) < 1e-8


class CoinFlipDraftLength:
    """A draft-length policy that stops at random (its own generator, independent of the policy): every cycle
    length occurs in every batch, which a confidence rule averaged over a large batch would not give."""

    max_draft_tokens = 3

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.lengths: list[int] = []

    def keep_drafting(self, confidences) -> bool:
        if len(confidences) == 1:  # a new cycle: its length is drawn uniformly from 1..3
            self.lengths.append(int(torch.randint(1, self.max_draft_tokens + 1, (1,), generator=self.generator)))
        return len(confidences) < self.lengths[-1]

    def begin_cycle(self, batch_size) -> None:
        pass

    def update(self, confidences, num_accepted) -> None:
        pass

    def end_cycle(self, num_drafts, tokens, seconds) -> None:
        pass


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_completions_with_a_draft_length_chosen_per_cycle_follow_the_policy_law(policy, head, draft_sampling):
    draft_length = CoinFlipDraftLength()
    engine = SpeculativeGenerator(policy, head, 3, draft_sampling=draft_sampling, draft_length=draft_length)
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, temperature=1.0), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"
    assert set(draft_length.lengths) == {1, 2, 3}, draft_length.lengths


def test_a_wrong_residual_is_detected_with_a_draft_length_chosen_per_cycle(policy, head, monkeypatch):
    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    engine = SpeculativeGenerator(policy, head, 3, draft_length=CoinFlipDraftLength())
    assert max(pvalues(policy, engine, temperature=1.0)) < 1e-8


def test_the_confidence_rule_varies_the_draft_length_and_counts_every_draft(policy, head):
    # With these costs and a prior that never moves (acceptance = the head's top probability), one row drafts 1 to 3
    # tokens depending on the head's confidence at each cycle.
    draft_length = AdaptiveDraftLength(
        StepCosts(draft=0.05, verify=(1.0, 1.1, 1.2, 1.3)), prior_weight=1e9, fallback=False
    )
    engine = SpeculativeGenerator(policy, head, 3, draft_length=draft_length)
    input_ids, attention_mask = left_pad([PROMPTS[0]], pad_token_id=0)
    stats = engine.generate(
        input_ids, attention_mask, max_new_tokens=200, eos_token_id=[], generator=torch.Generator().manual_seed(0)
    ).stats
    drafted = stats.drafted_per_position.tolist()
    assert drafted[0] == stats.num_drafts and drafted[0] > drafted[1] > 0, drafted
    assert stats.num_draft_tokens == sum(drafted) == int(stats.draft_tokens_per_row.sum())
    assert 1.0 < stats.mean_draft_length < 3.0


# A draft vocabulary without token 1 and 7: q is 0 there, yet the output must keep the policy's mass on them.
DRAFT_VOCAB = [0, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_completions_with_a_draft_vocabulary_follow_the_policy_law(policy, draft_sampling):
    head = perturbed_head(policy, scale=0.1, draft_vocab=DRAFT_VOCAB)
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=2, draft_sampling=draft_sampling)
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, temperature=1.0), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_a_target_renormalised_over_the_draft_vocabulary_is_detected(policy, draft_sampling, monkeypatch):
    # Negative control: a verifier that renormalises p over the draft vocabulary (as the EAGLE losses do) never
    # emits tokens 1 and 7 from a cycle, so the law of the later tokens is off.
    inside = torch.zeros(VOCAB, dtype=torch.bool)
    inside[DRAFT_VOCAB] = True
    verify = engine_module.rejection_sample

    def renormalised(draft_tokens, draft_probs, target_probs, generator=None, **kwargs):
        target_probs = target_probs * inside
        return verify(
            draft_tokens, draft_probs, target_probs / target_probs.sum(-1, keepdim=True), generator, **kwargs
        )

    monkeypatch.setattr(engine_module, "rejection_sample", renormalised)
    head = perturbed_head(policy, scale=0.1, draft_vocab=DRAFT_VOCAB)
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=2, draft_sampling=draft_sampling)
    assert max(pvalues(policy, engine, temperature=1.0)) < 1e-8


# Continuous batching: 3072 rows through 96 at a time, ending at EOS after 1 to 3 tokens, so that rows are refilled
# at every cycle from a queue that mixes the three prompts.
BATCH = 96


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_continuous_batching_follows_the_policy_law(policy, head, draft_sampling):
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=2, draft_sampling=draft_sampling)
    for prompt, pvalue in zip(
        PROMPTS,
        pvalues(policy, engine, eos_token_id=EOS, max_batch_size=BATCH, temperature=1.0),
        strict=True,
    ):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


def test_a_refilled_row_that_keeps_the_old_rows_cache_is_detected(policy, head, monkeypatch):
    # Negative control: a row given to a new completion that kept the slots of the completion before it.
    load = slot_cache.SlotCache.load

    def stale_load(self, rows, keys, values, lengths):
        previous = self.lengths[rows].clone()
        load(self, rows, keys, values, lengths)
        self.lengths[rows] = torch.maximum(previous, lengths)

    monkeypatch.setattr(slot_cache.SlotCache, "load", stale_load)
    engine = SpeculativeGenerator(policy, head, num_speculative_tokens=2)
    assert max(pvalues(policy, engine, eos_token_id=EOS, max_batch_size=BATCH, temperature=1.0)) < 1e-8


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
@pytest.mark.parametrize("k", [2, 3])
def test_block_verification_follows_the_policy_law(policy, head, draft_sampling, k):
    engine = SpeculativeGenerator(
        policy, head, num_speculative_tokens=k, draft_sampling=draft_sampling, rejection_sample_method="block"
    )
    for prompt, pvalue in zip(PROMPTS, pvalues(policy, engine, temperature=1.0), strict=True):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"


def rollout_drafter() -> RolloutDrafter:
    # One-token contexts match at once in an 8-token vocabulary, so rollout drafts run from the first cycles.
    return RolloutDrafter(min_match=1, max_match=3)


@pytest.mark.parametrize("with_head", [True, False])
def test_rollout_drafts_follow_the_policy_law(policy, head, with_head):
    drafter = rollout_drafter()
    engine = SpeculativeGenerator(
        policy, head if with_head else None, num_speculative_tokens=2, rollout_drafter=drafter
    )
    for prompt, pvalue in zip(
        PROMPTS,
        pvalues(policy, engine, eos_token_id=EOS, max_batch_size=BATCH, temperature=1.0),
        strict=True,
    ):
        assert pvalue > 1e-4, f"prompt {prompt}: chi-square p-value {pvalue:.2e}"
    # Both sources drafted, and rollout drafts were accepted (the drafter learnt from them).
    assert drafter.rollout_acceptance.verified.sum() > 1000
    if with_head:
        assert drafter.head_acceptance.verified.sum() > 1000


def test_rollout_drafts_verified_as_if_sampled_are_detected(policy, head, monkeypatch):
    # Negative control: rollout drafts verified with min(1, p/q) against a spread-out q instead of a one-hot one.
    as_drafts = engine_module._RolloutProposals.as_drafts

    def spread(self, vocab_size):
        drafts = as_drafts(self, vocab_size)
        drafts.probs = 0.5 * drafts.probs + 0.5 / vocab_size
        return drafts

    monkeypatch.setattr(engine_module._RolloutProposals, "as_drafts", spread)
    engine = SpeculativeGenerator(policy, None, num_speculative_tokens=2, rollout_drafter=rollout_drafter())
    assert max(pvalues(policy, engine, eos_token_id=EOS, max_batch_size=BATCH, temperature=1.0)) < 1e-8
