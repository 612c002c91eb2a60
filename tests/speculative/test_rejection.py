"""`rejection_sample` on fixed distributions: the output law is the target's, for both verification methods, both
drafting modes and a number of drafts set per row."""

import pytest
import torch

from bebop_trl.speculative import rejection, rejection_sample, sample
from bebop_trl.speculative.rejection import REJECTION_SAMPLE_METHODS

from .helpers import binomial_z, chisquare_pvalue


VOCAB, K, ROWS = 6, 3, 100_000


def fixed_distributions() -> tuple[torch.Tensor, torch.Tensor]:
    """Target p [K + 1, V] and draft q [K, V] that overlap partly; q drafts a token p excludes, and vice versa."""
    p = torch.tensor(
        [
            [0.10, 0.05, 0.30, 0.15, 0.40, 0.00],
            [0.20, 0.10, 0.05, 0.35, 0.10, 0.20],
            [0.05, 0.45, 0.10, 0.10, 0.20, 0.10],
            [0.30, 0.10, 0.10, 0.20, 0.25, 0.05],
        ]
    )
    q = torch.tensor(
        [
            [0.05, 0.10, 0.15, 0.10, 0.50, 0.10],
            [0.10, 0.30, 0.05, 0.40, 0.00, 0.15],
            [0.10, 0.50, 0.10, 0.05, 0.15, 0.10],
        ]
    )
    return p, q


def run(
    mode: str, seed: int = 1, method: str = "standard", num_drafts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p, q = fixed_distributions()
    generator = torch.Generator().manual_seed(seed)
    if mode == "greedy":
        draft_tokens, draft_probs = q.argmax(-1).expand(ROWS, K), None
    else:
        draft_probs = q.expand(ROWS, K, VOCAB)
        draft_tokens = sample(draft_probs, generator)
    tokens, num_accepted = rejection_sample(
        draft_tokens, draft_probs, p.expand(ROWS, K + 1, VOCAB), generator, num_drafts=num_drafts, method=method
    )
    return tokens, num_accepted, p, q


def ragged_num_drafts() -> torch.Tensor:
    """[ROWS] every number of drafts from 0 to K, a quarter of the rows each."""
    return torch.arange(ROWS) % (K + 1)


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_every_slot_follows_the_target(mode, method):
    tokens, num_accepted, p, _ = run(mode, method=method)
    for slot in range(K + 1):
        reached = num_accepted >= slot
        assert reached.sum() > 1000
        pvalue = chisquare_pvalue(tokens[reached, slot], p[slot])
        assert pvalue > 1e-4, f"slot {slot}: p-value {pvalue:.2e}"


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_wrong_residual_is_detected(mode, method, monkeypatch):
    # Negative control: sampling from p after a rejection over-represents the drafted tokens.
    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    tokens, _, p, _ = run(mode, method=method)
    assert chisquare_pvalue(tokens[:, 0], p[0]) < 1e-10


def test_block_stop_probability_equal_to_the_weight_is_detected(monkeypatch):
    # Negative control: stopping at every position with probability w_i, as if it were the last draft, keeps too
    # many drafts.
    stop_probs = rejection._block_stop_probs

    def weight_as_stop_probs(draft_tokens, draft_probs, target_probs, num_drafts):
        weights, _ = stop_probs(draft_tokens, draft_probs, target_probs, num_drafts)
        is_draft = torch.arange(1, draft_tokens.shape[1] + 1) <= num_drafts.unsqueeze(-1)
        return weights, torch.where(is_draft, weights[:, 1:], 0.0)

    monkeypatch.setattr(rejection, "_block_stop_probs", weight_as_stop_probs)
    tokens, num_accepted, p, _ = run("probabilistic", method="block")
    pvalues = [chisquare_pvalue(tokens[num_accepted >= slot, slot], p[slot]) for slot in range(K + 1)]
    assert min(pvalues) < 1e-8, pvalues


def test_block_residual_without_the_weight_is_detected(monkeypatch):
    # Negative control: the standard residual max(0, p - q) in place of max(0, w p - q) after a partial block (with
    # greedy drafts w cancels out of the normalised residual, so only probabilistic drafts can tell).
    next_token_probs = rejection._next_token_probs
    monkeypatch.setattr(rejection, "_next_token_probs", lambda *args: next_token_probs(*args[:5]))
    tokens, num_accepted, p, _ = run("probabilistic", method="block")
    pvalues = [chisquare_pvalue(tokens[num_accepted >= slot, slot], p[slot]) for slot in range(K + 1)]
    assert min(pvalues) < 1e-8, pvalues


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_output_layout(method):
    tokens, num_accepted, _, _ = run("probabilistic", method=method)
    slots = torch.arange(K + 1)
    emitted = slots <= num_accepted.unsqueeze(-1)
    assert ((tokens >= 0) == emitted).all()
    assert (tokens[emitted] < VOCAB).all()
    assert num_accepted.min() == 0 and num_accepted.max() == K


@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_first_slot_acceptance_converges(mode):
    _, num_accepted, p, q = run(mode, seed=2)
    expected = torch.minimum(p[0], q[0]).sum() if mode == "probabilistic" else p[0, q[0].argmax()]
    accepted = int((num_accepted >= 1).sum())
    assert abs(binomial_z(accepted, ROWS, float(expected))) < 5


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_identical_distributions_accept_everything_without_nan(method):
    p = torch.tensor([[0.5, 0.5, 0.0]]).expand(4, 3, 3).contiguous()
    draft = torch.tensor([[0, 1]]).expand(4, 2)
    tokens, num_accepted = rejection_sample(draft, p[:, :2], p, method=method)
    assert (num_accepted == 2).all()
    assert torch.isin(tokens[:, 2], torch.tensor([0, 1])).all()


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_zero_residual_mass_falls_back_to_target(method):
    # p <= q everywhere up to rounding: the residual is all zero and must not produce NaN or an invalid token.
    p = torch.tensor([[[0.3, 0.7], [0.5, 0.5]]])
    q = torch.tensor([[[0.3, 0.7 + 1e-7]]])
    torch.manual_seed(0)
    for _ in range(50):
        tokens, _ = rejection_sample(torch.tensor([[1]]), q, p, method=method)
        assert tokens[0, 0] in (0, 1)
    assert torch.equal(rejection._residual_probs(p[:, 0], q[:, 0], torch.tensor([1])), p[:, 0])


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_greedy_target_always_keeps_its_argmax(method):
    p = torch.zeros(8, 3, 5)
    p[:, 0, 2] = p[:, 1, 4] = p[:, 2, 0] = 1.0
    draft = torch.tensor([[2, 1]]).expand(8, 2)
    tokens, num_accepted = rejection_sample(draft, None, p, method=method)
    assert (num_accepted == 1).all()
    assert torch.equal(tokens, torch.tensor([[2, 4, -1]]).expand(8, 3))


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_no_drafts_samples_the_target(method):
    p = torch.tensor([0.1, 0.2, 0.7]).expand(ROWS, 1, 3)
    tokens, num_accepted = rejection_sample(torch.empty(ROWS, 0, dtype=torch.long), None, p, method=method)
    assert tokens.shape == (ROWS, 1) and (num_accepted == 0).all()
    assert chisquare_pvalue(tokens[:, 0], p[0, 0]) > 1e-4


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_generator_makes_draws_reproducible(method):
    first = run("probabilistic", seed=5, method=method)[0]
    second = run("probabilistic", seed=5, method=method)[0]
    assert torch.equal(first, second)
    assert not torch.equal(first, run("probabilistic", seed=6, method=method)[0])


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_ragged_drafts_follow_the_target_with_the_bonus_from_the_slot_after_the_last_draft(mode, method):
    num_drafts = ragged_num_drafts()
    tokens, num_accepted, p, _ = run(mode, method=method, num_drafts=num_drafts)
    assert (num_accepted <= num_drafts).all()
    for slot in range(K + 1):
        reached = num_accepted >= slot
        pvalue = chisquare_pvalue(tokens[reached, slot], p[slot])
        assert pvalue > 1e-4, f"slot {slot}: p-value {pvalue:.2e}"
    for drafts in range(K + 1):
        bonus = tokens[(num_drafts == drafts) & (num_accepted == drafts), drafts]
        assert len(bonus) > 1000
        pvalue = chisquare_pvalue(bonus, p[drafts])
        assert pvalue > 1e-4, f"{drafts} drafts: bonus p-value {pvalue:.2e}"
        if drafts < K:  # the test tells slot `drafts` from slot K apart
            assert chisquare_pvalue(bonus, p[K]) < 1e-8


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_padding_drafts_are_never_accepted(mode, method):
    # Padding drafts the target's most likely tokens from q = p, which would pass (almost) always if read.
    p, q = fixed_distributions()
    num_drafts = ragged_num_drafts()
    generator = torch.Generator().manual_seed(3)
    is_padding = (torch.arange(K) >= num_drafts.unsqueeze(-1)).unsqueeze(-1)
    draft_probs = torch.where(is_padding, p[:K], q).contiguous()
    draft_tokens = torch.where(is_padding.squeeze(-1), p[:K].argmax(-1), sample(draft_probs, generator))
    if mode == "greedy":
        draft_tokens, draft_probs = torch.where(is_padding.squeeze(-1), draft_tokens, q.argmax(-1)), None
    tokens, num_accepted = rejection_sample(
        draft_tokens, draft_probs, p.expand(ROWS, K + 1, VOCAB), generator, num_drafts=num_drafts, method=method
    )
    assert (num_accepted <= num_drafts).all()
    assert ((tokens >= 0) == (torch.arange(K + 1) <= num_accepted.unsqueeze(-1))).all()


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_padding_probabilities_are_never_read(mode, method):
    # NaN in the padding drafts' q and in the target slots after the bonus slot change no draw.
    p, q = fixed_distributions()
    rows = 1000
    num_drafts = torch.arange(rows) % (K + 1)
    draft_tokens = sample(q.expand(rows, K, VOCAB), torch.Generator().manual_seed(0))
    outputs = []
    for padding in (0.0, float("nan")):
        draft_probs = q.expand(rows, K, VOCAB).clone()
        target_probs = p.expand(rows, K + 1, VOCAB).clone()
        draft_probs[torch.arange(K) >= num_drafts.unsqueeze(-1)] = padding
        target_probs[torch.arange(K + 1) > num_drafts.unsqueeze(-1)] = padding
        draft_probs = None if mode == "greedy" else draft_probs
        generator = torch.Generator().manual_seed(4)
        outputs.append(
            rejection_sample(draft_tokens, draft_probs, target_probs, generator, num_drafts=num_drafts, method=method)
        )
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert (outputs[0][1] <= num_drafts).all()


@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_zero_drafts_sample_the_first_target_slot(mode, method):
    tokens, num_accepted, p, _ = run(mode, method=method, num_drafts=torch.zeros(ROWS, dtype=torch.long))
    assert (num_accepted == 0).all() and (tokens[:, 1:] == -1).all()
    assert chisquare_pvalue(tokens[:, 0], p[0]) > 1e-4


def test_unknown_method_is_rejected():
    p = torch.full((2, 2, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"method must be one of \('standard', 'block'\), got 'tree'"):
        rejection_sample(torch.zeros(2, 1, dtype=torch.long), None, p, method="tree")


@pytest.mark.parametrize(
    ("num_drafts", "message"),
    [
        (torch.tensor([[1], [1]]), r"\[B\] = \[2\] integer tensor, got torch.int64 of shape \(2, 1\)"),
        (torch.tensor([1, 1, 1]), r"\[B\] = \[2\] integer tensor, got torch.int64 of shape \(3,\)"),
        (torch.tensor([1.0, 1.0]), r"integer tensor, got torch.float32"),
        (torch.tensor([-1, 1]), r"in \[0, k\] = \[0, 2\], got values from -1 to 1"),
        (torch.tensor([0, 3]), r"in \[0, k\] = \[0, 2\], got values from 0 to 3"),
    ],
)
def test_bad_num_drafts_is_rejected(num_drafts, message):
    p = torch.full((2, 3, 3), 1 / 3)
    with pytest.raises(ValueError, match=message):
        rejection_sample(torch.zeros(2, 2, dtype=torch.long), None, p, num_drafts=num_drafts)
