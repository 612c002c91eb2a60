"""Exact laws of verification on trees of context-dependent distributions small enough to enumerate.

The target p after each prefix of drafts and the draft q after each prefix are fixed random distributions over a
few tokens. Enumerating every draft block gives the exact law of the verifier's output (accepted drafts, then the
next token); completing that output with tokens sampled from p must give p's own law of k + 1 tokens. The verifiers
are written here as plain loops over the method's formulas, and the library's block verification is checked
against them through its stop probabilities and next-token laws.
"""

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from bebop_trl.speculative import rejection, rejection_sample, sample
from bebop_trl.speculative.rejection import REJECTION_SAMPLE_METHODS


VOCAB, K = 4, 3
MODES = ("probabilistic", "greedy")

# A distribution after each prefix (a tuple of token ids).
Tree = dict[tuple[int, ...], torch.Tensor]
# Per draft block: (P(τ = t | block), law of the next token given τ = t) for t = 0..γ.
Outcomes = list[tuple[float, torch.Tensor]]


def prefixes(length: int, vocab: int = VOCAB) -> list[tuple[int, ...]]:
    return list(itertools.product(range(vocab), repeat=length))


def vocab_size(tree: Tree) -> int:
    return len(tree[()])


def random_trees(seed: int, mode: str) -> tuple[Tree, Tree]:
    """Target p after every prefix of 0..K tokens and draft q after every prefix of 0..K - 1 tokens (float64).

    About a quarter of the entries are 0, so that drafts the target excludes and target tokens the draft never
    proposes both occur; greedy q is one-hot on its most likely token.
    """
    generator = torch.Generator().manual_seed(seed)

    def distribution() -> torch.Tensor:
        weights = torch.rand(VOCAB, generator=generator, dtype=torch.float64) ** 2
        kept = torch.rand(VOCAB, generator=generator) > 0.25
        kept[weights.argmax()] = True
        weights = weights * kept
        return weights / weights.sum()

    p = {prefix: distribution() for length in range(K + 1) for prefix in prefixes(length)}
    q = {prefix: distribution() for length in range(K) for prefix in prefixes(length)}
    if mode == "greedy":
        q = {prefix: torch.eye(VOCAB, dtype=torch.float64)[law.argmax()] for prefix, law in q.items()}
    return p, q


def constant_trees(p: list[float], q: list[float], k: int) -> tuple[Tree, Tree]:
    """Trees whose target and draft are the same after every prefix."""
    vocab = len(p)
    target = {prefix: torch.tensor(p, dtype=torch.float64) for n in range(k + 1) for prefix in prefixes(n, vocab)}
    draft = {prefix: torch.tensor(q, dtype=torch.float64) for n in range(k) for prefix in prefixes(n, vocab)}
    return target, draft


def reference_outcomes(block: tuple[int, ...], p: Tree, q: Tree, method: str) -> Outcomes:
    """The verifier's law on one draft block, from the method's formulas (γ = len(block))."""
    num_drafts = len(block)
    target = [p[block[:j]] for j in range(num_drafts + 1)]
    draft = [q[block[:j]] for j in range(num_drafts)]
    ratios = [float(target[i][x] / draft[i][x]) for i, x in enumerate(block)]
    if method == "standard":
        # P(τ = t) = (prod_{i <= t} a_i) (1 - a_{t+1}), a_i = min(1, p(x_i) / q(x_i)); the residual has weight 1.
        accept = [min(1.0, ratio) for ratio in ratios]
        stops = [math.prod(accept[:t]) * (1 - accept[t]) for t in range(num_drafts)] + [math.prod(accept)]
        weights = [1.0] * (num_drafts + 1)
    else:
        weights = [1.0]
        for ratio in ratios:
            weights.append(min(1.0, weights[-1] * ratio))
        # τ is the last position i that may end the block, each independently with probability h_i; h_0 = 1.
        stop_probs = [1.0]
        for i in range(1, num_drafts):
            mass = float((weights[i] * target[i] - draft[i]).clamp_min(0).sum())
            stop_probs.append(mass / (mass + 1 - weights[i]) if mass > 0 else 0.0)
        if num_drafts > 0:
            stop_probs.append(weights[num_drafts])
        stops = [stop_probs[t] * math.prod(1 - h for h in stop_probs[t + 1 :]) for t in range(num_drafts + 1)]
    outcomes = []
    for t, stop in enumerate(stops):
        law = target[t]
        if t < num_drafts:
            residual = (weights[t] * target[t] - draft[t]).clamp_min(0)
            law = residual / residual.sum() if residual.sum() > 0 else law
        outcomes.append((stop, law))
    return outcomes


def draft_blocks(q: Tree, num_drafts: int) -> dict[tuple[int, ...], float]:
    """Every draft block of `num_drafts` tokens the draft can produce, with its probability."""
    blocks = {
        block: math.prod(float(q[block[:j]][x]) for j, x in enumerate(block))
        for block in prefixes(num_drafts, vocab_size(q))
    }
    return {block: probability for block, probability in blocks.items() if probability > 0}


def output_law(
    q: Tree, num_drafts: int, outcomes: Callable[[tuple[int, ...]], Outcomes]
) -> dict[tuple[int, ...], float]:
    """Exact law of the verifier's output (accepted drafts, then the next token) over all draft blocks."""
    law: dict[tuple[int, ...], float] = {}
    for block, probability in draft_blocks(q, num_drafts).items():
        for t, (stop, next_law) in enumerate(outcomes(block)):
            if stop == 0:  # the next-token law of an impossible stop is arbitrary
                continue
            for token in range(vocab_size(q)):
                output = (*block[:t], token)
                law[output] = law.get(output, 0.0) + probability * stop * float(next_law[token])
    return law


def completed_law(law: dict[tuple[int, ...], float], p: Tree) -> torch.Tensor:
    """[V ** (K + 1)] law of the output completed to K + 1 tokens by sampling p after it, in lexicographic order."""

    def target_probability(sequence: tuple[int, ...], start: int) -> float:
        return math.prod(float(p[sequence[:j]][sequence[j]]) for j in range(start, K + 1))

    return torch.tensor(
        [
            sum(law.get(sequence[:n], 0.0) * target_probability(sequence, n) for n in range(K + 2))
            for sequence in prefixes(K + 1)
        ],
        dtype=torch.float64,
    )


def target_law(p: Tree) -> torch.Tensor:
    """[V ** (K + 1)] p's law of K + 1 tokens, in lexicographic order."""
    return completed_law({(): 1.0}, p)


def accepted_moment(
    q: Tree, num_drafts: int, outcomes: Callable[[tuple[int, ...]], Outcomes], order: int = 1
) -> float:
    """E[num_accepted ** order] over all draft blocks."""
    return sum(
        probability * sum(t**order * stop for t, (stop, _) in enumerate(outcomes(block)))
        for block, probability in draft_blocks(q, num_drafts).items()
    )


def implementation_outcomes(p: Tree, q: Tree, mode: str) -> dict[tuple[int, ...], Outcomes]:
    """The library's block verification on every draft block of 0..K drafts, batched with ragged `num_drafts`.

    P(τ = t) = h_t prod_{j > t} (1 - h_j) is the law of the last position whose uniform falls below its stop
    probability h (h_0 = 1, j up to K); the next-token law is the library's. Padding holds NaN, which must never be
    read.
    """
    blocks = [block for num_drafts in range(K + 1) for block in draft_blocks(q, num_drafts)]
    num_drafts = torch.tensor([len(block) for block in blocks])
    draft_tokens = torch.zeros(len(blocks), K, dtype=torch.long)
    draft_probs = torch.full((len(blocks), K, VOCAB), float("nan"))
    target_probs = torch.full((len(blocks), K + 1, VOCAB), float("nan"))
    for row, block in enumerate(blocks):
        draft_tokens[row, : len(block)] = torch.tensor(block, dtype=torch.long)
        for j in range(len(block) + 1):
            target_probs[row, j] = p[block[:j]]
        for j in range(len(block)):
            draft_probs[row, j] = q[block[:j]]
    draft_probs = None if mode == "greedy" else draft_probs

    weights, stop_probs = rejection._block_stop_probs(draft_tokens, draft_probs, target_probs, num_drafts)
    rows = torch.arange(len(blocks))
    next_laws = []
    for t in range(K + 1):
        num_accepted = num_drafts.clamp(max=t)
        probs = rejection._next_token_probs(
            num_accepted, num_drafts, draft_tokens, draft_probs, target_probs, weights[rows, num_accepted]
        ).double()
        next_laws.append(probs / probs.sum(-1, keepdim=True))
    stop_probs = torch.cat([torch.ones(len(blocks), 1), stop_probs], dim=1).double()
    table = {}
    for row, block in enumerate(blocks):
        h = stop_probs[row]  # with the padding's, which must be 0
        table[block] = [(float(h[t] * (1 - h[t + 1 :]).prod()), next_laws[t][row]) for t in range(len(block) + 1)]
    return table


@pytest.mark.parametrize("num_drafts", range(K + 1))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", REJECTION_SAMPLE_METHODS)
def test_reference_output_completes_to_the_target_law(method, mode, num_drafts):
    p, q = random_trees(seed=num_drafts, mode=mode)
    law = output_law(q, num_drafts, lambda block: reference_outcomes(block, p, q, method))
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(completed_law(law, p), target_law(p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_block_verification_output_completes_to_the_target_law(mode, seed):
    p, q = random_trees(seed, mode)
    table = implementation_outcomes(p, q, mode)
    for num_drafts in range(K + 1):
        law = output_law(q, num_drafts, table.__getitem__)
        torch.testing.assert_close(completed_law(law, p), target_law(p), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_block_verification_matches_the_reference(mode):
    # A verifier can be exact and still not be block verification (the standard one is): compare the laws.
    p, q = random_trees(seed=2, mode=mode)
    for block, outcomes in implementation_outcomes(p, q, mode).items():
        for (stop, next_law), (expected_stop, expected_law) in zip(
            outcomes, reference_outcomes(block, p, q, "block"), strict=True
        ):
            assert stop == pytest.approx(expected_stop, abs=1e-6), block
            if expected_stop > 0:
                torch.testing.assert_close(next_law, expected_law, rtol=0, atol=1e-6)


def test_paper_binary_example_accepts_10_over_9_and_11_over_9():
    # Sun et al., Section 3: p = (1/3, 2/3), q = (2/3, 1/3) after every prefix, two drafts.
    p, q = constant_trees([1 / 3, 2 / 3], [2 / 3, 1 / 3], k=2)
    standard = accepted_moment(q, 2, lambda block: reference_outcomes(block, p, q, "standard"))
    block = accepted_moment(q, 2, lambda block: reference_outcomes(block, p, q, "block"))
    assert standard == pytest.approx(10 / 9, abs=1e-12)
    assert block == pytest.approx(11 / 9, abs=1e-12)


@pytest.mark.parametrize(("method", "expected"), [("standard", 10 / 9), ("block", 11 / 9)])
def test_paper_binary_example_acceptance_is_sampled(method, expected):
    p, q = constant_trees([1 / 3, 2 / 3], [2 / 3, 1 / 3], k=2)
    second_moment = accepted_moment(q, 2, lambda block: reference_outcomes(block, p, q, method), order=2)
    rows = 200_000
    generator = torch.Generator().manual_seed(0)
    draft_probs = torch.tensor([2 / 3, 1 / 3]).expand(rows, 2, 2)
    target_probs = torch.tensor([1 / 3, 2 / 3]).expand(rows, 3, 2)
    draft_tokens = sample(draft_probs, generator)
    _, num_accepted = rejection_sample(draft_tokens, draft_probs, target_probs, generator, method=method)
    standard_error = math.sqrt((second_moment - expected**2) / rows)
    assert abs(float(num_accepted.double().mean()) - expected) < 5 * standard_error


@pytest.mark.parametrize("seed", range(4))
def test_block_verification_accepts_at_least_as_many_drafts(seed):
    # With one draft the two methods coincide; with more, block verification may gain (here always at K drafts).
    p, q = random_trees(seed, "probabilistic")
    gains = [
        accepted_moment(q, num_drafts, lambda block: reference_outcomes(block, p, q, "block"))
        - accepted_moment(q, num_drafts, lambda block: reference_outcomes(block, p, q, "standard"))
        for num_drafts in range(1, K + 1)
    ]
    assert gains[0] == pytest.approx(0.0, abs=1e-12)
    assert min(gains) >= -1e-12 and gains[-1] > 1e-3, gains


def test_greedy_drafts_accept_as_many_drafts_with_either_method():
    # With a deterministic draft no exact verifier keeps x_1..x_i more often than p(x_1..x_i), which the standard
    # one reaches: block verification has nothing to gain.
    p, q = random_trees(seed=0, mode="greedy")
    standard = accepted_moment(q, K, lambda block: reference_outcomes(block, p, q, "standard"))
    block = accepted_moment(q, K, lambda block: reference_outcomes(block, p, q, "block"))
    assert block == pytest.approx(standard, abs=1e-12)
