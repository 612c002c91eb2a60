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


def run_cycles(
    policy: AdaptiveDraftLength, seconds_of: dict[int, float], cycles: int, acceptance: float = 0.5, seed: int = 0
) -> list[int]:
    """Drives `cycles` cycles of one row at confidence 0.5, where a cycle of j drafts takes `seconds_of[j]` and each
    draft is accepted with probability `acceptance` once the earlier ones were; returns each cycle's draft length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(cycles):
        policy.begin_cycle(batch_size=1)
        length = drafted_length(policy, 0.5)
        passes = torch.rand(length, generator=generator) < acceptance
        num_accepted = int(passes.int().cumprod(0).sum())
        policy.update(torch.full((1, length), 0.5), torch.tensor([num_accepted]))
        policy.end_cycle(length, tokens=num_accepted + 1, seconds=seconds_of[length])
        lengths.append(length)
    return lengths


def test_fallback_drafts_mostly_at_the_fastest_measured_length():
    # Whatever the calibrated costs say, k = 1 is measured fastest here: 1.5 tokens in 1 s, against 1.75 in 3 s for
    # k = 2 and less for longer drafts.
    policy = AdaptiveDraftLength(COSTS, exploration=0.1)
    lengths = run_cycles(policy, {1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}, cycles=400)
    assert set(lengths[:20]) == {1, 2, 3, 4}  # the arms take turns until each is measured
    share = (torch.tensor(lengths[100:]) == 1).double().mean().item()
    assert share >= 0.85, share  # the fastest, but for the exploration share of cycles
    rates = policy.rates()
    assert max(rates, key=rates.get) == "k=1"
    # Fixed lengths' rates: expected tokens per cycle from the acceptance per position, over the timed seconds.
    assert rates["k=1"] == pytest.approx(1.5, rel=0.2) and rates["k=3"] == pytest.approx(1.875 / 5, rel=0.2)


def test_fallback_follows_a_change_of_costs():
    policy = AdaptiveDraftLength(COSTS, memory=0.5)
    run_cycles(policy, {1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}, cycles=200)
    # Long drafts became cheap: k = 4 (or the rule, which then drafts 4) is fastest. A length's timing only moves at
    # the cycles of that length, one in 30 for each arm checked, so the choice climbs over some hundreds of cycles.
    lengths = run_cycles(policy, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}, cycles=1500, seed=1)
    assert (torch.tensor(lengths[-200:]) == 4).double().mean().item() >= 0.85


def test_the_nearest_measured_batch_size_stands_for_an_unmeasured_one():
    policy = AdaptiveDraftLength(COSTS)
    run_cycles(policy, {1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}, cycles=200)
    choices = []
    for _ in range(10):
        policy.begin_cycle(batch_size=3)
        choices.append(policy.arm)
        policy.end_cycle(1, tokens=2, seconds=1.0)
    # Batch 1's choice (k = 1, or the rule, which drafts 1 there) but for one exploration cycle, not the arms in turn.
    assert choices.count(1) + choices.count(None) >= 9, choices


def test_without_fallback_the_rule_drafts_every_cycle():
    policy = AdaptiveDraftLength(COSTS, num_bins=20, prior_weight=1e9, fallback=False)  # a table that never moves
    expected = brute_force_best_length([policy.predicted_acceptance(torch.tensor([0.5])).item()] * 4, COSTS)
    assert policy.arms == [None]
    assert set(run_cycles(policy, {j: 1.0 for j in range(1, 5)}, cycles=50)) == {expected}
    assert set(policy.rates()) == {"rule"}


def test_measured_cycle_costs_replace_the_calibrated_ones_per_batch_size():
    policy = AdaptiveDraftLength(StepCosts(draft=0.1, verify=(1.0, 1.1, 1.2)), fallback=False)
    policy.begin_cycle(batch_size=8)
    assert policy.cycle_cost(2) == pytest.approx(1.2 + 0.2)  # calibrated until every length is timed
    for _ in range(3):
        for length, seconds in ((1, 0.5), (2, 2.0)):
            policy.begin_cycle(batch_size=8)
            policy.end_cycle(length, tokens=length + 1, seconds=seconds)
    policy.begin_cycle(batch_size=8)
    assert (policy.cycle_cost(1), policy.cycle_cost(2)) == (pytest.approx(0.5), pytest.approx(2.0))
    # With long drafts measured this dear, a confident head stops at one draft, where the calibration drafted two.
    assert drafted_length(policy, 0.95) == 1
    policy.begin_cycle(batch_size=1)  # another batch size has its own timings, none yet
    assert policy.cycle_cost(2) == pytest.approx(1.4) and drafted_length(policy, 0.95) == 2


@pytest.mark.parametrize("kwargs", [{"exploration": 0.0}, {"exploration": 1.0}, {"memory": 1.0}, {"memory": 0.0}])
def test_bad_fallback_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="exploration and memory"):
        AdaptiveDraftLength(COSTS, **kwargs)
