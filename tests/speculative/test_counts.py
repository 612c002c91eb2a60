"""AcceptanceCounts: arithmetic, the gather tensor, rates and metrics, and agreement with the engine's statistics."""

import pytest
import torch

from bebop_trl import SpeculativeGenerator
from bebop_trl.speculative import AcceptanceCounts
from bebop_trl.testing import perturbed_head


def test_counts_add_and_subtract_with_positions_padded():
    a = AcceptanceCounts(4, 12, 5, [3, 2])
    b = AcceptanceCounts(2, 6, 3, [2, 0, 1])
    assert a + b == AcceptanceCounts(6, 18, 8, [5, 2, 1])
    assert (a + b) - b == AcceptanceCounts(4, 12, 5, [3, 2, 0])
    assert a - AcceptanceCounts() == a


def test_tensor_round_trip_and_sum_of_gathered_tensors():
    a, b = AcceptanceCounts(4, 12, 5, [3, 2, 0]), AcceptanceCounts(2, 6, 3, [2, 1, 0])
    gathered = torch.stack([a.as_tensor(3), b.as_tensor(3)])
    assert gathered.dtype == torch.float64 and gathered.shape == (2, 9)
    assert AcceptanceCounts.from_tensor(gathered.sum(0)) == a + b
    # Cut or padded to k positions.
    assert a.as_tensor(2).tolist() == [4, 12, 5, 0, 0, 0, 3, 2]
    assert AcceptanceCounts(1, 1, 1, [1]).as_tensor(3).tolist() == [1, 1, 1, 0, 0, 0, 1, 0, 0]
    # Rollout drafts travel too.
    c = AcceptanceCounts(5, 15, 6, [3, 2, 1], 2, 5, 3)
    assert AcceptanceCounts.from_tensor(c.as_tensor(3)) == c
    assert c.metrics()["rollout_draft_share"] == pytest.approx(0.4)
    assert c.metrics()["rollout_draft_acceptance_rate"] == pytest.approx(0.6)


def test_rates_and_metrics():
    counts = AcceptanceCounts(
        num_drafts=4, num_draft_tokens=12, num_accepted_tokens=6, accepted_per_position=[3, 2, 1]
    )
    assert counts.acceptance_rate == pytest.approx(0.5)
    assert counts.accepted_drafts_per_cycle == pytest.approx(1.5)
    assert counts.acceptance_per_position == pytest.approx([0.75, 0.5, 0.25])
    assert counts.metrics("rollout/") == pytest.approx(
        {
            "rollout/draft_tokens": 12.0,
            "rollout/acceptance_rate": 0.5,
            "rollout/accepted_drafts_per_cycle": 1.5,
            "rollout/acceptance_position_1": 0.75,
            "rollout/acceptance_position_2": 0.5,
            "rollout/acceptance_position_3": 0.25,
        }
    )
    empty = AcceptanceCounts()
    assert empty.acceptance_rate == empty.accepted_drafts_per_cycle == 0.0 and empty.acceptance_per_position == []


def test_the_engines_statistics_report_the_same_counts(load_tiny):
    policy = load_tiny("llama")
    engine = SpeculativeGenerator(policy, perturbed_head(policy, scale=0.05), num_speculative_tokens=3)
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    stats = engine.generate(
        prompt, torch.ones_like(prompt), max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0)
    ).stats
    counts = stats.counts
    assert counts.num_drafts == stats.num_drafts > 0
    assert counts.num_draft_tokens == stats.num_draft_tokens
    assert counts.num_accepted_tokens == stats.num_accepted_tokens == sum(counts.accepted_per_position)
    assert counts.acceptance_per_position == pytest.approx(stats.acceptance_per_position.tolist())
    assert counts.acceptance_rate == stats.acceptance_rate
