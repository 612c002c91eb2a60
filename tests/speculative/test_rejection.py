"""`rejection_sample` on fixed distributions: the output law is the target's, for both drafting modes."""

import pytest
import torch

from bebop_trl.speculative import rejection, rejection_sample, sample

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


def run(mode: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p, q = fixed_distributions()
    generator = torch.Generator().manual_seed(seed)
    if mode == "greedy":
        draft_tokens, draft_probs = q.argmax(-1).expand(ROWS, K), None
    else:
        draft_probs = q.expand(ROWS, K, VOCAB)
        draft_tokens = sample(draft_probs, generator)
    tokens, num_accepted = rejection_sample(draft_tokens, draft_probs, p.expand(ROWS, K + 1, VOCAB), generator)
    return tokens, num_accepted, p, q


@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_every_slot_follows_the_target(mode):
    tokens, num_accepted, p, _ = run(mode)
    for slot in range(K + 1):
        reached = num_accepted >= slot
        assert reached.sum() > 1000
        pvalue = chisquare_pvalue(tokens[reached, slot], p[slot])
        assert pvalue > 1e-4, f"slot {slot}: p-value {pvalue:.2e}"


@pytest.mark.parametrize("mode", ["probabilistic", "greedy"])
def test_wrong_residual_is_detected(mode, monkeypatch):
    # Negative control: sampling from p after a rejection over-represents the drafted tokens.
    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    tokens, _, p, _ = run(mode)
    assert chisquare_pvalue(tokens[:, 0], p[0]) < 1e-10


def test_output_layout():
    tokens, num_accepted, _, _ = run("probabilistic")
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


def test_identical_distributions_accept_everything_without_nan():
    p = torch.tensor([[0.5, 0.5, 0.0]]).expand(4, 3, 3).contiguous()
    draft = torch.tensor([[0, 1]]).expand(4, 2)
    tokens, num_accepted = rejection_sample(draft, p[:, :2], p)
    assert (num_accepted == 2).all()
    assert torch.isin(tokens[:, 2], torch.tensor([0, 1])).all()


def test_zero_residual_mass_falls_back_to_target():
    # p <= q everywhere up to rounding: the residual is all zero and must not produce NaN or an invalid token.
    p = torch.tensor([[[0.3, 0.7], [0.5, 0.5]]])
    q = torch.tensor([[[0.3, 0.7 + 1e-7]]])
    torch.manual_seed(0)
    for _ in range(50):
        tokens, _ = rejection_sample(torch.tensor([[1]]), q, p)
        assert tokens[0, 0] in (0, 1)
    assert torch.equal(rejection._residual_probs(p[:, 0], q[:, 0], torch.tensor([1])), p[:, 0])


def test_greedy_target_always_keeps_its_argmax():
    p = torch.zeros(8, 3, 5)
    p[:, 0, 2] = p[:, 1, 4] = p[:, 2, 0] = 1.0
    draft = torch.tensor([[2, 1]]).expand(8, 2)
    tokens, num_accepted = rejection_sample(draft, None, p)
    assert (num_accepted == 1).all()
    assert torch.equal(tokens, torch.tensor([[2, 4, -1]]).expand(8, 3))


def test_no_drafts_samples_the_target():
    p = torch.tensor([0.1, 0.2, 0.7]).expand(ROWS, 1, 3)
    tokens, num_accepted = rejection_sample(torch.empty(ROWS, 0, dtype=torch.long), None, p)
    assert tokens.shape == (ROWS, 1) and (num_accepted == 0).all()
    assert chisquare_pvalue(tokens[:, 0], p[0, 0]) > 1e-4


def test_generator_makes_draws_reproducible():
    first = run("probabilistic", seed=5)[0]
    second = run("probabilistic", seed=5)[0]
    assert torch.equal(first, second)
    assert not torch.equal(first, run("probabilistic", seed=6)[0])
