"""The draft-length policy: its decision is the exact marginal rule of the cost model, and it learns acceptance."""

import pytest
import torch

from bebop_trl.speculative.draft_length import AdaptiveDraftLength, StepCosts


COSTS = StepCosts(draft=0.1, verify=(1.0, 1.1, 1.2, 1.3, 1.4))


def brute_force_best_length(acceptance: list[float], costs: StepCosts) -> int:
    """The draft length that maximises expected tokens per unit cost, with the acceptances known in advance."""
    best, best_rate = 1, 0.0
    for length in range(1, costs.max_draft_tokens + 1):
        survival, expected = 1.0, 1.0
        for a in acceptance[:length]:
            survival *= a
            expected += survival
        rate = expected / costs.cycle(length)
        if rate > best_rate:
            best, best_rate = length, rate
    return best


def drafted_length(policy: AdaptiveDraftLength, confidence: float) -> int:
    confidences = [torch.tensor([confidence])]
    while policy.keep_drafting(confidences):
        confidences.append(torch.tensor([confidence]))
    return len(confidences)


@pytest.mark.parametrize("confidence", [0.05, 0.3, 0.55, 0.75, 0.95])
def test_stops_where_the_cost_model_is_best(confidence):
    # The prior predicts the top probability itself (bin centres), so a constant confidence means a known acceptance.
    policy = AdaptiveDraftLength(COSTS, num_bins=20)
    acceptance = policy.predicted_acceptance(torch.tensor([confidence])).item()
    assert drafted_length(policy, confidence) == brute_force_best_length([acceptance] * 4, COSTS)


def test_confident_heads_draft_more_and_cheap_verification_drafts_more():
    policy = AdaptiveDraftLength(COSTS)
    lengths = [drafted_length(policy, c) for c in (0.05, 0.5, 0.95)]
    assert lengths[0] <= lengths[1] <= lengths[2] and lengths[0] < lengths[2]
    expensive = AdaptiveDraftLength(StepCosts(draft=0.25, verify=(1.0, 1.5, 2.0, 2.5, 3.0)))
    assert drafted_length(expensive, 0.7) < drafted_length(AdaptiveDraftLength(COSTS), 0.7)


def test_never_drafts_past_the_costs_it_knows():
    policy = AdaptiveDraftLength(StepCosts(draft=0.0, verify=(1.0, 1.0, 1.0)))
    assert drafted_length(policy, 0.99) == 2


def test_update_learns_the_acceptance_of_a_confidence_bin():
    policy = AdaptiveDraftLength(COSTS, num_bins=10, prior_weight=1.0)
    confidence = torch.full((1000, 3), 0.92)
    # Drafts of top probability 0.92 are accepted 30% of the time, independently at each position.
    generator = torch.Generator().manual_seed(0)
    passes = torch.rand(1000, 3, generator=generator) < 0.3
    num_accepted = torch.where(passes.all(-1), 3, (~passes).int().argmax(-1))
    policy.update(confidence, num_accepted)
    predicted = policy.predicted_acceptance(torch.tensor([0.92])).item()
    assert predicted == pytest.approx(0.3, abs=0.04)
    # Only verified drafts count: a rejection hides the drafts after it.
    verified = int((torch.arange(3) <= num_accepted.unsqueeze(-1)).sum())
    assert policy.verified[9].item() == pytest.approx(1.0 + verified)


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="Step costs must be positive"):
        StepCosts(draft=0.1, verify=())
    with pytest.raises(ValueError, match="Step costs must be positive"):
        StepCosts(draft=-1.0, verify=(1.0, 1.2))
